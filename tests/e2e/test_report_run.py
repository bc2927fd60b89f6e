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

import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import run_curate, write_config
from curate.pipeline.cli import main
from curate.pipeline.models.clip import TINY_CLIP, TINY_CLIP_DIR
from curate.pipeline.demo.devserver import DevServer
from curate.pipeline.report.page import (
    choose_samples,
    fill_histograms,
    funnel,
    open_run,
    plan_histograms,
    read_config,
    read_stats,
)
from curate.pipeline.report.samples import THUMBNAIL_SIDE, is_safety_reason
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
