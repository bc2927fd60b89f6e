"""Probe: is the score stage's threading what keeps ViT-B-32 below one thread that decodes and embeds in turn?

On an H200 (BENCHMARKS.md, session 12), one thread doing nvJPEG decode + GPU preprocessing + both towers,
batch after batch, scored 10,732 images/s on bench/shards_e2e.py's images, while the score stage alone
(two tasks, each with PREPARE_THREADS preparing threads on their own CUDA streams) scored 7,665-9,345.
This probe runs both on the same batches held in memory (no tar reading, captions tokenized beforehand),
K tasks at a time in threads, in the order given, so that an order effect shows:

- `stage`: `ClipScorer.embed_all`, as the score stage runs it;
- `serial`: each task's thread decodes, preprocesses and embeds its batches itself, one after the other,
  on the default stream (the GPU runs one batch's model while the thread decodes the next: the launches
  are asynchronous), embeddings copied back at the end.

    python bench/probes/serial_vs_threads.py [--images 40000] [--at-once 1,2] [--order stage,serial,serial,stage]
    python bench/probes/serial_vs_threads.py --quick     # CPU dry run: tiny CLIP
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.shards_e2e import make_shards  # noqa: E402


def load_batches(tars: list[Path], images: int, batch: int, clip) -> list:
    """Batches of whole tars (as the score stage makes them per shard) until `images` are held, tokenized."""
    from curate.pipeline.score_reader import read_batches

    batches, held = [], 0
    for tar in tars:
        for b in read_batches(tar, batch, clip.tokenizer):
            batches.append(b)
            held += len(b.keys)
            if held >= images:
                return batches
    return batches


def scorer_and_batches(quick: bool, images: int, batch: int):
    """The probes' scorer (ViT-B-32 on cuda; quick: the tiny CLIP on the CPU) and `images` of
    shards_e2e's data (made once, then reused) in batches of `batch`, tokenized."""
    from curate.pipeline.config import ClipConfig
    from curate.pipeline.models.clip import TINY_CLIP
    from curate.pipeline.stages.score import ClipScorer

    n, size, unique = (2_000, 500, 200) if quick else (100_000, 10_000, 4_000)  # shards_e2e's data
    tars_dir, _ = make_shards(n, size, unique, os.cpu_count() or 1)
    cfg = ClipConfig(enabled=True, model=TINY_CLIP if quick else "ViT-B-32", pretrained=None,
                     device="cpu" if quick else "cuda", batch_size=batch)
    scorer = ClipScorer(cfg)
    return scorer, load_batches(sorted(tars_dir.glob("*.tar")), images, batch, scorer.clip)


def run_stage(scorer, batches: list) -> int:
    return sum(len(b.keys) for b, *_ in scorer.embed_all(iter(batches)))


def run_serial(scorer, batches: list) -> int:
    import torch

    out = []
    with torch.inference_mode():
        for batch in batches:
            pixels, tokens, errors = scorer._inputs(batch)
            out.append(scorer._forward(pixels, tokens, errors))
        for image, text in out:
            image.float().cpu().numpy(), text.float().cpu().numpy()
    return sum(len(b.keys) for b in batches)


def timed(kind: str, scorer, batches: list, at_once: int) -> float:
    run = run_stage if kind == "stage" else run_serial
    parts = [batches[i::at_once] for i in range(at_once)]  # each task its own batches, as shards are
    started = time.perf_counter()
    with ThreadPoolExecutor(at_once) as pool:
        images = sum(pool.map(lambda part: run(scorer, part), parts))
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="images held in memory (default 40000; quick 600)")
    parser.add_argument("--batch", type=int, default=None, help="default 1024 (quick 64)")
    parser.add_argument("--at-once", default="1,2")
    parser.add_argument("--order", default="stage,serial,serial,stage")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    images = args.images or (600 if args.quick else 40_000)
    batch = args.batch or (64 if args.quick else 1024)
    scorer, batches = scorer_and_batches(args.quick, images, batch)
    timed("serial", scorer, batches[:2], 1)  # warm-up: kernels, nvJPEG, allocator
    timed("stage", scorer, batches[:2], 1)
    print(f"{sum(len(b.keys) for b in batches):,} images in {len(batches)} batches of {batch}, "
          f"{scorer.cfg.model}, {scorer.cfg.device}")
    for at_once in [int(x) for x in args.at_once.split(",")]:
        for kind in args.order.split(","):
            print(f"{kind:7s} {at_once} at once: {timed(kind, scorer, batches, at_once):9,.0f} images/s", flush=True)


if __name__ == "__main__":
    main()
