"""The rule filters through a real run (CLI subprocess, LocalCluster, devserver on 127.0.0.1):
row filters drop before the fetch, `resolution` on the header before decoding, reasons land in
the parquet, the cleaned caption and the aspect bucket (resize.mode buckets) land in the written
samples, and a written image is the one the download stage encoded: decoded and encoded once."""

from __future__ import annotations

import io
import json
import math
import os
from urllib.parse import urlsplit

import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from conftest import run_curate, write_config
from curate.pipeline.geometry import aspect_buckets
from curate.pipeline.records import FILTERED
from curate.pipeline.tarshard import iter_tar_samples

N_ROWS = 150
SIZE = 192  # buckets (128, 256), (192, 192), (256, 128) with max_ratio 2
MIN_SIDE = 150
BLOCKED_WORD = "triangle"  # the plural "triangles" shares its letters and must be kept
BLOCKED_PREFIX = "/images/00001"  # rows 10..19


def expected_reason(row) -> str | None:
    """What the configured chain must answer for an input row, computed independently of it."""
    if BLOCKED_WORD in row["clean"].replace(",", " ").split():
        return "unsafe: caption_blocklist"
    if urlsplit(row["URL"]).path.startswith(BLOCKED_PREFIX):
        return "unsafe: url_blocklist"
    if row["punsafe"] is not None and not math.isnan(row["punsafe"]) and row["punsafe"] >= 0.5:
        return "unsafe: laion_punsafe>=0.5"
    return None


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    server, urls, _ = dataset
    tmp = tmp_path_factory.mktemp("filters_run")
    table = pd.read_parquet(urls).head(N_ROWS).reset_index(drop=True)
    table["clean"] = table["TEXT"]
    # Captions as scraped: some wrapped in HTML, which caption_clean must remove before the blocklist.
    wrapped = table.index % 7 == 0
    table.loc[wrapped, "TEXT"] = "<i>" + table.loc[wrapped, "TEXT"] + "</i>&nbsp;"
    # LAION's punsafe column: some unsafe, some missing.
    table["punsafe"] = [0.9 if i % 5 == 1 else (float("nan") if i % 5 == 2 else 0.1) for i in range(N_ROWS)]
    table.drop(columns="clean").to_parquet(tmp / "urls.parquet", index=False)

    base = server.base_url
    config = write_config(
        tmp / "config.yaml", tmp / "urls.parquet", tmp / "out",
        input={"extra_cols": ["truth", "punsafe"], "rows_per_shard": 75},
        download={"timeout": 10},
        # Enlarged too (upscale), so that every written image is exactly its bucket.
        resize={"size": SIZE, "mode": "buckets", "bucket_max_ratio": 2.0, "upscale": True},
        resolution=None,
        filters=[
            {"name": "caption_clean"},
            {"name": "caption_blocklist", "words": [BLOCKED_WORD.upper()]},
            {"name": "url_blocklist", "prefixes": [base + BLOCKED_PREFIX]},
            {"name": "laion_columns"},
            {"name": "resolution", "min_side": MIN_SIDE, "max_aspect_ratio": 3.0},
        ],
    )
    before = server.path_requests
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    # keep_intermediate: the download shards, to compare the written images with.
    result = run_curate(["run", str(config), "--no-progress", "--set", "output.keep_intermediate=true"], env,
                        timeout=180)
    requested = server.path_requests - before
    table["expected"] = [expected_reason(r) for r in table.to_dict("records")]
    out = tmp / "out"
    rows = pd.concat([pq.read_table(p).to_pandas() for p in sorted((out / "shards").glob("*.parquet"))])
    tars = [str(p) for p in sorted((out / "shards").glob("*.tar"))]
    return {"result": result, "table": table, "rows": rows.set_index("url"), "requested": requested, "out": out,
            "samples": list(wds.WebDataset(tars, shardshuffle=False)),
            "stats": json.loads((out / "stats.json").read_text())}


def test_run_succeeds(run):
    assert run["result"].returncode == 0, run["result"].stderr
    assert run["stats"]["rows_in"] == N_ROWS == len(run["rows"])


def test_row_filters_give_their_reasons_in_the_parquet(run):
    table, rows = run["table"], run["rows"]
    dropped = table[table["expected"].notna()]
    for reason in ("unsafe: caption_blocklist", "unsafe: url_blocklist", "unsafe: laion_punsafe>=0.5"):
        assert (dropped["expected"] == reason).sum() >= 3, reason
    for _, r in dropped.iterrows():
        assert rows.loc[r["URL"], "status"] == FILTERED
        assert rows.loc[r["URL"], "reason"] == r["expected"], r["URL"]
    # Everything else got past the row filters: written, or rejected for another reason.
    others = rows.loc[table.loc[table["expected"].isna(), "URL"], "reason"].dropna()
    assert not others.str.startswith(("unsafe", "caption_empty")).any(), others.value_counts()


def test_rows_dropped_by_row_filters_are_never_fetched(run):
    table, requested = run["table"], run["requested"]
    paths = table["URL"].map(lambda u: urlsplit(u).path)
    dropped = paths[table["expected"].notna()]
    assert not [p for p in dropped if requested[p]], "a row dropped before the fetch was requested"
    assert all(requested[p] >= 1 for p in paths[table["expected"].isna()])


def test_resolution_judges_the_original_size(run):
    table, rows = run["table"], run["rows"].reset_index()
    fetched = rows[rows["reason"].isna() | rows["reason"].str.startswith("resolution")]
    small = table.set_index("URL").loc[fetched["url"]]
    expect_small = (small[["WIDTH", "HEIGHT"]].min(axis=1) < MIN_SIDE).to_numpy()
    assert 0 < expect_small.sum() < len(fetched)
    assert ((fetched["reason"] == f"resolution: side<{MIN_SIDE}").to_numpy() == expect_small).all()


def test_written_samples_have_cleaned_captions_and_their_bucket(run):
    table = run["table"].set_index("URL")
    buckets = set(aspect_buckets(SIZE, 2.0))
    seen_buckets = set()
    assert len(run["samples"]) == run["stats"]["written"] > 20
    for sample in run["samples"]:
        meta = json.loads(sample["json"])
        source = table.loc[meta["url"]]
        assert sample["txt"].decode() == meta["caption"] == source["clean"]  # HTML removed
        with Image.open(io.BytesIO(sample["jpg"])) as im:
            assert list(im.size) == meta["bucket"] == [meta["width"], meta["height"]]
        assert tuple(meta["bucket"]) in buckets
        assert meta["width"] % 64 == 0 and meta["height"] % 64 == 0
        # The chosen bucket is the one closest to the original aspect ratio.
        aspect = math.log(meta["original_width"] / meta["original_height"])
        best = min(abs(math.log(w / h) - aspect) for w, h in buckets)
        assert abs(math.log(meta["bucket"][0] / meta["bucket"][1]) - aspect) == pytest.approx(best)
        seen_buckets.add(tuple(meta["bucket"]))
    assert len(seen_buckets) >= 2


def test_filter_counts_in_stats(run):
    stats, table = run["stats"], run["table"]
    counts = table["expected"].value_counts().to_dict()
    assert stats["filters"]["caption_blocklist"]["dropped: unsafe: caption_blocklist"] == counts[
        "unsafe: caption_blocklist"]
    assert stats["filters"]["url_blocklist"]["dropped: unsafe: url_blocklist"] == counts["unsafe: url_blocklist"]
    laion = stats["filters"]["laion_columns"]
    assert laion["dropped: unsafe: laion_punsafe>=0.5"] == counts["unsafe: laion_punsafe>=0.5"]
    reached = table[~table["expected"].isin(["unsafe: caption_blocklist", "unsafe: url_blocklist"])]
    assert laion["unchecked: no punsafe"] == reached["punsafe"].isna().sum() > 0
    assert stats["filters"]["caption_clean"] == {"kept": N_ROWS}
    assert "resize" not in stats["filters"]  # no such filter: the resize: section sizes the images
    side = run["rows"]["reason"].eq(f"resolution: side<{MIN_SIDE}").sum()
    assert stats["filters"]["resolution"][f"dropped: resolution: side<{MIN_SIDE}"] == side > 0


def test_written_images_are_the_ones_the_download_stage_encoded(run):
    """One decode-resize-encode per image: the write stage stores the download stage's JPEG bytes."""
    out = run["out"]
    downloaded = {k: f["jpg"] for tar in sorted((out / "work" / "download").glob("*.tar"))
                  for k, f in iter_tar_samples(tar)}
    written = {s["__key__"]: s["jpg"] for s in run["samples"]}
    assert len(written) == run["stats"]["written"] > 20
    assert all(written[k] == downloaded[k] for k in written)
