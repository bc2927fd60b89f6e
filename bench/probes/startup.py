"""Probe: what a fresh scoring process spends before its first batch is scored, step by step.

In `curate run` over existing shards on an H200 (bench/shards_e2e.py), the first two score tasks
waited ~12.8 s for the GPU worker's model (`ready_seconds`), and took ~20 s against ~3 s for the
later ones. This probe times, in a fresh interpreter (run it once per model, nothing else on the
machine unless --helpers): import torch; import open_clip; CUDA's first context; the model built
and moved to the GPU; the first and second batch of each part (nvJPEG decode, GPU preprocessing,
both towers), on shards_e2e-like JPEGs.

    python bench/probes/startup.py [--model ViT-B-32] [--batch 1024] [--helpers 0]

--helpers N starts N decoding helpers (pipeline/decode_helpers.py) first, as the score stage does,
to see what their start costs the scoring process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

_last = [STARTED]


def step(name: str) -> None:
    now = time.perf_counter()
    print(f"{now - STARTED:7.2f} s  (+{now - _last[0]:6.2f})  {name}", flush=True)
    _last[0] = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--helpers", type=int, default=0)
    args = parser.parse_args()
    pool = None
    if args.helpers:
        from curate.pipeline.decode_helpers import DecodePool

        pool = DecodePool(args.helpers)
        pool.start()
        step(f"{args.helpers} decoding helpers started (processes spawned)")
    import torch

    step("import torch")
    import torchvision  # noqa: F401

    step("import torchvision")
    import open_clip  # noqa: F401

    step("import open_clip")
    from curate.pipeline.stages import score

    step("import curate's score stage")
    torch.cuda.init()
    torch.empty(1, device="cuda")
    step("CUDA context (first tensor on the GPU)")
    cfg = score.ClipConfig(enabled=True, model=args.model, pretrained=None, device="cuda", batch_size=args.batch)
    scorer = score.ClipScorer(cfg)
    scorer.clip
    torch.cuda.synchronize()
    step(f"{args.model} built (random weights) and on the GPU")

    import io
    import random

    from PIL import Image

    rng = random.Random(0)
    jpgs = []
    for _ in range(64):
        w, h = rng.randint(256, 512), rng.randint(256, 512)
        buf = io.BytesIO()
        Image.effect_noise((w, h), 40).convert("RGB").save(buf, "JPEG", quality=90)
        jpgs.append(buf.getvalue())
    jpgs = [jpgs[i % 64] for i in range(args.batch)]
    step(f"{args.batch} JPEGs made (64 unique, 256-512 px)")
    clip = scorer.clip
    tokens = clip.prepare_tokens(clip.tokenizer(["a photo of a small red house by a lake"] * args.batch)).cuda()
    with torch.inference_mode():
        for round_ in (1, 2):
            images, errors = score.decode_batch(jpgs, "cuda")
            torch.cuda.synchronize()
            step(f"nvJPEG decode, batch {round_}")
            pixels = score.gpu_preprocess(images, clip).to(clip.dtype)
            torch.cuda.synchronize()
            step(f"GPU preprocessing, batch {round_}")
            clip.encode_image(pixels)
            torch.cuda.synchronize()
            step(f"image tower, batch {round_}")
            clip.encode_text(tokens)
            torch.cuda.synchronize()
            step(f"text tower, batch {round_}")
    if pool is not None:
        pool.close()


if __name__ == "__main__":
    main()
