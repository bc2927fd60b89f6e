"""Faults a long run over the open web meets, each survived without losing or duplicating a row:
a Dask worker killed mid-shard, the whole `curate run` SIGKILLed at random points, the image
server going away mid-run, and the output disk filling up.

Every row is fetched through a /slow/ route, so shards take long enough to be interrupted
while they run. An uninterrupted run on a LocalCluster is the reference that each disturbed
run must reproduce byte for byte (tars) and row for row (parquets, stats).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import REPO, curate_command, kill_group, run_curate, sigkill_group, write_config
from dask_processes import dask_processes, executing, worker_pids
from curate.pipeline.demo.devserver import DevServer
from curate.pipeline.records import SUCCESS
from curate.pipeline.shards import is_done
from curate.pipeline.tarshard import iter_tar_samples

ROWS, ROWS_PER_SHARD = 200, 50
N_SHARDS = ROWS // ROWS_PER_SHARD
SLOW = 0.05  # seconds per image: a shard of 50 rows on 4 threads takes about 0.7 s
TIMING_KEYS = {"duration_seconds", "rows_per_second", "images_per_second", "task_seconds_by_stage"}
ENV = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}


def snapshot(out: Path) -> dict:
    """What a run leaves behind, in a form two runs can be compared by."""
    shards = out / "shards"
    stats = json.loads((out / "stats.json").read_text())
    keys = [key for tar in sorted(shards.glob("*.tar")) for key, _ in iter_tar_samples(tar)]
    return {
        "tars": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shards.glob("*.tar"))},
        "rows": {p.name: pq.read_table(p).to_pylist() for p in sorted(shards.glob("*.parquet"))},
        "shard_files": sorted(p.name for p in shards.iterdir()),
        "stats": {k: v for k, v in stats.items() if k not in TIMING_KEYS},
        "keys": keys,
        "leftovers": sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp-" in p.name
                            or (p.is_file() and p.parent.name == "download")),
    }


def start_curate(*args: str) -> subprocess.Popen:
    return subprocess.Popen(curate_command(*args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@pytest.fixture(scope="module")
def faults(dataset, tmp_path_factory):
    """The first ROWS rows of the shared dataset, every image behind /slow/, and a config."""
    server, urls, _ = dataset
    tmp = tmp_path_factory.mktemp("faults")
    frame = pd.read_parquet(urls).iloc[:ROWS].copy()
    frame["URL"] = frame["URL"].str.replace(f"{server.base_url}/images/", f"{server.base_url}/slow/{SLOW}/images/",
                                            regex=False)
    assert frame["URL"].str.contains("/slow/").sum() > ROWS // 2
    frame.to_parquet(tmp / "slow.parquet", index=False)
    # timeout: no row may time out on a loaded machine, or two runs could differ.
    config = write_config(tmp / "config.yaml", tmp / "slow.parquet", tmp / "unused",
                          input={"rows_per_shard": ROWS_PER_SHARD}, download={"threads": 4, "timeout": 10})
    return {"server": server, "config": config, "tmp": tmp}


@pytest.fixture(scope="module")
def reference(faults):
    """An undisturbed run on the embedded LocalCluster."""
    out = faults["tmp"] / "reference"
    requests = faults["server"].requests
    started = time.monotonic()
    result = run_curate(["run", str(faults["config"]), "--no-progress", "--set", f"output.path={out}"], ENV)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert faults["server"].requests - requests == ROWS
    snap = snapshot(out)
    assert len(snap["tars"]) == N_SHARDS and snap["stats"]["rows_in"] == ROWS
    assert snap["stats"]["written"] > ROWS // 2
    assert len(snap["keys"]) == len(set(snap["keys"])) == snap["stats"]["written"]
    assert snap["leftovers"] == []
    return {"snapshot": snap, "seconds": seconds}


def assert_same_as_reference(out: Path, reference: dict, context: str = "") -> None:
    got, ref = snapshot(out), reference["snapshot"]
    assert got["leftovers"] == [], context
    assert len(got["keys"]) == len(set(got["keys"])), f"duplicate samples {context}"
    assert got["tars"] == ref["tars"], context  # byte-identical shards
    assert got["rows"] == ref["rows"], context  # every row, once, with the same outcome
    assert got["stats"] == ref["stats"], context
    assert got == ref, context


# --- 1a: a Dask worker killed mid-shard ------------------------------------------------------


def _kill_a_worker_mid_download(client, proc, out: Path) -> dict:
    """Wait until a worker has been running a download task for a while, then SIGKILL that
    worker process (its nanny restarts it). Returns what was killed."""
    pids = worker_pids(client)
    seen: dict[tuple[str, str], float] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        for address, keys in executing(client).items():
            for key in keys:
                if not key.startswith("download-"):
                    continue
                first = seen.setdefault((address, key), time.monotonic())
                shard = int(key.rsplit("-", 1)[1])
                # 0.2 s into a shard of 50 slow rows: some rows fetched, most still to come.
                if time.monotonic() - first >= 0.2 and not is_done(out / "work" / "download", shard):
                    os.kill(pids[address], signal.SIGKILL)
                    return {"address": address, "pid": pids[address], "key": key, "shard": shard}
        time.sleep(0.05)
    raise AssertionError("no download task was seen running long enough to be interrupted")


def test_worker_killed_mid_shard_is_redone_with_identical_output(faults, reference, tmp_path):
    server = faults["server"]
    out = tmp_path / "out"
    with dask_processes(tmp_path, n_workers=2) as (address, client):
        requests = server.requests
        proc = start_curate("run", str(faults["config"]), "--no-progress", "--set", f"output.path={out}",
                            "--set", f"dask.scheduler={address}")
        try:
            killed = _kill_a_worker_mid_download(client, proc, out)
            _, err = proc.communicate(timeout=120)
        finally:
            kill_group(proc)
        assert proc.returncode == 0, err
        # The nanny brought a fresh worker process in place of the killed one.
        client.wait_for_workers(2, timeout=30)
        assert killed["pid"] not in worker_pids(client).values()

    assert is_done(out / "shards", killed["shard"])
    # The killed attempt had fetched some of its rows; the redo fetched them again.
    assert server.requests - requests > ROWS, killed
    assert_same_as_reference(out, reference, str(killed))


# --- 1b: the whole run SIGKILLed at random points -----------------------------------------------


def _wait_for_kill_point(proc: subprocess.Popen, out: Path, point: tuple) -> None:
    started = time.monotonic()
    deadline = started + 60
    if point[0] == "seconds":
        while time.monotonic() - started < point[1] and proc.poll() is None:
            time.sleep(0.01)
        return
    _, shards, extra = point  # once `shards` shards are downloaded, plus a random delay
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "work" / "download").glob("*.done.json"))) >= shards:
            break
        time.sleep(0.01)
    end = time.monotonic() + extra
    while time.monotonic() < end and proc.poll() is None:
        time.sleep(0.01)


def test_sigkill_at_random_points_then_rerun_gives_identical_output(faults, reference, tmp_path):
    seed = int(os.environ.get("CURATE_KILL_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    # One point anywhere in the first part of a run (cluster start, input cutting, downloads),
    # two tied to progress so that they surely fall between finished and unfinished shards:
    # 2 workers download shards two at a time, so after 1 or 2 downloaded shards others are
    # still downloading (final shards are written mostly at the end, after the downloads).
    points = [
        ("seconds", rng.uniform(0.2, 0.4 * reference["seconds"])),
        ("shards", rng.randint(1, N_SHARDS // 2), rng.uniform(0.0, 0.3)),
        ("shards", rng.randint(1, N_SHARDS // 2), rng.uniform(0.0, 0.3)),
    ]
    context = f"CURATE_KILL_SEED={seed} points={points}"
    done_at_kill = []
    for i, point in enumerate(points):
        out = tmp_path / f"out{i}"
        proc = start_curate("run", str(faults["config"]), "--no-progress", "--set", f"output.path={out}")
        try:
            _wait_for_kill_point(proc, out, point)
            assert proc.poll() is None, f"the run ended before kill point {point}; {context}"
            survivors = sigkill_group(proc)
        finally:
            kill_group(proc)
        assert survivors == [], context
        progress = tuple(len(list((out / stage).glob("*.done.json"))) for stage in ("work/download", "shards"))
        done_at_kill.append(progress)
        assert progress[1] < N_SHARDS, context

        rerun = run_curate(["run", str(faults["config"]), "--no-progress", "--set", f"output.path={out}"], ENV)
        assert rerun.returncode == 0, (context, rerun.stderr)
        assert_same_as_reference(out, reference, f"{context} kill {i}")
    # At least the progress-tied kills fell between finished and unfinished shards
    # (downloaded shards whose final shard is written count as finished too).
    assert sum(1 for downloaded, final in done_at_kill if 0 < downloaded + final and final < N_SHARDS) >= 2, (
        done_at_kill, context)


# --- 1c: the image server going away mid-run --------------------------------------------------


def test_server_going_away_mid_run_fails_rows_with_a_reason_and_the_run_finishes(dataset, tmp_path):
    _, urls, root = dataset
    with DevServer(root) as doomed:  # a second server over the same files, stopped mid-run
        frame = pd.read_parquet(urls).iloc[:ROWS].copy()
        frame["URL"] = frame["URL"].str.replace(r"^http://127\.0\.0\.1:\d+/images/", f"{doomed.base_url}/slow/{SLOW}/images/",
                                                regex=True)
        frame["URL"] = frame["URL"].str.replace(r"^http://127\.0\.0\.1:\d+/", f"{doomed.base_url}/", regex=True)
        assert frame["URL"].str.startswith(doomed.base_url).all()
        frame.to_parquet(tmp_path / "urls.parquet", index=False)
        config = write_config(tmp_path / "config.yaml", tmp_path / "urls.parquet", tmp_path / "out",
                              input={"rows_per_shard": ROWS_PER_SHARD}, download={"threads": 4, "timeout": 10})
        proc = start_curate("run", str(config), "--no-progress")
        try:
            deadline = time.monotonic() + 60
            while doomed.requests < ROWS // 3 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
            assert proc.poll() is None, "the run ended before the server could go away"
            doomed.stop()
            served = doomed.requests
            _, err = proc.communicate(timeout=120)
        finally:
            kill_group(proc)

    assert proc.returncode == 0, err
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rows_in"] == ROWS == stats["written"] + stats["rejected"]
    rows = [r for p in sorted((tmp_path / "out" / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == ROWS and len({r["key"] for r in rows}) == ROWS
    for row in rows:
        if row["status"] == SUCCESS:
            assert row["reason"] is None
        else:
            assert row["reason"] and row["error_message"], row
    unreachable = [r for r in rows if r["reason"] == "failed_to_download: connection error"]
    assert len(unreachable) >= ROWS // 3, stats["rejected_by_reason"]
    assert all("Connection" in r["error_message"] for r in unreachable)
    assert 0 < stats["written"] <= served
    assert stats["rejected_by_reason"]["failed_to_download: connection error"] == len(unreachable)


# --- 1d: the output disk fills up ----------------------------------------------------------------

_DISK_FULL_SCRIPT = """
set -u
mount -t tmpfs -o size=600k curate-test {disk} || exit 97
run() {{ {curate} run {config} --no-progress --set output.path={disk}/out >{res}/$1.out 2>{res}/$1.err; echo $? >{res}/$1.rc; }}
run full
run still_full
dd if=/dev/zero of={disk}/filler bs=4k 2>/dev/null  # not a byte left: the run fails at its first write
run no_room
rm -f {disk}/filler
(cd {disk}/out && find . | sort) >{res}/after_full.files
mount -o remount,size=64m {disk} || exit 98
run resumed
cp -a {disk}/out {res}/out
"""


def test_disk_full_is_one_clear_error_and_the_next_run_resumes(faults, reference, tmp_path):
    """A 600 KB tmpfs (the final shards alone need about 1.1 MB) in a private mount namespace, so
    no root is needed and nothing stays mounted; then the same tmpfs grown, as when space is freed."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small tmpfs in a private mount namespace")
    disk, res = tmp_path / "disk", tmp_path / "results"
    disk.mkdir()
    res.mkdir()
    script = _DISK_FULL_SCRIPT.format(
        disk=shlex.quote(str(disk)), res=shlex.quote(str(res)), config=shlex.quote(str(faults["config"])),
        curate=" ".join(shlex.quote(a) for a in curate_command()),
    )
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this system refuses a private mount namespace: {probe.stderr.strip()}")
    proc = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script], capture_output=True,
                          text=True, cwd=REPO, env=ENV, timeout=240)
    if proc.returncode == 97:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr

    # failing; failing again while the disk is still full; and with no byte left, at the run's first write
    for name in ("full", "still_full", "no_room"):
        rc = int((res / f"{name}.rc").read_text())
        lines = (res / f"{name}.err").read_text().strip().splitlines()
        assert rc == 2, (name, lines)
        assert len(lines) == 1, (name, lines)
        assert lines[0].startswith("curate: error: no space left"), (name, lines)
    assert not [f for f in (res / "after_full.files").read_text().split() if ".tmp-" in f]

    assert int((res / "resumed.rc").read_text()) == 0, (res / "resumed.err").read_text()
    assert_same_as_reference(res / "out", reference)
