"""Decoding helpers (pipeline/decode_helpers.py): real helper processes decoding the ends of offered
batches, what they compute against the GPU path's preprocessing, and the score stage's embeddings with
and without them (on the CPU device, with the tiny CLIP the project ships)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

from curate.pipeline.config import ClipConfig
from curate.pipeline.decode_helpers import CHUNK, DecodePool, decode_for_clip
from curate.pipeline.models.clip import TINY_CLIP, TINY_CLIP_DIR
from conftest import raw_shard

pytestmark = pytest.mark.skipif(not (TINY_CLIP_DIR / "open_clip_config.json").exists(), reason="tiny CLIP not built")


def _jpegs(n: int, seed: int, corrupt=()) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = rng.integers(20, 90, size=2)
        # Smooth gradients plus noise: JPEG-like content, not flat colour.
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (h + w)], axis=-1)
        pixels = np.clip(base + rng.integers(-20, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        out.append(b"garbage, not an image" if i in corrupt else buffer.getvalue())
    return out


@pytest.fixture(scope="module")
def pool():
    pool = DecodePool(2)
    pool.start()
    yield pool
    pool.close()


def _wait_until_all_claimed(share, numbers, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with share._cond:
            if all(share._offers[n].helpers_from == 0 for n in numbers):
                return
        time.sleep(0.01)
    raise AssertionError("the helpers did not take the offered batches")


@pytest.mark.parametrize("squash", [False, True])
def test_decode_for_clip_gives_the_gpu_paths_pixels(squash):
    """The helpers' pixels are the GPU path's preprocessing (crop, antialiased bicubic resize), rounded."""
    import torch

    from curate.pipeline.models.clip import load_clip
    from curate.pipeline.stages.score import decode_batch, gpu_preprocess, normalize_pixels

    clip = load_clip(TINY_CLIP, None, "cpu", "fp32")
    cfg = clip.model.visual.preprocess_cfg
    size = clip.image_size
    from PIL import Image

    png = io.BytesIO()
    Image.open(io.BytesIO(_jpegs(1, seed=2)[0])).save(png, "PNG")  # other formats: decoded by Pillow
    jpgs = _jpegs(12, seed=1) + [png.getvalue()]
    try:
        clip.model.visual.preprocess_cfg = {**cfg, "resize_mode": "squash" if squash else "shortest"}
        images, errors = decode_batch(jpgs, "cpu")
        assert errors == [None] * 13
        expected = gpu_preprocess(images, clip)
        helped = np.stack([decode_for_clip(j, size, squash) for j in jpgs])
        assert helped.shape == (13, size, size, 3) and helped.dtype == np.uint8
        got = normalize_pixels(torch.from_numpy(helped).permute(0, 3, 1, 2).float(), clip)
    finally:
        clip.model.visual.preprocess_cfg = cfg
    # In 0..255 units: the rounding to uint8, and the uint8 resize's fixed-point weights.
    diff = ((got - expected) * torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255).abs()
    assert diff.max() <= 4.0 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_helpers_decode_offered_batches_from_their_ends(pool):
    size = 24
    batches = [_jpegs(70, seed=s, corrupt={65} if s == 1 else ()) for s in range(3)]
    with pool.share(size, squash=False, pinned=False) as share:
        for number, jpgs in enumerate(batches):
            share.offer(number, jpgs)
        _wait_until_all_claimed(share, range(3))
        for number, jpgs in enumerate(batches):
            assert share.take(number) == 0  # nothing left for the preparing thread
            helped = share.helped(number)
            # Chunks of CHUNK images from the end, back in order, covering the batch once.
            assert [(s, e) for s, e, _, _ in helped] == [(0, 6), (6, 38), (38, 70)] == \
                [(max(0, e - CHUNK), e) for e in (6, 38, 70)]
            errors = [err for _, _, _, errs in helped for err in errs]
            pixels = np.concatenate([p.numpy() for _, _, p, _ in helped])
            bad = [i for i, e in enumerate(errors) if e is not None]
            assert bad == ([65] if number == 1 else [])
            if bad:
                assert errors[65].startswith("UnidentifiedImageError")
            good = [j for i, j in enumerate(jpgs) if i not in bad]
            assert pixels.shape == (len(good), size, size, 3)
            assert np.array_equal(pixels, np.stack([decode_for_clip(j, size, False) for j in good]))
        assert share.helped_images == 210


def test_what_the_preparing_thread_takes_and_the_helpers_did_cover_each_batch_once(pool):
    with pool.share(16, squash=True, pinned=False) as share:
        for round_ in range(5):  # taken at once, mid-way, late: whatever the helpers got to
            jpgs = _jpegs(100, seed=10 + round_)
            share.offer(round_, jpgs)
            time.sleep(0.05 * round_)
            here = share.take(round_)
            spans = [(s, e) for s, e, _, _ in share.helped(round_)]
            covered = [(0, here)] + spans if here else spans
            assert covered[0][0] == 0 and covered[-1][1] == 100
            assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


def _scores(scorer, tar, pool=None, counts=None, pause=0.0):
    from curate.pipeline.score_reader import read_batches

    def batches():
        for batch in read_batches(tar, 8, scorer.clip.tokenizer):
            time.sleep(pause)  # a reader slower than the model: the helpers get to the offered batches
            yield batch

    sims, errors = [], []
    for _, img, txt, errs in scorer.embed_all(batches(), pool, counts):
        sims.extend((img * txt).sum(axis=1).tolist())
        errors.extend(errs)
    return np.array(sims), errors


def test_scores_with_helpers_are_the_scores_without(tmp_path, pool):
    from curate.pipeline.stages.score import ClipScorer

    tar = tmp_path / "00000.tar"
    raw_shard(tar, 60, seed=5, corrupt={3, 41})
    scorer = ClipScorer(ClipConfig(enabled=True, model=TINY_CLIP, pretrained=None, device="cpu", batch_size=8))
    alone, alone_errors = _scores(scorer, tar)
    counts = {}
    helped, helped_errors = _scores(scorer, tar, pool, counts, pause=0.2)
    assert counts["helper_decoded"] > 0
    assert [e is None for e in helped_errors] == [e is None for e in alone_errors]
    assert [i for i, e in enumerate(helped_errors) if e] == [3, 41]
    ok = [e is None for e in alone_errors]
    assert np.abs(helped[ok] - alone[ok]).max() < 0.01


def test_a_dead_helpers_chunks_are_decoded_by_the_scorer(tmp_path, pool):
    from curate.pipeline.stages.score import ClipScorer

    tar = tmp_path / "00000.tar"
    raw_shard(tar, 40, seed=6, corrupt={9})
    scorer = ClipScorer(ClipConfig(enabled=True, model=TINY_CLIP, pretrained=None, device="cpu", batch_size=8))
    alone, alone_errors = _scores(scorer, tar)
    for helper in list(pool._helpers):
        helper.kill()
        helper.wait()
    counts = {}
    again, errors = _scores(scorer, tar, pool, counts, pause=0.1)
    assert counts["helper_decoded"] == 0
    assert [i for i, e in enumerate(errors) if e] == [9] and len(errors) == 40
    ok = [e is None for e in alone_errors]
    assert np.abs(again[ok] - alone[ok]).max() < 1e-5  # the same decoder, in this process
    pool.start()  # the next shard's start brings them back
    assert len(pool._helpers) == 2 and all(h.poll() is None for h in pool._helpers)


def test_decode_processes_must_not_be_negative():
    with pytest.raises(ValueError, match="decode_processes"):
        ClipConfig(decode_processes=-1)
