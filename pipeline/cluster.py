"""Where the shard tasks run: an existing Dask cluster, or a LocalCluster on this machine."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
from typing import Callable, Iterator

import dask
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster
from distributed.diagnostics.plugin import WorkerPlugin

from curate.pipeline import storage
from curate.pipeline.config import DaskConfig
from curate.pipeline.errors import UserError


# Score tasks a GPU worker runs at once. Scoring one shard has a start (reading and decoding
# the first batch while the GPU waits) and an end (copying the embeddings back, writing the
# .npy and parquet files) in which the GPU is mostly idle; a second shard's task fills those.
# Measured on an H200, ViT-B-32, shards of 5,000: BENCHMARKS.md, "one shard at a time".
SCORE_TASKS_PER_GPU = 2

# Cores the embedded cluster leaves to each GPU worker when it sizes its CPU workers: the GPU
# worker's own threads (two shards' batches decoded by nvJPEG, whose Huffman stage runs on the
# CPU) and its two reader processes (tar headers, tokenizing). With a CPU worker per core, the
# write and read tasks took every core and the scorer ran 3x below its speed alone.
CORES_PER_GPU_WORKER = 4
# Dask's statistical profiler walks every thread's stack 100 times a second, holding the GIL: in a
# GPU worker (two score tasks, each with its decoding threads) py-spy found it holding the GIL
# for ~11% of the time any thread held it (H200 host, ViT-B-32), time the threads feeding the GPU
# wait for. Off in the embedded GPU workers (their dashboard's profile page stays empty).
# (A dotted key: the worker process applies it with dask.config.set over the nanny's whole config; a
# nested {"distributed": ...} there would replace all of distributed's settings.)
GPU_WORKER_CONFIG = {"distributed.worker.profile.enabled": False}
# And the CPU workers beside a GPU run at a lower CPU priority (a nice value: this module's
# `dask_setup`, preloaded), so that when the cores are all busy the work that keeps the GPU fed
# runs first. Downloads wait on the network anyway; writes catch up when the GPU is done.
BACKGROUND_PRELOAD = "curate.pipeline.background_worker"


def scheduler_address(cfg: DaskConfig) -> str | None:
    return cfg.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None


def local_gpu_count() -> int:
    """CUDA devices this process may use (CUDA_VISIBLE_DEVICES applies): 0 without a GPU.

    Asked of the CUDA driver library directly when torch is not imported yet: importing torch
    costs the driver process seconds before its cluster can start, and this process never
    computes on a GPU itself (its workers do). Without the driver library (no NVIDIA driver, or
    another GPU stack), torch is asked."""
    # cuInit makes a process unfit to fork CUDA users from: only where workers are spawned (Dask's default).
    spawned = dask.config.get("distributed.worker.multiprocessing-method", "spawn") != "fork"
    if "torch" not in sys.modules and spawned:
        count = _cuda_driver_device_count()
        if count is not None:
            return count
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def _cuda_driver_device_count() -> int | None:
    """cuDeviceGetCount of libcuda (no CUDA context is made), or None when there is no such library."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    if cuda.cuInit(0) != 0:  # e.g. CUDA_ERROR_NO_DEVICE: the library is there, no usable GPU
        return 0
    count = ctypes.c_int(0)
    return count.value if cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0


def _one_of(client: Client, resource: str) -> dict | None:
    """{resource: 1} when some worker offers that resource, else None: a task asking for it
    could run nowhere."""
    workers = client.scheduler_info().get("workers", {}).values()
    return {resource: 1} if any(w.get("resources", {}).get(resource) for w in workers) else None


def gpu_resources(client: Client) -> dict | None:
    """Dask resources for GPU tasks: {"GPU": 1} when some worker offers a GPU (started with
    `dask worker --resources GPU=1`, or the GPU workers of the local cluster), else None so
    that the CPU path runs anywhere."""
    return _one_of(client, "GPU")


def cpu_resources(client: Client) -> dict | None:
    """Dask resources for the other tasks: {"CPU": 1} when some worker offers CPU slots (the
    embedded GPU layout's CPU workers; `dask worker --resources CPU=N` on a cluster), so those
    tasks keep off the GPU workers; else None: any worker runs them."""
    return _one_of(client, "CPU")


# The embedded cluster listens on loopback only: a Dask scheduler or worker runs whatever code
# it is sent, unauthenticated, so one reachable from the network would let anyone who can reach
# a shared GPU server run code on it. Real clusters: see README "On a cluster" (TLS).
LOOPBACK = "127.0.0.1"


def _local_cluster(cfg: DaskConfig, gpus: int):
    # CRITICAL: a failed task reaches the client, which reports it once (one line for a
    # full disk); the workers' own "Compute Failed" logs would repeat it with tracebacks.
    common = dict(silence_logs=logging.CRITICAL)
    if not gpus:
        return LocalCluster(
            n_workers=cfg.n_workers or os.cpu_count() or 1,
            threads_per_worker=cfg.threads_per_worker,
            memory_limit=cfg.memory_limit,
            processes=True,
            host=LOOPBACK,
            dashboard_address=f"{LOOPBACK}:0",
            worker_dashboard_address=f"{LOOPBACK}:0",
            **common,
        )
    scheduler = {"cls": Scheduler, "options": {"host": LOOPBACK, "dashboard_address": f"{LOOPBACK}:0"}}
    return SpecCluster(workers=gpu_layout(cfg, gpus), scheduler=scheduler, **common)


def gpu_layout(cfg: DaskConfig, gpus: int) -> dict:
    """The embedded cluster's worker specs on a machine with GPUs: CPU workers for download and
    write, plus one worker per GPU that only it sees. GPU tasks ask for resources={"GPU": 1}, so
    SCORE_TASKS_PER_GPU run per device at a time. CPU workers see no GPU: a model a sample filter
    loads there (vae_latents, concepts) stays on the CPU instead of every CPU worker opening a
    CUDA context on GPU 0."""
    worker = {"nthreads": cfg.threads_per_worker, "memory_limit": cfg.memory_limit,
              "host": LOOPBACK, "dashboard_address": f"{LOOPBACK}:0"}
    cpu_workers = cfg.n_workers or max(1, (os.cpu_count() or 1) - CORES_PER_GPU_WORKER * gpus)
    workers = {
        f"cpu-{i}": {"cls": Nanny, "options": {**worker, "env": {"CUDA_VISIBLE_DEVICES": ""},
                                               "resources": {"CPU": cfg.threads_per_worker},
                                               "preload": [BACKGROUND_PRELOAD]}}
        for i in range(cpu_workers)
    }
    # The devices this process was given (CUDA_VISIBLE_DEVICES: indexes, UUIDs or MIG names), one per
    # GPU worker: with "2,3" the workers get GPUs 2 and 3, not 0 and 1.
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    devices = visible if len(visible) >= gpus else [str(j) for j in range(gpus)]
    for j in range(gpus):
        workers[f"gpu-{j}"] = {"cls": Nanny, "options": {
            **worker, "nthreads": SCORE_TASKS_PER_GPU, "resources": {"GPU": SCORE_TASKS_PER_GPU},
            "env": {"CUDA_VISIBLE_DEVICES": devices[j]}, "config": GPU_WORKER_CONFIG,
        }}
    return workers


@contextlib.contextmanager
def dask_client(cfg: DaskConfig, gpus: int = 0) -> Iterator[Client]:
    """A connected client. No scheduler configured → the embedded default, a local cluster
    with one single-threaded worker process per core (the download stage runs its own
    I/O threads inside each task), or with `gpus` > 0 the GPU layout (`gpu_layout`)."""
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
    cluster = _local_cluster(cfg, gpus)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


class StorageOptions(WorkerPlugin):
    """The config's object store options (pipeline/storage.py `configure`) set in every worker
    process, those that join later included, so that each reads and writes the same URLs."""

    name = "curate-storage-options"

    def __init__(self, options: dict):
        self.options = options

    def setup(self, worker) -> None:
        storage.configure(self.options)


class WarmUp(WorkerPlugin):
    """Starts a run's GPU warm-up calls (pipeline/plan.py `warm_ups`: imports, model loads,
    compiling) on each GPU worker when it joins, in a thread of its own: they then run beside the
    first reads and writes instead of inside the first GPU task, and leave the worker's task
    threads free. What they build goes into the process's model cache, where the tasks find it (or
    wait for it, if still under way). A failure is left for the first task that needs the same
    thing: it fails there, with the shard named."""

    name = "curate-warm-up"

    def __init__(self, calls: list[tuple[Callable, tuple]]):
        self.calls = calls

    def setup(self, worker) -> None:
        if worker.state.total_resources.get("GPU"):
            threading.Thread(target=self._run, name="curate-warm-up", daemon=True).start()

    def _run(self) -> None:
        for fn, args in self.calls:
            try:
                fn(*args)
            except Exception as exc:
                logging.getLogger("curate").debug(f"warm-up {fn.__name__} failed: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def gpu_workers_warmed_up(client: Client, calls: list[tuple[Callable, tuple]]) -> Iterator[None]:
    """`WarmUp` registered for the duration of a run, then taken off the scheduler: on a cluster that
    outlives the run, a GPU worker joining later must not load this run's models."""
    if not calls:
        yield
        return
    client.register_plugin(WarmUp(calls))
    try:
        yield
    finally:
        try:
            client.unregister_worker_plugin(WarmUp.name)
        except Exception as exc:  # the cluster is going down with the run: nothing left to warm
            logging.getLogger("curate").debug(f"warm-up plugin not removed: {type(exc).__name__}: {exc}")


def share_storage_options(client: Client, options: dict) -> None:
    if options:
        client.register_plugin(StorageOptions(options))
