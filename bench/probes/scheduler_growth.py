"""Probe: the scheduler's memory per finished task, with a shard's chain of three tasks sent as
three `client.submit` calls (curate's executor today) or as one `client.get` call of a
three-task graph. distributed keeps one span-metadata entry per call, for as long as the client
is connected (BENCHMARKS.md, "Driver and scheduler memory at scale"); this measures what one call
per chain would save; `--per-call K` sends K chains in each `client.get` call (a new call once K
chains have finished), as curate's executor now does. Trivial tasks, at most 8 chains in flight,
a real `dask scheduler` and two `dask worker` processes on 127.0.0.1; the scheduler's RSS (psutil)
every `--every` chains.

    python bench/probes/scheduler_growth.py --chains 50000 --every 10000
    python bench/probes/scheduler_growth.py --modes get --per-call 4
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DASK = str(Path(sys.executable).parent / "dask")


def _inc(x):
    return x + 1


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(mode: str, chains: int, every: int, in_flight: int = 8, per_call: int = 1) -> list[tuple[int, float]]:
    import psutil
    from dask._task_spec import Task, TaskRef
    from distributed import Client, as_completed

    address = f"tcp://127.0.0.1:{_port()}"
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                                   "--no-dashboard"], cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        time.sleep(2)
        procs += [subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                                    "--no-dashboard"], cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                  for _ in range(2)]
        scheduler = psutil.Process(procs[0].pid)
        readings = []
        try:
            with Client(address, timeout=30) as client:
                client.wait_for_workers(2, timeout=60)
                done = as_completed()
                submitted = finished = 0

                def graph(i):
                    return {f"a-{i}": Task(f"a-{i}", _inc, i), f"b-{i}": Task(f"b-{i}", _inc, TaskRef(f"a-{i}")),
                            f"c-{i}": Task(f"c-{i}", _inc, TaskRef(f"b-{i}"))}

                def submit(first, n):
                    """Chains first .. first + n - 1: the futures of their last tasks."""
                    if mode == "submit":
                        out = []
                        for i in range(first, first + n):
                            a = client.submit(_inc, i, key=f"a-{i}")
                            b = client.submit(_inc, a, key=f"b-{i}")
                            out.append(client.submit(_inc, b, key=f"c-{i}"))
                        return out
                    merged = {}
                    for i in range(first, first + n):
                        merged.update(graph(i))
                    return client.get(merged, [f"c-{i}" for i in range(first, first + n)], sync=False)

                def send(n):
                    nonlocal submitted
                    n = min(n, chains - submitted)
                    if n > 0:
                        for future in submit(submitted, n):
                            done.add(future)
                        submitted += n

                send(min(in_flight, chains))
                started = time.time()
                freed = 0
                for future in done:
                    future.result()
                    finished += 1
                    freed += 1
                    if finished % every == 0:
                        readings.append((finished, scheduler.memory_info().rss / 2**20))
                        print(f"{mode} x{per_call}: {finished:,} chains, scheduler {readings[-1][1]:.0f} MB, "
                              f"{finished / (time.time() - started):.0f} chains/s", flush=True)
                    if freed >= per_call or submitted + freed >= chains:
                        send(freed)
                        freed = 0
        finally:
            for p in procs:
                p.kill()
    return readings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=50_000)
    parser.add_argument("--every", type=int, default=10_000)
    parser.add_argument("--modes", nargs="+", default=["submit", "get"])
    parser.add_argument("--per-call", type=int, default=1, help="chains per client.get call (mode get)")
    args = parser.parse_args()
    for mode in args.modes:
        readings = run(mode, args.chains, args.every, per_call=args.per_call if mode == "get" else 1)
        if len(readings) >= 2:
            (n0, m0), (n1, m1) = readings[0], readings[-1]
            print(f"{mode} x{args.per_call if mode == 'get' else 1}: {(m1 - m0) * 1024 / ((n1 - n0) * 3):.2f} KB per finished task "
                  f"({(m1 - m0) * 1024 / (n1 - n0):.2f} KB per chain) from {n0:,} to {n1:,} chains")


if __name__ == "__main__":
    main()
