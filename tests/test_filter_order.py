"""Filter order within a stage, and what the review of session 2 found."""

import pandas as pd
import pyarrow.parquet as pq

from curate.filters import build_stage_chain
from curate.filters.blocklist import CaptionBlocklist
from tests.conftest import write_config


def test_cleaning_then_safety_then_the_rest_whatever_the_yaml_order():
    specs = [
        {"name": "caption_length", "min_words": 2},
        {"name": "caption_blocklist", "words": ["bad"]},
        {"name": "caption_clean"},
        {"name": "url_blocklist", "domains": ["blocked.example"]},
    ]
    chain = build_stage_chain(specs, "row")
    assert [f.name for f in chain] == ["caption_clean", "caption_blocklist", "url_blocklist", "caption_length"]
    # A one-word unsafe caption is rejected for safety, not for its length: its reason is what
    # keeps it out of the report.
    sample = {"key": "k", "url": "http://ok.example/a.jpg", "caption": "bad", "meta": {}}
    rejections = [f(sample) for f in chain]
    assert rejections[1].reason == "unsafe: caption_blocklist"


def test_invisible_characters_and_entities_do_not_split_a_blocked_word():
    f = CaptionBlocklist(words=["bad"])
    for caption in ["b\u200bad photo", "b\u00adad photo", "b\u200dad", "b\u2063ad", "b\u034fad", "&#98;ad", "B&amp;AD"[:0] + "&#x62;AD"]:
        assert f({"caption": caption}).reason == "unsafe: caption_blocklist", caption
    assert f({"caption": "a badge"}) is None


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


def test_a_redirect_onto_a_blocked_url_is_refused(server):
    """The URL blocklist judges the input URL before the fetch, and every redirect target during it."""
    from urllib.parse import quote

    from curate.filters.blocklist import UrlBlocklist
    from curate.pipeline.config import DownloadConfig
    from curate.pipeline.stages.download import redirect_check
    from curate.pipeline.fetch import fetch

    (server.root_dir / "images").mkdir(exist_ok=True)
    (server.root_dir / "images" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    blocked = f"{server.base_url}/images/a.jpg"
    via = f"{server.base_url}/redirect-to?url={quote(blocked, safe='')}"
    rule = UrlBlocklist(prefixes=[blocked])
    assert rule({"url": via}) is None  # the input URL itself is not on the list
    cfg = DownloadConfig(allow_private_addresses=True, timeout=5)
    assert fetch(via, cfg).ok  # without the check the redirect is followed
    got = fetch(via, cfg, redirect_check([rule]))
    assert not got.ok and got.reason == "unsafe: url_blocklist"
    assert redirect_check([]) is None
