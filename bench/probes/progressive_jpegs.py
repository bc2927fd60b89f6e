"""Probe: batches with progressive JPEGs in them, on the GPU path.

nvJPEG's hardware engines (A100, H100, H200) take baseline JPEGs only; torchvision's batched
`decode_jpeg(device="cuda")` decodes the rest one at a time in software, each with a host-to-device
copy and a stream synchronization (bench/probes/nvjpeg_path.py: 637-933 progressive images/s against
23,000-36,000 baseline). `score.decode_batch` now keeps progressive JPEGs out of the batched call and
decodes them with Pillow in CPU_DECODE_THREADS threads beside it. On bench/shards_e2e.py's images,
a share of them re-encoded progressive (same quality), in batches of 1,024, this measures:
- decode rate: all JPEGs in one torchvision batched call (what decode_batch did before) against
  decode_batch, at 0%, 10% and 30% progressive;
- the score stage (`ClipScorer.embed_all`, ViT-B-32, one task) at 0% and 10%.

    python bench/probes/progressive_jpegs.py [--images 20480]
    python bench/probes/progressive_jpegs.py --cost --images 40960   # the check's cost: the stage on
        # baseline JPEGs only, with is_progressive and with it replaced by "no", 1 and 2 tasks
    python bench/probes/progressive_jpegs.py --quick   # CPU dry run: tiny CLIP, the CPU device
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.probes.serial_vs_threads import scorer_and_batches, timed  # noqa: E402

_JPGS: list = []


def _progressive(index: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(_JPGS[index])).save(buffer, "JPEG", quality=92, progressive=True)
    return buffer.getvalue()


def with_share(batches: list, share: float) -> list:
    """Copies of the batches in which every image whose index i satisfies (i * share) crossing an
    integer (an even spread, `share` of them) is re-encoded progressive."""
    from dataclasses import replace

    global _JPGS
    out = []
    for b in batches:
        picks = [i for i in range(len(b.jpgs)) if int((i + 1) * share) > int(i * share)]
        _JPGS = [bytes(b.jpgs[i]) for i in picks]
        with Pool(os.cpu_count() or 1) as pool:
            redone = dict(zip(picks, pool.map(_progressive, range(len(picks)))))
        out.append(replace(b, jpgs=[redone.get(i, b.jpgs[i]) for i in range(len(b.jpgs))]))
    return out


def decode_rate(fn, batches: list, seconds: float) -> float:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn(batches[0])
    sync()
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        n += len(fn(batches[n // len(batches[0].jpgs) % len(batches)]))
    sync()
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_480)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cost", action="store_true", help="only the stage with and without the check")
    args = parser.parse_args()
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from curate.pipeline.stages.score import decode_batch, is_progressive

    scorer, batches = scorer_and_batches(args.quick, 640 if args.quick else args.images, 64 if args.quick else 1024)
    device = scorer.cfg.device

    def all_batched(b):  # the previous decode_batch: every JPEG in torchvision's one batched call
        return decode_jpeg([torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in b.jpgs],
                           mode=ImageReadMode.RGB, device=device)

    def now(b):
        return decode_batch(b.jpgs, device, progressive_on_cpu=True)[0]

    if args.cost:
        from curate.pipeline.stages import score

        timed("stage", scorer, batches[:2], 1)
        for at_once in (1, 2):
            for check in (True, False, False, True):
                score.is_progressive = is_progressive if check else (lambda jpg: False)
                print(f"stage, baseline JPEGs only, {at_once} at once, check {'on ' if check else 'off'}: "
                      f"{timed('stage', scorer, batches, at_once):9,.0f} images/s", flush=True)
        return
    shares = {share: with_share(batches[:4], share) for share in (0.0, 0.1, 0.3)}
    for share, held in shares.items():
        found = sum(is_progressive(j) for b in held for j in b.jpgs) / sum(len(b.jpgs) for b in held)
        print(f"{share:4.0%} progressive (found {found:.1%}): one batched call "
              f"{decode_rate(all_batched, held, args.seconds):9,.0f} images/s; decode_batch "
              f"{decode_rate(now, held, args.seconds):9,.0f} images/s", flush=True)
    ten = with_share(batches, 0.1)
    timed("stage", scorer, batches[:2], 1)
    for label, held in (("0%", batches), ("10%", ten), ("0%", batches), ("10%", ten)):
        print(f"stage, {label:3s} progressive, 1 task: {timed('stage', scorer, held, 1):9,.0f} images/s", flush=True)


if __name__ == "__main__":
    main()
