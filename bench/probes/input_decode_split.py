"""Probe: on existing shards' images (bench/shards_e2e.py's data, 256-512 px), what each part of
scoring costs, to tell how much of the decoding could move to the CPU cores.

Measures, on the first input tar in batches of --batch:
- on the CPU, before CUDA is touched, in P processes: PIL decode alone; PIL decode, center square
  crop and bicubic antialiased resize to 224 (what the GPU path computes); the same with
  Pillow's `reducing_gap` (an integer box reduction first: faster, not the same pixels); what the
  decoding helpers do (pipeline/decode_helpers.py: PIL decode, torch's uint8 resize);
- on the GPU, one thread: torchvision's batched nvJPEG decode; the same plus curate's GPU
  preprocessing; the preprocessing alone on decoded images; the model alone (ViT-B-32, as curate
  runs it); decode + preprocess + model one after the other.

    python bench/probes/input_decode_split.py [--processes 1,4,8,12,15]
    python bench/probes/input_decode_split.py --cpu-only  # the CPU rates only
    python bench/probes/input_decode_split.py --quick     # CPU only, small data
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.shards_e2e import make_shards  # noqa: E402

_JPGS: list = []  # inherited by the forked CPU processes
SIZE = 224


def _decode(jpg: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(jpg))
    im.load()
    return im


def _crop_resize(jpg: bytes, reducing_gap=None):
    import numpy as np
    from PIL import Image

    im = _decode(jpg).convert("RGB")
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return np.asarray(im.resize((SIZE, SIZE), Image.BICUBIC, box=(left, top, left + side, top + side),
                                reducing_gap=reducing_gap))


def _cpu_job(args: tuple) -> int:
    from curate.pipeline.decode_helpers import decode_for_clip

    kind, start, count = args
    if kind.startswith("decode_for_clip"):
        import torch

        torch.set_num_threads(1)  # as a helper runs
    for i in range(start, start + count):
        jpg = _JPGS[i % len(_JPGS)]
        if kind == "decode":
            _decode(jpg)
        elif kind == "decode+crop+resize":
            _crop_resize(jpg)
        elif kind == "decode_for_clip (helpers)":
            decode_for_clip(jpg, SIZE, False)
        else:
            _crop_resize(jpg, reducing_gap=2.0)
    return count


def cpu_rates(processes: list[int], images: int) -> list[tuple[str, int, float]]:
    rows = []
    ctx = multiprocessing.get_context("fork")
    for kind in ("decode", "decode+crop+resize", "crop+resize reducing_gap 2", "decode_for_clip (helpers)"):
        for p in processes:
            per = max(1, images // p)
            with ctx.Pool(p) as pool:
                pool.map(_cpu_job, [(kind, 0, 20)] * p)  # warm
                started = time.perf_counter()
                done = sum(pool.map(_cpu_job, [(kind, i * per, per) for i in range(p)]))
                rate = done / (time.perf_counter() - started)
            rows.append((kind, p, rate))
            print(f"cpu {kind:28s} {p:3d} processes: {rate:9,.0f} images/s", flush=True)
    return rows


def gpu_rates(jpgs: list, batch: int) -> list[tuple[str, float]]:
    from bench.clip_score import clip_cfg, make_captions
    from bench.probes.timing import images_per_second
    from curate.pipeline.stages.score import ClipScorer, decode_batch, gpu_preprocess

    scorer = ClipScorer(clip_cfg("ViT-B-32", "cuda", "bf16", batch))
    clip = scorer.clip
    import numpy as np

    batches = [[np.frombuffer(j, np.uint8).copy() for j in jpgs[i:i + batch]]
               for i in range(0, len(jpgs) - batch + 1, batch)]
    tokens = clip.prepare_tokens(clip.tokenizer(make_captions(batch, seed=1))).cuda()
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(batches)
        return batches[state["i"]]

    decoded = decode_batch(batches[0], "cuda")[0]
    pixels = gpu_preprocess(decoded, clip).to(clip.dtype)
    errors = [None] * batch
    rows = []

    def measure(name, fn):
        rate = images_per_second(fn, batch, 4.0)
        rows.append((name, rate))
        print(f"gpu {name:40s} {rate:9,.0f} images/s", flush=True)

    measure("nvJPEG decode", lambda: decode_batch(nxt(), "cuda"))
    measure("nvJPEG decode + GPU preprocess", lambda: gpu_preprocess(decode_batch(nxt(), "cuda")[0], clip))
    measure("GPU preprocess of decoded images", lambda: gpu_preprocess(decoded, clip))
    measure("model (image + text towers)", lambda: scorer._forward(pixels, tokens, errors))
    measure("decode + preprocess + model, serially",
            lambda: scorer._forward(gpu_preprocess(decode_batch(nxt(), "cuda")[0], clip).to(clip.dtype), tokens, errors))
    return rows


def main() -> None:
    global _JPGS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default=None, help="CPU process counts (default 1,4,8,12,cores-1)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="CPU only, 2,000 images")
    parser.add_argument("--cpu-only", action="store_true", help="the CPU rates only")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    images, shard_size, unique = (2_000, 500, 200) if args.quick else (100_000, 10_000, 4_000)
    tars_dir, info = make_shards(images, shard_size, unique, cores)
    from curate.pipeline.tarshard import iter_tar_samples

    _JPGS = [bytes(fields["jpg"]) for _, fields in iter_tar_samples(tars_dir / "00000.tar")]
    print(f"{len(_JPGS):,} JPEGs from 00000.tar, mean {sum(map(len, _JPGS)) / len(_JPGS) / 1024:.1f} KB; "
          f"{cores} cores", flush=True)
    processes = [int(p) for p in args.processes.split(",")] if args.processes else \
        sorted({1, min(4, cores), min(8, cores), min(12, cores), max(1, cores - 1)})
    cpu_rates(processes, 600 if args.quick else 6_000)
    if not (args.quick or args.cpu_only):
        gpu_rates(_JPGS, args.batch)


if __name__ == "__main__":
    main()
