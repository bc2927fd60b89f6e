"""caption_repetition: the example of adding a filter (filters/repetition.py, one line in
filters/__init__.py's FILTERS, this file)."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from curate.filters import FILTERS, build_stage_chain
from curate.filters.repetition import CaptionRepetition, repeated_word_fraction
from curate.pipeline.config import RunConfig, load_config
from curate.pipeline.errors import UserError
from curate.pipeline.reader import write_input_shards
from curate.pipeline.stages.download import download_shard
from conftest import write_config


def test_the_measure():
    assert repeated_word_fraction("Shoes shoes cheap SHOES sale") == (0.6, 5)
    assert repeated_word_fraction("a red circle on a blue background") == (2 / 7, 7)
    assert repeated_word_fraction("") == (0.0, 0)


def test_drops_spam_with_the_measure_as_data_and_keeps_the_rest():
    f = CaptionRepetition(max_word_fraction=0.4)
    rejection = f({"caption": "shoes shoes cheap shoes sale"})
    assert rejection.reason == "caption_repetition>0.4"
    assert (rejection.filter, rejection.metric, rejection.value, rejection.threshold) == (
        "caption_repetition", "repeated_word_fraction", 0.6, 0.4)
    assert f({"caption": "two red circles on the left of a blue background"}) is None
    assert f({"caption": "cat cat cat"}) is None  # fewer than min_words: not judged
    assert f({"caption": None}) is None
    assert f.counts == {"dropped: caption_repetition>0.4": 1, "kept": 3}


def test_registered_as_a_row_filter_and_configured_from_yaml(tmp_path):
    assert FILTERS["caption_repetition"] is CaptionRepetition
    chain = build_stage_chain([{"name": "caption_repetition", "max_word_fraction": 0.5}], "row")
    assert [f.name for f in chain] == ["caption_repetition"]
    bad = write_config(tmp_path / "bad.yaml", tmp_path / "urls.parquet", tmp_path / "out",
                       filters=[{"name": "caption_repetition", "max_word_fraction": 2}])
    with pytest.raises(UserError, match=r"filters\.0\.max_word_fraction"):
        load_config(bad)


def test_the_download_stage_drops_before_fetching_and_records_the_decision(tmp_path):
    # Kept rows have no URL, so nothing is fetched at all: they end as invalid_url.
    captions = ["buy buy buy buy now", "a photo of a dog on a beach", "sale sale cheap sale sale"]
    pd.DataFrame({"URL": [None] * 3, "TEXT": captions}).to_parquet(tmp_path / "urls.parquet", index=False)
    cfg = RunConfig.model_validate({
        "input": {"paths": [str(tmp_path / "urls.parquet")]}, "output": {"path": str(tmp_path / "out")},
        "filters": [{"name": "caption_repetition"}],
    })
    write_input_shards(cfg.input, [str(tmp_path / "urls.parquet")], tmp_path / "input")
    stats = download_shard(str(tmp_path / "input" / "00000_00000.parquet"), 0, str(tmp_path / "download"), cfg)
    assert stats["filters"]["caption_repetition"] == {"dropped: caption_repetition>0.4": 2, "kept": 1}
    rows = pq.read_table(tmp_path / "download" / "00000.parquet").to_pylist()
    assert [r["reason"] for r in rows] == ["caption_repetition>0.4", "invalid_url: missing", "caption_repetition>0.4"]
    assert [r["reject_value"] for r in rows] == [0.8, None, 0.8]
    assert rows[0]["reject_metric"] == "repeated_word_fraction" and rows[0]["reject_threshold"] == 0.4
    assert rows[0]["reject_filter"] == "caption_repetition" and rows[1]["reject_filter"] == "download"
