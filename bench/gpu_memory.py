"""GPU memory of a scoring worker: what the score stage holds on the GPU, and what bounds it.

Issue 14 saw a `curate run` GPU worker at 83.8 GB in nvidia-smi (ViT-B-32, 48,000 rows, H200)
while bench/clip_score.py's peak for the same model was 4.0 GiB. This script scores 48,000
photo-like JPEGs of 256-512 px (short side 256-512, long side up to 1.5x: the sizes a run's
resize policy or existing shards give) in raw shards, two shards at a time in two threads of one
process, exactly as a Dask GPU worker runs its score tasks, and reports per variant (each in a
fresh process, so the allocator starts empty):

- nvidia-smi's peak for the process (polled every 0.1 s: what other users of the GPU lose),
- PyTorch's peak allocated (tensors in use) and peak reserved (its cache included),
- images/s.

Variants: `unbounded` (no limit: the code before this change), `expandable segments` (PyTorch's
allocator setting against fragmentation, no limit), `limit 16 GiB (default)` and `limit 8 GiB`
(`clip.gpu_memory_limit_gib`).

    python bench/gpu_memory.py                 # GPU; writes BENCHMARKS.md
    python bench/gpu_memory.py --quick --no-write   # CPU smoke test of the script
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.clip_score import TINY, make_captions, register_tiny_model  # noqa: E402
from bench.download import cpu_name  # noqa: E402
from curate.pipeline.demo.synthetic import photo_like_jpeg  # noqa: E402
from curate.pipeline.shards import sample_key, shard_name  # noqa: E402
from curate.pipeline.tarshard import TarShardWriter  # noqa: E402

WORK = REPO / "bench-work" / "gpu-memory"
HEADING = "## GPU memory of a scoring worker (issue 14)"
VARIANTS = {
    "unbounded": {"limit": None, "env": {}},
    "expandable segments": {"limit": None, "env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}},
    "limit 16 GiB (default)": {"limit": 16.0, "env": {}},
    "limit 8 GiB": {"limit": 8.0, "env": {}},
}


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def _image(index: int) -> bytes:
    rng = random.Random(7_919 * index + 5)
    short = rng.randint(256, 512)
    long = min(int(short * rng.uniform(1.0, 1.5)), 768)
    width, height = (long, short) if rng.random() < 0.5 else (short, long)
    return photo_like_jpeg(width, height, rng, quality=rng.choice((75, 85, 92)))


def make_shards(n_images: int, shard_size: int, n_unique: int) -> Path:
    folder = WORK / f"shards-{n_images}x{shard_size}-u{n_unique}"
    if (folder / "complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    with multiprocessing.Pool(os.cpu_count()) as pool:
        unique = pool.map(_image, range(n_unique), chunksize=16)
    captions = make_captions(n_images)
    for shard in range(-(-n_images // shard_size)):
        with TarShardWriter(folder / f"{shard_name(shard)}.tar") as tar:
            for i in range(min(shard_size, n_images - shard * shard_size)):
                index = shard * shard_size + i
                key = sample_key(shard, i, shard_size)
                tar.write(key, {"jpg": unique[index % n_unique],
                                "json": json.dumps({"key": key, "caption": captions[index]}).encode()})
        # As the download stage leaves a shard: its done-marker beside the tar.
        (folder / f"{shard_name(shard)}.done.json").write_text(json.dumps({"shard": shard}))
    (folder / "complete").write_text("")
    log(f"data: {n_images} images ({n_unique} unique) in {time.perf_counter() - started:.0f} s")
    return folder


def _smi_peak(pid: int, stop: threading.Event, peak: list) -> None:
    while not stop.is_set():
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            for line in out.splitlines():
                p, used = (x.strip() for x in line.split(","))
                if int(p) == pid:
                    peak[0] = max(peak[0], int(used))
        except Exception:
            pass
        stop.wait(0.1)


def child(args) -> None:
    """One variant, in this (fresh) process: prints one JSON line."""
    import torch

    import curate.pipeline.stages.score as score
    from curate.pipeline.config import ClipConfig

    variant = VARIANTS[args.variant]
    if args.quick:
        register_tiny_model()
    cfg = ClipConfig(enabled=True, model=args.model, pretrained=None, device=args.device, batch_size=args.batch,
                     gpu_memory_limit_gib=variant["limit"])
    shards = sorted(Path(args.shards).glob("*.tar"))
    out = WORK / f"out-{args.variant}"
    shutil.rmtree(out, ignore_errors=True)
    peak, stop = [0], threading.Event()
    watcher = threading.Thread(target=_smi_peak, args=(os.getpid(), stop, peak), daemon=True)
    if args.device == "cuda":
        watcher.start()
    # The model loads and warms on the first shard, untimed, as on a worker that has scored before.
    score.score_shard(0, {}, str(args.shards), str(out / "warm-emb"), str(out / "warm-markers"), cfg)
    started = time.perf_counter()
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        return score.score_shard(i, {}, str(args.shards), str(out / "emb"), str(out / "markers"), cfg)

    with ThreadPoolExecutor(2) as pool:  # SCORE_TASKS_PER_GPU
        results = list(pool.map(one, range(len(shards))))
    seconds = time.perf_counter() - started
    stop.set()
    n = sum(r["scored"] + r["decode_errors"] for r in results)
    row = {"variant": args.variant, "images": n, "images_per_s": n / seconds, "smi_peak_mib": peak[0]}
    if args.device == "cuda":
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    print("RESULT " + json.dumps(row), flush=True)


def render(rows: list[dict], args, device_name: str) -> str:
    lines = [
        HEADING,
        "",
        f"Measured {datetime.date.today().isoformat()} on {device_name}, host {cpu_name()} ({os.cpu_count()} cores). "
        f"{args.model} (random weights), batch {args.batch}, bf16, {args.images:,} JPEGs of 256-512 px short side in "
        f"shards of {args.shard_size:,}, scored two shards at a time in one process (a Dask GPU worker's two score "
        "tasks). Each variant in a fresh process; `bench/gpu_memory.py`.",
        "",
        "| variant | images/s | nvidia-smi peak (process) | torch peak allocated | torch peak reserved |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['images_per_s']:,.0f} | {r['smi_peak_mib'] / 1024:.1f} GiB | "
                     f"{r.get('peak_allocated_gib', 0):.1f} GiB | {r.get('peak_reserved_gib', 0):.1f} GiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--shard-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--variants", default=";".join(VARIANTS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or (TINY if args.quick else "ViT-B-32")
    args.images = args.images or (400 if args.quick else 48_000)
    args.shard_size = args.shard_size or (200 if args.quick else 8_000)
    args.batch = args.batch or (64 if args.quick else 1024)
    if args.variant:
        return child(args)

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else cpu_name()
    shards = make_shards(args.images, args.shard_size, 200 if args.quick else 3000)
    rows = []
    for variant in args.variants.split(";"):
        log(f"variant {variant} ...")
        proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--shards", str(shards), "--device", device,
                               "--model", args.model, "--images", str(args.images), "--shard-size", str(args.shard_size),
                               "--batch", str(args.batch)] + (["--quick"] if args.quick else []),
                              capture_output=True, text=True, env={**os.environ, **VARIANTS[variant]["env"]})
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not found:
            rows.append({"variant": variant, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:150]})
        else:
            rows.append(json.loads(found[-1][len("RESULT "):]))
        log(json.dumps(rows[-1]))
        table = render(rows, args, device_name)
        print(table, flush=True)
        if not args.no_write and device == "cuda":
            from curate.pipeline.benchmarks import update_section

            update_section(REPO / "BENCHMARKS.md", HEADING, table)


if __name__ == "__main__":
    main()
