"""The run report's parts on files written here: the thumbnails the write stage keeps for it
(bounded, borderline first, never a safety rejection), thresholds and score columns read from the
rejection columns, the page's escaping, and the one-line errors of `curate stats`, `curate inspect`
and `curate report`. The report of a real run, in Chromium: tests/e2e/test_report_run.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.pipeline.cli import main
from curate.pipeline.report.page import (
    CaptionExamples,
    build_report,
    choose_samples,
    describe_samples,
    fill_histograms,
    plan_histograms,
    rejection_thresholds,
    score_columns,
)
from curate.pipeline.records import FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE, FILTERED, SUCCESS, Rejection, records_table
from curate.pipeline.report.samples import SCHEMA, ReportSamples, is_safety_reason


# ------------------------------------------------------------------ the thumbnails kept for it

def _jpeg(color, size=(200, 150)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def _sample(i: int, score: float | None = None) -> dict:
    meta = {"width": 200, "height": 150}
    if score is not None:
        meta["clip_similarity"] = score
    return {"key": f"00000{i:05d}", "jpg": _jpeg((i % 256, 0, 0)), "caption": f"caption {i}", "meta": meta}


def test_safety_rejected_samples_never_get_a_thumbnail(tmp_path):
    collector = ReportSamples(0)
    for i, reason in enumerate(["unsafe: test", "unsafe: nsfw", "unsafe: hash_blocklist", "unsafe:concept x"]):
        collector.add_dropped(_sample(i), Rejection(reason, metric="punsafe", value=0.9, threshold=0.5))
    collector.add_dropped(_sample(10), Rejection("caption_has_url"))
    collector.add_kept(_sample(11))
    assert {e["key"] for e in collector.entries()} == {"0000000010", "0000000011"}
    path = tmp_path / "samples" / "00000.parquet"
    assert collector.save(path) == 2
    saved = pq.read_table(path).to_pylist()
    assert sorted(s["key"] for s in saved) == ["0000000010", "0000000011"]
    assert not any(is_safety_reason(s["reason"]) for s in saved)

    # And the report skips such a row even if a samples file somehow holds one.
    planted = dict(saved[0], key="0000000099", status=FILTERED, reason="unsafe: test")
    pq.write_table(pa.Table.from_pylist(saved + [planted], schema=SCHEMA), tmp_path / "samples" / "00001.parquet")
    chosen = choose_samples(tmp_path / "samples")
    shown = [s["key"] for s in chosen.kept] + [s["key"] for group in chosen.dropped.values() for s in group]
    shown += [s["key"] for side in (chosen.near_kept, chosen.near_dropped) for g in side.values() for s in g]
    assert "0000000099" not in shown and "unsafe: test" not in chosen.dropped


def test_collector_is_bounded_prefers_the_threshold_and_repeats(tmp_path):
    def fill(shard_id):
        c = ReportSamples(shard_id, kept=8, per_reason=5)
        rng = np.random.default_rng(3)
        for i in range(300):
            c.add_kept(_sample(i))
        for i, score in enumerate(rng.uniform(-0.2, 0.5, 200)):
            c.add_dropped(_sample(1000 + i, float(score)), clip_rejection(float(score), 0.5))
        for i in range(50):
            c.add_dropped(_sample(2000 + i), Rejection("caption_has_url", filter="caption_url"))
        return c, rng

    c, _ = fill(4)
    entries = c.entries()
    kept = [e for e in entries if e["status"] == SUCCESS]
    near = [e for e in entries if e["reason"] == "clip_similarity<0.5"]
    other = [e for e in entries if e["reason"] == "caption_has_url"]
    assert len(kept) == 8 and len(near) == 5 and len(other) == 5
    scores = np.random.default_rng(3).uniform(-0.2, 0.5, 200)
    assert sorted(e["distance"] for e in near) == pytest.approx(sorted(0.5 - scores)[:5])
    assert all(e["distance"] is None for e in other)
    # Random picks spread over the stream, not its first items; the same shard picks the same.
    assert max(int(e["key"]) for e in kept) > 50
    assert [e["key"] for e in fill(4)[0].entries()] == [e["key"] for e in entries]
    assert [e["key"] for e in fill(5)[0].entries() if e["status"] == SUCCESS] != [e["key"] for e in kept]
    assert c.save(tmp_path / "s.parquet") == 18


def clip_rejection(score: float, threshold: float) -> Rejection:
    return Rejection(f"clip_similarity<{threshold:g}", filter="clip_similarity", metric="clip_similarity",
                     value=score, threshold=threshold)


def test_thresholds_and_score_columns_come_from_the_rejection_columns(tmp_path):
    """Which columns are scores and where their thresholds lie: the declared score fields and the
    rows' reject_metric / reject_threshold, whatever the reasons say."""
    rows = [
        {"key": "0", "status": SUCCESS, "clip_similarity": 0.4, "punsafe": 0.1, "latent_scaling_factor": 0.18},
        {"key": "1", "status": FILTERED, "reason": "any words at all", "clip_similarity": 0.1, "punsafe": 0.2,
         **{f"reject_{k}": v for k, v in dict(filter="clip_similarity", metric="clip_similarity", value=0.1,
                                              threshold=0.25).items()}},
        {"key": "2", "status": FILTERED, "reason": "unsafe: laion_punsafe>=0.5", "clip_similarity": None, "punsafe": 0.7,
         **{f"reject_{k}": v for k, v in dict(filter="laion_columns", metric="punsafe", value=0.7, threshold=0.5).items()}},
        {"key": "3", "status": FILTERED, "reason": "resolution: side<64", "original_width": 30, "original_height": 90,
         **{f"reject_{k}": v for k, v in dict(filter="resolution", metric="side", value=30.0, threshold=64.0).items()}},
        {"key": "4", "status": FILTERED, "reason": "clip_similarity<0.28 but not parsed", "bytes": 10,
         **{f"reject_{k}": v for k, v in dict(filter="resolution", metric="bytes", value=10.0, threshold=100.0).items()}},
    ]
    (tmp_path / "shards").mkdir()
    for i in range(2):  # the same thresholds in two shards count once
        pq.write_table(records_table(rows, []), tmp_path / "shards" / f"0000{i}.parquet")
    files = sorted((tmp_path / "shards").glob("*.parquet"))
    found = rejection_thresholds(files)
    assert found == {"clip_similarity": {0.25}, "punsafe": {0.5}, "side": {64.0}, "bytes": {100.0}}
    stats = {"rows_in": 10, "written": 2, "score_fields": ["clip_similarity"]}
    # Declared scores, and input columns a filter thresholded; not the record's own columns
    # (bytes), nor undeclared floats (latent_scaling_factor).
    columns = score_columns(stats, found, {c: (0.0, 1.0) for c in ("clip_similarity", "punsafe", "bytes",
                                                                  "latent_scaling_factor", "original_width")})
    assert columns == ["clip_similarity", "punsafe"]
    charts = {c.key: c for c in plan_histograms(files, stats, {"filters": []})}
    assert set(charts) == {"score:clip_similarity", "score:punsafe", "size", "aspect", "caption"}
    assert charts["score:clip_similarity"].markers == [(0.25, "threshold 0.25")]
    assert charts["score:punsafe"].markers == [(0.5, "threshold 0.5")]
    for path in files:
        fill_histograms(list(charts.values()), pq.read_table(path))
    # "Dropped by this rule" is the row's reject_metric, not its reason's wording.
    assert charts["score:clip_similarity"].counts["rule"].sum() == 2
    assert charts["score:punsafe"].counts["rule"].sum() == 2 and charts["score:punsafe"].counts["other"].sum() == 2
    assert charts["size"].counts["rule"].sum() == 2


def test_borderline_is_the_distance_of_the_rejected_value_to_its_threshold():
    c = ReportSamples(0, per_reason=2)
    for i, score in enumerate([1.0, 4.9, 3.0, 4.5]):
        c.add_dropped(dict(_sample(i), meta={"aesthetic_score": score}),
                      Rejection("aesthetic_score<5", filter="aesthetic", metric="aesthetic_score", value=score, threshold=5))
    for i, side in enumerate([100, 250, 30, 240]):
        c.add_dropped(dict(_sample(10 + i), meta={"original_width": side, "original_height": 400}),
                      Rejection("resolution: side<256", filter="resolution", metric="side", value=side, threshold=256))
    # A rejection without a value is no threshold decision: a random pick, no distance.
    c.add_dropped(_sample(20), Rejection("duplicate: url", filter="dedup"))
    chosen = {r: [e["distance"] for e in c.entries() if e["reason"] == r]
              for r in ("aesthetic_score<5", "resolution: side<256", "duplicate: url")}
    assert chosen["aesthetic_score<5"] == pytest.approx([0.1, 0.5])
    assert chosen["resolution: side<256"] == pytest.approx([6, 16])
    assert chosen["duplicate: url"] == [None]


def test_thumbnails_show_the_declared_scores():
    c = ReportSamples(0, score_fields=["clip_similarity", "punsafe"])
    c.add_kept(dict(_sample(0), meta={"clip_similarity": 0.3, "punsafe": 0.25, "latent_scaling_factor": 0.18, "width": 9}))
    assert json.loads(c.entries()[0]["scores"]) == {"clip_similarity": 0.3, "punsafe": 0.25}


# ------------------------------------------------------------------ the page

def test_caption_examples_never_show_safety_rejections():
    table = pa.table({"reason": ["unsafe: caption_blocklist", "caption_too_short: <2 words", None, "unsafe: caption_blocklist"],
                      "caption": ["a blocked word", "hi", "a kept caption", "another blocked word"]})
    examples = CaptionExamples({"unsafe: caption_blocklist", "caption_too_short: <2 words"})
    examples.add(table)
    assert examples.items() == {"caption_too_short: <2 words": ["hi"]}


def test_report_is_escaped_and_works_without_samples(tmp_path):
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    (out / "config.yaml").write_text("input: {paths: [x]}\noutput: {path: run}\nfilters: []\n")
    caption = "<script>alert(1)</script> a red circle"
    table = pa.Table.from_pylist([
        {"key": "0000000000", "status": SUCCESS, "reason": None, "caption": caption, "original_width": 100, "original_height": 80},
        {"key": "0000000001", "status": FAILED_TO_DOWNLOAD, "reason": "failed_to_download: HTTP 404", "caption": "x y", "original_width": None, "original_height": None},
    ])
    pq.write_table(table, out / "shards" / "00000.parquet")
    (out / "stats.json").write_text(json.dumps({"rows_in": 2, "written": 1, "rejected": 1,
                                                "rejected_by_reason": {"failed_to_download: HTTP 404": 1}}))
    html = Path(build_report(out)).read_text()
    assert "<script>alert(1)</script>" not in html
    assert "No thumbnails were kept" in html


# ------------------------------------------------------------------ the terminal side

def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("curate: error: "), err
    return err


@pytest.mark.parametrize("command", ["stats", "report"])
def test_run_folder_errors_are_one_line(command, tmp_path, capsys):
    assert main([command, str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in _error_line(capsys)
    (tmp_path / "file").write_text("x")
    assert main([command, str(tmp_path / "file")]) == 2
    assert "not a folder" in _error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main([command, str(tmp_path / "empty")]) == 2
    assert "not a curate run" in _error_line(capsys)
    (tmp_path / "empty" / "config.yaml").write_text("input: {}\n")
    assert main([command, str(tmp_path / "empty")]) == 2
    assert "has not finished" in _error_line(capsys)
    (tmp_path / "empty" / "stats.json").write_text("{not json")
    assert main([command, str(tmp_path / "empty")]) == 2
    assert "not valid JSON" in _error_line(capsys)
    assert not (tmp_path / "empty" / "report.html").exists()


def test_inspect_errors_are_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.tar")]) == 2
    assert "no such file" in _error_line(capsys)
    (tmp_path / "notes.tar").write_text("hello, I am not a tar file\n" * 40)
    assert main(["inspect", str(tmp_path / "notes.tar")]) == 2
    assert "not a tar file" in _error_line(capsys)
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a tar file" in _error_line(capsys)


def test_describe_samples_of_an_empty_tar(tmp_path):
    import tarfile

    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    assert describe_samples(tmp_path / "empty.tar").endswith("no samples")
    # -n 0 asks for none: it says how many there are, not that there are none.
    assert describe_samples(tmp_path / "empty.tar", 0).endswith(": 0 samples (0 requested: none printed)")


# ------------------------------------------------------------------ both sides of each threshold

def test_filters_say_their_thresholds_and_measure_a_written_sample():
    from curate.filters import build_chain

    chain = {f.name: f for f in build_chain([
        {"name": "caption_length", "min_words": 3, "max_words": 40},
        {"name": "resolution", "min_side": 64, "max_aspect_ratio": 3},
        {"name": "clip_similarity", "min_similarity": 0.28},
        {"name": "laion_columns", "punsafe_threshold": 0.5},
    ])}
    assert chain["caption_length"].thresholds() == [("words", 3.0), ("words", 40.0)]
    assert chain["resolution"].thresholds() == [("side", 64.0), ("aspect", 3.0)]
    assert chain["clip_similarity"].thresholds() == [("clip_similarity", 0.28)]
    assert chain["laion_columns"].thresholds() == [("punsafe", 0.5)]
    sample = {"caption": "a red circle on blue", "meta": {"clip_similarity": 0.31, "original_width": 300,
                                                          "original_height": 100, "bytes": 1234}}
    assert chain["caption_length"].measures(sample) == {"words": 5.0, "chars": 20.0}
    assert chain["resolution"].measures(sample) == {"side": 100.0, "area": 30000.0, "aspect": 3.0, "bytes": 1234.0}
    assert chain["clip_similarity"].measures(sample) == {"clip_similarity": 0.31}
    assert chain["clip_similarity"].measures({"meta": {}}) == {}
    # A top fraction is no threshold until resolved.
    assert build_chain([{"name": "clip_similarity", "top_fraction": 0.3}])[0].thresholds() == []


def test_kept_samples_nearest_each_rule_and_none_for_safety_rules():
    from curate.filters import build_chain

    filters = build_chain([{"name": "clip_similarity", "min_similarity": 0.5},
                           {"name": "laion_columns", "punsafe_threshold": 0.5}])
    c = ReportSamples(0, kept=2, per_rule=3, filters=filters)
    scores = [0.9, 0.52, 0.7, 0.55, 0.61, 0.5]
    for i, score in enumerate(scores):
        c.add_kept(dict(_sample(i), meta={"clip_similarity": score, "punsafe": 0.49}))
    entries = c.entries()
    near = [e for e in entries if e["rule_metric"] == "clip_similarity"]
    assert [e["value"] for e in near] == [0.5, 0.52, 0.55]
    assert [e["distance"] for e in near] == pytest.approx([0.0, 0.02, 0.05])
    assert {(e["rule_filter"], e["threshold"], e["status"]) for e in near} == {("clip_similarity", 0.5, SUCCESS)}
    # The kept images nearest to being judged unsafe are not picked out.
    assert not [e for e in entries if e["rule_metric"] == "punsafe"]
    assert len([e for e in entries if e["rule_metric"] is None]) == 2
    # Dropped samples of a threshold rule carry the rule too, for the report to pair them.
    c.add_dropped(_sample(20, 0.45), clip_rejection(0.45, 0.5))
    dropped = [e for e in c.entries() if e["status"] == FILTERED]
    assert [(e["rule_filter"], e["rule_metric"], e["threshold"], e["value"]) for e in dropped] == [
        ("clip_similarity", "clip_similarity", 0.5, 0.45)]


def test_choose_samples_pairs_both_sides_of_a_rule(tmp_path):
    from curate.filters import build_chain

    filters = build_chain([{"name": "clip_similarity", "min_similarity": 0.5}])
    for shard in range(2):
        c = ReportSamples(shard, kept=1, per_rule=4, filters=filters)
        for i in range(10):
            c.add_kept(dict(_sample(100 * shard + i), meta={"clip_similarity": 0.5 + (i + shard) / 100}))
            c.add_dropped(_sample(1000 + 100 * shard + i, 0.5 - (i + 1) / 50), clip_rejection(0.5 - (i + 1) / 50, 0.5))
        c.save(tmp_path / f"0000{shard}.parquet")
    chosen = choose_samples(tmp_path, per_rule=5)
    rule = ("clip_similarity", "clip_similarity", 0.5)
    assert list(chosen.near_kept) == [rule] and list(chosen.near_dropped) == [rule]
    assert [round(s["value"], 2) for s in chosen.near_kept[rule]] == [0.5, 0.51, 0.51, 0.52, 0.52]
    assert [round(s["value"], 2) for s in chosen.near_dropped[rule]] == [0.48, 0.48, 0.46, 0.46, 0.44]
    assert len(chosen.kept) == 2  # the random ones only


def test_download_stage_pictures_are_thumbnailed_as_chosen_and_never_unsafe(tmp_path):
    c = ReportSamples(3, kept=0, per_reason=2, stage="download")
    big = _jpeg((10, 200, 10), size=(2000, 500))
    c.add_dropped({"key": "1", "caption": "wide", "jpg": big, "meta": {"width": 2000, "height": 500}},
                  Rejection("resolution: aspect>3", filter="resolution", metric="aspect", value=4.0, threshold=3.0))
    c.add_dropped({"key": "2", "caption": "broken", "jpg": b"\xff\xd8\xff\xe0" + bytes(100), "meta": {}},
                  Rejection("decode_error", filter="download"))
    c.add_dropped({"key": "3", "caption": "x", "jpg": big, "meta": {}}, Rejection("unsafe: hash_blocklist"))
    c.add_kept({"key": "4", "caption": "y", "jpg": big, "meta": {}})
    entries = c.entries()
    # Thumbnails, not the originals, are held; an image without one is not chosen at all.
    assert [e["key"] for e in entries] == ["1"] and "jpg" not in entries[0]
    with Image.open(io.BytesIO(entries[0]["thumbnail"])) as im:
        assert max(im.size) == 128
    assert c.save(tmp_path / "00003.download.parquet") == 1
    assert pq.read_table(tmp_path / "00003.download.parquet").to_pylist()[0]["stage"] == "download"


def test_images_dropped_at_download_get_pictures_only_when_safety_filters_saw_them():
    from curate.pipeline.stages.download import screened_by_every_safety_filter

    assert screened_by_every_safety_filter([{"name": "resolution", "min_side": 64},
                                            {"name": "caption_blocklist", "words": ["x"]}])
    assert not screened_by_every_safety_filter([{"name": "resolution", "min_side": 64},
                                                {"name": "concepts", "concepts": [
                                                    {"name": "c", "prompts": ["a c"], "threshold": 0.3}]}])


# ------------------------------------------------------------------ what a threshold would keep

def test_kept_share_and_its_direction():
    from curate.pipeline.report.page import Histogram

    h = Histogram(key="score:s", title="s", x_title="s", edges=np.linspace(0, 1, 11), rule_metric="s",
                  markers=[(0.5, "threshold 0.5")])
    values = np.array([0.05, 0.15, 0.25, 0.55, 0.65, 0.75, 0.85, 0.95])
    rejected = values < 0.5
    h.add(values, np.where(rejected, FILTERED, SUCCESS).astype(object),
          np.full(8, "f", dtype=object), np.where(rejected, "s", "").astype(object))
    assert h.keeps_above()
    x, share = h.kept_share()
    assert share[0] == 100 and share[5] == pytest.approx(62.5) and share[-1] == 0
    # Drops above the marker: an upper limit, which keeps what lies below.
    h2 = Histogram(key="score:p", title="p", x_title="p", edges=np.linspace(0, 1, 11), rule_metric="p",
                   markers=[(0.5, "threshold 0.5")])
    h2.add(values, np.where(~rejected, FILTERED, SUCCESS).astype(object),
           np.full(8, "f", dtype=object), np.where(~rejected, "p", "").astype(object))
    assert not h2.keeps_above()
    assert h2.kept_share()[1][5] == pytest.approx(37.5)


# ------------------------------------------------------------------ why downloads failed

def test_download_failures_by_reason_domain_and_status():
    from curate.pipeline.report.page import DownloadFailures, TopCounts

    def row(url, reason=None, status=None, nbytes=None, detail=None, by="download", outcome=FAILED_TO_DOWNLOAD):
        return {"url": url, "status": outcome if reason else SUCCESS, "reason": reason, "reject_filter": by if reason else None,
                "http_status": status, "bytes": nbytes, "error_message": detail}

    table = pa.Table.from_pylist([
        row("http://A.example.com/1.jpg", "failed_to_download: HTTP 404", 404, detail="HTTP 404 Not Found"),
        row("https://user@a.example.com:8080/2.jpg", "failed_to_download: HTTP 404", 404),
        row("http://b.example.org/x", "failed_to_download: timeout", None, detail="no answer"),
        row("http://b.example.org/y"),
        row("http://b.example.org/z", "decode_error", nbytes=100, outcome=FAILED_TO_RESIZE),  # fetched: not a download failure
        row("http://c.example.net/w", "caption_too_short: <2 words", by="caption_length", outcome=FILTERED),
        row("ftp://weird", "invalid_url: unsupported scheme"),
        row(None, "invalid_url: missing"),
    ], schema=pa.schema([("url", pa.string()), ("status", pa.string()), ("reason", pa.string()),
                         ("reject_filter", pa.string()), ("http_status", pa.int64()), ("bytes", pa.int64()),
                         ("error_message", pa.string())]))
    f = DownloadFailures()
    f.add(table)
    f.add(table.slice(0, 1))
    assert f.reasons == {"failed_to_download: HTTP 404": 3, "failed_to_download: timeout": 1,
                         "invalid_url: unsupported scheme": 1, "invalid_url: missing": 1}
    assert f.http == {404: 3} and f.no_answer == 3
    domains = f.domain_table()
    assert [(d["domain"], d["failed"], d["rows"]) for d in domains["rows"]][:2] == [
        ("a.example.com", 3, 3), ("b.example.org", 1, 3)]
    assert {d["domain"] for d in domains["rows"]} == {"a.example.com", "b.example.org", "weird", "(no host)"}
    assert domains["reasons"][0] == "failed_to_download: HTTP 404" and not domains["approximate"]
    examples = {e["reason"]: e["urls"] for e in f.examples()}
    assert {u["url"] for u in examples["failed_to_download: HTTP 404"]} == {
        "http://A.example.com/1.jpg", "https://user@a.example.com:8080/2.jpg"}
    assert f.http_figure() is not None

    # Bounded: beyond twice its capacity the rarest keys go, and the counts say they are lower bounds.
    top = TopCounts(capacity=2)
    top.update({"a": 5, "b": 1, "c": 1})
    assert not top.approximate
    top.update({"d": 1, "e": 2})
    assert top.approximate and len(top.counts) == 2 and top.counts.most_common(1) == [("a", 5)]


# ------------------------------------------------------------------ two runs

def test_merge_labels_keeps_each_runs_order():
    from curate.pipeline.report.compare import merge_labels

    assert merge_labels(["rows in", "a", "downloaded", "written"], ["rows in", "downloaded", "b", "written"]) == [
        "rows in", "a", "downloaded", "b", "written"]
    # A label the first lacks goes after the one it follows in the second (or last, if it leads).
    assert merge_labels(["x"], ["y", "x", "z"]) == ["x", "z", "y"]


def test_compare_needs_two_runs_and_out_only_with_them(tmp_path, capsys):
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "no such folder" in _error_line(capsys)
    (tmp_path / "a").mkdir()
    assert main(["report", str(tmp_path / "a"), "-o", str(tmp_path / "x.html")]) == 2
    assert "give a second run" in _error_line(capsys)
