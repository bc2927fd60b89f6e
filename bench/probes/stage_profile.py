"""Probe: what the GPU does while the score stage runs over existing shards' images (torch.profiler).

The score stage alone (2 tasks) scores ViT-B-32 at 7,665-9,345 images/s on bench/shards_e2e.py's images,
while its parts alone are faster (model 20,197; nvJPEG decode + preprocessing 17,122) and the GPU was
~45% busy by nvidia-smi (BENCHMARKS.md, sessions 11-12). This probe records a CUDA trace of the stage
(`ClipScorer.embed_all`, K tasks in threads, as serial_vs_threads.py runs it) and of one thread per
task decoding and embedding in turn, and reads from each trace:

- the GPU's busy share over the window (the union of all kernels and copies), its idle gaps;
- per CUDA stream: kernel time (the model runs on the default stream, curate's preprocessing on the
  preparing threads' side streams, nvJPEG on streams of its own), and how much of it overlapped;
- the kernels and the CPU-side calls that took the most time (syncs show where threads wait).

The profiler slows the CPU side, so its images/s is lower than unprofiled; the shares are the point.

    python bench/probes/stage_profile.py [--images 16000] [--at-once 2] [--kinds stage,serial] [--trace-dir DIR]
    python bench/probes/stage_profile.py --quick   # CPU dry run: tiny CLIP, CPU activities only
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.probes.serial_vs_threads import scorer_and_batches, timed  # noqa: E402

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def summarize(trace: dict, wall_s: float) -> str:
    """The GPU's side of a chrome trace as text: busy share, gaps, streams, top kernels and CPU calls."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    lines = []
    if not gpu:
        lines.append("no GPU activity in the trace")
    else:
        spans = [(e["ts"], e["ts"] + e["dur"]) for e in gpu]
        first, last = min(s for s, _ in spans), max(e for _, e in spans)
        window = last - first
        busy = _union(spans)
        busy_us = sum(e - s for s, e in busy)
        gaps = [b[0] - a[1] for a, b in zip(busy, busy[1:])]
        long_gaps = [g for g in gaps if g > 500]
        lines.append(f"GPU window {window / 1e3:,.1f} ms (wall {wall_s * 1e3:,.1f} ms): busy {busy_us / window:.1%}; "
                     f"{len(gaps):,} gaps, {len(long_gaps)} over 0.5 ms adding up to {sum(long_gaps) / 1e3:,.1f} ms, "
                     f"longest {max(gaps, default=0) / 1e3:,.2f} ms")
        per_stream: dict = defaultdict(list)
        for e in gpu:
            per_stream[e.get("args", {}).get("stream", "?")].append(e)
        stream_busy = 0.0
        for stream, evs in sorted(per_stream.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
            own = sum(e - s for s, e in _union([(e["ts"], e["ts"] + e["dur"]) for e in evs]))
            stream_busy += own
            names = defaultdict(float)
            for e in evs:
                names[e["name"]] += e["dur"]
            top = max(names, key=names.get)
            lines.append(f"  stream {stream}: {len(evs):6,} kernels/copies, busy {own / 1e3:9,.1f} ms "
                         f"({own / window:.1%}); most: {top[:70]} ({names[top] / 1e3:,.1f} ms)")
        lines.append(f"  overlap between streams: {(stream_busy - busy_us) / 1e3:,.1f} ms "
                     f"({(stream_busy - busy_us) / window:.1%} of the window)")
        kernels = defaultdict(lambda: [0, 0.0])
        for e in gpu:
            kernels[e["name"]][0] += 1
            kernels[e["name"]][1] += e["dur"]
        lines.append("  top GPU work by time:")
        for name, (count, dur) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:12]:
            lines.append(f"    {dur / 1e3:9,.1f} ms {count:6,}x  {name[:100]}")
    cpu = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            cpu[e["name"]][0] += 1
            cpu[e["name"]][1] += e["dur"]
    if cpu:
        lines.append("  CUDA runtime/driver calls by time (all threads):")
        for name, (count, dur) in sorted(cpu.items(), key=lambda kv: -kv[1][1])[:10]:
            lines.append(f"    {dur / 1e3:9,.1f} ms {count:7,}x  {name[:80]}")
    return "\n".join(lines)


def profiled(kind: str, scorer, batches: list, at_once: int, on_gpu: bool, trace_dir) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        rate = timed(kind, scorer, batches, at_once)
        if on_gpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
        if trace_dir:
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
            with open(path, "rb") as src, gzip.open(Path(trace_dir) / f"{kind}-{at_once}.json.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
    print(f"== {kind}, {at_once} at once, profiled: {rate:,.0f} images/s", flush=True)
    print(summarize(trace, wall), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="images held in memory (default 16000; quick 300)")
    parser.add_argument("--batch", type=int, default=None, help="default 1024 (quick 64)")
    parser.add_argument("--at-once", type=int, default=2)
    parser.add_argument("--kinds", default="stage,serial")
    parser.add_argument("--trace-dir", default=None, help="also keep each trace there, gzipped")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    images = args.images or (300 if args.quick else 16_000)
    batch = args.batch or (64 if args.quick else 1024)
    scorer, batches = scorer_and_batches(args.quick, images, batch)
    for kind in args.kinds.split(","):
        timed(kind, scorer, batches[:2], 1)  # warm-up: kernels, nvJPEG, allocator
    print(f"{sum(len(b.keys) for b in batches):,} images in {len(batches)} batches of {batch}, "
          f"{scorer.cfg.model}, {scorer.cfg.device}")
    for kind in args.kinds.split(","):
        profiled(kind, scorer, batches, args.at_once, scorer.on_gpu, args.trace_dir)


if __name__ == "__main__":
    main()
