"""The run report: report.html of a real small run, opened from file:// in Debian's headless
Chromium (charts drawn, every image loaded, no console error, no request leaving the page),
its numbers checked against the run's own files; the thumbnails the write stage keeps for
it; `curate stats`, `curate inspect` and `curate report`."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import run_curate, write_config
from curate.pipeline.cli import main
from curate.pipeline.models.clip import TINY_CLIP, TINY_CLIP_DIR
from curate.pipeline.demo.devserver import DevServer
from curate.pipeline.report.page import (
    CaptionExamples,
    build_report,
    choose_samples,
    describe_samples,
    fill_histograms,
    funnel,
    open_run,
    plan_histograms,
    read_config,
    read_stats,
    rejection_thresholds,
    score_columns,
)
from curate.pipeline.records import Rejection, records_table
from curate.pipeline.report.samples import SCHEMA, THUMBNAIL_SIDE, ReportSamples, is_safety_reason
from curate.pipeline.demo.synthetic import generate_dataset

CHROMIUM = Path("/usr/bin/chromium")
THRESHOLD = 0.5
CLIP_REASON = f"clip_similarity<{THRESHOLD}"
MIN_WORDS = 8
CAPTION_REASON = f"caption_too_short: <{MIN_WORDS} words"
SCREENSHOT_COPY = Path("/tmp/report-screenshot.png")

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """`curate run` (the CLI, in its own process) on 160 served rows with many mismatched captions,
    a caption rule before the download and a CLIP threshold after it: 2 shards."""
    if not (TINY_CLIP_DIR / "open_clip_config.json").exists():
        pytest.skip("tiny CLIP not built")
    tmp = tmp_path_factory.mktemp("report")
    data = tmp / "data"
    data.mkdir()
    with DevServer(data) as server:
        urls = generate_dataset(data, 160, base_url=server.base_url, seed=7, wrong_caption_rate=0.35,
                                min_side=96, max_side=240)
        config = write_config(
            tmp / "run.yaml", urls, tmp / "out",
            input={"rows_per_shard": 80},
            download={"timeout": 10},
            clip={"enabled": True, "model": TINY_CLIP, "pretrained": None, "batch_size": 64, "device": "cpu"},
            dask={"n_workers": 1},
            filters=[{"name": "caption_length", "min_words": MIN_WORDS},
                     {"name": "clip_similarity", "min_similarity": THRESHOLD}],
        )
        env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
        result = run_curate(["run", str(config), "--no-progress"], env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp / "out"
    assert f"report       {out}/report.html" in result.stdout
    return out


def shard_rows(out: Path) -> list[dict]:
    return [r for p in sorted((out / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


# ------------------------------------------------------------------ in the browser

def test_report_renders_in_chromium(run_dir, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("/usr/bin/chromium is missing: `make test` installs it as root (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (make test installs it as root)")
    from playwright.sync_api import sync_playwright

    report = run_dir / "report.html"
    stats = json.loads((run_dir / "stats.json").read_text())
    errors, outside = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user-data-dir
            executable_path=str(CHROMIUM), headless=True, viewport={"width": 1280, "height": 900},
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: errors.append(f"failed request: {r.url}") if not r.url.startswith("data:") else None)

            def only_local(route):  # the report must need nothing but its own file
                if route.request.url.startswith(("file:", "data:")):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", only_local)
            page.goto(report.as_uri(), wait_until="load")
            charts = page.locator(".plotly-graph-div")
            assert charts.count() >= 6  # funnel, CLIP similarity, size, aspect, caption length, stages
            page.wait_for_function(
                "[...document.querySelectorAll('.plotly-graph-div')].every(d => d.querySelector('svg.main-svg'))",
                timeout=20_000,
            )
            drawn = page.evaluate("""[...document.querySelectorAll('.plotly-graph-div')].map(d => ({
                id: d.id, title: (d.querySelector('.gtitle') || {}).textContent || '',
                marks: [...d.querySelectorAll('.trace path')].filter(p => { const b = p.getBBox(); return b.width > 0 && b.height > 0; }).length,
                width: d.getBoundingClientRect().width, height: d.getBoundingClientRect().height}))""")
            for chart in drawn:
                assert chart["marks"] > 0 and chart["width"] > 200 and chart["height"] > 150, chart
            assert any(c["title"] == "CLIP image-text similarity" for c in drawn), drawn
            # The threshold is marked on the CLIP chart.
            clip_chart = page.locator(".plotly-graph-div", has_text="CLIP image-text similarity")
            assert f"threshold {THRESHOLD}" in clip_chart.inner_text()

            images = page.evaluate("""[...document.images].map(i => ({
                alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}))""")
            expected = sum(pq.read_metadata(p).num_rows for p in (run_dir / "report" / "samples").glob("*.parquet"))
            assert 0 < len(images) <= expected
            broken = [i for i in images if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
            assert not broken, broken
            assert max(max(i["w"], i["h"]) for i in images) <= THUMBNAIL_SIDE

            # The funnel table shows the run's numbers.
            steps = page.locator("#funnel tr.step td:nth-child(2)").all_inner_texts()
            assert steps[0] == f"{stats['rows_in']:,}" and steps[-1] == f"{stats['written']:,}"
            assert page.locator("#funnel").inner_text().count(CLIP_REASON) == 1

            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert not outside, outside
    with Image.open(shot) as im:
        assert im.width == 1280 and im.height > 1500
    shutil.copyfile(shot, SCREENSHOT_COPY)  # for a person to look at


# ------------------------------------------------------------------ the report's numbers

def test_funnel_accounts_for_every_row(run_dir):
    layout = open_run(run_dir)
    stats, config = read_stats(layout), read_config(layout)
    steps = funnel(stats, config)
    # resolution (write_config's size rule) judges the downloaded bytes, before the sample filters.
    assert [s["label"] for s in steps] == ["rows in", "caption_length", "downloaded", "resolution", "clip_similarity",
                                           "written"]
    assert steps[0]["count"] == stats["rows_in"] == 160
    for before, step in zip(steps, steps[1:]):
        assert step["count"] == before["count"] - sum(d["count"] for d in step["dropped"]), step
    assert steps[-1]["count"] == steps[-2]["count"] == stats["written"]
    reasons = {d["reason"]: d["count"] for s in steps for d in s["dropped"]}
    assert reasons == stats["rejected_by_reason"]
    assert [d["reason"] for d in steps[1]["dropped"]] == [CAPTION_REASON]
    assert {d["reason"] for d in steps[3]["dropped"]} == {"resolution: side<64", "resolution: aspect>3"}
    assert [d["reason"] for d in steps[4]["dropped"]] == [CLIP_REASON]
    assert "failed_to_download: HTTP 404" in {d["reason"] for d in steps[2]["dropped"]}
    clip = steps[4]["dropped"][0]
    assert clip["percent"] == pytest.approx(100 * clip["count"] / 160)
    assert clip["percent_of_step"] == pytest.approx(100 * clip["count"] / steps[3]["count"])


def test_histograms_count_every_row_by_outcome(run_dir):
    layout = open_run(run_dir)
    stats, config = read_stats(layout), read_config(layout)
    files = sorted((run_dir / "shards").glob("*.parquet"))
    charts = {c.key: c for c in plan_histograms(files, stats, config)}
    for path in files:
        fill_histograms(list(charts.values()), pq.read_table(path))
    rows = shard_rows(run_dir)

    # Every CLIP drop is stored as data beside its reason: who, on what, its value, the threshold.
    clip_drops = [r for r in rows if r["reason"] == CLIP_REASON]
    assert clip_drops and all(
        (r["reject_filter"], r["reject_metric"], r["reject_threshold"]) == ("clip_similarity", "clip_similarity", THRESHOLD)
        and r["reject_value"] == r["clip_similarity"] < THRESHOLD for r in clip_drops)
    assert all(r["reject_filter"] == "caption_length" and r["reject_metric"] == "words" and r["reject_threshold"] == MIN_WORDS
               and r["reject_value"] < MIN_WORDS for r in rows if r["reason"] == CAPTION_REASON)
    assert all(r["reject_filter"] == "download" for r in rows if (r["reason"] or "").startswith("failed_to_download"))
    assert all(r["reject_filter"] is None for r in rows if r["status"] == "ok")
    assert stats["score_fields"] == ["clip_similarity"]

    clip = charts["score:clip_similarity"]
    scored = [r for r in rows if r.get("clip_similarity") is not None]
    assert clip.total == len(scored) > 0
    assert clip.counts["written"].sum() == sum(r["status"] == "ok" for r in scored) == stats["written"]
    assert clip.counts["rule"].sum() == stats["rejected_by_reason"][CLIP_REASON]
    assert clip.markers == [(THRESHOLD, f"threshold {THRESHOLD}")]
    # Below the threshold only dropped rows, from it on only kept ones.
    centers = (clip.edges[:-1] + clip.edges[1:]) / 2
    assert clip.counts["written"][clip.edges[1:] <= THRESHOLD].sum() == 0
    assert clip.counts["rule"][clip.edges[:-1] >= THRESHOLD].sum() == 0
    assert len(centers) == 50

    # Captions: every row, the too-short ones left of min_words.
    caption = charts["caption"]
    assert caption.total == len(rows)
    assert caption.counts["rule"].sum() == stats["rejected_by_reason"][CAPTION_REASON]
    assert caption.counts["rule"][MIN_WORDS:].sum() == 0

    # Sizes: rows rejected from their header (too small) are counted, left of min_side; their
    # sizes are in their records (read from the header), like those of every downloaded row.
    size = charts["size"]
    too_small = stats["rejected_by_reason"].get("resolution: side<64", 0)
    assert too_small > 0 and size.counts["rule"].sum() == too_small
    assert size.counts["rule"][size.edges[1:] > 64].sum() == 0
    assert size.markers == [(64.0, "min_side 64")]
    by_header = [r for r in rows if (r["reason"] or "").startswith("resolution: ")]
    assert len(by_header) == too_small + stats["rejected_by_reason"].get("resolution: aspect>3", 0)
    assert all(r["original_width"] is not None and r["original_height"] is not None for r in by_header)
    downloaded_or_sized = sum(1 for r in rows if r["original_width"] is not None)
    assert size.total == downloaded_or_sized


# ------------------------------------------------------------------ the thumbnails kept for it

def test_report_samples_are_bounded_kept_and_borderline(run_dir):
    rows = {r["key"]: r for r in shard_rows(run_dir)}
    files = sorted((run_dir / "report" / "samples").glob("*.parquet"))
    assert [p.name for p in files] == ["00000.parquet", "00001.parquet"]
    for path in files:
        shard = path.stem
        samples = pq.read_table(path).to_pylist()
        kept = [s for s in samples if s["status"] == "ok"]
        written = [k for k, r in rows.items() if k.startswith(shard) and r["status"] == "ok"]
        assert len(kept) == min(8, len(written)) and {s["key"] for s in kept} <= set(written)
        # Dropped at the CLIP threshold: exactly the 8 nearest it in this shard.
        dropped = {k: abs(r["clip_similarity"] - THRESHOLD) for k, r in rows.items()
                   if k.startswith(shard) and r["reason"] == CLIP_REASON}
        chosen = [s for s in samples if s["reason"] == CLIP_REASON]
        assert len(dropped) > 8 and len(chosen) == 8
        others = [d for k, d in dropped.items() if k not in {s["key"] for s in chosen}]
        assert max(s["distance"] for s in chosen) <= min(others) + 1e-6
        for s in chosen:
            assert s["distance"] == pytest.approx(dropped[s["key"]], abs=1e-6)
        # Only reasons whose images existed at write time; the caption rule ran before the download.
        assert {s["reason"] for s in samples} <= {None, CLIP_REASON}
        assert not any(is_safety_reason(s["reason"]) for s in samples)
        for s in samples:
            assert s["caption"] == rows[s["key"]]["caption"]
            with Image.open(io.BytesIO(s["thumbnail"])) as im:
                assert im.format == "JPEG" and max(im.size) <= THUMBNAIL_SIDE
    kept, dropped = choose_samples(run_dir / "report" / "samples")
    assert len(kept) == sum(1 for p in files for s in pq.read_table(p).to_pylist() if s["status"] == "ok")
    assert [s["distance"] for s in dropped[CLIP_REASON]] == sorted(s["distance"] for s in dropped[CLIP_REASON])


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
    planted = dict(saved[0], key="0000000099", status="rejected", reason="unsafe: test")
    pq.write_table(pa.Table.from_pylist(saved + [planted], schema=SCHEMA), tmp_path / "samples" / "00001.parquet")
    kept, dropped = choose_samples(tmp_path / "samples")
    shown = [s["key"] for s in kept] + [s["key"] for group in dropped.values() for s in group]
    assert "0000000099" not in shown and "unsafe: test" not in dropped


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
    kept = [e for e in entries if e["status"] == "ok"]
    near = [e for e in entries if e["reason"] == "clip_similarity<0.5"]
    other = [e for e in entries if e["reason"] == "caption_has_url"]
    assert len(kept) == 8 and len(near) == 5 and len(other) == 5
    scores = np.random.default_rng(3).uniform(-0.2, 0.5, 200)
    assert sorted(e["distance"] for e in near) == pytest.approx(sorted(0.5 - scores)[:5])
    assert all(e["distance"] is None for e in other)
    # Random picks spread over the stream, not its first items; the same shard picks the same.
    assert max(int(e["key"]) for e in kept) > 50
    assert [e["key"] for e in fill(4)[0].entries()] == [e["key"] for e in entries]
    assert [e["key"] for e in fill(5)[0].entries() if e["status"] == "ok"] != [e["key"] for e in kept]
    assert c.save(tmp_path / "s.parquet") == 18


def clip_rejection(score: float, threshold: float) -> Rejection:
    return Rejection(f"clip_similarity<{threshold:g}", filter="clip_similarity", metric="clip_similarity",
                     value=score, threshold=threshold)


def test_thresholds_and_score_columns_come_from_the_rejection_columns(tmp_path):
    """Which columns are scores and where their thresholds lie: the declared score fields and the
    rows' reject_metric / reject_threshold, whatever the reasons say."""
    rows = [
        {"key": "0", "status": "ok", "clip_similarity": 0.4, "punsafe": 0.1, "latent_scaling_factor": 0.18},
        {"key": "1", "status": "rejected", "reason": "any words at all", "clip_similarity": 0.1, "punsafe": 0.2,
         **{f"reject_{k}": v for k, v in dict(filter="clip_similarity", metric="clip_similarity", value=0.1,
                                              threshold=0.25).items()}},
        {"key": "2", "status": "rejected", "reason": "unsafe: laion_punsafe>=0.5", "clip_similarity": None, "punsafe": 0.7,
         **{f"reject_{k}": v for k, v in dict(filter="laion_columns", metric="punsafe", value=0.7, threshold=0.5).items()}},
        {"key": "3", "status": "rejected", "reason": "resolution: side<64", "original_width": 30, "original_height": 90,
         **{f"reject_{k}": v for k, v in dict(filter="resolution", metric="side", value=30.0, threshold=64.0).items()}},
        {"key": "4", "status": "rejected", "reason": "clip_similarity<0.28 but not parsed", "bytes": 10,
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


# ------------------------------------------------------------------ the terminal side

def test_curate_stats_prints_the_funnel(run_dir, capsys):
    assert main(["stats", str(run_dir)]) == 0
    out = capsys.readouterr().out
    stats = json.loads((run_dir / "stats.json").read_text())
    lines = out.splitlines()
    assert lines[0].split() == ["step", "rows", "%", "of", "in", "%", "of", "step"]
    assert lines[1].split()[:3] == ["rows", "in", f"{stats['rows_in']:,}"]
    written = next(line for line in lines if line.startswith("written"))
    assert written.split()[1] == f"{stats['written']:,}"
    for reason, count in stats["rejected_by_reason"].items():
        line = next(line for line in lines if line.strip().startswith(f"- {reason} "))
        assert line.split()[-3] == f"{count:,}"
        assert line.split()[-2] == f"{100 * count / stats['rows_in']:.1f}%"


def test_curate_inspect_prints_samples(run_dir, capsys):
    tar = run_dir / "shards" / "00000.tar"
    assert main(["inspect", str(tar), "-n", "2"]) == 0
    out = capsys.readouterr().out
    written = [r for r in shard_rows(run_dir) if r["status"] == "ok" and r["key"].startswith("00000")][:3]
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 2
    for block, row in zip(blocks, written):
        assert block.startswith(row["key"] + "  jpg (")
        assert f"  caption: {row['caption']}" in block
        assert f'"sha256": "{row["sha256"]}"' in block
    assert written[2]["key"] not in out


def test_curate_report_rebuilds_it(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report.html", "embeddings", "work"))
    assert main(["report", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == str(copy / "report.html")
    html = (copy / "report.html").read_text()
    original = (run_dir / "report.html").read_text()
    # The same report, apart from where it lives and when it was made.
    assert len(html) == pytest.approx(len(original), rel=0.01)
    assert html.count("data:image/jpeg;base64,") == original.count("data:image/jpeg;base64,") > 0
    assert not list(copy.glob("*.tmp-*"))


def test_report_shows_captions_of_rows_dropped_before_download(run_dir):
    html = (run_dir / "report.html").read_text()
    heading = "Dropped before download: caption_too_short: &lt;8 words"
    assert heading in html
    shown = html.split(heading, 1)[1].split("</ul>", 1)[0]
    short = [r["caption"] for r in shard_rows(run_dir) if r["reason"] == CAPTION_REASON]
    assert 0 < sum(f"<li>{c}</li>" in shown for c in set(short)) <= 8


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
        {"key": "0000000000", "status": "ok", "reason": None, "caption": caption, "original_width": 100, "original_height": 80},
        {"key": "0000000001", "status": "rejected", "reason": "failed_to_download: HTTP 404", "caption": "x y", "original_width": None, "original_height": None},
    ])
    pq.write_table(table, out / "shards" / "00000.parquet")
    (out / "stats.json").write_text(json.dumps({"rows_in": 2, "written": 1, "rejected": 1,
                                                "rejected_by_reason": {"failed_to_download: HTTP 404": 1}}))
    html = build_report(out).read_text()
    assert "<script>alert(1)</script>" not in html
    assert "No thumbnails were kept" in html


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
