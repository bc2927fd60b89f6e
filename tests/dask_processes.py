"""A real `dask scheduler` and `dask worker` processes on 127.0.0.1, for tests that watch or kill
workers (tests/e2e/test_faults.py, tests/e2e/test_awkward_images.py). Each worker runs under its nanny,
as `dask worker` does by default, so a killed worker process is restarted."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

from distributed import Client

from conftest import kill_group

DASK = str(Path(sys.executable).parent / "dask")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dask_processes(tmp: Path, n_workers: int, nthreads: int = 1,
                   resources: Optional[list[str]] = None) -> Iterator[tuple[str, Client]]:
    """(scheduler address, connected client); everything is killed on exit. `resources`: each
    worker's `--resources` (e.g. "GPU=1"), as a cluster's workers are started."""
    address = f"tcp://127.0.0.1:{free_port()}"
    procs, logs = [], []

    def spawn(args: list[str], name: str) -> None:
        log = open(tmp / f"{name}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([DASK, *args], stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
                                      start_new_session=True))

    try:
        # The timeouts only matter if this process dies without its finally: then the
        # scheduler stops once idle and the workers follow it.
        spawn(["scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard",
               "--idle-timeout", "300s"], "scheduler")
        for i in range(n_workers):
            extra = ["--resources", resources[i], "--name", f"worker{i}"] if resources else []
            spawn(["worker", address, "--host", "127.0.0.1", "--nthreads", str(nthreads), "--no-dashboard",
                   "--death-timeout", "60s", "--local-directory", str(tmp / f"worker{i}"), *extra], f"worker{i}")
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(n_workers, timeout=60)
            yield address, client
    finally:
        for proc in reversed(procs):
            kill_group(proc)
        for log in logs:
            log.close()


def worker_pids(client: Client) -> dict[str, int]:
    """worker address -> pid of the worker process (not its nanny)."""
    return client.run(os.getpid)


def executing(client: Client) -> dict[str, list[str]]:
    """worker address -> keys of the tasks running on it right now."""

    def running(dask_worker) -> list[str]:
        return [str(ts.key) for ts in dask_worker.state.executing]

    return client.run(running)
