"""What `curate eval` shows a person: a grid per scheduler and eval.html.

    grid-SCHEDULER.png   one row per step count, one column per prompt (the first 8), prompts as labels
    eval.html            the results table, one chart of quality against steps (a line per
                         scheduler), the grids, the settings; self-contained like the run report
                         (pipeline/report/page.py: jinja2, autoescaped; plotly.js inlined; images
                         as data: URIs), so it opens offline from the file system
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import textwrap
from pathlib import Path

import jinja2
import numpy as np
import plotly.graph_objects as go
from markupsafe import Markup
from PIL import Image, ImageDraw, ImageFont
from plotly.offline import get_plotlyjs

from curate.pipeline.shards import atomic_path
from curate.train.eval.data import Prompt

TILE = 160  # px per image in the grids
LABEL_LINES = 4
LINE_HEIGHT = 13
ROW_LABEL = 90


def _font():
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow without FreeType support for the default font
        return ImageFont.load_default()


def _tile(image: np.ndarray) -> Image.Image:
    picture = Image.fromarray(image)
    smaller = picture.width > TILE
    return picture.resize((TILE, TILE), Image.LANCZOS if smaller else Image.NEAREST)


def grid_image(rows: list[tuple[str, np.ndarray]], prompts: list[str]) -> Image.Image:
    """rows: (label, uint8 images (k, H, W, 3)); prompts: the column labels."""
    columns = max(len(images) for _, images in rows)
    font = _font()
    top = LABEL_LINES * LINE_HEIGHT + 6
    grid = Image.new("RGB", (ROW_LABEL + columns * (TILE + 4), top + len(rows) * (TILE + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for c, prompt in enumerate(prompts[:columns]):
        lines = textwrap.wrap(prompt, width=26)[:LABEL_LINES]
        for n, line in enumerate(lines):
            draw.text((ROW_LABEL + c * (TILE + 4), 2 + n * LINE_HEIGHT), line, fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        y = top + r * (TILE + 4)
        draw.text((4, y + TILE // 2 - 6), label, fill="black", font=font)
        for c, image in enumerate(images):
            grid.paste(_tile(image), (ROW_LABEL + c * (TILE + 4), y))
    return grid


def write_grids(out: Path, summary: dict, prompts: list[Prompt]) -> list[tuple[str, Path]]:
    """grid-SCHEDULER.png per scheduler, from the images kept in runs/*.npz."""
    by_scheduler: dict[str, list[tuple[str, np.ndarray]]] = {}
    for r in summary["results"]:
        with np.load(out / "runs" / f"{r['scheduler']}-{r['steps']}.npz", allow_pickle=False) as saved:
            images = saved["grid"]
        by_scheduler.setdefault(r["scheduler"], []).append((f"{r['steps']} steps", images))
    paths = []
    for scheduler, rows in by_scheduler.items():
        path = out / f"grid-{scheduler.replace('+', 'p')}.png"
        with atomic_path(path) as tmp:
            grid_image(sorted(rows, key=lambda row: int(row[0].split()[0])), [p.text for p in prompts]).save(tmp, format="PNG")
        paths.append((scheduler, path))
    return paths


def quality_figure(results: list[dict]) -> tuple[go.Figure, str]:
    """Quality against steps, a line per scheduler: FID where measured, else FD in CLIP space."""
    key, title = ("fid", "FID") if any(r.get("fid") is not None for r in results) else ("fd_clip", "FD in CLIP space")
    fig = go.Figure()
    for scheduler in dict.fromkeys(r["scheduler"] for r in results):
        rows = sorted((r for r in results if r["scheduler"] == scheduler and r.get(key) is not None),
                      key=lambda r: r["steps"])
        fig.add_trace(go.Scatter(x=[r["steps"] for r in rows], y=[r[key] for r in rows], mode="lines+markers",
                                 name=scheduler,
                                 text=[f"{r['images_per_second'] or 0:.2f} images/s" for r in rows]))
    fig.update_layout(title=f"{title} against sampling steps (lower is better)", xaxis_title="steps",
                      yaxis_title=title, xaxis_type="log", height=380, template="plotly_white",
                      margin=dict(l=60, r=20, t=50, b=40))
    return fig, title


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _model_name(model: str) -> str:
    """A folder's name (a `curate train` output's, not its pipeline/'s), or the hub id / tiny."""
    path = Path(model)
    return (path.parent.name if path.name == "pipeline" else path.name) if path.is_absolute() else model


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("curate.train.eval", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["num"] = lambda v, fmt="{:.2f}": fmt.format(v) if v is not None else "–"
    return env


def write_page(out: Path, summary: dict, grids: list[tuple[str, Path]]) -> Path:
    """OUT/eval.html from eval.json's contents and the grids (scheduler, PNG)."""
    fig, quality = quality_figure(summary["results"])
    grids = [{"scheduler": scheduler, "uri": _data_uri(path)} for scheduler, path in grids]
    html = _environment().get_template("eval.html.j2").render(
        title=f"curate eval: {_model_name(summary['model'])}",
        summary=summary, results=summary["results"], quality=quality,
        chart=Markup(fig.to_html(full_html=False, include_plotlyjs=False, div_id="chart-quality",
                                 config={"displaylogo": False, "responsive": True})),
        grids=grids, generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        settings=json.dumps({k: summary[k] for k in ("model", "prompts", "reference", "inception", "clip",
                                                     "generation", "device", "precision", "torch", "diffusers")},
                            indent=1),
        plotly_js=Markup(get_plotlyjs()),
    )
    path = out / "eval.html"
    with atomic_path(path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return path
