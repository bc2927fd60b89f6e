"""`curate run` end to end, as a user runs it: the CLI in a subprocess against the served
synthetic dataset, then every output read back and checked against the input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from conftest import run_curate, write_config
from curate.pipeline.config import load_config
from curate.pipeline.records import FAILED_TO_DOWNLOAD, FILTERED, SUCCESS

IMAGE_SIZE = 128
MIN_WORDS = 9  # splits the synthetic captions (7 to 13 words) into kept and dropped
CAPTION_REASON = f"caption_too_short: <{MIN_WORDS} words"


def served_sha256(url: str) -> str:
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to 127.0.0.1
    with no_proxy.open(url, timeout=10) as resp:
        return hashlib.sha256(resp.read()).hexdigest()


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    """One run of a small config, reused by every assertion below."""
    server, urls, _ = dataset
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    config = write_config(
        tmp / "config.yaml", urls, out,
        input={"extra_cols": ["truth", "WIDTH", "HEIGHT"]},
        download={"timeout": 10},  # a loaded CI machine must not turn a good row into a timeout
        resize={"size": IMAGE_SIZE},
        filters=[{"name": "caption_length", "min_words": MIN_WORDS}],
    )
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    result = run_curate(["run", str(config), "--no-progress"], env)
    inputs = pd.read_parquet(urls)
    return {"result": result, "out": out, "config": config, "inputs": inputs, "env": env, "urls": urls}


def shard_paths(out: Path, ext: str) -> list[Path]:
    return sorted((out / "shards").glob(f"*.{ext}"))


def samples(out: Path) -> list[dict]:
    tars = [str(p) for p in shard_paths(out, "tar")]
    return list(wds.WebDataset(tars, shardshuffle=False))


def rows(out: Path) -> pd.DataFrame:
    return pd.concat([pq.read_table(p).to_pandas() for p in shard_paths(out, "parquet")], ignore_index=True)


def test_exit_code_and_summary(finished):
    result = finished["result"]
    assert result.returncode == 0, result.stderr
    assert "rows in" in result.stdout and "300" in result.stdout
    assert "Traceback" not in result.stderr


def test_layout(finished):
    out = finished["out"]
    n_shards = 3  # 300 rows, 100 per shard
    for ext in ("tar", "parquet", "done.json"):
        assert [p.name.split(".")[0] for p in shard_paths(out, ext)] == [f"{i:05d}" for i in range(n_shards)]
    assert not list(out.rglob("*.tmp-*"))


def test_samples_read_back_with_webdataset(finished):
    out, inputs = finished["out"], finished["inputs"].set_index("URL")
    got = samples(out)
    assert len(got) == json.loads((out / "stats.json").read_text())["written"] > 100
    for sample in got:
        assert {"jpg", "txt", "json"} <= set(sample), sample.keys()
        meta = json.loads(sample["json"])
        for field in ("url", "caption", "width", "height", "original_width", "original_height", "sha256"):
            assert field in meta, (sample["__key__"], field)
        source = inputs.loc[meta["url"]]
        assert sample["txt"].decode() == meta["caption"] == source["TEXT"]
        assert (meta["original_width"], meta["original_height"]) == (source["WIDTH"], source["HEIGHT"])

        with Image.open(io.BytesIO(sample["jpg"])) as im:
            im.load()
            assert im.mode == "RGB"
            assert im.size == (meta["width"], meta["height"])
        short_in = min(meta["original_width"], meta["original_height"])
        assert min(im.size) == min(IMAGE_SIZE, short_in)
        if short_in <= IMAGE_SIZE:  # not resized: passed through unchanged
            assert im.size == (meta["original_width"], meta["original_height"])
            assert hashlib.sha256(sample["jpg"]).hexdigest() == meta["sha256"]


def test_sha256_is_the_hash_of_the_served_bytes(finished):
    for sample in samples(finished["out"])[::7]:
        meta = json.loads(sample["json"])
        assert meta["sha256"] == served_sha256(meta["url"])


def test_stats_account_for_every_row(finished):
    stats = json.loads((finished["out"] / "stats.json").read_text())
    assert stats["rows_in"] == len(finished["inputs"]) == 300
    assert stats["written"] + stats["rejected"] == stats["rows_in"]
    assert sum(stats["rejected_by_reason"].values()) == stats["rejected"]
    assert stats["shards"] == 3
    table = rows(finished["out"])
    assert (table["status"] == SUCCESS).sum() == stats["written"]
    assert table.loc[table["status"] != SUCCESS, "reason"].value_counts().to_dict() == stats["rejected_by_reason"]


def test_every_input_row_appears_exactly_once(finished):
    table = rows(finished["out"])
    inputs = finished["inputs"]
    assert len(table) == len(inputs)
    assert table["key"].is_unique
    assert sorted(zip(table["url"], table["caption"], table["truth"])) == sorted(
        zip(inputs["URL"], inputs["TEXT"], inputs["truth"])
    )
    # img2dataset's statuses: the broken URLs failed to download, the rules' drops are curate's own
    assert set(table["status"]) == {SUCCESS, FAILED_TO_DOWNLOAD, FILTERED}
    rejected = table[table["status"] != SUCCESS]
    assert rejected["reason"].notna().all() and (rejected["reason"] != "").all()
    assert table.loc[table["status"] == SUCCESS, "reason"].isna().all()
    # The written samples are exactly the rows marked ok.
    assert sorted(s["__key__"] for s in samples(finished["out"])) == sorted(table.loc[table["status"] == SUCCESS, "key"])


def test_planted_faults_get_their_reasons(finished):
    table = rows(finished["out"])
    assert set(table["truth"]) == {"ok", "wrong_caption", "broken_url", "too_small", "extreme_aspect"}
    # The caption rule looks only at the row, so it runs before the download: a short
    # caption is its reason whatever the image would have done.
    short = table["caption"].str.split().str.len() < MIN_WORDS
    assert (table.loc[short, "reason"] == CAPTION_REASON).all()
    assert short.any() and (~short).any()  # the filter really splits the data
    by_truth = table[~short].groupby("truth")["reason"]
    assert by_truth.get_group("broken_url").eq("failed_to_download: HTTP 404").all()
    assert table.loc[~short & (table["truth"] == "broken_url"), "status"].eq(FAILED_TO_DOWNLOAD).all()
    assert table.loc[short | table["truth"].isin(["too_small", "extreme_aspect"]), "status"].eq(FILTERED).all()
    assert by_truth.get_group("too_small").eq("resolution: side<64").all()
    assert by_truth.get_group("extreme_aspect").eq("resolution: aspect>3").all()
    fine = table[table["truth"].isin(["ok", "wrong_caption"]) & ~short]
    assert (fine["status"] == SUCCESS).all()


def test_caption_filter_counts_in_stats(finished):
    stats = json.loads((finished["out"] / "stats.json").read_text())
    table = rows(finished["out"])
    dropped = int((table["reason"] == CAPTION_REASON).sum())
    assert dropped > 0
    assert stats["rejected_by_reason"][CAPTION_REASON] == dropped
    # The filter sees every row before the download: it keeps all the rows it does not drop.
    assert stats["filters"]["caption_length"] == {"kept": stats["rows_in"] - dropped, f"dropped: {CAPTION_REASON}": dropped}


def test_saved_config_loads_back(finished):
    saved = load_config(finished["out"] / "config.yaml")
    assert saved == load_config(finished["config"])
    assert saved.resize.size == IMAGE_SIZE
    assert saved.filters[0].name == "caption_length"


def test_intermediates_removed(finished):
    download = finished["out"] / "work" / "download"
    assert download.is_dir() and not list(download.iterdir())


def test_keep_intermediate_keeps_download_shards(finished, tmp_path):
    inputs = finished["inputs"].iloc[:40]
    small = tmp_path / "small.parquet"
    inputs.to_parquet(small, index=False)
    out = tmp_path / "kept"
    result = run_curate([
        "run", str(finished["config"]), "--no-progress",
        "--set", "output.keep_intermediate=true",
        "--set", f"output.path={out}",
        "--set", f"input.paths=[{small}]",
        "--set", "input.rows_per_shard=20",
        "--set", "dask.n_workers=1",
    ], finished["env"])
    assert result.returncode == 0, result.stderr
    download = out / "work" / "download"
    names = sorted(p.name for p in download.iterdir())
    assert names == [f"0000{i}.{ext}" for i in range(2) for ext in ("done.json", "parquet", "tar")]
    # The raw shard holds every row too; the final one agrees with it on what was downloaded.
    raw = pd.concat([pq.read_table(download / f"0000{i}.parquet").to_pandas() for i in range(2)])
    final = rows(out)
    assert len(raw) == len(final) == 40
    assert set(final.loc[final["status"] == SUCCESS, "key"]) <= set(raw.loc[raw["status"] == SUCCESS, "key"])


def test_extra_columns_of_any_type_survive_the_write_stage(dataset, tmp_path):
    """Timestamps in an extra column used to become text on written rows only, and the shard's
    parquet failed to write (mixed types in one column)."""
    from curate.pipeline.config import load_config
    from curate.pipeline.run import run

    _, urls, _ = dataset
    table = pd.read_parquet(urls).head(60)
    table["seen"] = pd.Timestamp("2024-01-02") + pd.to_timedelta(range(len(table)), unit="h")
    path = tmp_path / "urls.parquet"
    table.to_parquet(path, index=False)
    cfg = write_config(tmp_path / "cfg.yaml", path, tmp_path / "out", input={"extra_cols": ["truth", "seen"]},
                       dask={"n_workers": 1}, filters=[{"name": "caption_length", "min_words": 1}])
    stats = run(load_config(cfg), progress=False, log=lambda *a: None)
    assert stats["written"] > 0 and stats["rejected"] > 0
    rows = pq.read_table(tmp_path / "out" / "shards" / "00000.parquet").to_pandas()
    assert len(rows) == 60 and rows["seen"].notna().all()
