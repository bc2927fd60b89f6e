"""Two runs side by side, the question after every threshold change:

    curate report A B   →  A/compare-B.html  (or -o PATH; one self-contained file, like report.html)

- the funnels of both, step by step and reason by reason (steps and reasons one run lacks
  count 0), and the settings that differ (config.yaml, as `curate run` names a changed key);
- every score column of either run, on the same bins: the share of each run's rows with a
  value per bin, each run's thresholds, and what a threshold at x would keep in each.

Built from the same parts as the run report (pipeline/report/page.py), from each run's
stats.json, config.yaml and shard parquets, read one shard at a time.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Optional

import numpy as np
import plotly.graph_objects as go
from markupsafe import Markup
from plotly.offline import get_plotlyjs

from curate.pipeline import storage
from curate.pipeline.config import changed_settings
from curate.pipeline.report.page import (
    SCORE_BINS,
    Histogram,
    _environment,
    _html,
    fill_histograms,
    funnel,
    log_switch,
    open_run,
    plan_histograms,
    read_config,
    read_stats,
    _shown,
    write_page,
)

RUNS = ("a", "b")
COLORS = {"a": "#1565c0", "b": "#ef6c00"}
# Settings that differ between any two runs without changing what they keep.
NOT_COMPARED = {"output.path", "dask"}


def merge_labels(first: list[str], second: list[str]) -> list[str]:
    """The labels of both, in the first's order, each of the second's own placed after the label
    it follows there (so "written" stays last and a filter only B has sits where B ran it)."""
    merged = list(first)
    for i, label in enumerate(second):
        if label not in merged:
            merged.insert(merged.index(second[i - 1]) + 1 if i and second[i - 1] in merged else len(merged), label)
    return merged


def compare_funnels(a: list[dict], b: list[dict], rows_in: dict[str, int]) -> list[dict]:
    """Aligned funnel steps: per step and per reason, each run's rows and % of its rows in."""
    steps = {"a": {s["label"]: s for s in a}, "b": {s["label"]: s for s in b}}

    def pct(n: int, run: str) -> float:
        return 100.0 * n / rows_in[run] if rows_in[run] else 0.0

    out = []
    for label in merge_labels([s["label"] for s in a], [s["label"] for s in b]):
        counts = {run: steps[run][label]["count"] if label in steps[run] else None for run in RUNS}
        drops = {run: {d["reason"]: d["count"] for d in steps[run].get(label, {}).get("dropped", [])} for run in RUNS}
        reasons = merge_labels(list(drops["a"]), list(drops["b"]))
        out.append({
            "label": label,
            "runs": {run: {"count": counts[run], "percent": None if counts[run] is None else pct(counts[run], run)}
                     for run in RUNS},
            "dropped": [{"reason": r, "runs": {run: {"count": drops[run].get(r, 0), "percent": pct(drops[run].get(r, 0), run)}
                                               for run in RUNS}} for r in reasons],
        })
    for step in out:
        for row in [step, *step["dropped"]]:
            pa_, pb = row["runs"]["a"]["percent"], row["runs"]["b"]["percent"]
            row["delta"] = None if pa_ is None or pb is None else pb - pa_
    return out


def funnel_figure(steps: list[dict], names: dict[str, str]) -> go.Figure:
    fig = go.Figure()
    for run in RUNS:
        fig.add_trace(go.Funnel(
            name=names[run], y=[s["label"] for s in steps], x=[s["runs"][run]["count"] or 0 for s in steps],
            textinfo="value+percent initial", marker_color=COLORS[run],
        ))
    fig.update_layout(height=90 + 60 * len(steps), template="plotly_white", margin=dict(l=140, r=20, t=20, b=20),
                      legend=dict(orientation="h", y=-0.05))
    return fig


def score_charts(files: dict[str, list[Path]], stats: dict[str, dict], config: dict[str, dict]) -> list[dict[str, Histogram]]:
    """Per score column of either run, one Histogram per run on the same bins, filled."""
    plans = {run: {c.key: c for c in plan_histograms(files[run], stats[run], config[run]) if c.key.startswith("score:")}
             for run in RUNS}
    keys = list(dict.fromkeys([*plans["a"], *plans["b"]]))
    charts = []
    for key in keys:
        present = [plans[run][key] for run in RUNS if key in plans[run]]
        lo, hi = min(p.edges[0] for p in present), max(p.edges[-1] for p in present)
        edges = np.linspace(lo, hi, SCORE_BINS + 1)
        charts.append({run: Histogram(key=key, title=present[0].title, x_title=present[0].x_title, edges=edges,
                                      rule_metric=present[0].rule_metric,
                                      markers=plans[run][key].markers if key in plans[run] else [])
                       for run in RUNS})
    columns = {"status", "reject_filter", "reject_metric"} | {k[len("score:"):] for k in keys}

    def read(path: str):
        return storage.read_parquet(path, columns=sorted(columns & set(storage.parquet_names(path))))

    for run in RUNS:
        for _, table in storage.read_ahead(files[run], read):  # a few shards' needed columns in memory at a time
            fill_histograms([c[run] for c in charts], table)
    for pair in charts:
        # One direction for both curves: the run that has the rule says which side it keeps.
        ruled = [pair[run] for run in RUNS if pair[run].markers and pair[run].counts["rule"].any()]
        above = ruled[0].keeps_above() if ruled else pair["a"].keeps_above()
        for run in RUNS:
            pair[run].keep_above = above
    return [pair for pair in charts if any(pair[run].total for run in RUNS)]


def score_figure(pair: dict[str, Histogram], names: dict[str, str]) -> go.Figure:
    first = pair["a"]
    centers = (first.edges[:-1] + first.edges[1:]) / 2
    side = "≥" if first.keeps_above() else "<"
    fig = go.Figure()
    for run in RUNS:
        chart = pair[run]
        per_bin = sum(chart.counts.values())
        n = int(per_bin.sum())
        if not n:
            continue
        fig.add_trace(go.Scatter(
            x=centers, y=100.0 * per_bin / n, mode="lines", line_shape="hvh", name=f"{names[run]}: % of its {n:,} rows",
            line=dict(color=COLORS[run], width=2), hovertemplate="%{x:.4g}: %{y:.2f}% of rows<extra></extra>",
        ))
        x, share = chart.kept_share()
        fig.add_trace(go.Scatter(
            x=x.tolist(), y=share.round(3).tolist(), yaxis="y2", mode="lines", name=f"{names[run]}: % kept at x (rows {side} x)",
            line=dict(color=COLORS[run], width=1.5, dash="dot"),
            hovertemplate=f"threshold %{{x:.4g}}: keeps %{{y:.1f}}%<extra>{names[run]}</extra>",
        ))
        for mx, label in chart.markers:  # B's labels a line lower, so that close thresholds stay legible
            fig.add_vline(x=mx, line_dash="dash", line_color=COLORS[run], annotation_text=f"{names[run]} {label}",
                          annotation_position="top right", annotation_font_color=COLORS[run],
                          annotation_yshift=0 if run == "a" else -16)
    fig.update_layout(
        title=first.title, height=360, template="plotly_white", margin=dict(l=50, r=50, t=60, b=45),
        legend=dict(orientation="h", y=-0.22), xaxis_title=first.x_title, yaxis_title="% of rows with a value",
        yaxis2=dict(overlaying="y", side="right", range=[0, 100], showgrid=False, ticksuffix="%",
                    tickmode="linear", tick0=0, dtick=25, title="kept",
                    zeroline=False),
        updatemenus=[log_switch()],
    )
    return fig


def _at(config: Any, path: str) -> Any:
    """The value at a dotted path of a config mapping (`filters.1.min_similarity`), or None."""
    for part in path.split("."):
        if isinstance(config, dict):
            config = config.get(part)
        elif isinstance(config, list) and part.isdigit() and int(part) < len(config):
            config = config[int(part)]
        else:
            return None
    return config


def build_comparison(a: str | Path, b: str | Path, output: Optional[str | Path] = None) -> str:
    """Write the page comparing run A with run B; returns its path (default A/compare-<B's folder name>.html)."""
    layouts = {"a": open_run(a), "b": open_run(b)}
    stats = {run: read_stats(layouts[run]) for run in RUNS}
    config = {run: read_config(layouts[run]) for run in RUNS}
    files = {run: storage.listing(layouts[run].shards, suffix=".parquet") for run in RUNS}
    names = {"a": "A", "b": "B"}
    folders = {run: _shown(layouts[run].root) for run in RUNS}
    path = str(output) if output is not None else storage.join(layouts["a"].root, f"compare-{storage.name(folders['b'])}.html")

    steps = compare_funnels(funnel(stats["a"], config["a"]), funnel(stats["b"], config["b"]),
                            {run: stats[run]["rows_in"] for run in RUNS})
    charts = score_charts(files, stats, config)
    changed = [{"path": p, "a": _at(config["a"], p), "b": _at(config["b"], p)}
               for p in changed_settings(config["a"], config["b"], NOT_COMPARED)]
    html = _environment().get_template("compare.html.j2").render(
        title=f"curate runs compared: {storage.name(folders['a'])} (A) and {storage.name(folders['b'])} (B)",
        runs=[{"name": names[run], "css": run, "root": str(folders[run]), "stats": stats[run]} for run in RUNS],
        generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        steps=steps,
        funnel_chart=_html(funnel_figure(steps, names), "chart-funnel"),
        charts=[{"title": c["a"].title, "html": _html(score_figure(c, names), f"chart-{i}")} for i, c in enumerate(charts)],
        changed=changed,
        plotly_js=Markup(get_plotlyjs()),
    )
    storage.make_dirs(storage.parent(path))
    write_page(path, html)
    return path
