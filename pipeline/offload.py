"""A sample filter's GPU work, sent from a write task to a GPU worker.

A write task normalizes images (decode, resize, encode: CPU work in threads) and then applies the
filters. When a filter needs a GPU (`Filter.needs_gpu`: vae_latents), running the whole write on the
GPU worker puts that CPU work in the same process as the thread feeding the GPU, and they fight
over the GIL: measured on an H200 host, the VAE fed 431 images/s alone and 183 with eight
normalizing threads beside it (bench/probes/vae_write.py). So the write stays on a CPU worker, and
only the filter's batch goes to a GPU worker, as a task of its own asking for the GPU resource.

A filter gets its runner in the setup context (`context["offload"]`) and calls
`runner(fn, *args)`: `fn` is a module-level function (sent by reference); its arguments may be
large (vae_latents sends its crops as uint8 arrays, ~50 MB per 256 crops at 256 px), so they go
straight to the GPU worker (`scatter(direct=True)`) and never through the scheduler, which would
carry every byte of them inside the task. Without a GPU worker, or outside Dask, the runner is
`run_here`.
"""

from __future__ import annotations

from typing import Any, Callable


def run_here(fn: Callable, *args: Any) -> Any:
    """No GPU worker to send to (the CPU layout, the in-process executor): run it in this process."""
    return fn(*args)


class DaskOffload:
    """Runs `fn(*args)` as a Dask task on a worker with `resources` (e.g. {"GPU": 1}) and returns
    its result.

    Called from inside a task (the write task): `worker_client` gives the worker's client and
    secedes this thread from the worker's pool while it waits, so a worker whose every thread
    waits on GPU tasks (a cluster whose GPU workers also run writes) still runs them. The
    arguments are scattered to the chosen worker first and the task is pinned there: the bytes
    travel once, worker to worker. The workers that have the resources are asked of the scheduler
    once per runner (one per write task) and taken in turn."""

    def __init__(self, resources: dict):
        self.resources = resources
        self._targets: list[str] | None = None
        self._turn = 0

    def _next_target(self, client) -> str | None:
        if self._targets is None:
            workers = client.scheduler_info()["workers"]
            self._targets = sorted(address for address, info in workers.items()
                                   if all(info.get("resources", {}).get(name, 0) >= amount
                                          for name, amount in self.resources.items()))
        if not self._targets:
            return None
        self._turn += 1
        return self._targets[self._turn % len(self._targets)]

    def __call__(self, fn: Callable, *args: Any) -> Any:
        from distributed import worker_client

        with worker_client() as client:
            target = self._next_target(client)
            if target is not None:
                try:
                    sent = client.scatter(list(args), workers=[target], direct=True, hash=False)
                except OSError:  # the worker left: ask for the list again next time, send this one plainly
                    self._targets, target = None, None
            if target is None:  # no worker known to have them: the scheduler places the task (and its bytes)
                return client.submit(fn, *args, resources=self.resources, pure=False).result()
            # Dask hands the task the scattered values; leaving this block releases them. Pinned to
            # the target strictly: with allow_other_workers the scheduler (distributed 2026.8) may
            # place it on a worker without the resources, whose state machine then fails hard
            # (KeyError 'GPU', seen on an H200 host). If the target leaves, the scattered values go
            # with it and the task errs; the write task is then retried like any failed task.
            return client.submit(fn, *sent, resources=self.resources, workers=[target], pure=False).result()


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
