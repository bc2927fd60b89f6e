"""Where the shard tasks run: an existing Dask cluster, or a LocalCluster on this machine."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from distributed import Client, LocalCluster

from pipeline.config import DaskConfig
from pipeline.errors import UserError


def scheduler_address(cfg: DaskConfig) -> str | None:
    return cfg.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None


@contextlib.contextmanager
def dask_client(cfg: DaskConfig) -> Iterator[Client]:
    """A connected client. No scheduler configured → the embedded default, a LocalCluster
    with one single-threaded worker process per core (the download stage runs its own
    I/O threads inside each task)."""
    address = scheduler_address(cfg)
    if address:
        try:
            client = Client(address, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise UserError(f"cannot reach the Dask scheduler at {address} ({type(exc).__name__})") from exc
        except ValueError as exc:  # distributed's answer to a malformed address
            raise UserError(f"not a valid Dask scheduler address: {address} ({exc})") from exc
        try:
            yield client
        finally:
            client.close()
        return
    cluster = LocalCluster(
        n_workers=cfg.n_workers or os.cpu_count() or 1,
        threads_per_worker=cfg.threads_per_worker,
        memory_limit=cfg.memory_limit,
        processes=True,
        dashboard_address="127.0.0.1:0",
        silence_logs=logging.ERROR,
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
