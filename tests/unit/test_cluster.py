"""The embedded Dask clusters curate starts (pipeline/cluster.py), without a run: the GPU
layout and the environment each worker gets, and every listening socket on loopback. `curate run`
on an existing cluster: tests/e2e/test_cluster_run.py."""

from __future__ import annotations

import pytest



def test_gpu_cluster_layout_each_gpu_worker_sees_one_device_and_cpu_workers_none():
    """The embedded cluster for a machine with GPUs, started here without one: the layout and
    the environment each worker gets are what the GPU path relies on."""
    import os

    from distributed import Client

    from curate.pipeline.background_worker import CPU_WORKER_NICENESS
    from curate.pipeline.cluster import SCORE_TASKS_PER_GPU, _local_cluster, cpu_resources, gpu_resources
    from curate.pipeline.config import DaskConfig

    with _local_cluster(DaskConfig(n_workers=1), gpus=2) as cluster, Client(cluster) as client:
        client.wait_for_workers(3, timeout=60)
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        by_name = {info["name"]: seen[addr] for addr, info in client.scheduler_info()["workers"].items()}
        assert by_name == {"cpu-0": "", "gpu-0": "0", "gpu-1": "1"}
        import dask

        profiling = client.run(lambda: dask.config.get("distributed.worker.profile.enabled"))
        by_name = {info["name"]: profiling[addr] for addr, info in client.scheduler_info()["workers"].items()}
        default = dask.config.get("distributed.worker.profile.enabled")  # what a CPU worker keeps
        assert by_name == {"cpu-0": default, "gpu-0": False, "gpu-1": False}
        assert gpu_resources(client) == {"GPU": 1}
        # Each GPU worker runs SCORE_TASKS_PER_GPU score tasks at once; the CPU worker none.
        infos = {info["name"]: info for info in client.scheduler_info()["workers"].values()}
        for name in ("gpu-0", "gpu-1"):
            assert infos[name]["nthreads"] == SCORE_TASKS_PER_GPU
            assert infos[name]["resources"] == {"GPU": SCORE_TASKS_PER_GPU}
        # CPU workers offer CPU slots, which the other tasks ask for: none takes a GPU worker's thread.
        assert infos["cpu-0"]["resources"] == {"CPU": 1}
        assert cpu_resources(client) == {"CPU": 1}
        # CPU workers yield the cores to the GPU workers' decoding and reading when all are busy:
        # the nice value of the threads that run their tasks.
        niceness = {name: client.submit(lambda: os.nice(0), workers=[addr], pure=False).result()
                    for addr, name in ((a, i["name"]) for a, i in client.scheduler_info()["workers"].items())}
        assert niceness["cpu-0"] == CPU_WORKER_NICENESS + os.nice(0)
        assert niceness["gpu-0"] == niceness["gpu-1"] == os.nice(0)

        # A run's warm-up calls run on each GPU worker, in a thread of their own, and on no CPU
        # worker; one that fails leaves the next to run.
        import tempfile
        import time
        from pathlib import Path

        from curate.pipeline.cluster import WarmUp, gpu_workers_warmed_up

        with tempfile.TemporaryDirectory() as folder:
            def fails():
                raise RuntimeError("no such model")

            def mark(where):
                import threading
                Path(where, f"gpu{os.environ['CUDA_VISIBLE_DEVICES']}-{threading.current_thread().name}").touch()

            def plugins(dask_worker):
                return list(dask_worker.plugins)

            with gpu_workers_warmed_up(client, [(fails, ()), (mark, (folder,))]):
                deadline = time.time() + 30
                while len(list(Path(folder).iterdir())) < 2 and time.time() < deadline:
                    time.sleep(0.1)
                time.sleep(0.5)  # a CPU worker's mark, were there one, would be there by now
                assert sorted(p.name for p in Path(folder).iterdir()) == ["gpu0-curate-warm-up", "gpu1-curate-warm-up"]
                assert all(WarmUp.name in names for names in client.run(plugins).values())
            # Taken off after the run: a GPU worker joining the cluster later loads nothing of it.
            assert not any(WarmUp.name in names for names in client.run(plugins).values())


def test_gpu_cluster_layout_leaves_cores_to_each_gpu_worker(monkeypatch):
    from curate.pipeline.cluster import CORES_PER_GPU_WORKER, gpu_layout
    from curate.pipeline.config import DaskConfig

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    names = sorted(gpu_layout(DaskConfig(), gpus=2))
    assert names.count("gpu-0") == names.count("gpu-1") == 1
    assert len([n for n in names if n.startswith("cpu-")]) == 16 - 2 * CORES_PER_GPU_WORKER


@pytest.mark.parametrize("visible, expected", [(None, ["0", "1"]), ("2,3", ["2", "3"]),
                                               ("GPU-aa, GPU-bb", ["GPU-aa", "GPU-bb"])])
def test_each_gpu_worker_gets_one_of_the_devices_this_process_was_given(monkeypatch, visible, expected):
    from curate.pipeline.cluster import gpu_layout
    from curate.pipeline.config import DaskConfig

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    layout = gpu_layout(DaskConfig(n_workers=1), gpus=2)
    assert [layout[f"gpu-{j}"]["options"]["env"]["CUDA_VISIBLE_DEVICES"] for j in range(2)] == expected
    assert layout["cpu-0"]["options"]["env"]["CUDA_VISIBLE_DEVICES"] == ""


def _listening() -> set:
    """(pid, ip, port) of every listening socket of this process and its descendants."""
    import psutil

    me = psutil.Process()
    found = set()
    for proc in [me, *me.children(recursive=True)]:
        try:
            found |= {(proc.pid, c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    return found


@pytest.mark.parametrize("gpus", [0, 2], ids=["cpu-layout", "gpu-layout"])
def test_embedded_clusters_listen_on_loopback_only(gpus):
    """A Dask scheduler or worker runs the code it is sent: the embedded cluster must not be
    reachable from the network. Every socket the cluster opens for listening (scheduler,
    nannies, workers, dashboards) is bound to 127.0.0.1."""
    import ipaddress

    from distributed import Client

    from curate.pipeline.cluster import _local_cluster
    from curate.pipeline.config import DaskConfig

    before = _listening()  # what other tests of this session left open is not this cluster's
    with _local_cluster(DaskConfig(n_workers=1), gpus=gpus) as cluster, Client(cluster) as client:
        client.wait_for_workers(1 + gpus, timeout=60)
        opened = _listening() - before
        # scheduler + its dashboard, and per worker: nanny, worker, worker dashboard
        assert len(opened) >= 2 + 3 * (1 + gpus), opened
        assert all(ipaddress.ip_address(ip).is_loopback for _, ip, _ in opened), opened
