"""The run report: `report.html` in the output folder; the terminal views `curate stats`
(the funnel as a table) and `curate inspect` (a shard's first samples).

    build_report(OUTPUT)  →  OUTPUT/report.html  (one self-contained file: opens offline)

What it shows, and where each part comes from:

- the funnel (rows in → row filters → downloaded → sample filters → written, with
  counts and percentages per reason): stats.json, in the chain order of config.yaml;
- histograms (every score column with its threshold marked, image sizes, aspect
  ratios, caption lengths), split into written / dropped by that rule / dropped for
  another reason, each with the share of rows a threshold at x would keep (a cumulative
  curve) and a linear / log switch: the shard parquets, read one shard at a time and only
  the needed columns, binned per shard into bins fixed beforehand and summed, so memory is
  bounded by a shard's columns whatever the run's size. Which columns are scores, where the
  thresholds lie and which rows a rule dropped come from the data, never from parsing a
  reason: the score fields the run's filters declared (stats.json `score_fields`), and
  each rejected row's `reject_filter`, `reject_metric`, `reject_value`, `reject_threshold`;
- both sides of each threshold (the kept samples nearest it beside the dropped ones nearest
  it), random kept samples, dropped samples per reason, pictures of images the download
  stage dropped: report/samples/, thumbnails the stages kept (pipeline/report/samples.py).
  Rows rejected for safety are never shown;
- why downloads failed: per reason and domain (top domains), per HTTP status (the
  `http_status` column), a few example URLs per reason: the failed rows' columns;
- throughput and duration per stage: stats.json and the shards' done-markers;
- the run's config: config.yaml.

Charts are plotly figures; plotly.js is inlined once (about 4.8 MB) so the page works
from file:// with no network, and thumbnails are data: URIs. plotly rather than
vega-lite/altair: its Python package ships the JS bundle itself (altair needs a second
package to inline vega), and a histogram from pre-binned counts is a plain bar trace.
The page is a jinja2 template (pipeline/report/templates/report.html.j2), autoescaped, so a
caption can never inject markup.
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import json
import math
import random
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import jinja2
import numpy as np
import plotly.graph_objects as go
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from markupsafe import Markup
from plotly.offline import get_plotlyjs

from curate.filters import FILTERS
from curate.pipeline import storage
from curate.pipeline.errors import UserError
from curate.pipeline.layout import RunLayout
from curate.pipeline.records import FAILED_TO_DOWNLOAD, RECORD_COLUMNS, SUCCESS
from curate.pipeline.report.samples import BottomK, is_safety_reason
from curate.pipeline.urls import normalize_host
from curate.pipeline.shards import atomic_path
from curate.pipeline.tarshard import iter_tar_samples

KEPT_SHOWN = 24          # random kept samples in the grid
DROPPED_SHOWN = 12       # dropped samples shown per reason
NEAR_SHOWN = 8           # samples shown on each side of a threshold
DOMAINS_SHOWN = 10       # top domains of the download failures
REASONS_BY_DOMAIN = 6    # reasons (columns) of the failures-by-domain table; the rest add up as "other"
URLS_SHOWN = 4           # example URLs per download failure reason
CAPTIONS_SHOWN = 8       # example captions per reason for rows dropped before download
CAPTION_WORDS_MAX = 60   # longer captions count in the last bin
SCORE_BINS = 50
SIZE_BINS = 40
ASPECT_MAX = 6.0         # long side / short side; wider ones count in the last bin

COLORS = {"written": "#2e7d32", "rule": "#c62828", "other": "#9e9e9e"}
KEPT_CURVE = "#1565c0"


# ---------------------------------------------------------------- the run folder

def open_run(root: str | Path) -> RunLayout:
    """The layout of a finished run, or a UserError saying why this is not one."""
    layout = RunLayout(root)
    if not storage.is_url(layout.root) and not Path(layout.root).exists():
        raise UserError(f"{layout.root}: no such folder")
    if not storage.is_url(layout.root) and not Path(layout.root).is_dir():
        raise UserError(f"{layout.root}: not a folder (expected a curate output folder)")
    if not storage.exists(layout.config):
        raise UserError(f"{layout.root}: not a curate run (no config.yaml)")
    if not storage.exists(layout.stats):
        raise UserError(f"{layout.root}: the run has not finished (no stats.json); rerun `curate run` to complete it")
    return layout


def read_stats(layout: RunLayout) -> dict:
    try:
        stats = json.loads(storage.read_text(layout.stats))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{layout.stats}: not valid JSON") from exc
    if not isinstance(stats, dict) or "rows_in" not in stats or "written" not in stats:
        raise UserError(f"{layout.stats}: not a curate stats file (no rows_in / written)")
    return stats


def read_config(layout: RunLayout) -> dict:
    # Plain YAML, not load_config: a report must not depend on the model paths or the
    # filters of the run still resolving today.
    try:
        data = yaml.safe_load(storage.read_text(layout.config))
    except yaml.YAMLError as exc:
        raise UserError(f"{layout.config}: not valid YAML") from exc
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------- the funnel

def _stage(name: str) -> str:
    return FILTERS[name].stage if name in FILTERS else "sample"


def _dropped(counts: dict[str, int]) -> dict[str, int]:
    prefix = "dropped: "
    return {k[len(prefix):]: v for k, v in counts.items() if k.startswith(prefix)}


def _step(label: str, kind: str, count: int, drops: dict[str, int], before: int, rows_in: int) -> dict:
    def pct(n, of):
        return 100.0 * n / of if of else 0.0

    return {
        "label": label, "kind": kind, "count": count, "percent": pct(count, rows_in),
        "dropped": [
            {"reason": r, "count": n, "percent": pct(n, rows_in), "percent_of_step": pct(n, before)}
            for r, n in sorted(drops.items(), key=lambda kv: (-kv[1], kv[0])) if n > 0
        ],
    }


def funnel(stats: dict, config: dict) -> list[dict]:
    """Steps from rows in to written; each step's count and the reasons it dropped.

    Filters of the "row" stage run before the download, the others after it (see
    filters/base.py), so: rows in → row filters → downloaded → bytes and sample filters
    → written. "downloaded" drops every rejection no filter counted (fetch failures,
    image rules, decode errors).
    """
    rows_in = stats["rows_in"]
    counts = stats.get("filters") or {}
    order = [f.get("name") for f in config.get("filters") or [] if isinstance(f, dict)]
    order = list(dict.fromkeys([n for n in order if n in counts] + list(counts)))
    drops = {name: _dropped(counts[name]) for name in order}
    by_filters: Counter = Counter()
    for d in drops.values():
        by_filters.update(d)
    others = {r: n - by_filters.get(r, 0) for r, n in (stats.get("rejected_by_reason") or {}).items()}

    steps = [_step("rows in", "input", rows_in, {}, rows_in, rows_in)]
    remaining = rows_in

    def add(label: str, kind: str, dropped: dict[str, int]) -> None:
        nonlocal remaining
        before, remaining = remaining, remaining - sum(n for n in dropped.values() if n > 0)
        steps.append(_step(label, kind, remaining, dropped, before, rows_in))

    for name in order:
        if _stage(name) == "row":
            add(name, "filter", drops[name])
    # Existing shards as input have no download: their step is reading the tars (pipeline/stages/read.py).
    fmt = (config.get("input") or {}).get("format")
    add("read from the input tars" if fmt == "webdataset" else "downloaded", "download", others)
    for stage in ("bytes", "sample"):  # the bytes filters judge the download before the sample filters
        for name in order:
            if _stage(name) == stage:
                add(name, "filter", drops[name])
    steps.append(_step("written", "output", stats["written"], {}, remaining, rows_in))
    return steps


def format_funnel(stats: dict, config: dict) -> str:
    """The funnel as a plain-text table (`curate stats`)."""
    steps = funnel(stats, config)
    width = max([40] + [len(d["reason"]) + 4 for s in steps for d in s["dropped"]])
    lines = [f"{'step':<{width}} {'rows':>10} {'% of in':>8}  {'% of step':>9}"]
    for s in steps:
        lines.append(f"{s['label']:<{width}} {s['count']:>10,} {s['percent']:>7.1f}%")
        for d in s["dropped"]:
            lines.append(f"{'  - ' + d['reason']:<{width}} {d['count']:>10,} {d['percent']:>7.1f}%  {d['percent_of_step']:>8.1f}%")
    duration = stats.get("duration_seconds")
    if duration is not None:
        lines.append("")
        lines.append(f"duration {duration:,.1f} s, {stats.get('rows_per_second') or 0:,.1f} rows/s, "
                     f"{stats.get('images_per_second') or 0:,.1f} images/s, {stats.get('shards', '?')} shards")
    return "\n".join(lines)


# ---------------------------------------------------------------- histograms

@dataclass
class Histogram:
    """Counts per bin and outcome (written / dropped by this chart's rule / dropped otherwise),
    summed shard by shard into bins fixed before the first shard.

    The chart's rule: rows rejected by `rule_filter` and/or on `rule_metric` (their
    `reject_filter` / `reject_metric` columns), whichever of the two is given."""

    key: str
    title: str
    x_title: str
    edges: np.ndarray
    rule_filter: Optional[str] = None
    rule_metric: Optional[str] = None
    markers: list[tuple[float, str]] = field(default_factory=list)
    # Does a threshold keep the values above it (min_similarity, min_side) or below it
    # (max_aspect_ratio, punsafe)? None: as the rule's drops say (see keeps_above).
    keep_above: Optional[bool] = None
    counts: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        assert self.rule_filter is not None or self.rule_metric is not None, self.key
        self.counts = {o: np.zeros(len(self.edges) - 1, dtype=np.int64) for o in COLORS}

    def is_rule(self, filters: np.ndarray, metrics: np.ndarray) -> np.ndarray:
        """Per row: was it rejected by this chart's rule?"""
        rule = np.ones(len(filters), dtype=bool)
        if self.rule_filter is not None:
            rule &= filters == self.rule_filter
        if self.rule_metric is not None:
            rule &= metrics == self.rule_metric
        return rule

    def add(self, values: np.ndarray, status: np.ndarray, filters: np.ndarray, metrics: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        known = np.isfinite(values)
        # Values beyond the axis count in the first or last bin rather than vanishing.
        values = np.clip(values[known], self.edges[0], self.edges[-1])
        status = status[known]
        rule = self.is_rule(filters[known], metrics[known])
        written = status == SUCCESS
        for outcome, mask in (("written", written), ("rule", ~written & rule), ("other", ~written & ~rule)):
            self.counts[outcome] += np.histogram(values[mask], bins=self.edges)[0]

    @property
    def total(self) -> int:
        return int(sum(c.sum() for c in self.counts.values()))

    def keeps_above(self) -> bool:
        """Whether a threshold of this chart keeps the values at or above it: given, or told by
        where this rule's drops lie relative to its first marker (above it: an upper limit)."""
        if self.keep_above is not None:
            return self.keep_above
        if self.markers:
            centers = (self.edges[:-1] + self.edges[1:]) / 2
            x = self.markers[0][0]
            dropped = self.counts["rule"]
            return bool(dropped[centers < x].sum() >= dropped[centers >= x].sum())
        return True

    def kept_share(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, % of the rows with a value that a threshold at x would keep), at the bin edges:
        "at 0.30 I keep 61%". Exact at each edge, for this rule alone."""
        per_bin = sum(self.counts.values())
        n = per_bin.sum()
        at_or_above = np.concatenate([np.cumsum(per_bin[::-1])[::-1], [0]])
        kept = at_or_above if self.keeps_above() else n - at_or_above
        return self.edges, (100.0 * kept / n if n else np.zeros(len(self.edges)))


def column_ranges(files: list[str]) -> dict[str, tuple[float, float]]:
    """The min and max of every numeric column over all shards, from the parquet footers'
    statistics: one pass, no data read (a column is read only where its footer has no
    statistics)."""
    found: dict[str, list[float]] = {}
    for path, parquet in storage.read_ahead(files, storage.parquet_file):
        meta = parquet.metadata
        leaves = {meta.schema.column(i).path: i for i in range(meta.num_columns)}  # flat columns: path == name
        for f in parquet.schema_arrow:
            numeric = pa.types.is_floating(f.type) or pa.types.is_integer(f.type)
            if not numeric or f.name not in leaves:
                continue
            span = found.setdefault(f.name, [math.inf, -math.inf])
            for g in range(meta.num_row_groups):
                chunk = meta.row_group(g).column(leaves[f.name])
                st = chunk.statistics
                if st is not None and st.has_min_max:
                    values = [float(st.min), float(st.max)]
                elif st is not None and st.has_null_count and st.null_count == chunk.num_values:
                    values = []  # every value null: nothing to read (it was a data read per file)
                elif meta.row_group(g).num_rows:
                    mm = pc.min_max(storage.read_parquet(path, columns=[f.name]).column(f.name)).as_py()
                    values = [float(mm["min"]), float(mm["max"])] if mm["min"] is not None else []
                else:
                    values = []
                values = [v for v in values if math.isfinite(v)]
                if values:
                    span[0], span[1] = min(span[0], *values), max(span[1], *values)
    return {name: (lo, hi) for name, (lo, hi) in found.items() if lo <= hi}


def rejection_thresholds(files: list[str]) -> dict[str, set[float]]:
    """metric → the thresholds the run's rejections compared it with (`reject_metric`,
    `reject_threshold`), one shard's two columns in memory at a time."""
    found: dict[str, set] = {}
    columns = ["reject_metric", "reject_threshold"]

    def read(path: str) -> Optional[pa.Table]:
        return storage.read_parquet(path, columns=columns) if set(columns) <= set(storage.parquet_names(path)) else None

    for _, table in storage.read_ahead(files, read):
        if table is None:
            continue
        table = table.filter(pc.and_(pc.is_valid(table["reject_metric"]), pc.is_valid(table["reject_threshold"])))
        pairs = table.group_by(["reject_metric", "reject_threshold"]).aggregate([])
        for metric, threshold in zip(pairs["reject_metric"].to_pylist(), pairs["reject_threshold"].to_pylist()):
            if math.isfinite(threshold):
                found.setdefault(metric, set()).add(float(threshold))
    return found


def score_columns(stats: dict, thresholds: dict[str, set[float]], ranges: dict[str, tuple[float, float]]) -> list[str]:
    """The numeric columns that are scores: those the run's filters and score stage declared
    (stats.json `score_fields`), and input columns a filter thresholded (LAION's punsafe);
    not the record's own columns (sizes, bytes: they have their charts or none)."""
    declared = [c for c in stats.get("score_fields") or [] if isinstance(c, str)]
    thresholded = [c for c in sorted(thresholds) if c not in RECORD_COLUMNS]
    found = [c for c in dict.fromkeys(declared + thresholded) if c in ranges]
    # CLIP similarity first: it is the threshold users tune most.
    return sorted(found, key=lambda n: (n != "clip_similarity", n))


def score_thresholds(stats: dict, config: dict, found: dict[str, set[float]]) -> dict[str, list[float]]:
    """metric → thresholds: those the run's rejections compared with (`found`, see
    rejection_thresholds), its resolved top_fraction thresholds and its CLIP parameter."""
    found = {metric: set(values) for metric, values in found.items()}
    for metric, resolved in (stats.get("resolved_thresholds") or {}).items():
        if isinstance(resolved, dict) and resolved.get("min_similarity") is not None:
            found.setdefault(metric, set()).add(float(resolved["min_similarity"]))
    for spec in config.get("filters") or []:
        if isinstance(spec, dict) and spec.get("name") == "clip_similarity" and spec.get("min_similarity") is not None:
            found.setdefault("clip_similarity", set()).add(float(spec["min_similarity"]))
    return {m: sorted(v) for m, v in found.items()}


def _limits(config: dict, sources: list[tuple[str, str, float]]) -> list[tuple[float, str]]:
    """Markers from the configured filters: (filter name, parameter, offset) → (x, label)."""
    marks = []
    sections = [(f.get("name"), f) for f in config.get("filters") or [] if isinstance(f, dict)]
    for owner, values in sections:
        for source, param, offset in sources:
            value = (values or {}).get(param) if owner == source else None
            if isinstance(value, (int, float)) and value and math.isfinite(value):
                marks.append((float(value) + offset, f"{param} {value:g}"))
    return marks


def plan_histograms(files: list[str], stats: dict, config: dict) -> list[Histogram]:
    """The charts and their bins, fixed before any shard is read."""
    charts = []
    ranges = column_ranges(files)
    found = rejection_thresholds(files)
    thresholds = score_thresholds(stats, config, found)
    for column in score_columns(stats, found, ranges):
        span = ranges[column]
        marks = thresholds.get(column, [])
        lo, hi = min([span[0], *marks]), max([span[1], *marks])
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        title = "CLIP image-text similarity" if column == "clip_similarity" else column
        charts.append(Histogram(
            key=f"score:{column}", title=title, x_title=column,
            edges=np.linspace(lo, hi, SCORE_BINS + 1), rule_metric=column,
            markers=[(t, f"threshold {t:.4g}") for t in marks],
        ))

    # Size rules: the resolution filter's (it judges the header, in the download stage).
    size_marks = _limits(config, [("resolution", "min_side", 0)])
    spans = [ranges[c] for c in ("original_width", "original_height") if c in ranges]
    largest = max([s[1] for s in spans] + [2 * x for x, _ in size_marks] + [64.0])
    step = max(8.0, math.ceil(largest / SIZE_BINS / 8) * 8)
    charts.append(Histogram(
        key="size", title="Image size (shorter side, as downloaded)", x_title="pixels",
        edges=np.arange(0, largest + step, step), rule_metric="side",
        markers=size_marks, keep_above=True,
    ))
    aspect_marks = _limits(config, [("resolution", "max_aspect_ratio", 0)])
    aspect_top = min(ASPECT_MAX, max([3.0] + [x + 1 for x, _ in aspect_marks]))
    charts.append(Histogram(
        key="aspect", title="Aspect ratio (longer side / shorter side)", x_title="ratio",
        edges=np.linspace(1.0, aspect_top, 41), rule_metric="aspect",
        markers=aspect_marks, keep_above=False,
    ))
    # A caption of max_words passes and one more word fails: that limit sits one bin right.
    charts.append(Histogram(
        key="caption", title="Caption length", x_title="words",
        edges=np.arange(0, CAPTION_WORDS_MAX + 2, 1.0),
        rule_filter="caption_length",
        markers=_limits(config, [("caption_length", "min_words", 0), ("caption_length", "max_words", 1)]),
    ))
    return charts


def _floats(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64, NaN where null or where the shard lacks the column."""
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return pc.cast(table[name], pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def _strings(table: pa.Table, name: str) -> np.ndarray:
    """A text column as an object array, "" where null or where the shard lacks the column."""
    if name not in table.column_names:
        return np.full(table.num_rows, "", dtype=object)
    return np.array([v or "" for v in table[name].to_pylist()], dtype=object)


def fill_histograms(charts: list[Histogram], table: pa.Table) -> None:
    """Add one shard's rows to every chart."""
    status = np.array(table["status"].to_pylist(), dtype=object)
    filters, metrics = _strings(table, "reject_filter"), _strings(table, "reject_metric")
    # The original size, in every record that got as far as the image header (rejected or not).
    width, height = _floats(table, "original_width"), _floats(table, "original_height")
    for chart in charts:
        if chart.key.startswith("score:"):
            column = chart.key[len("score:"):]
            if column not in table.column_names:
                continue
            try:
                values = pc.cast(table[column], pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue  # the reader kept this shard's column as text (mixed input types)
        elif chart.key == "size":
            values = np.fmin(width, height)
        elif chart.key == "aspect":
            short = np.fmin(width, height)
            values = np.fmax(width, height) / np.where(short > 0, short, np.nan)
        elif chart.key == "caption":
            if "caption" not in table.column_names or pa.types.is_null(table["caption"].type):
                continue  # no captions in this shard (a column of nulls has no text type)
            words = pc.list_value_length(pc.utf8_split_whitespace(table["caption"]))
            values = pc.cast(words, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
        else:
            raise ValueError(chart.key)
        chart.add(values, status, filters, metrics)


def chart_figure(chart: Histogram) -> go.Figure:
    centers = (chart.edges[:-1] + chart.edges[1:]) / 2
    widths = np.diff(chart.edges)
    names = {"written": "written", "rule": "dropped by this rule", "other": "dropped for another reason"}
    fig = go.Figure()
    for outcome, counts in chart.counts.items():
        if counts.any() or outcome == "written":
            fig.add_trace(go.Bar(x=centers, y=counts, width=widths, name=names[outcome],
                                 marker_color=COLORS[outcome], marker_line_width=0))
    # Show the bins that hold rows (and every marker), not the whole fixed range.
    filled = np.flatnonzero(sum(chart.counts.values()))
    if len(filled):
        lo, hi = chart.edges[filled[0]], chart.edges[filled[-1] + 1]
        lo, hi = min([lo, *[x for x, _ in chart.markers]]), max([hi, *[x for x, _ in chart.markers]])
        pad = (hi - lo) * 0.03
        fig.update_xaxes(range=[lo - pad, hi + pad])
    for x, label in chart.markers:
        fig.add_vline(x=x, line_dash="dash", line_color="#000", annotation_text=label, annotation_position="top")
    x, share = chart.kept_share()
    side = "≥" if chart.keeps_above() else "<"
    fig.add_trace(go.Scatter(
        x=x.tolist(), y=share.round(3).tolist(), yaxis="y2", mode="lines", name=f"% kept by a threshold at x (rows {side} x)",
        line=dict(color=KEPT_CURVE, width=1.5),
        hovertemplate=f"threshold %{{x:.4g}}: keeps %{{y:.1f}}% (rows {side} it)<extra></extra>",
    ))
    fig.update_layout(
        title=dict(text=chart.title, y=0.97, yanchor="top"), barmode="stack", bargap=0, height=350,
        template="plotly_white", margin=dict(l=50, r=50, t=75, b=45), legend=dict(orientation="h", y=-0.22),
        xaxis_title=chart.x_title, yaxis_title="rows",
        yaxis2=dict(overlaying="y", side="right", range=[0, 100], showgrid=False, ticksuffix="%",
                    tickmode="linear", tick0=0, dtick=25,
                    title="kept", zeroline=False),
        updatemenus=[log_switch()],
    )
    return fig


def log_switch() -> dict:
    """A linear / log switch of the counts axis (where one bar dwarfs the rest): a plotly
    button, drawn and handled by the inlined plotly.js, so it works offline."""
    return dict(
        type="buttons", direction="right", showactive=True, active=0, x=1.0, xanchor="right", y=1.0,
        yanchor="bottom", pad=dict(r=0, t=0, b=28), font=dict(size=11),
        buttons=[dict(label="linear", method="relayout", args=[{"yaxis.type": "linear"}]),
                 dict(label="log", method="relayout", args=[{"yaxis.type": "log"}])],
    )


# ---------------------------------------------------------------- samples

Rule = tuple[str, str, float]  # (filter, metric, threshold) of a threshold rule


@dataclass
class ChosenSamples:
    """The thumbnails the report shows, from the stages' per-shard selections."""

    kept: list[dict]                         # written, at random
    dropped: dict[str, list[dict]]           # per reason: nearest its threshold, or at random
    near_kept: dict[Rule, list[dict]]        # per threshold rule: the written ones nearest it
    near_dropped: dict[Rule, list[dict]]     # per threshold rule: the dropped ones nearest it


def _rule(row: dict) -> Optional[Rule]:
    if row.get("rule_metric") is None or row.get("threshold") is None or row.get("distance") is None:
        return None
    return (row.get("rule_filter") or "", row["rule_metric"], float(row["threshold"]))


def choose_samples(folder: str, kept_shown: int = KEPT_SHOWN, per_reason: int = DROPPED_SHOWN,
                   per_rule: int = NEAR_SHOWN) -> ChosenSamples:
    """Kept samples at random; per reason the dropped ones nearest the threshold (or at random);
    per threshold rule the kept and the dropped ones nearest it. From every stage's per-shard
    selection (report/samples/*.parquet), one file in memory at a time."""
    rng = random.Random(0)
    kept = BottomK(kept_shown)
    dropped: dict[str, BottomK] = {}
    near: dict[tuple[str, Rule], BottomK] = {}
    for _, table in storage.read_ahead(storage.listing(folder, suffix=".parquet"),
                                       storage.read_parquet):
        for row in table.to_pylist():
            if is_safety_reason(row["reason"]):
                continue  # never shown, whatever a samples file holds
            rule = _rule(row)
            if rule is not None:
                side = "kept" if row["status"] == SUCCESS else "dropped"
                near.setdefault((side, rule), BottomK(per_rule)).offer(row["distance"], row)
            if row["status"] == SUCCESS:
                if rule is None:
                    kept.offer(rng.random(), row)
            else:
                group = dropped.setdefault(row["reason"], BottomK(per_reason))
                group.offer(row["distance"] if row["distance"] is not None else rng.random(), row)
    return ChosenSamples(
        kept=kept.items(),
        dropped={reason: group.items() for reason, group in dropped.items()},
        near_kept={rule: g.items() for (side, rule), g in near.items() if side == "kept"},
        near_dropped={rule: g.items() for (side, rule), g in near.items() if side == "dropped"},
    )


def _tile(row: dict) -> dict:
    scores = json.loads(row.get("scores") or "{}")
    value = row.get("value")
    return {
        "key": row["key"], "caption": row.get("caption") or "", "reason": row.get("reason"),
        "src": "data:image/jpeg;base64," + base64.b64encode(row["thumbnail"]).decode(),
        "size": f"{row['width']}×{row['height']}" if row.get("width") else "",
        "scores": ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items())),
        "distance": row.get("distance"),
        "value": None if value is None else f"{row.get('rule_metric')} {value:.4g}",
        "stage": row.get("stage") or "write",
    }


def threshold_groups(chosen: ChosenSamples, dropped_by_rule: Counter) -> list[dict]:
    """Per threshold rule: the kept samples nearest it beside the dropped ones nearest it."""
    rules = set(chosen.near_kept) | set(chosen.near_dropped)
    groups = []
    for rule in sorted(rules, key=lambda r: (r[1] != "clip_similarity", -dropped_by_rule.get(r, 0), r)):
        name, metric, threshold = rule
        groups.append({
            "filter": name, "metric": metric, "threshold": f"{threshold:g}",
            "dropped_count": dropped_by_rule.get(rule, 0),
            "kept": [_tile(r) for r in chosen.near_kept.get(rule, [])],
            "dropped": [_tile(r) for r in chosen.near_dropped.get(rule, [])],
        })
    return groups


def count_rule_drops(table: pa.Table, counts: Counter) -> None:
    """Add one shard's rejections per threshold rule (reject_filter, reject_metric, reject_threshold)."""
    names = ["reject_filter", "reject_metric", "reject_threshold"]
    if not set(names) <= set(table.column_names):
        return
    ruled = table.filter(pc.and_(pc.is_valid(table["reject_metric"]), pc.is_valid(table["reject_threshold"])))
    if not ruled.num_rows:
        return
    grouped = ruled.group_by(names, use_threads=False).aggregate([("reject_metric", "count")])
    for f, m, t, n in zip(*(grouped[c].to_pylist() for c in names + ["reject_metric_count"])):
        counts[(f or "", m, float(t))] += n


# ---------------------------------------------------------------- download failures

# The host of a URL, found by Arrow on a whole column (scheme://[userinfo@]host[:port]...).
_HOST = r"^[A-Za-z][A-Za-z0-9+.\-]*://(?:[^@/?#]*@)?(?P<host>\[[^\]]*\]|[^:/?#]*)"


class TopCounts:
    """Counts of the most frequent keys in bounded memory: exact while there are at most
    2 × `capacity` distinct keys; beyond that the rarest are dropped (down to `capacity`) and
    the counts kept are lower bounds (`approximate`). A web crawl has millions of domains."""

    def __init__(self, capacity: int = 50_000):
        self.capacity = capacity
        self.counts: Counter = Counter()
        self.approximate = False

    def update(self, counts: dict) -> None:
        self.counts.update(counts)
        if len(self.counts) > 2 * self.capacity:
            self.counts = Counter(dict(self.counts.most_common(self.capacity)))
            self.approximate = True


def _hosts(urls: pa.Array) -> pa.Array:
    """The host of each URL as written (lower case), "" where there is none."""
    if not pa.types.is_string(urls.type) and not pa.types.is_large_string(urls.type):
        urls = pc.cast(urls, pa.string())
    found = pc.struct_field(pc.extract_regex(urls, pattern=_HOST), [0])
    return pc.fill_null(pc.utf8_lower(found), "")


def _counts(value_counts: pa.StructArray) -> dict:
    """{value: count} from Arrow's value_counts."""
    return dict(zip(value_counts.field("values").to_pylist(), value_counts.field("counts").to_pylist()))


def _domain(host: str) -> str:
    return normalize_host(host) if host else "(no host)"


class DownloadFailures:
    """Why downloads failed: the rows whose fetch failed (status FAILED_TO_DOWNLOAD), per reason,
    per domain and reason (top domains), per HTTP status (`http_status`), with a few example URLs
    per reason. Fed one shard at a time; memory bounded by the top-domain counters."""

    COLUMNS = {"status", "reason", "url", "reject_filter", "bytes", "http_status", "error_message"}

    def __init__(self):
        self._rng = random.Random(2)
        self.reasons: Counter = Counter()
        self.rows_by_domain = TopCounts()
        self.failed_by_domain = TopCounts()
        self.by_domain_reason = TopCounts(capacity=100_000)
        self.http: Counter = Counter()
        self.no_answer = 0
        self._examples: dict[str, BottomK] = {}

    def add(self, table: pa.Table) -> None:
        if not {"url", "status", "reason"} <= set(table.column_names):
            return
        hosts = _hosts(table["url"])
        self.rows_by_domain.update(_counts(pc.value_counts(hosts)))
        failed = pc.fill_null(pc.equal(table["status"], FAILED_TO_DOWNLOAD), False)
        rows = table.filter(failed)
        if not rows.num_rows:
            return
        columns = {"host": hosts.filter(failed), "reason": pc.fill_null(rows["reason"], ""),
                   "url": pc.fill_null(pc.cast(rows["url"], pa.string()), "")}
        columns["http_status"] = rows["http_status"] if "http_status" in rows.column_names else pa.nulls(rows.num_rows, pa.int64())
        columns["detail"] = (pc.fill_null(rows["error_message"], "") if "error_message" in rows.column_names
                             else pa.array([""] * rows.num_rows))
        failures = pa.table(columns)
        # Counted by Arrow, per shard: Python sees distinct values, not rows.
        self.reasons.update(_counts(pc.value_counts(failures["reason"])))
        self.failed_by_domain.update(_counts(pc.value_counts(failures["host"])))
        pairs = failures.group_by(["host", "reason"], use_threads=False).aggregate([("url", "count")])
        self.by_domain_reason.update(dict(zip(zip(pairs["host"].to_pylist(), pairs["reason"].to_pylist()),
                                              pairs["url_count"].to_pylist())))
        statuses = _counts(pc.value_counts(failures["http_status"]))
        self.no_answer += statuses.pop(None, 0)
        self.http.update({int(code): n for code, n in statuses.items()})
        # Examples: per reason, the rows with the smallest random keys (a uniform pick), offered.
        priorities = np.array([self._rng.random() for _ in range(failures.num_rows)])
        reasons = failures["reason"].to_numpy(zero_copy_only=False)
        for reason in np.unique(reasons):
            group = self._examples.get(reason)
            if group is None:
                if len(self._examples) >= 64:  # reasons are few; a flood of new ones is not shown
                    continue
                group = self._examples[reason] = BottomK(URLS_SHOWN)
            where = np.flatnonzero(reasons == reason)
            for i in where[np.argsort(priorities[where], kind="stable")[:URLS_SHOWN]]:
                if group.accepts(priorities[i]):
                    picked = failures.slice(int(i), 1).to_pylist()[0]
                    group.offer(priorities[i], {"url": picked["url"], "detail": picked["detail"],
                                                "http_status": picked["http_status"]})

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def domain_table(self) -> dict:
        """Rows: the top failing domains; columns: the top reasons (and the rest as "other")."""
        reasons = [r for r, _ in self.reasons.most_common(REASONS_BY_DOMAIN)]
        rows = []
        for host, failed in self.failed_by_domain.counts.most_common(DOMAINS_SHOWN):
            seen = self.rows_by_domain.counts.get(host, 0)
            cells = [self.by_domain_reason.counts.get((host, r), 0) for r in reasons]
            rows.append({"domain": _domain(host), "rows": seen, "failed": failed,
                         "percent": 100.0 * failed / seen if seen else None,
                         "cells": cells, "other": failed - sum(cells)})
        approximate = self.rows_by_domain.approximate or self.failed_by_domain.approximate
        return {"reasons": reasons, "rows": rows, "approximate": approximate,
                "domains": len(self.failed_by_domain.counts)}

    def examples(self) -> list[dict]:
        return [{"reason": reason, "count": n, "urls": self._examples[reason].items()}
                for reason, n in self.reasons.most_common() if reason in self._examples]

    def http_figure(self) -> Optional[go.Figure]:
        if not self.http:
            return None
        codes = sorted(self.http)
        fig = go.Figure(go.Bar(
            x=[f"HTTP {c}" for c in codes], y=[self.http[c] for c in codes], marker_color=COLORS["rule"],
            text=[f"{self.http[c]:,}" for c in codes], textposition="outside",
        ))
        fig.update_layout(title="Failed downloads by HTTP status (the server answered)", height=300, bargap=0.5,
                          template="plotly_white", margin=dict(l=50, r=20, t=50, b=40), yaxis_title="rows",
                          xaxis_type="category")
        return fig


# ---------------------------------------------------------------- stages

def stage_seconds(layout: RunLayout) -> dict[str, list[float]]:
    """Per stage, each shard's task seconds (from the done-markers)."""
    seconds: dict[str, list[float]] = {}
    for _, text in storage.read_ahead(storage.listing(layout.shards, suffix=".done.json"),
                                      storage.read_text):
        for stage, value in (json.loads(text).get("seconds") or {}).items():
            seconds.setdefault(stage, []).append(float(value))
    return seconds


def stage_table(stats: dict, per_shard: dict[str, list[float]]) -> list[dict]:
    total = stats.get("task_seconds_by_stage") or {s: sum(v) for s, v in per_shard.items()}
    rows_in = stats["rows_in"]
    out = []
    for stage, seconds in total.items():
        shard_times = per_shard.get(stage, [])
        out.append({
            "stage": stage, "task_seconds": seconds,
            "share": 100.0 * seconds / sum(total.values()) if sum(total.values()) else 0.0,
            "mean_shard": float(np.mean(shard_times)) if shard_times else None,
            "max_shard": float(np.max(shard_times)) if shard_times else None,
            "rows_per_task_second": rows_in / seconds if seconds else None,
        })
    return out


def stage_figure(per_shard: dict[str, list[float]]) -> go.Figure:
    fig = go.Figure()
    for stage, seconds in per_shard.items():
        fig.add_trace(go.Box(x=seconds, name=stage, boxpoints="outliers", orientation="h"))
    fig.update_layout(title="Seconds per shard task, by stage", height=80 + 60 * max(1, len(per_shard)),
                      template="plotly_white", margin=dict(l=80, r=20, t=50, b=40), showlegend=False,
                      xaxis_title="seconds")
    return fig


def funnel_figure(steps: list[dict]) -> go.Figure:
    fig = go.Figure(go.Funnel(
        y=[s["label"] for s in steps], x=[s["count"] for s in steps],
        textinfo="value+percent initial", marker_color="#1565c0",
    ))
    fig.update_layout(height=70 + 45 * len(steps), template="plotly_white", margin=dict(l=140, r=20, t=20, b=20))
    return fig


# ---------------------------------------------------------------- the page

def _html(fig: go.Figure, div_id: str) -> Markup:
    return Markup(fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                              config={"displaylogo": False, "responsive": True}))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("curate.pipeline.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["num"] = lambda n: f"{n:,}" if isinstance(n, int) else (f"{n:,.1f}" if n is not None else "–")
    return env


class CaptionExamples:
    """Random captions per reason, for rows dropped before the download (they have no image)."""

    def __init__(self, reasons: set[str]):
        self._rng = random.Random(1)
        self._chosen = {r: BottomK(CAPTIONS_SHOWN) for r in reasons if not is_safety_reason(r)}

    def add(self, table: pa.Table) -> None:
        if not self._chosen or "caption" not in table.column_names:
            return
        wanted = pc.is_in(table["reason"], pa.array(list(self._chosen), pa.string()))
        picked = table.filter(wanted)
        for reason, caption in zip(picked["reason"].to_pylist(), picked["caption"].to_pylist()):
            self._chosen[reason].offer(self._rng.random(), {"caption": caption or ""})

    def items(self) -> dict[str, list[str]]:
        return {r: [c["caption"] for c in g.items()] for r, g in sorted(self._chosen.items()) if g.items()}


def build_report(root: str | Path) -> str:
    """Write OUTPUT/report.html from a finished run; returns its path."""
    layout = open_run(root)
    stats, config = read_stats(layout), read_config(layout)
    files = storage.listing(layout.shards, suffix=".parquet")
    steps = funnel(stats, config)

    charts = plan_histograms(files, stats, config)
    captions = CaptionExamples({
        r for name, c in (stats.get("filters") or {}).items() if _stage(name) == "row" for r in _dropped(c)
    })
    failures = DownloadFailures()
    dropped_by_rule: Counter = Counter()
    wanted = {"status", "reason", "caption", "original_width", "original_height", "reject_filter", "reject_metric",
              "reject_threshold"} | DownloadFailures.COLUMNS
    wanted |= {c.key[len("score:"):] for c in charts if c.key.startswith("score:")}
    def read(path: str) -> pa.Table:
        return storage.read_parquet(path, columns=sorted(wanted & set(storage.parquet_names(path))))

    for _, table in storage.read_ahead(files, read):  # a few shards' needed columns in memory at a time
        fill_histograms(charts, table)
        captions.add(table)
        failures.add(table)
        count_rule_drops(table, dropped_by_rule)
    charts = [c for c in charts if c.total]

    chosen = choose_samples(layout.report_samples)
    counts = stats.get("rejected_by_reason") or {}
    # Reasons of threshold rules are shown beside their threshold; here the others.
    dropped_groups = [
        {"reason": reason, "count": counts.get(reason, 0), "tiles": [_tile(r) for r in rows],
         "download": all(r.get("stage") == "download" for r in rows)}
        for reason, rows in sorted(chosen.dropped.items(), key=lambda kv: (-counts.get(kv[0], 0), kv[0]))
        if not any(r["distance"] is not None for r in rows)
    ]
    per_shard = stage_seconds(layout)
    http_figure = failures.http_figure()

    html = _environment().get_template("report.html.j2").render(
        title=f"curate run report: {storage.name(_shown(layout.root))}",
        root=_shown(layout.root),
        generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        stats=stats,
        steps=steps,
        funnel_chart=_html(funnel_figure(steps), "chart-funnel"),
        charts=[{"title": c.title, "html": _html(chart_figure(c), f"chart-{i}")} for i, c in enumerate(charts)],
        kept=[_tile(r) for r in chosen.kept],
        thresholds=threshold_groups(chosen, dropped_by_rule),
        dropped_groups=dropped_groups,
        row_stage_captions=captions.items(),
        failures={"total": failures.total, "domains": failures.domain_table(), "examples": failures.examples(),
                  "no_answer": failures.no_answer,
                  "http_chart": _html(http_figure, "chart-http") if http_figure is not None else None},
        stages=stage_table(stats, per_shard),
        stage_chart=_html(stage_figure(per_shard), "chart-stages") if per_shard else None,
        config_text=storage.read_text(layout.config),
        plotly_js=Markup(get_plotlyjs()),
    )
    write_page(layout.report, html)
    return layout.report


def _shown(root: str) -> str:
    """The run's place as the page names it: an absolute local path, or the URL."""
    return root if storage.is_url(root) else str(Path(root).resolve())


def write_page(path: str, html: str) -> None:
    """Write a page atomically, first removing what a build killed mid-write left."""
    storage.remove_temporaries(storage.parent(path), storage.name(path))
    with atomic_path(path) as tmp:
        tmp.write_text(html, encoding="utf-8")


# ---------------------------------------------------------------- `curate inspect`

def describe_samples(tar_path: str | Path, n: int = 3) -> str:
    """The first `n` samples of a WebDataset shard: key, members, caption and json metadata;
    for n = 0 only how many samples the shard holds."""
    path = Path(tar_path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file() or not tarfile.is_tarfile(path):
        raise UserError(f"{path}: not a tar file (expected a WebDataset shard such as shards/00000.tar)")
    if n <= 0:
        try:
            count = sum(1 for _ in iter_tar_samples(path))
        except (tarfile.TarError, OSError) as exc:
            raise UserError(f"{path}: unreadable tar ({exc})") from exc
        return f"{path}: {count:,} sample{'s' if count != 1 else ''} (0 requested: none printed)"
    blocks = []
    try:
        for key, fields in itertools.islice(iter_tar_samples(path), max(n, 0)):
            members = ", ".join(f"{ext} ({len(data):,} bytes)" for ext, data in fields.items())
            lines = [f"{key}  {members}"]
            if "txt" in fields:
                lines.append(f"  caption: {fields['txt'].decode('utf-8', 'replace')}")
            if "json" in fields:
                try:
                    meta = json.dumps(json.loads(fields["json"]), indent=2, sort_keys=True, ensure_ascii=False)
                except ValueError:
                    meta = fields["json"].decode("utf-8", "replace")
                lines.append("  json: " + meta.replace("\n", "\n  "))
            blocks.append("\n".join(lines))
    except (tarfile.TarError, OSError) as exc:
        raise UserError(f"{path}: unreadable tar ({exc})") from exc
    if not blocks:
        return f"{path}: no samples"
    return "\n\n".join(blocks)
