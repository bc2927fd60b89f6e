"""Decoding helpers (pipeline/decode_helpers.py): real helper processes decoding the ends of offered
batches, what they compute against the GPU path's preprocessing, and the score stage's embeddings with
and without them (on the CPU device, with the tiny CLIP the project ships)."""

from __future__ import annotations

import contextlib
import io
import os
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
    with pool.share(size, squash=False) as share:
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
    with pool.share(16, squash=True) as share:
        for round_ in range(5):  # taken at once, mid-way, late: whatever the helpers got to
            jpgs = _jpegs(100, seed=10 + round_)
            share.offer(round_, jpgs)
            time.sleep(0.05 * round_)
            here = share.take(round_)
            spans = [(s, e) for s, e, _, _ in share.helped(round_)]
            covered = [(0, here)] + spans if here else spans
            assert covered[0][0] == 0 and covered[-1][1] == 100
            assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


@pytest.mark.parametrize("into", [False, True])
def test_frames_carry_empty_arrays_of_any_shape(into):
    """A helper answers a chunk whose images all failed with pixels of shape (0, size, size, 3)."""
    from curate.pipeline import frames

    buffer = io.BytesIO()
    arrays = (np.zeros((0, 16, 16, 3), np.uint8), np.arange(6, dtype=np.int64).reshape(2, 3))
    frames.send(buffer, {"kind": "pixels"}, arrays)
    buffer.seek(0)
    header, got = frames.receive(buffer, into=(lambda dtype, shape: np.empty(shape, dtype)) if into else None)
    assert header == {"kind": "pixels"}
    assert [a.shape for a in got] == [(0, 16, 16, 3), (2, 3)] and np.array_equal(got[1], arrays[1])


def test_a_chunk_of_images_that_all_fail_comes_back_as_their_errors(pool):
    jpgs = _jpegs(CHUNK + 1, seed=20, corrupt={0})  # chunks [1, 33) and [0, 1): the second all corrupt
    with pool.share(16, squash=False) as share:
        share.offer(0, jpgs)
        _wait_until_all_claimed(share, [0])
        assert share.take(0) == 0
        (s0, e0, p0, errors0), (s1, e1, p1, errors1) = share.helped(0)
    assert (s0, e0, s1, e1) == (0, 1, 1, CHUNK + 1)
    assert tuple(p0.shape) == (0, 16, 16, 3) and errors0[0].startswith("UnidentifiedImageError")
    assert tuple(p1.shape) == (CHUNK, 16, 16, 3) and errors1 == [None] * CHUNK
    assert len(pool._helpers) == 2 and all(h.poll() is None for h in pool._helpers)  # no helper lost


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


def test_one_lost_helper_is_replaced_at_the_next_start(pool):
    lost = pool._helpers[0]
    lost.kill()
    lost.wait()
    with pool.share(16, squash=False) as share:
        number = 0
        deadline = time.time() + 60
        while lost in pool._helpers and time.time() < deadline:  # until its thread has met the dead pipe
            share.offer(number, _jpegs(2 * CHUNK, seed=30))
            time.sleep(0.05)
            share.take(number)
            spans = [(s, e) for s, e, _, _ in share.helped(number)]
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            number += 1
    assert lost not in pool._helpers and len(pool._helpers) == 1
    pool.start()
    assert len(pool._helpers) == 2 and all(h.poll() is None for h in pool._helpers)


def test_a_helper_that_stops_answering_is_killed_and_its_chunk_given_back(pool, monkeypatch):
    import signal

    from curate.pipeline import decode_helpers

    with pool.share(16, squash=False) as share:  # both helpers past their imports (seconds) first
        share.offer(0, _jpegs(4 * CHUNK, seed=41))
        _wait_until_all_claimed(share, [0])
        share.take(0)
        share.helped(0)
    monkeypatch.setattr(decode_helpers, "CHUNK_TIMEOUT", 1.0)
    stuck = pool._helpers[0]
    os.kill(stuck.pid, signal.SIGSTOP)  # alive, never answering
    try:
        with pool.share(16, squash=False) as share:
            share.offer(0, _jpegs(2 * CHUNK, seed=40))
            _wait_until_all_claimed(share, [0])
            assert share.take(0) == 0
            started = time.time()
            helped = share.helped(0)
            waited = time.time() - started
    finally:
        with contextlib.suppress(ProcessLookupError):  # (killed and reaped as it should be: no pid left to wake)
            os.kill(stuck.pid, signal.SIGCONT)
    assert 0.9 < waited < 30
    assert sorted(p is None for _, _, p, _ in helped) == [False, True]  # one chunk done, the stuck one given back
    assert stuck.wait(timeout=30) is not None  # killed
    pool.start()
    assert len(pool._helpers) == 2 and all(h.poll() is None for h in pool._helpers)


def test_decode_processes_must_not_be_negative():
    with pytest.raises(ValueError, match="decode_processes"):
        ClipConfig(decode_processes=-1)
