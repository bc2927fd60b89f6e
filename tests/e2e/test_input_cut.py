"""Input cutting runs on the workers, one task per input file, and streams: the first file's
shards are downloading while a later file is still being cut, and a run killed mid-cut resumes
with the same per-file shard numbering as a run never interrupted.

Real parts: `curate run` as a user runs it (a subprocess with its LocalCluster of two worker
processes), the loopback image server, three input files (parquet, csv, a large csv whose
cut takes seconds: 60,000 rows of long captions whose URLs are rejected without a fetch).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import kill_curate_when, run_curate, write_config

PER_SHARD = 20_000
BIG_ROWS = 60_000  # three shards; cutting it takes a few seconds
TIMING_KEYS = {"duration_seconds", "rows_per_second", "images_per_second", "task_seconds_by_stage"}


def write_big_csv(path: Path, rows: int) -> None:
    filler = "lorem ipsum dolor sit amet " * 150
    with open(path, "w") as f:
        f.write("URL,TEXT,truth\n")
        for i in range(rows):
            f.write(f"ftp://nowhere.example/{i}.jpg,{i} {filler},1\n")  # unsupported scheme: no fetch


def mtime(path: Path) -> float:
    return path.stat().st_mtime


def outcome(out: Path) -> dict:
    """What a run leaves that depends on shard numbering: the input summary, every final shard's
    rows (keys included) and the stats."""
    stats = json.loads((out / "stats.json").read_text())
    columns = ["key", "url", "status", "reason"]
    return {
        "input": json.loads((out / "work" / "input" / "_done.json").read_text()),
        "rows": {p.name: pq.read_table(p, columns=columns).to_pylist() for p in sorted((out / "shards").glob("*.parquet"))},
        "stats": {k: v for k, v in stats.items() if k not in TIMING_KEYS},
    }


@pytest.fixture(scope="module")
def story(dataset, tmp_path_factory):
    server, urls, _ = dataset
    tmp = tmp_path_factory.mktemp("input-cut")
    frame = pd.read_parquet(urls)
    frame.iloc[:30].to_parquet(tmp / "a.parquet", index=False)
    frame.iloc[30:60].to_csv(tmp / "b.csv", index=False)
    write_big_csv(tmp / "c.csv", BIG_ROWS)
    config = write_config(tmp / "config.yaml", tmp / "unused", tmp / "out",
                          input={"paths": [str(tmp / "a.parquet"), str(tmp / "b.csv"), str(tmp / "c.csv")],
                                 "rows_per_shard": PER_SHARD},
                          download={"timeout": 10})  # no timeouts on a loaded machine: runs must agree
    settings = yaml.safe_load(config.read_text())
    settings["output"]["keep_intermediate"] = True  # the download markers stay, to be compared
    config.write_text(yaml.safe_dump(settings))
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    ref, out = tmp / "ref", tmp / "out"
    story = {"ref": ref, "out": out}

    story["ref_result"] = run_curate(["run", str(config), "--no-progress", "--set", f"output.path={ref}"], env)

    # Kill the whole run (its LocalCluster too) once the first shard is downloaded: the large
    # file is still being cut then.
    story["alive_at_kill"], _ = kill_curate_when(["run", str(config), "--no-progress"], env,
                                                 (out / "work" / "download" / "00000.done.json").exists)
    story["cut_at_kill"] = sorted(p.name for p in (out / "work" / "input").glob("*.done.json"))
    story["summary_at_kill"] = (out / "work" / "input" / "_done.json").exists()
    story["resume_result"] = run_curate(["run", str(config), "--no-progress"], env)
    return story


def test_reference_run_cuts_one_task_per_file_and_shards_never_span_files(story):
    result = story["ref_result"]
    assert result.returncode == 0, result.stderr
    summary = json.loads((story["ref"] / "work" / "input" / "_done.json").read_text())
    assert [(f["first"], f["shards"], f["rows"]) for f in summary["per_file"]] == [(0, 1, 30), (1, 1, 30), (2, 3, BIG_ROWS)]
    stats = json.loads((story["ref"] / "stats.json").read_text())
    assert stats["rows_in"] == 60 + BIG_ROWS and stats["shards"] == 5
    assert stats["rejected_by_reason"]["invalid_url: unsupported scheme"] == BIG_ROWS
    assert stats["written"] > 30


def test_the_first_download_finishes_before_the_last_file_is_cut(story):
    work = story["ref"] / "work"
    first_download = mtime(work / "download" / "00000.done.json")
    last_cut = mtime(work / "input" / "00002.done.json")
    assert first_download < last_cut, (first_download, last_cut)
    # and the large file's cut took longer than that lead: it really ran alongside the download
    assert json.loads((work / "input" / "00002.done.json").read_text())["seconds"] > 1


def test_killed_mid_cut(story):
    assert story["alive_at_kill"], "the run finished before it could be interrupted"
    assert not story["summary_at_kill"]  # the input was not completely cut yet
    assert "00000.done.json" in story["cut_at_kill"] and "00002.done.json" not in story["cut_at_kill"]


def test_resume_numbers_the_shards_as_the_uninterrupted_run(story):
    result = story["resume_result"]
    assert result.returncode == 0, result.stderr
    assert outcome(story["out"]) == outcome(story["ref"])
