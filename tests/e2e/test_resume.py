"""Kill `curate run` mid-way (SIGKILL to its whole process group, LocalCluster workers
included), rerun the same command, and get exactly what an uninterrupted run gives."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import kill_curate_when, run_curate, write_config

# Half the served dataset, in six shards: each shard still waits on its slow rows long enough
# for the run to be killed between finished and unfinished shards.
ROWS, ROWS_PER_SHARD = 150, 25
N_SHARDS = ROWS // ROWS_PER_SHARD
TIMING_KEYS = {"duration_seconds", "rows_per_second", "images_per_second", "task_seconds_by_stage"}


def snapshot(out: Path) -> dict:
    """What a run leaves: tar bytes, parquet rows and stats counts, per shard."""
    shards = out / "shards"
    stats = json.loads((out / "stats.json").read_text())
    return {
        "tars": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shards.glob("*.tar"))},
        "rows": {p.name: pq.read_table(p).to_pylist() for p in sorted(shards.glob("*.parquet"))},
        "markers": sorted(p.name for p in shards.glob("*.done.json")),
        "stats": {k: v for k, v in stats.items() if k not in TIMING_KEYS},
        "tmp": sorted(str(p) for p in out.rglob("*.tmp-*")),
    }


@pytest.fixture(scope="module")
def slow_urls(dataset, tmp_path_factory):
    """The dataset's first ROWS rows with every other image behind /slow/0.2/, so a run takes a few seconds."""
    server, urls, _ = dataset
    frame = pd.read_parquet(urls).iloc[:ROWS].copy()
    assert len(frame) == ROWS
    plain = f"{server.base_url}/images/"
    slow = frame.index % 2 == 0
    frame.loc[slow, "URL"] = frame.loc[slow, "URL"].str.replace(plain, f"{server.base_url}/slow/0.2/images/", regex=False)
    assert frame["URL"].str.contains("/slow/0.2/images/").sum() > ROWS // 3
    path = tmp_path_factory.mktemp("resume-input") / "slow.parquet"
    frame.to_parquet(path, index=False)
    return path


@pytest.fixture(scope="module")
def story(dataset, slow_urls, tmp_path_factory):
    """An uninterrupted run, then kill / resume / rerun / changed config / overwrite on another."""
    server = dataset[0]
    tmp = tmp_path_factory.mktemp("resume")
    config = write_config(tmp / "config.yaml", slow_urls, tmp / "out",
                          input={"rows_per_shard": ROWS_PER_SHARD},
                          # timeout: no row may time out on a loaded machine, or runs would differ
                          download={"threads": 4, "timeout": 10})
    out, ref = tmp / "out", tmp / "ref"
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    command = ["run", str(config), "--no-progress"]
    story = {"out": out, "ref": ref, "command": command, "env": env, "server": server}

    requests = server.requests
    story["ref_result"] = run_curate([*command, "--set", f"output.path={ref}"], env)
    story["ref_requests"] = server.requests - requests
    story["ref"] = snapshot(ref)

    # Interrupted run: SIGKILL the whole group once some shards are final, but not all.
    story["alive_at_kill"], story["survivors"] = kill_curate_when(
        command, env, lambda: bool(list((out / "shards").glob("*.done.json"))))
    story["done_at_kill"] = sorted(p.name for p in (out / "shards").glob("*.done.json"))
    story["downloaded_at_kill"] = sorted(p.name for p in (out / "work" / "download").glob("*.done.json"))

    requests = server.requests
    story["resume_result"] = run_curate(command, env)
    story["resume_requests"] = server.requests - requests
    story["resumed"] = snapshot(out)

    requests = server.requests
    story["rerun_result"] = run_curate(command, env)
    story["rerun_requests"] = server.requests - requests
    story["rerun"] = snapshot(out)

    story["changed_result"] = run_curate([*command, "--set", "resize.size=64"], env)
    story["after_changed"] = snapshot(out)

    (out / "shards" / "stray.txt").write_text("left by someone")
    requests = server.requests
    story["overwrite_result"] = run_curate([*command, "--overwrite"], env)
    story["overwrite_requests"] = server.requests - requests
    story["overwritten"] = snapshot(out)
    story["stray_survived"] = (out / "shards" / "stray.txt").exists()
    return story


def test_reference_run(story):
    assert story["ref_result"].returncode == 0, story["ref_result"].stderr
    assert story["ref_requests"] == ROWS  # one request per row: no retries configured
    assert len(story["ref"]["tars"]) == N_SHARDS
    assert story["ref"]["stats"]["rows_in"] == ROWS
    assert story["ref"]["stats"]["written"] > ROWS // 2


def test_kill_happened_mid_run_and_took_the_workers_with_it(story):
    assert story["alive_at_kill"], "the run finished before it could be interrupted"
    assert 0 < len(story["done_at_kill"]) < N_SHARDS, story["done_at_kill"]
    assert story["survivors"] == []


def test_resume_completes_without_redoing_finished_shards(story):
    result = story["resume_result"]
    assert result.returncode == 0, result.stderr
    assert len(story["resumed"]["markers"]) == N_SHARDS
    downloaded = set(story["done_at_kill"]) | set(story["downloaded_at_kill"])
    assert story["resume_requests"] <= ROWS - ROWS_PER_SHARD * len(downloaded)


def test_resumed_output_equals_uninterrupted_output(story):
    resumed, ref = story["resumed"], story["ref"]
    assert resumed["tars"] == ref["tars"]  # byte-identical shards
    assert resumed["rows"] == ref["rows"]
    assert resumed["stats"] == ref["stats"]
    assert resumed["stats"]["written"] + resumed["stats"]["rejected"] == ROWS


def test_no_temporary_files_left(story):
    assert story["ref"]["tmp"] == []
    assert story["resumed"]["tmp"] == []
    assert story["overwritten"]["tmp"] == []


def test_rerun_of_finished_run_does_no_work(story):
    assert story["rerun_result"].returncode == 0, story["rerun_result"].stderr
    assert story["rerun_requests"] == 0
    assert story["rerun"] == story["resumed"]


def test_changed_config_is_refused_with_one_line(story):
    result = story["changed_result"]
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("curate: error:")
    assert "different config" in lines[0] and "--overwrite" in lines[0]
    assert story["after_changed"] == story["rerun"]  # nothing touched


def test_overwrite_starts_over(story):
    result = story["overwrite_result"]
    assert result.returncode == 0, result.stderr
    assert not story["stray_survived"]
    assert story["overwrite_requests"] == ROWS
    assert story["overwritten"]["tars"] == story["ref"]["tars"]
    assert story["overwritten"]["stats"] == story["ref"]["stats"]
