"""Driver and scheduler memory against the number of shards: does `curate run` stay small?

Tiny shards (2 rows each, one 64-px JPEG served from a loopback HTTP server in its own
process), a real `dask scheduler` and `dask worker` processes on 127.0.0.1, and `curate run`
as a user runs it against that scheduler. For each shard count the script samples the
resident memory of the driver (the `curate run` process) and of the scheduler process
every 50 ms and reports the peaks, the wall time and the wall time per shard. The table
goes to BENCHMARKS.md after each shard count, so a cut-off run keeps what it measured.

    python bench/scale.py [--shards 1000 10000 50000] [--workers 2]

Target (issue 15): driver and scheduler peak memory at 50,000 shards ≤ 1.2× that at 1,000,
and the per-shard wall time flat.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.download import cpu_name, update_benchmarks  # noqa: E402

WORK = REPO / "bench-work" / "scale"
HEADING = "## Driver and scheduler memory at scale"
ROWS_PER_SHARD = 2
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakRss:
    """Samples the resident memory of some processes every 50 ms; keeps each one's peak."""

    def __init__(self, pids: dict[str, int]):
        self.pids, self.peak = pids, {name: 0.0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_mb(pid))
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_input(shards: int, base_url: str) -> Path:
    path = WORK / f"urls-{shards}.parquet"
    if not path.exists():
        n = shards * ROWS_PER_SHARD
        pd.DataFrame({"URL": [f"{base_url}/images/tiny.jpg?{i}" for i in range(n)],
                      "TEXT": [f"a tiny red square number {i}" for i in range(n)]}).to_parquet(path, index=False)
    return path


def run_once(shards: int, scheduler: str, scheduler_pid: int, base_url: str) -> dict:
    out = WORK / f"out-{shards}"
    shutil.rmtree(out, ignore_errors=True)
    config = WORK / f"config-{shards}.yaml"
    config.write_text(
        f"input: {{paths: [{make_input(shards, base_url)}], url_col: URL, caption_col: TEXT, rows_per_shard: {ROWS_PER_SHARD}}}\n"
        f"output: {{path: {out}}}\n"
        "download: {timeout: 10, threads: 2, allow_private_addresses: true}\n"
        "resize: {size: 64}\n"
        f"dask: {{scheduler: '{scheduler}'}}\n")
    started = time.perf_counter()
    driver = subprocess.Popen([str(BIN / "curate"), "run", str(config), "--no-progress"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    with PeakRss({"driver": driver.pid, "scheduler": scheduler_pid}) as peaks:
        stdout, stderr = driver.communicate()
    seconds = time.perf_counter() - started
    if driver.returncode != 0:
        raise SystemExit(f"curate run failed at {shards} shards:\n{stderr[-2000:]}")
    return {"shards": shards, "driver_mb": peaks.peak["driver"], "scheduler_mb": peaks.peak["scheduler"],
            "seconds": seconds, "ms_per_shard": 1000 * seconds / shards}


def table(rows: list[dict], workers: int) -> str:
    base = rows[0]
    lines = [
        HEADING, "",
        f"{datetime.date.today()}, {cpu_name()}, {os.cpu_count()} cores; `python bench/scale.py`: shards of "
        f"{ROWS_PER_SHARD} rows (one 64-px JPEG on a loopback server), a `dask scheduler` and {workers} "
        "`dask worker` processes (1 thread each) on 127.0.0.1, `curate run` against them. Peak resident memory "
        "sampled every 50 ms. Target: both peaks at 50,000 shards ≤ 1.2× those at 1,000; ms per shard flat.", "",
        "| shards | driver peak MB | × first | scheduler peak MB | × first | wall s | ms / shard |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['shards']:,} | {r['driver_mb']:.0f} | {r['driver_mb'] / base['driver_mb']:.2f} | "
                     f"{r['scheduler_mb']:.0f} | {r['scheduler_mb'] / base['scheduler_mb']:.2f} | "
                     f"{r['seconds']:.1f} | {r['ms_per_shard']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()

    from PIL import Image

    (WORK / "www" / "images").mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "JPEG")
    (WORK / "www" / "images" / "tiny.jpg").write_bytes(buffer.getvalue())

    procs = []
    try:
        server = subprocess.Popen([sys.executable, "-m", "curate.pipeline.demo.devserver", str(WORK / "www"),
                                   "--port", "0"], stdout=subprocess.PIPE, text=True)
        procs.append(server)
        base_url = server.stdout.readline().strip().split()[-1]
        port = free_port()
        address = f"tcp://127.0.0.1:{port}"
        scheduler = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                      "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(scheduler)
        for i in range(args.workers):
            procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--host", "127.0.0.1",
                                           "--nthreads", "1", "--no-dashboard", "--local-directory",
                                           str(WORK / f"worker{i}")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(args.workers, timeout=60)
        rows = []
        for shards in args.shards:
            rows.append(run_once(shards, address, scheduler.pid, base_url))
            print(rows[-1], flush=True)
            if not args.no_write:
                update_benchmarks(HEADING, table(rows, args.workers))
        print(table(rows, args.workers))
    finally:
        for proc in reversed(procs):
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
