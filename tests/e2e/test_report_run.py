"""The run report: report.html of a real small run, opened from file:// in Debian's headless
Chromium (charts drawn, the log switch working, every image loaded, no console error, no request
leaving the page), its numbers checked against the run's own files: the funnel, the histograms
and what a threshold would keep, both sides of each threshold, the pictures of what the download
stage dropped, why downloads failed; two runs compared (`curate report A B`); `curate stats`,
`curate inspect` and `curate report`."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from conftest import run_curate, write_config
from curate.pipeline.cli import main
from curate.pipeline.models.clip import TINY_CLIP, TINY_CLIP_DIR
from curate.pipeline.demo.devserver import DevServer
from curate.pipeline.report.compare import compare_funnels
from curate.pipeline.report.page import (
    DownloadFailures,
    choose_samples,
    fill_histograms,
    funnel,
    open_run,
    plan_histograms,
    read_config,
    read_stats,
)
from curate.pipeline.records import FAILED_TO_RESIZE, FILTERED, SUCCESS
from curate.pipeline.report.samples import THUMBNAIL_SIDE, is_safety_reason
from curate.pipeline.demo.synthetic import generate_dataset

CHROMIUM = Path("/usr/bin/chromium")
THRESHOLD = 0.5
CLIP_REASON = f"clip_similarity<{THRESHOLD}"
MIN_WORDS = 8
CAPTION_REASON = f"caption_too_short: <{MIN_WORDS} words"
SCREENSHOT_COPY = Path("/tmp/report-screenshot.png")
ROWS_PER_SHARD = 84
MAX_IMAGE_AREA = 1_000_000  # download.max_image_area: the planted 1200x1000 images are refused from their header
B_THRESHOLD = 0.3           # run B: the same rows with the CLIP threshold moved here


def plant_download_faults(data: Path, urls: Path, base_url: str) -> dict[str, int]:
    """Rows whose downloads fail in other ways than the generated 404s, appended to the URL list:
    403 and 503 answers, 404s on a second domain (localhost), an image too large for
    download.max_image_area (fetched, so it gets a picture) and one that does not decode (none).
    Captions are long enough for the caption rule. Returns what was planted, per kind."""
    big = Image.new("RGB", (1200, 1000), (30, 90, 200))
    big.paste((250, 200, 20), (300, 250, 900, 750))
    big.save(data / "images" / "big.png")
    (data / "images" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(3000))
    host = base_url.replace("127.0.0.1", "localhost")
    planted = {
        f"{base_url}/status/403/a.jpg": "http_403", f"{base_url}/status/503/b.jpg": "http_503",
        f"{host}/status/404/c.jpg": "localhost_404", f"{host}/status/404/d.jpg": "localhost_404",
        f"{base_url}/images/big.png": "too_large", f"{base_url}/images/big.png?copy=2": "too_large",
        f"{base_url}/images/garbage.jpg": "garbage",
    }
    frame = pd.read_parquet(urls)
    extra = pd.DataFrame([{"URL": url, "TEXT": f"a planted row of the report test number {i} here",
                           "WIDTH": 100, "HEIGHT": 100, "truth": kind} for i, (url, kind) in enumerate(planted.items())])
    pd.concat([frame, extra], ignore_index=True).to_parquet(urls, index=False)
    kinds: dict[str, int] = {}
    for kind in planted.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """`curate run` (the CLI, in its own process) on 160 served rows with many mismatched captions
    and 7 planted download faults, a caption rule before the download and a CLIP threshold after
    it: 2 shards."""
    if not (TINY_CLIP_DIR / "open_clip_config.json").exists():
        pytest.skip("tiny CLIP not built")
    tmp = tmp_path_factory.mktemp("report")
    data = tmp / "data"
    data.mkdir()
    with DevServer(data) as server:
        urls = generate_dataset(data, 160, base_url=server.base_url, seed=7, wrong_caption_rate=0.35,
                                min_side=96, max_side=240)
        plant_download_faults(data, urls, server.base_url)
        config = write_config(
            tmp / "run.yaml", urls, tmp / "out",
            input={"rows_per_shard": ROWS_PER_SHARD},
            download={"timeout": 10, "max_image_area": MAX_IMAGE_AREA},
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


# ------------------------------------------------------------------ run B, to compare with

def rethreshold(run: Path, out: Path, threshold: float) -> Path:
    """Run B from run A's files: the same rows with the CLIP threshold moved to `threshold`, decided
    as the write stage would (status, reason, rejection columns, stats.json, config.yaml)."""
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("report.html", "embeddings", "work", "compare-*"))
    reason = f"clip_similarity<{threshold:.4g}"
    written, reasons = 0, {}
    for path in sorted((out / "shards").glob("*.parquet")):
        rows = pq.read_table(path).to_pylist()
        for r in rows:
            if r["status"] == SUCCESS or r["reject_filter"] == "clip_similarity":
                keep = r["clip_similarity"] >= threshold
                r.update(status=SUCCESS if keep else FILTERED, reason=None if keep else reason,
                         reject_filter=None if keep else "clip_similarity",
                         reject_metric=None if keep else "clip_similarity",
                         reject_value=None if keep else r["clip_similarity"], reject_threshold=None if keep else threshold)
            written += r["status"] == SUCCESS
            if r["status"] != SUCCESS:
                reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    stats = json.loads((out / "stats.json").read_text())
    stats.update(written=written, rejected=sum(reasons.values()), rejected_by_reason=reasons)
    stats["filters"]["clip_similarity"] = {"kept": written, f"dropped: {reason}": reasons[reason]}
    (out / "stats.json").write_text(json.dumps(stats))
    config = yaml.safe_load((out / "config.yaml").read_text())
    next(f for f in config["filters"] if f["name"] == "clip_similarity")["min_similarity"] = threshold
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def compared(run_dir, tmp_path_factory):
    """`curate report A B`: run A and run B (A's rows at another CLIP threshold) side by side."""
    b = rethreshold(run_dir, tmp_path_factory.mktemp("compare") / "b", B_THRESHOLD)
    page = run_dir / "compare-b.html"
    page.unlink(missing_ok=True)
    assert main(["report", str(run_dir), str(b)]) == 0
    assert page.is_file()
    return {"a": run_dir, "b": b, "page": page}


# ------------------------------------------------------------------ in the browser

DRAWN = """[...document.querySelectorAll('.plotly-graph-div')].map(d => ({
    id: d.id, title: (d.querySelector('.gtitle') || {}).textContent || '',
    marks: [...d.querySelectorAll('.trace path')].filter(p => { const b = p.getBBox(); return b.width > 0 && b.height > 0; }).length,
    width: d.getBoundingClientRect().width, height: d.getBoundingClientRect().height,
    yaxis: d.layout.yaxis.type,
    curves: d.data.filter(t => t.type === 'scatter' && t.yaxis === 'y2').map(t => Array.from(t.y)),
    buttons: d.querySelectorAll('.updatemenu-button').length}))"""


def open_page(page, path: Path) -> list[dict]:
    """Open a page from file://, wait until every chart is drawn; each chart's drawing, checked."""
    page.goto(path.as_uri(), wait_until="load")
    page.wait_for_function(
        "[...document.querySelectorAll('.plotly-graph-div')].every(d => d.querySelector('svg.main-svg'))",
        timeout=20_000,
    )
    drawn = page.evaluate(DRAWN)
    for chart in drawn:
        assert chart["marks"] > 0 and chart["width"] > 200 and chart["height"] > 150, chart
    images = page.evaluate("""[...document.images].map(i => ({
        alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}))""")
    broken = [i for i in images if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
    assert not broken, broken
    assert all(max(i["w"], i["h"]) <= THUMBNAIL_SIDE for i in images)
    return drawn


def test_report_renders_in_chromium(run_dir, compared, tmp_path):
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
            drawn = open_page(page, report)
            # funnel, CLIP similarity, size, aspect, caption length, HTTP statuses, stages
            assert len(drawn) >= 7
            assert any(c["title"] == "CLIP image-text similarity" for c in drawn), drawn
            # The threshold is marked on the CLIP chart.
            clip_chart = page.locator(".plotly-graph-div", has_text="CLIP image-text similarity")
            assert f"threshold {THRESHOLD}" in clip_chart.inner_text()
            # Every histogram has what a threshold would keep (a share, falling from 100% or rising to
            # it) and a linear / log switch.
            histograms = [c for c in drawn if c["curves"]]
            assert len(histograms) == 4, drawn
            for chart in histograms:
                curve = chart["curves"][0]
                assert chart["buttons"] == 2 and chart["yaxis"] == "linear", chart
                assert all(0 <= y <= 100 for y in curve) and {round(curve[0]), round(curve[-1])} == {0, 100}, chart
            # The log switch: the counts axis turns logarithmic, the bars stay drawn.
            clip_chart.locator(".updatemenu-button", has_text="log").click()
            page.wait_for_function(
                "[...document.querySelectorAll('.plotly-graph-div')].some(d => d.layout.yaxis.type === 'log')")
            clip_after = next(c for c in page.evaluate(DRAWN) if c["title"] == "CLIP image-text similarity")
            assert clip_after["yaxis"] == "log" and clip_after["marks"] > 0

            images = page.evaluate("[...document.images].map(i => i.alt)")
            expected = sum(pq.read_metadata(p).num_rows for p in (run_dir / "report" / "samples").glob("*.parquet"))
            assert 0 < len(images) <= expected

            # Both sides of each threshold: CLIP's kept and dropped pictures side by side; resolution's
            # dropped side are pictures the download stage kept; the caption rule's dropped rows have none.
            rules = page.locator("#thresholds .rule")
            titles = [t.split("(")[0].strip() for t in rules.locator("h3").all_inner_texts()]
            assert titles[0] == f"clip_similarity · threshold {THRESHOLD}"
            dropped_by_clip = stats["rejected_by_reason"][CLIP_REASON]
            assert f"{dropped_by_clip:,} rows dropped by it" in rules.nth(0).locator("h3").inner_text()
            assert {"side · threshold 64", "aspect · threshold 3", f"words · threshold {MIN_WORDS}"} <= set(titles)
            for title, rule in zip(titles, rules.all()):
                kept, dropped = rule.locator(".side.kept img").count(), rule.locator(".side.dropped img").count()
                if title.startswith("words"):
                    assert kept == 8 and dropped == 0 and "never downloaded" in rule.inner_text()
                else:
                    assert kept == 8 and dropped > 0, title
            # Why downloads failed: both domains, the HTTP chart, example URLs.
            domains = page.locator("#downloads table.domains tbody tr td:first-child").all_inner_texts()
            assert domains == ["127.0.0.1", "localhost"]
            assert page.locator("#downloads #chart-http").count() == 1
            assert page.locator("#downloads ul.urls li").count() >= 4
            # A picture of what the download stage dropped without a threshold.
            assert page.locator("#samples h3", has_text="Dropped at download: image_area_too_large").count() == 1

            # The funnel table shows the run's numbers.
            steps = page.locator("#funnel tr.step td:nth-child(2)").all_inner_texts()
            assert steps[0] == f"{stats['rows_in']:,}" and steps[-1] == f"{stats['written']:,}"
            assert page.locator("#funnel").inner_text().count(CLIP_REASON) == 1

            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)

            # Two runs side by side: every chart drawn, both thresholds' reasons in the funnel table.
            drawn = open_page(page, compared["page"])
            assert [c["title"] for c in drawn][1:] == ["CLIP image-text similarity"]
            assert len(drawn[1]["curves"]) == 2 and drawn[1]["buttons"] == 2
            table = page.locator("#funnel table").inner_text()
            assert CLIP_REASON in table and f"clip_similarity<{B_THRESHOLD}" in table
            assert "filters.1.min_similarity" in page.locator("#settings").inner_text()
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
    assert steps[0]["count"] == stats["rows_in"] == 167
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
    assert clip["percent"] == pytest.approx(100 * clip["count"] / 167)
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
    assert all(r["reject_filter"] is None for r in rows if r["status"] == SUCCESS)
    assert stats["score_fields"] == ["clip_similarity"]

    clip = charts["score:clip_similarity"]
    scored = [r for r in rows if r.get("clip_similarity") is not None]
    assert clip.total == len(scored) > 0
    assert clip.counts["written"].sum() == sum(r["status"] == SUCCESS for r in scored) == stats["written"]
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
    files = sorted((run_dir / "report" / "samples").glob("?????.parquet"))
    assert [p.name for p in files] == ["00000.parquet", "00001.parquet"]
    for path in files:
        shard = path.stem
        samples = pq.read_table(path).to_pylist()
        kept = [s for s in samples if s["status"] == SUCCESS and s["rule_metric"] is None]
        written = [k for k, r in rows.items() if k.startswith(shard) and r["status"] == SUCCESS]
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
        assert {s["stage"] for s in samples} == {"write"}
        assert not any(is_safety_reason(s["reason"]) for s in samples)
        for s in samples:
            assert s["caption"] == rows[s["key"]]["caption"]
            with Image.open(io.BytesIO(s["thumbnail"])) as im:
                assert im.format == "JPEG" and max(im.size) <= THUMBNAIL_SIDE
    chosen = choose_samples(run_dir / "report" / "samples")
    assert len(chosen.kept) == sum(1 for p in files for s in pq.read_table(p).to_pylist()
                                   if s["status"] == SUCCESS and s["rule_metric"] is None)
    dropped = chosen.dropped[CLIP_REASON]
    assert [s["distance"] for s in dropped] == sorted(s["distance"] for s in dropped)


def test_kept_samples_nearest_each_threshold(run_dir):
    """The write stage keeps, per threshold rule of the run's filters, the written samples whose value
    is nearest the threshold: CLIP's score, the resolution filter's side from the original size."""
    rows = {r["key"]: r for r in shard_rows(run_dir)}
    for path in sorted((run_dir / "report" / "samples").glob("?????.parquet")):
        shard = path.stem
        samples = pq.read_table(path).to_pylist()
        written = {k: r for k, r in rows.items() if k.startswith(shard) and r["status"] == SUCCESS}
        measures = {
            ("clip_similarity", "clip_similarity", THRESHOLD): lambda r: r["clip_similarity"],
            ("resolution", "side", 64.0): lambda r: min(r["original_width"], r["original_height"]),
            ("caption_length", "words", float(MIN_WORDS)): lambda r: len(r["caption"].split()),
        }
        for (name, metric, threshold), measure in measures.items():
            near = [s for s in samples if s["status"] == SUCCESS and (s["rule_filter"], s["rule_metric"], s["threshold"])
                    == (name, metric, threshold)]
            distances = sorted(abs(measure(r) - threshold) for r in written.values())
            assert len(near) == min(8, len(written)), (name, metric)
            assert sorted(s["distance"] for s in near) == pytest.approx(distances[:len(near)])
            for s in near:
                assert s["value"] == pytest.approx(measure(written[s["key"]])) and s["key"] in written
        # No rule of aspect on this side: no written sample is near 3 in the data? It is measured all the same.
        assert {(s["rule_filter"], s["rule_metric"]) for s in samples if s["status"] == SUCCESS and s["rule_metric"]} == {
            ("clip_similarity", "clip_similarity"), ("resolution", "side"), ("resolution", "aspect"),
            ("caption_length", "words")}
    chosen = choose_samples(run_dir / "report" / "samples")
    clip = chosen.near_kept[("clip_similarity", "clip_similarity", THRESHOLD)]
    assert len(clip) == 8 and [s["distance"] for s in clip] == sorted(s["distance"] for s in clip)
    assert all(rows[s["key"]]["status"] == SUCCESS for s in clip)
    assert all(rows[s["key"]]["reason"] == CLIP_REASON
               for s in chosen.near_dropped[("clip_similarity", "clip_similarity", THRESHOLD)])


def test_pictures_of_what_the_download_stage_dropped(run_dir):
    """Thumbnails of images dropped after their bytes were fetched (too small, too elongated, too
    large), chosen as the download stage had them; none of an image that does not decode."""
    rows = {r["key"]: r for r in shard_rows(run_dir)}
    files = sorted((run_dir / "report" / "samples").glob("*.download.parquet"))
    assert [p.name for p in files] == ["00000.download.parquet", "00001.download.parquet"]
    samples = [s for p in files for s in pq.read_table(p).to_pylist()]
    assert {s["stage"] for s in samples} == {"download"} and {s["status"] for s in samples} == {FILTERED, FAILED_TO_RESIZE}
    assert {s["reason"] for s in samples} == {"resolution: side<64", "resolution: aspect>3", "image_area_too_large"}
    for s in samples:
        row = rows[s["key"]]
        assert (row["reason"], row["status"]) == (s["reason"], s["status"]) and row["caption"] == s["caption"]
        with Image.open(io.BytesIO(s["thumbnail"])) as im:
            assert im.format == "JPEG" and max(im.size) <= THUMBNAIL_SIDE
        if s["reason"].startswith("resolution"):  # a threshold decision: nearest first, as data
            assert (s["rule_filter"], s["value"], s["threshold"]) == ("resolution", row["reject_value"], row["reject_threshold"])
            assert s["distance"] == pytest.approx(abs(row["reject_value"] - row["reject_threshold"]))
        else:
            assert s["distance"] is None and s["rule_metric"] is None
    side = [s for s in samples if s["reason"] == "resolution: side<64"]
    too_small = [r for r in rows.values() if r["reason"] == "resolution: side<64"]
    assert len(side) == min(len(too_small), 16) and len([s for s in samples if s["reason"] == "image_area_too_large"]) == 2
    # The image that does not decode was dropped at download too, with no picture.
    assert any(r["reason"] == "decode_error" for r in rows.values())


def test_why_downloads_failed(run_dir):
    """Per reason and domain, per HTTP status (stored as a number where the server answered), with
    example URLs: from the rows' columns."""
    rows = shard_rows(run_dir)
    http = {r["url"].rsplit("/status/", 1)[1].split("/")[0]: r for r in rows if "/status/" in (r["url"] or "")}
    assert all(r["http_status"] == int(code) and r["reason"] == f"failed_to_download: HTTP {code}"
               for code, r in http.items())
    assert all(r["http_status"] is None for r in rows if "/status/" not in (r["url"] or ""))
    failures = DownloadFailures()
    for path in sorted((run_dir / "shards").glob("*.parquet")):
        failures.add(pq.read_table(path))
    not_found = sum(1 for r in rows if r["reason"] == "failed_to_download: HTTP 404")
    assert failures.http == {404: not_found, 403: 1, 503: 1} and failures.no_answer == 0
    assert failures.total == not_found + 2
    table = failures.domain_table()
    assert table["reasons"][0] == "failed_to_download: HTTP 404"
    by_domain = {d["domain"]: d for d in table["rows"]}
    assert list(by_domain) == ["127.0.0.1", "localhost"]
    assert by_domain["localhost"]["failed"] == by_domain["localhost"]["rows"] == 2
    assert by_domain["localhost"]["cells"][0] == 2 and by_domain["127.0.0.1"]["rows"] == len(rows) - 2
    examples = {e["reason"]: e for e in failures.examples()}
    assert set(examples) == {"failed_to_download: HTTP 404", "failed_to_download: HTTP 403", "failed_to_download: HTTP 503"}
    failed_urls = {r["url"]: r for r in rows if (r["reason"] or "").startswith("failed_to_download")}
    for reason, e in examples.items():
        assert e["count"] == sum(1 for r in failed_urls.values() if r["reason"] == reason)
        assert 0 < len(e["urls"]) <= 4
        assert all(failed_urls[u["url"]]["reason"] == reason and u["detail"] == failed_urls[u["url"]]["error_message"]
                   for u in e["urls"])
    # The image rules of the download stage are not download failures: their bytes were fetched.
    assert not {"decode_error", "image_area_too_large"} & set(failures.reasons)


def test_what_a_threshold_would_keep(run_dir):
    """The kept-share curve: at each bin edge x, the share of the rows with a value on the kept side."""
    layout = open_run(run_dir)
    files = sorted((run_dir / "shards").glob("*.parquet"))
    charts = {c.key: c for c in plan_histograms(files, read_stats(layout), read_config(layout))}
    for path in files:
        fill_histograms(list(charts.values()), pq.read_table(path))
    rows = shard_rows(run_dir)
    scores = np.array([r["clip_similarity"] for r in rows if r["clip_similarity"] is not None])
    clip = charts["score:clip_similarity"]
    assert clip.keeps_above()
    x, share = clip.kept_share()
    assert list(x) == list(clip.edges) and share[0] == 100 and share[-1] == 0
    for edge, value in zip(x[1:-1], share[1:-1]):
        assert value == pytest.approx(100 * (scores >= edge).mean())
    aspect = charts["aspect"]  # an upper limit: a threshold keeps what lies below it
    assert not aspect.keeps_above()
    x, share = aspect.kept_share()
    assert share[0] == 0 and share[-1] == 100 and all(np.diff(share) >= 0)


def test_two_runs_compared(compared):
    """`curate report A B`: the funnels side by side, step by step and reason by reason."""
    a, b = (open_run(compared[run]) for run in ("a", "b"))
    stats = {run: read_stats(layout) for run, layout in (("a", a), ("b", b))}
    steps = compare_funnels(funnel(stats["a"], read_config(a)), funnel(stats["b"], read_config(b)),
                            {run: stats[run]["rows_in"] for run in stats})
    assert [s["label"] for s in steps] == ["rows in", "caption_length", "downloaded", "resolution", "clip_similarity",
                                           "written"]
    written = steps[-1]["runs"]
    assert (written["a"]["count"], written["b"]["count"]) == (stats["a"]["written"], stats["b"]["written"])
    assert stats["b"]["written"] > stats["a"]["written"]
    assert steps[-1]["delta"] == pytest.approx(100 * (stats["b"]["written"] - stats["a"]["written"]) / stats["a"]["rows_in"])
    clip = {d["reason"]: d["runs"] for d in steps[4]["dropped"]}
    assert clip[CLIP_REASON]["a"]["count"] == stats["a"]["rejected_by_reason"][CLIP_REASON]
    assert clip[CLIP_REASON]["b"]["count"] == 0
    assert clip[f"clip_similarity<{B_THRESHOLD}"]["b"]["count"] == stats["b"]["rejected_by_reason"][f"clip_similarity<{B_THRESHOLD}"]
    html = compared["page"].read_text()
    assert "curate runs compared" in html and html.count("plotly-graph-div") >= 2


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
    written = [r for r in shard_rows(run_dir) if r["status"] == SUCCESS and r["key"].startswith("00000")][:3]
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
