"""`curate run` on an existing cluster: a real `dask scheduler` and two `dask worker`
processes on 127.0.0.1, reached through `--set dask.scheduler=...` and through
DASK_SCHEDULER_ADDRESS, give the same samples as the embedded LocalCluster."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import Client

from conftest import kill_group, run_curate, write_config
from curate.pipeline.tarshard import iter_tar_samples

DASK = str(Path(sys.executable).parent / "dask")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def written_samples(out: Path) -> dict[str, str]:
    """key -> sha256 of the jpg member, over every final shard."""
    found = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        for key, fields in iter_tar_samples(tar):
            assert key not in found
            found[key] = hashlib.sha256(fields["jpg"]).hexdigest()
    return found


def scheduler_task_counts(client: Client) -> dict[str, int]:
    """How many download / write tasks this scheduler has finished, ever."""
    def counts(dask_scheduler):
        return {name: prefix.state_counts["memory"] for name, prefix in dask_scheduler.task_prefixes.items()}

    return client.run_on_scheduler(counts)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler and two single-threaded workers, as separate processes on loopback."""
    tmp = tmp_path_factory.mktemp("cluster")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = []
    logs = []

    def spawn(args: list[str], name: str) -> None:
        log = open(tmp / f"{name}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([DASK, *args], stdout=log, stderr=subprocess.STDOUT,
                                      cwd=tmp, start_new_session=True))

    try:
        # The timeouts only matter if this process dies without its finally: then the
        # scheduler stops once idle and the workers follow it.
        spawn(["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard",
               "--idle-timeout", "300s"], "scheduler")
        for i in range(2):
            spawn(["worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard",
                   "--death-timeout", "60s", "--local-directory", str(tmp / f"worker{i}")], f"worker{i}")
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            assert len(client.scheduler_info()["workers"]) == 2
            yield address, client, tmp
    finally:
        for proc in reversed(procs):
            kill_group(proc)
        for log in logs:
            log.close()


@pytest.fixture(scope="module")
def runs(dataset, cluster, tmp_path_factory):
    """The same config three ways: LocalCluster, --set dask.scheduler, DASK_SCHEDULER_ADDRESS."""
    _, urls, _ = dataset
    address, client, _ = cluster
    tmp = tmp_path_factory.mktemp("cluster-runs")
    config = write_config(tmp / "config.yaml", urls, tmp / "unused", input={"rows_per_shard": 100},
                          download={"timeout": 10})  # no timeouts on a loaded machine: runs must agree
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    results = {}

    before = scheduler_task_counts(client)
    results["local"] = run_curate(["run", str(config), "--no-progress", "--set", f"output.path={tmp / 'local'}"], env)
    after_local = scheduler_task_counts(client)
    results["set"] = run_curate(["run", str(config), "--no-progress", "--set", f"output.path={tmp / 'set'}",
                                 "--set", f"dask.scheduler={address}"], env)
    after_set = scheduler_task_counts(client)
    results["env"] = run_curate(["run", str(config), "--no-progress", "--set", f"output.path={tmp / 'env'}"],
                                {**env, "DASK_SCHEDULER_ADDRESS": address})
    after_env = scheduler_task_counts(client)
    return {"tmp": tmp, "results": results, "counts": [before, after_local, after_set, after_env]}


def test_all_runs_succeed(runs):
    for name, result in runs["results"].items():
        assert result.returncode == 0, (name, result.stderr)


def test_remote_runs_ran_their_tasks_on_the_cluster(runs):
    before, after_local, after_set, after_env = runs["counts"]
    n_shards = 3

    def delta(a, b, prefix):
        return b.get(prefix, 0) - a.get(prefix, 0)

    # The LocalCluster run must not touch the external scheduler...
    assert delta(before, after_local, "download") == delta(before, after_local, "write") == 0
    # ...and each remote run runs one download and one write task per shard there.
    for a, b in ((after_local, after_set), (after_set, after_env)):
        assert delta(a, b, "download") == n_shards
        assert delta(a, b, "write") == n_shards


def test_same_samples_as_local_cluster(runs):
    tmp = runs["tmp"]
    local = written_samples(tmp / "local")
    assert len(local) > 100
    assert written_samples(tmp / "set") == local
    assert written_samples(tmp / "env") == local


def test_same_stats_as_local_cluster(runs):
    def counts(name):
        stats = json.loads((runs["tmp"] / name / "stats.json").read_text())
        return {k: stats[k] for k in ("rows_in", "written", "rejected", "rejected_by_reason", "shards", "bytes_downloaded")}

    assert counts("set") == counts("local")
    assert counts("env") == counts("local")


def test_workers_are_still_there(cluster):
    """A run's client closing must not take the shared cluster down with it."""
    _, client, _ = cluster
    assert len(client.scheduler_info()["workers"]) == 2
    assert client.submit(sum, [1, 2], pure=False).result(timeout=10) == 3
