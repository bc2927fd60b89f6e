"""The score stage on the CPU path, with the tiny CLIP the project ships (`curate run` with it:
tests/e2e/test_score_run.py)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.pipeline.models.clip import TINY_CLIP, TINY_CLIP_DIR
from curate.pipeline.config import ClipConfig
from curate.pipeline.embeddings import HIST_BINS, histogram, merge_histograms, read_scores, threshold_for_top_fraction
from curate.pipeline.layout import embedding_files
from curate.pipeline.stages.score import score_shard
from curate.pipeline.shards import sample_key
from conftest import raw_shard

pytestmark = pytest.mark.skipif(not (TINY_CLIP_DIR / "open_clip_config.json").exists(), reason="tiny CLIP not built")

CLIP = ClipConfig(enabled=True, model=TINY_CLIP, pretrained=None, device="cpu", batch_size=16)


def test_top_fraction_threshold_matches_the_quantile():
    rng = np.random.default_rng(0)
    scores = [rng.normal(0.2, 0.1, 5000).clip(-1, 1) for _ in range(4)]
    merged = merge_histograms([histogram(s) for s in scores])
    assert merged.sum() == 20000 and len(merged) == HIST_BINS
    everything = np.concatenate(scores)
    for fraction in (0.1, 0.3, 0.9):
        t = threshold_for_top_fraction(merged, fraction)
        kept = (everything >= t).mean()
        assert abs(kept - fraction) < 0.002, (fraction, t, kept)


def test_score_shard_writes_row_aligned_embeddings_and_separates_captions(tmp_path):
    download = tmp_path / "download"
    download.mkdir()
    truth = raw_shard(download / "00000.tar", 40, seed=123, corrupt={5})
    stats = score_shard(0, {}, str(download), str(tmp_path / "emb"), str(tmp_path / "markers"), CLIP)

    out = embedding_files(tmp_path / "emb", 0)
    img, txt = np.load(out["img_emb"]), np.load(out["text_emb"])
    meta = pq.read_table(out["metadata"]).to_pylist()
    assert img.dtype == np.float16 and img.shape == txt.shape and img.shape[0] == 40 == len(meta)
    assert [m["key"] for m in meta] == [sample_key(0, i, 40) for i in range(40)]
    assert stats["scored"] == 39 and stats["decode_errors"] == 1
    assert 0 < stats["embed_seconds"] <= stats["seconds"]  # embedding, then writing the files
    assert 0 <= stats["ready_seconds"] <= stats["embed_seconds"]  # the model loaded, then the batches
    assert meta[5]["reason"] == "decode_error" and meta[5]["clip_similarity"] is None

    # The saved similarity is the cosine of the saved (normalized) embeddings.
    ok = [i for i in range(40) if i != 5]
    cos = (img[ok].astype(np.float32) * txt[ok].astype(np.float32)).sum(1)
    saved = np.array([meta[i]["clip_similarity"] for i in ok])
    assert np.abs(cos - saved).max() < 5e-3
    assert np.allclose(np.linalg.norm(img[ok].astype(np.float32), axis=1), 1, atol=5e-3)

    # Meaning: right captions score higher than wrong ones.
    right = [meta[i]["clip_similarity"] for i in ok if truth[i]]
    wrong = [meta[i]["clip_similarity"] for i in ok if not truth[i]]
    assert np.mean(right) > np.mean(wrong) + 0.1

    # Done shards are not redone.
    before = os.stat(out["img_emb"]).st_mtime_ns
    again = score_shard(0, {}, str(download), str(tmp_path / "emb"), str(tmp_path / "markers"), CLIP)
    assert again == stats and os.stat(out["img_emb"]).st_mtime_ns == before
    assert read_scores(tmp_path / "emb", 0)[sample_key(0, 0, 40)][0] == pytest.approx(meta[0]["clip_similarity"])


def test_a_shard_without_images_saves_empty_embeddings_of_the_models_width(tmp_path):
    """Index builders concatenate every shard's arrays: an empty one must have the model's width."""
    download = tmp_path / "download"
    download.mkdir()
    raw_shard(download / "00000.tar", 1, seed=1)
    raw_shard(download / "00001.tar", 0, seed=1)
    for shard in (0, 1):
        score_shard(shard, {}, str(download), str(tmp_path / "emb"), str(tmp_path / "markers"), CLIP)
    full, empty = (np.load(embedding_files(tmp_path / "emb", s)["img_emb"]) for s in (0, 1))
    assert empty.shape == (0, full.shape[1]) and np.concatenate([full, empty]).shape == full.shape


def _encoded(fmt: str, color, size=(24, 16)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def decode_jpeg_calls(monkeypatch) -> list:
    """The images in each call of torchvision's decode_jpeg (which still decodes), as they come."""
    import torchvision.io

    calls = []
    real = torchvision.io.decode_jpeg

    def counted(data, *args, **kwargs):
        calls.append(len(data) if isinstance(data, list) else 1)
        return real(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", counted)
    return calls


def test_decode_batch_keeps_other_formats_out_of_the_jpeg_batch(decode_jpeg_calls):
    # The GPU path's decoding, run on the CPU device: a PNG and a WebP among JPEGs are decoded on
    # the CPU and the JPEGs in ONE batched decode_jpeg call (a mixed batch made that call fail, and
    # then every JPEG was decoded alone); garbage gets an error; the order is kept.
    from curate.pipeline.stages.score import decode_batch

    calls = decode_jpeg_calls
    jpg_a, jpg_b = _encoded("JPEG", (200, 10, 10)), _encoded("JPEG", (10, 200, 10), (8, 30))
    png, webp = _encoded("PNG", (1, 2, 250)), _encoded("WEBP", (90, 90, 90))
    view = np.frombuffer(bytearray(jpg_b), dtype=np.uint8)  # the ReaderPool hands views of the mapped tar
    images, errors = decode_batch([jpg_a, png, b"not an image", view, webp], "cpu")
    assert calls == [2]
    assert errors[:2] == [None, None] and errors[3:] == [None, None] and errors[2].startswith("UnidentifiedImageError")
    assert images[2] is None
    assert [tuple(im.shape) for i, im in enumerate(images) if i != 2] == [(3, 16, 24), (3, 16, 24), (3, 30, 8), (3, 16, 24)]
    assert images[1][:, 0, 0].tolist() == [1, 2, 250]  # PNG: lossless, exact
    assert abs(int(images[0][0, 8, 12]) - 200) <= 3 and abs(int(images[3][1, 15, 4]) - 200) <= 3


def test_decode_batch_tries_each_jpeg_alone_when_the_batch_fails():
    # A cut JPEG (it has the JPEG magic) makes the batched call fail: the others still decode.
    from curate.pipeline.stages.score import decode_batch

    good = _encoded("JPEG", (30, 60, 90))
    images, errors = decode_batch([good, good[: len(good) // 3], good], "cpu")
    assert errors[0] is None and errors[2] is None and errors[1] is not None
    assert images[1] is None and tuple(images[0].shape) == tuple(images[2].shape) == (3, 16, 24)


def _reencoded(jpg: bytes, **save) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpg)).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def test_is_progressive_reads_the_frame_marker():
    import io
    import random

    from PIL import Image

    from curate.pipeline.demo.synthetic import photo_like_jpeg
    from curate.pipeline.stages.score import is_progressive

    baseline = photo_like_jpeg(300, 200, random.Random(3), quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    grey = io.BytesIO()
    Image.open(io.BytesIO(baseline)).convert("L").save(grey, "JPEG")
    not_progressive = [baseline, _reencoded(baseline, quality=80, optimize=True), grey.getvalue(),
                       _reencoded(baseline, quality=90, exif=exif.tobytes(), icc_profile=b"\xff\xc2" * 3000)]
    progressive = [_reencoded(baseline, quality=90, progressive=True),
                   _reencoded(baseline, quality=90, progressive=True, exif=exif.tobytes(), icc_profile=b"x" * 70_000)]
    assert [is_progressive(j) for j in not_progressive] == [False] * 4
    assert [is_progressive(j) for j in progressive] == [True, True]
    assert is_progressive(progressive[0][:2] + b"\xff\xff" + progressive[0][2:])  # fill bytes before a marker
    assert is_progressive(np.frombuffer(bytearray(progressive[0]), dtype=np.uint8))  # a view of a mapped tar
    # Cut or malformed headers are "not progressive" (the decoders judge them), never an error.
    for cut in (b"\xff\xd8\xff", progressive[0][:20], b"\xff\xd8\xff\xe0\xff\xff\xff", b"\xff\xd8" + b"\x00" * 50):
        assert is_progressive(cut) is False


def test_progressive_jpegs_are_decoded_on_the_cpu_beside_the_batch(decode_jpeg_calls):
    # On a GPU, progressive JPEGs stay out of nvJPEG's batched call (its hardware engines take baseline
    # ones only, and the rest are decoded one at a time): here forced on the CPU device.
    import random

    from curate.pipeline.demo.synthetic import photo_like_jpeg
    from curate.pipeline.stages.score import decode_batch

    calls = decode_jpeg_calls
    rng = random.Random(5)
    baseline = [photo_like_jpeg(64 + 8 * i, 48, rng, quality=90) for i in range(4)]
    progressive = [_reencoded(j, quality=95, progressive=True) for j in baseline[:3]]
    batch = [baseline[0], progressive[0], baseline[1], progressive[1], progressive[2], baseline[2], baseline[3]]
    images, errors = decode_batch(batch, "cpu", progressive_on_cpu=True)
    assert calls == [4] and errors == [None] * 7
    assert [tuple(im.shape) for im in images] == [(3, 48, 64), (3, 48, 64), (3, 48, 72), (3, 48, 72), (3, 48, 80),
                                                  (3, 48, 80), (3, 48, 88)]
    for a, b in ((0, 1), (2, 3)):  # a progressive image has its baseline twin's pixels
        assert (images[a].float() - images[b].float()).abs().mean() < 2.0
    calls.clear()
    decode_batch(batch, "cpu")  # on the CPU device nvJPEG is not involved: all JPEGs in one call
    assert calls == [7]


def test_images_decoded_on_the_cpu_are_decoded_in_order_by_the_pool_within_the_pixel_budget(monkeypatch):
    # Other formats (and, on a GPU, progressive JPEGs) are decoded by a pool of threads, each image
    # within the process's pixel budget, as the download stage decodes; more images than the pool's
    # window of 2 x CPU_DECODE_THREADS, so that results are taken while others are decoded.
    import threading

    from curate.pipeline import image
    from curate.pipeline.stages import score

    held_by = []

    class Recording(image.PixelBudget):
        def hold(self, pixels: int):
            held_by.append(threading.current_thread().name)
            return super().hold(pixels)

    budget = Recording(2 * 64 * 48)
    monkeypatch.setattr(score, "DECODE_BUDGET", budget)
    n = 2 * score.CPU_DECODE_THREADS + 5
    pngs = [_encoded("PNG", (i, 2, 3), (64, 48)) for i in range(n)]
    images, errors = score.decode_batch(pngs[:5] + [b"\x89PNG broken"] + pngs[5:], "cpu")
    assert errors[5].startswith("UnidentifiedImageError") and errors[:5] + errors[6:] == [None] * n
    assert [im[:, 0, 0].tolist() for i, im in enumerate(images) if i != 5] == [[i, 2, 3] for i in range(n)]
    assert len(held_by) == n and all(name.startswith("cpu-decode") for name in held_by)
    assert budget.in_use == 0


def test_gpu_preprocess_of_images_of_many_sizes_keeps_each_image_in_its_row():
    """The GPU path's crop-resize-normalize over a batch whose images come in several sizes (an input
    tar's), in the batch's order: each row as if that image were preprocessed alone."""
    import torch
    import torch.nn.functional as F

    from curate.pipeline.models.clip import TINY_CLIP, load_clip
    from curate.pipeline.stages.score import gpu_preprocess

    clip = load_clip(TINY_CLIP, None, "cpu", "fp32")
    size = clip.image_size
    gen = torch.Generator().manual_seed(0)
    shapes = [(40, 50), (size, size), (40, 50), (64, 33), (size, size + 7), (64, 33), (31, 31)]
    images = [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in shapes]
    cfg = clip.model.visual.preprocess_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)

    def alone(im, squash):
        _, h, w = im.shape
        if not squash:
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            im = im[:, top:top + side, left:left + side]
        x = im[None].float()
        if x.shape[2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        return (x.clamp(0, 255) / 255.0 - mean) / std

    try:
        for mode in ("shortest", "squash"):  # open_clip's default, and the tiny model's own
            clip.model.visual.preprocess_cfg = {**cfg, "resize_mode": mode}
            expected = torch.cat([alone(im, mode == "squash") for im in images])
            got = gpu_preprocess(images, clip)
            assert got.shape == (len(images), 3, size, size)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(gpu_preprocess(images[1:2], clip), expected[1:2], atol=1e-5, rtol=1e-5)
    finally:
        clip.model.visual.preprocess_cfg = cfg
