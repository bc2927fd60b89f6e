"""Shared fixtures and helpers of tests/unit and tests/e2e: a real HTTP server on 127.0.0.1,
generated LAION-style data, run configs, the CLI in its own process group, raw download shards."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from curate.pipeline.demo.devserver import DevServer
from curate.pipeline.demo.synthetic import caption, generate_dataset, random_scene, render, wrong_caption
from curate.pipeline.shards import sample_key
from curate.pipeline.tarshard import TarShardWriter

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A served synthetic dataset: (server, urls.parquet path, data dir). 300 rows with planted faults."""
    root = tmp_path_factory.mktemp("dataset")
    (root / "images").mkdir()
    with DevServer(root) as server:
        urls = generate_dataset(root, 300, base_url=server.base_url, seed=1, min_side=96, max_side=320)
        yield server, urls, root


@pytest.fixture()
def server(tmp_path):
    """A server rooted at tmp_path/"www"; files placed in www/images/NAME are served at /images/NAME."""
    www = tmp_path / "www"
    www.mkdir()
    with DevServer(www) as srv:
        srv.root_dir = www
        yield srv


# The size rule of every test run: the served dataset's planted too-small and extreme-aspect
# images are rejected from their header (`resolution: side<64`, `resolution: aspect>3`).
RESOLUTION = {"min_side": 64, "max_aspect_ratio": 3.0}


def write_config(path: Path, urls: Path | str, output: Path, resolution: dict | None = RESOLUTION,
                 **sections) -> Path:
    """A small run config for tests: private addresses allowed (the server is 127.0.0.1).
    `resolution`: the resolution filter's parameters, appended to `filters:` (None: no such filter)."""
    cfg = {
        "input": {"paths": [str(urls)], "extra_cols": ["truth"], "rows_per_shard": 100},
        "output": {"path": str(output)},
        "download": {"timeout": 3, "threads": 8, "allow_private_addresses": True},
        "resize": {"size": 128},
        "dask": {"n_workers": 2},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {})
        if isinstance(values, dict):
            cfg[name].update(values)
        else:
            cfg[name] = values
    if resolution is not None:
        cfg["filters"] = [*cfg.get("filters", []), {"name": "resolution", **resolution}]
    path.write_text(yaml.safe_dump(cfg))
    return path


def curate_command(*args: str) -> list[str]:
    """The installed CLI, run as a user would (a fresh process)."""
    return [sys.executable, "-m", "curate.pipeline.cli", *args]


def kill_group(proc: subprocess.Popen) -> None:
    """Kill a process started with start_new_session=True and everything it spawned."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _stat_fields(stat: Path) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None when gone."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Whether a process is still running (a zombie is not)."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return fields is not None and fields[0] != "Z"


def live_members(pgid: int) -> list[int]:
    """Processes of a process group that are still running (zombies don't count)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def sigkill_group(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a curate run and everything it started; returns the processes that outlived it."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while live_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return live_members(proc.pid)


def kill_curate_when(args: list[str], env: dict, ready, poll: float = 0.02, timeout: float = 90) -> tuple[bool, list[int]]:
    """Start the CLI in its own process group and SIGKILL the group as soon as `ready()` is true
    (a run interrupted part-way). Returns whether it was still running then, and the processes
    that outlived the kill."""
    proc = subprocess.Popen(curate_command(*args), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                break
            time.sleep(poll)
        alive = proc.poll() is None
        return alive, sigkill_group(proc)
    finally:
        kill_group(proc)


def run_curate(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the CLI in its own process group; whatever it spawned dies with it."""
    proc = subprocess.Popen(curate_command(*args), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture()
def clean_env():
    """Environment for subprocesses without a Dask scheduler address leaking in."""
    env = dict(os.environ)
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    return env


def raw_shard(path, n, seed, corrupt=()):
    """A raw download shard: jpg + json(caption) per key; half the captions are wrong."""
    import random

    rng = random.Random(seed)
    truth = []
    with TarShardWriter(path) as tar:
        for i in range(n):
            scene = random_scene(rng)
            right = i % 2 == 0
            text = caption(scene) if right else wrong_caption(scene, rng)
            buf = io.BytesIO()
            render(scene, rng.randint(96, 200), rng.randint(96, 200), rng).save(buf, "JPEG", quality=90)
            jpg = b"not a jpeg at all" if i in corrupt else buf.getvalue()
            tar.write(sample_key(0, i, n), {"jpg": jpg, "json": json.dumps({"caption": text}).encode()})
            truth.append(right)
    return truth
