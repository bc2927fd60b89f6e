"""The towers at fixed shapes (pipeline/clip_graphs.py): padding to static buffers changes no
result. The padding is checked on the CPU; the CUDA graph capture and replay, on a GPU
(run through the device tool; skipped where there is none)."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch

from pipeline.clip_graphs import GraphedClip, text_lengths
from pipeline.clip_model import TINY_CLIP, TINY_CLIP_DIR, load_clip
from pipeline.synthetic import caption, random_scene, render

pytestmark = pytest.mark.skipif(not (TINY_CLIP_DIR / "open_clip_config.json").exists(), reason="tiny CLIP not built")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _captions(n: int, seed: int, long: bool) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = caption(random_scene(rng))
        out.append(f"{text} and {text} again" if long else " ".join(text.split()[:5]))
    return out


def _inputs(clip, n: int, seed: int, long: bool):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn((n, 3, clip.image_size, clip.image_size), generator=g).clamp_(-2, 2)
    tokens = clip.prepare_tokens(clip.tokenizer(_captions(n, seed, long)))
    return pixels.to(clip.device, clip.dtype), tokens.to(clip.device)


def test_text_lengths():
    assert text_lengths(77, trimmed=True) == [16, 32, 48, 64, 77]
    assert text_lengths(32, trimmed=True) == [16, 32]
    assert text_lengths(77, trimmed=False) == [77]


def test_padded_towers_equal_the_model_on_cpu():
    clip = load_clip(TINY_CLIP, None, "cpu", "fp32")
    graphed = GraphedClip(clip, batch_size=16, capture=False)
    assert graphed.lengths == [16, 32]
    with torch.inference_mode():
        # A full batch of long captions first, then a shorter batch with shorter captions: the
        # static buffers then hold stale rows and stale tokens past the new captions' end.
        for n, seed, long in ((16, 1, True), (11, 2, False), (8, 3, True)):
            pixels, tokens = _inputs(clip, n, seed, long)
            assert graphed.fits(n)
            assert torch.allclose(graphed.encode_image(pixels), clip.encode_image(pixels), atol=1e-5)
            assert torch.allclose(graphed.encode_text(tokens), clip.encode_text(tokens), atol=1e-5)
        short = _inputs(clip, 11, 2, False)[1]
        assert short.shape[1] <= 16 < _inputs(clip, 16, 1, True)[1].shape[1]  # both lengths were used
        # Fewer than half a batch, or more than a batch: eager, unpadded, same result.
        for n in (3, 20):
            pixels, tokens = _inputs(clip, n, 4, False)
            assert not graphed.fits(n)
            assert torch.allclose(graphed.encode_image(pixels), clip.encode_image(pixels), atol=1e-5)
            assert torch.allclose(graphed.encode_text(tokens), clip.encode_text(tokens), atol=1e-5)


@needs_cuda
def test_cuda_graphs_replay_what_the_model_computes():
    clip = load_clip(TINY_CLIP, None, "cuda", "bf16")
    graphed = GraphedClip(clip, batch_size=64)
    assert graphed._image.graph is not None and all(t.graph is not None for t in graphed._text.values())
    with torch.inference_mode():
        kept = []
        for n, seed, long in ((64, 1, True), (40, 2, False), (33, 3, True)):
            pixels, tokens = _inputs(clip, n, seed, long)
            image, text = graphed.encode_image(pixels), graphed.encode_text(tokens)
            kept.append((image, text, clip.encode_image(pixels), clip.encode_text(tokens)))
        # Outputs are copies: later replays (which reuse the graphs' memory) leave them alone.
        for image, text, eager_image, eager_text in kept:
            assert (image.float() - eager_image.float()).abs().max() < 0.02
            assert (text.float() - eager_text.float()).abs().max() < 0.02
            sims = (image.float() * text.float()).sum(1)
            eager_sims = (eager_image.float() * eager_text.float()).sum(1)
            assert (sims - eager_sims).abs().max() < 0.01


@needs_cuda
def test_score_shard_with_and_without_cuda_graphs(tmp_path):
    from pipeline.config import ClipConfig
    from pipeline.score import read_scores, score_shard
    from pipeline.shards import sample_key
    from pipeline.tarshard import TarShardWriter

    rng = random.Random(7)
    download = tmp_path / "download"
    download.mkdir()
    with TarShardWriter(download / "00000.tar") as tar:
        for i in range(150):  # batches of 64, 64 and 22: the last one runs eagerly
            scene = random_scene(rng)
            buf = io.BytesIO()
            render(scene, rng.randint(64, 160), rng.randint(64, 160), rng).save(buf, "JPEG", quality=90)
            jpg = b"broken" if i == 70 else buf.getvalue()
            tar.write(sample_key(0, i), {"jpg": jpg, "json": json.dumps({"caption": caption(scene)}).encode()})
    scores = {}
    for graphs in (True, False):
        cfg = ClipConfig(enabled=True, model=TINY_CLIP, pretrained=None, device="cuda", batch_size=64,
                         cuda_graphs=graphs)
        out = tmp_path / f"graphs-{graphs}"
        stats = score_shard(0, {}, str(download), str(out / "emb"), str(out / "markers"), cfg)
        assert stats["scored"] == 149 and stats["decode_errors"] == 1
        scores[graphs] = read_scores(out / "emb", 0)
    assert scores[True].keys() == scores[False].keys()
    assert scores[True][sample_key(0, 70)][2] == "decode_error"
    diffs = [abs(a[0] - scores[False][k][0]) for k, a in scores[True].items() if a[0] is not None]
    assert len(diffs) == 149 and max(diffs) < 0.01
    assert np.mean([s[0] for s in scores[True].values() if s[0] is not None]) > 0  # right captions score positive
