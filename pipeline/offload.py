"""A sample filter's GPU work, sent from a write task to a GPU worker.

A write task normalizes images (decode, resize, encode: CPU work in threads) and then applies the
filters. When a filter needs a GPU (`Filter.needs_gpu`: vae_latents), running the whole write on the
GPU worker puts that CPU work in the same process as the thread feeding the GPU, and they fight
over the GIL: measured on an H200 host, the VAE fed 431 images/s alone and 183 with eight
normalizing threads beside it (bench/probes/vae_write.py). So the write stays on a CPU worker, and
only the filter's batch goes to a GPU worker, as a task of its own asking for the GPU resource.

A filter gets its runner in the setup context (`context["offload"]`) and calls
`runner(fn, *args)`: `fn` is a module-level function (sent by reference); its arguments may be
large (vae_latents sends its crops as uint8 arrays, ~50 MB per 256 crops at 256 px), so they
travel worker to worker (scattered to the calling worker, fetched from it by the GPU worker) and
never through the scheduler, which would carry every byte of them inside the task. Without a GPU
worker, or outside Dask, the runner is `run_here`.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

# distributed makes a worker's own client the first time a task asks for one, without a lock: two
# tasks of one worker asking at once can make two clients whose handshakes collide (seen once in
# CI: `assert len(msg) == 1` in Client._ensure_connected, from two writes starting together on one
# worker). Asking one at a time, the second task finds the client the first one made.
_FIRST_CLIENT = threading.Lock()


def run_here(fn: Callable, *args: Any) -> Any:
    """No GPU worker to send to (the CPU layout, the in-process executor): run it in this process."""
    return fn(*args)


class DaskOffload:
    """Runs `fn(*args)` as a Dask task with `resources` (e.g. {"GPU": 1}) and returns its result.

    Called from inside a task (the write task): `worker_client` gives the worker's client and
    secedes this thread from the worker's pool while it waits, so a worker whose every thread
    waits on GPU tasks (a cluster whose GPU workers also run writes) still runs them.

    The arguments are first scattered to this worker itself: the scheduler then holds only their
    keys, places the task on any worker with the resources (balancing its GPU workers), and that
    worker fetches the bytes from this one, worker to worker."""

    def __init__(self, resources: dict):
        self.resources = resources

    def __call__(self, fn: Callable, *args: Any) -> Any:
        from distributed import get_client, get_worker, worker_client

        here = get_worker().address
        with _FIRST_CLIENT:
            get_client()
        with worker_client() as client:
            sent = client.scatter(list(args), workers=[here], direct=True, hash=False)
            # Dask hands the task the scattered values; dropping `sent` on return releases them.
            return client.submit(fn, *sent, resources=self.resources, pure=False).result()


def offload_runner(resources: dict | None) -> Callable:
    """The runner a write task gives its filters: to the GPU workers when the plan named their
    resources and this runs inside a Dask worker, else here."""
    if not resources:
        return run_here
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:  # not in a Dask worker (a test calling the stage directly)
        return run_here
    return DaskOffload(resources)
