"""Download + normalize throughput: curate against img2dataset's own download(), same run.

Both get the same URL list (3,000 photo-like JPEGs of 300-1200 px served from a
local HTTP server in its own process), the same resize settings (keep_ratio 512,
resize only if bigger), the same shard size and the same cores. Each tool runs in
a fresh process and is timed from its entry call to its return, so start-up of its
worker processes is included for both. The table goes to BENCHMARKS.md.

    python bench/download.py [--images 3000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from curate.pipeline.benchmarks import update_section  # noqa: E402
from curate.pipeline.demo.synthetic import photo_like_jpeg  # noqa: E402

WORK = REPO / "bench-work" / "download"

IMG2DATASET = """
import sys, time
from img2dataset import download
out, urls, shard_rows, cores = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t = time.perf_counter()
download(url_list=urls, input_format="parquet", url_col="URL", caption_col="TEXT",
         output_format="webdataset", output_folder=out, processes_count=cores, thread_count=32,
         image_size=512, resize_mode="keep_ratio", resize_only_if_bigger=True,
         number_sample_per_shard=shard_rows, timeout=10, retries=0, enable_wandb=False,
         compute_hash="sha256", disallowed_header_directives=[])
print("SECONDS", time.perf_counter() - t)
"""

CURATE = """
import sys, time
from curate.pipeline.config import RunConfig
from curate.pipeline.run import run
out, urls, shard_rows, cores = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = RunConfig.model_validate({
    "input": {"paths": [urls], "rows_per_shard": shard_rows},
    "output": {"path": out},
    "download": {"timeout": 10, "retries": 0, "threads": 32, "allow_private_addresses": True},
    "resize": {"size": 512, "mode": "keep_ratio", "upscale": False},  # img2dataset's resize_only_if_bigger
    "dask": {"n_workers": cores, "threads_per_worker": 1},
})
t = time.perf_counter()
stats = run(cfg, overwrite=True, progress=False, log=lambda *_: None)
print("SECONDS", time.perf_counter() - t)
"""


def make_images(n: int) -> Path:
    images = WORK / "images"
    marker = images / f".complete-{n}"
    if marker.exists():
        return images
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n):
        w, h = rng.randint(300, 1200), rng.randint(300, 1200)
        (images / f"{i:06d}.jpg").write_bytes(photo_like_jpeg(w, h, rng))
    marker.touch()
    return images


def count_samples(folder: Path) -> int:
    n = 0
    for tar in folder.rglob("*.tar"):
        with tarfile.open(tar) as t:
            n += sum(1 for m in t if m.name.endswith(".jpg"))
    return n


def timed(script: str, out: Path, urls: Path, shard_rows: int, cores: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(out), str(urls), str(shard_rows), str(cores)],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark subprocess failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return float(proc.stdout.split("SECONDS")[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--shard-rows", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()

    images = make_images(args.images)
    sizes = [p.stat().st_size for p in images.glob("*.jpg")]
    # The server runs in its own process so its work is not charged to either tool's process.
    server = subprocess.Popen(
        [sys.executable, "-m", "curate.pipeline.demo.devserver", str(WORK), "--port", "0"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        base_url = server.stdout.readline().strip().split()[-1]
        urls = WORK / "urls.parquet"
        pd.DataFrame({
            "URL": [f"{base_url}/images/{i:06d}.jpg" for i in range(args.images)],
            "TEXT": [f"photo {i}" for i in range(args.images)],
        }).to_parquet(urls, index=False)

        results: dict[str, list[float]] = {"img2dataset": [], "curate": []}
        written: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, script in (("img2dataset", IMG2DATASET), ("curate", CURATE)):
                out = WORK / f"out-{name}"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                seconds = timed(script, out, urls, args.shard_rows, args.cores)
                written[name] = count_samples(out)
                results[name].append(seconds)
                print(f"{name:12s} {seconds:7.2f} s  {written[name]} images  {written[name] / seconds:7.1f} images/s", flush=True)
    finally:
        server.terminate()
        server.wait()

    med = {k: statistics.median(v) for k, v in results.items()}
    rate = {k: written[k] / med[k] for k in med}
    speedup = rate["curate"] / rate["img2dataset"]
    verdict = "met" if speedup >= 2 else "MISSED"
    date = datetime.date.today().isoformat()
    device = f"{cpu_name()}, {args.cores} cores"
    table = "\n".join([
        f"## Download + normalize ({date}, {device})",
        "",
        f"`bench/download.py`: {args.images} photo-like JPEGs, 300–1200 px (median {statistics.median(sizes) / 1024:.0f} KB), "
        f"served from a local HTTP server; keep_ratio 512, resize only if bigger; {args.shard_rows} rows per shard; "
        f"median of {args.repeats} runs each, fresh process per run, worker start-up included.",
        "",
        "| tool | seconds | images written | images/s |",
        "|---|---:|---:|---:|",
        f"| img2dataset {_version('img2dataset')} `download()`, {args.cores} processes × 32 threads | {med['img2dataset']:.1f} | {written['img2dataset']} | {rate['img2dataset']:.1f} |",
        f"| curate `run` (LocalCluster, {args.cores} workers × 32 fetch threads) | {med['curate']:.1f} | {written['curate']} | {rate['curate']:.1f} |",
        "",
        f"Speed-up: **{speedup:.2f}×** (target ≥ 2×: {verdict}).",
        "",
    ])
    print("\n" + table)
    if not args.no_write:
        update_benchmarks("## Download + normalize", table)


def _version(package: str) -> str:
    from importlib.metadata import version

    try:
        return version(package)
    except Exception:
        return "?"


def update_benchmarks(heading: str, table: str) -> None:
    """Replace this benchmark's section in BENCHMARKS.md (other sections stay)."""
    update_section(REPO / "BENCHMARKS.md", heading, table)


if __name__ == "__main__":
    main()
