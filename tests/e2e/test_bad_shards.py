"""Long runs survive bad shards, and the driver keeps a bounded number of shards in flight.

Real parts: the loopback image server, real input shards on disk, `curate run` as a user runs
it (a subprocess with its LocalCluster), and a Dask LocalCluster whose scheduler this test
watches while a run uses it.
"""

from __future__ import annotations

import json
from pathlib import Path
import threading
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import run_curate, write_config
from curate.pipeline.config import load_config
from curate.pipeline.layout import RunLayout
from curate.pipeline.reader import check_inputs, write_input_shards

ROWS, PER_SHARD = 90, 30  # three shards


@pytest.fixture(scope="module")
def poisoned(dataset, tmp_path_factory, clean_env_module):
    """A run whose middle input shard is not a parquet file, then the same run after fixing it."""
    server, urls, _ = dataset
    tmp = tmp_path_factory.mktemp("bad_shards")
    pd.read_parquet(urls).head(ROWS).to_parquet(tmp / "urls.parquet", index=False)
    config = write_config(tmp / "config.yaml", tmp / "urls.parquet", tmp / "out",
                          input={"rows_per_shard": PER_SHARD}, dask={"n_workers": 1, "retries": 1})
    cfg = load_config(config)
    layout = RunLayout(tmp / "out")
    write_input_shards(cfg.input, check_inputs(cfg.input), layout.input)  # cut here, to poison one
    good = Path(layout.input_shard(0, 1)).read_bytes()  # one input file: shard 1 is its second
    Path(layout.input_shard(0, 1)).write_bytes(b"PAR1 this is not a parquet file")
    story = {"layout": layout, "server": server}
    story["first"] = run_curate(["run", str(config), "--no-progress", "--log-file", str(tmp / "first.log")],
                                clean_env_module)
    story["first_log"] = (tmp / "first.log").read_text()
    story["first_stats"] = json.loads(Path(layout.stats).read_text())
    story["shard_files_after_failure"] = sorted(p.name for p in Path(layout.shards).glob("00001*"))
    Path(layout.input_shard(0, 1)).write_bytes(good)
    before = server.requests
    # As in a batch job: stderr is not a terminal (a pipe here), so progress comes as plain lines.
    story["second"] = run_curate(["run", str(config), "--progress-every", "0", "--log-file", str(tmp / "second.log")],
                                 clean_env_module)
    story["second_log"] = (tmp / "second.log").read_text()
    story["second_requests"] = server.requests - before
    story["second_stats"] = json.loads(Path(layout.stats).read_text())
    return story


@pytest.fixture(scope="module")
def clean_env_module():
    import os

    env = dict(os.environ)
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    return env


def test_a_failed_shard_is_named_and_the_others_are_written(poisoned):
    first = poisoned["first"]
    assert first.returncode == 1, first.stderr
    assert "shard 00001 (download)" in first.stderr and "rerun the same command" in first.stderr
    stats = poisoned["first_stats"]
    assert [f["shard"] for f in stats["failed_shards"]] == ["00001"]
    assert stats["failed_shards"][0]["step"] == "download" and stats["failed_shards"][0]["error"]
    assert stats["rows_in_failed_shards"] == PER_SHARD
    assert stats["written"] + stats["rejected"] + PER_SHARD == ROWS == stats["rows_in"]
    assert stats["shards"] == 2


def test_a_failed_shard_leaves_nothing_that_looks_finished(poisoned):
    assert poisoned["shard_files_after_failure"] == []


def test_a_rerun_retries_only_the_failed_shard(poisoned):
    second = poisoned["second"]
    assert second.returncode == 0, second.stderr
    assert poisoned["second_requests"] == PER_SHARD  # one fetch per row of shard 1, none for the others
    stats = poisoned["second_stats"]
    assert "failed_shards" not in stats
    assert stats["written"] + stats["rejected"] == ROWS == stats["rows_in"]
    assert stats["shards"] == 3
    rows = sum(pq.read_metadata(p).num_rows for p in Path(poisoned["layout"].shards).glob("*.parquet"))
    assert rows == ROWS


def test_shards_in_flight_never_exceed_the_bound(dataset, tmp_path):
    """One worker thread: the bound is SHARDS_PER_SLOT shards. The test watches the scheduler's
    tasks while a run of 15 shards uses the cluster; the run submits more only as shards finish."""
    from distributed import LocalCluster

    from curate.pipeline.executor import SHARDS_PER_SLOT
    from curate.pipeline.run import run

    server, urls, _ = dataset
    pd.read_parquet(urls).head(60).to_parquet(tmp_path / "urls.parquet", index=False)
    # In this process (inproc:// transport, nothing listens), so the test can read its scheduler.
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        config = write_config(tmp_path / "config.yaml", tmp_path / "urls.parquet", tmp_path / "out",
                              input={"rows_per_shard": 4}, dask={"scheduler": cluster.scheduler_address})
        seen: list[set] = []
        finished = threading.Event()

        def watch():
            # A shard is in flight while one of its tasks waits or runs (a finished task lingers
            # in memory until the driver lets go of it, which is not work in flight).
            unfinished = {"waiting", "queued", "processing", "no-worker"}
            while not finished.is_set():
                shards = {str(ts.key).rsplit("-", 1)[-1] for ts in list(cluster.scheduler.tasks.values())
                          if ts.state in unfinished and str(ts.key).startswith(("download-", "write-"))}
                seen.append(shards)
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            stats = run(load_config(config), progress=False, log=lambda *a: None)
        finally:
            finished.set()
            watcher.join()
    assert stats["shards"] == 15 and "failed_shards" not in stats
    assert len(set().union(*seen)) == 15  # the watcher saw every shard's tasks come and go
    assert max(len(s) for s in seen) <= SHARDS_PER_SLOT


def test_the_failed_shard_is_in_the_log_file_with_its_shard_named(poisoned):
    line = next(l for l in poisoned["first_log"].splitlines() if "failed" in l)
    assert " ERROR shard 00001 failed in download:" in line
    assert line[:4].isdigit()  # timestamped


def test_progress_in_a_log_is_plain_lines_counting_rows(poisoned):
    for text in (poisoned["second"].stderr, poisoned["second_log"]):
        assert "\r" not in text and "\x1b" not in text  # no bars, no cursor codes
        progress = [l for l in text.splitlines() if " INFO progress: " in l]
        assert progress, text
    last = [l for l in poisoned["second_log"].splitlines() if " INFO progress: " in l][-1]
    # the rerun counts the two shards written before (from their markers) and the one it redid
    assert "download 3/3, write 3/3 shards" in last and f"{ROWS:,} rows" in last


def test_with_a_dataset_wide_filter_nothing_is_written_until_every_shard_is_prepared(dataset, tmp_path,
                                                                                   clean_env_module):
    """dedup decides over every shard: with one failed, the others wait (accounted as waiting),
    and the rerun, once the shard is fixed, decides and writes them all."""
    server, urls, _ = dataset
    pd.read_parquet(urls).head(ROWS).to_parquet(tmp_path / "urls.parquet", index=False)
    config = write_config(tmp_path / "config.yaml", tmp_path / "urls.parquet", tmp_path / "out",
                          input={"rows_per_shard": PER_SHARD}, dask={"n_workers": 1, "retries": 0},
                          filters=[{"name": "dedup"}])
    cfg = load_config(config)
    layout = RunLayout(tmp_path / "out")
    write_input_shards(cfg.input, check_inputs(cfg.input), layout.input)
    good = Path(layout.input_shard(0, 2)).read_bytes()
    Path(layout.input_shard(0, 2)).write_bytes(b"not a parquet file")
    first = run_curate(["run", str(config), "--no-progress"], clean_env_module)
    assert first.returncode == 1, first.stderr
    stats = json.loads(Path(layout.stats).read_text())
    assert [f["shard"] for f in stats["failed_shards"]] == ["00002"]
    assert (stats["shards_waiting"], stats["rows_in_waiting_shards"], stats["written"]) == (2, 2 * PER_SHARD, 0)
    assert "wait for them" in first.stderr
    assert not list(Path(layout.shards).glob("*.tar"))
    Path(layout.input_shard(0, 2)).write_bytes(good)
    second = run_curate(["run", str(config), "--no-progress"], clean_env_module)
    assert second.returncode == 0, second.stderr
    stats = json.loads(Path(layout.stats).read_text())
    assert stats["written"] + stats["rejected"] == ROWS and "shards_waiting" not in stats and "dedup" in stats
