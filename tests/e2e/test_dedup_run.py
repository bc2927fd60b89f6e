"""Dedup end to end: `curate run` on served images with planted duplicates of every kind
across shards (the pass itself: tests/unit/test_dedup.py)."""

from __future__ import annotations

import io
import json
import os
import random

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, ImageOps

from conftest import run_curate, write_config
from curate.pipeline.models.clip import TINY_CLIP, TINY_CLIP_DIR
from curate.pipeline.demo.devserver import DevServer
from curate.pipeline.records import FILTERED, SUCCESS
from curate.pipeline.shards import sample_key
from curate.pipeline.demo.synthetic import caption, random_scene, render


# --- end to end: planted duplicates served over HTTP -------------------------------------


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _distinct_scenes(n: int, seed: int):
    """Scenes that look different to the tiny CLIP (each its own background) and are not
    mirror-symmetric in meaning (no left/right position word)."""
    rng = random.Random(seed)
    scenes, backgrounds = [], set()
    while len(scenes) < n:
        scene = random_scene(rng)
        if scene.background in backgrounds or len(scene.objects) < 2 or scene.position in ("left", "right"):
            continue
        backgrounds.add(scene.background)
        scenes.append((scene, render(scene, 200, 170, rng)))
    return scenes


# (file, expected reason or None, index of the row it duplicates)
PLANTED = [
    ("d0.jpg", None, None),
    ("d1.jpg", None, None),
    ("d2.jpg", None, None),
    ("d0.jpg", "duplicate: url", 0),             # the same URL again
    ("d3.jpg", None, None),
    ("d1-copy.jpg", "duplicate: sha256", 1),     # the same bytes at another URL
    ("d2-small.jpg", "duplicate: phash", 2),     # re-encoded at quality 70 and resized 0.8x
    ("d4.jpg", None, None),
    ("d5.jpg", None, None),
    ("d4-mirror.jpg", "duplicate: semantic", 7),  # mirrored: far by pHash, near by CLIP
    ("d6.jpg", None, None),
    ("d2-small.jpg", "duplicate: url", 6),       # the URL of a dropped duplicate: still a duplicate
]


@pytest.fixture(scope="module")
def dedup_run(tmp_path_factory):
    if not (TINY_CLIP_DIR / "open_clip_config.json").exists():
        pytest.skip("tiny CLIP not built")
    tmp = tmp_path_factory.mktemp("dedup")
    www = tmp / "www"
    (www / "images").mkdir(parents=True)
    scenes = _distinct_scenes(7, seed=11)
    captions = {}
    for i, (scene, im) in enumerate(scenes):
        (www / "images" / f"d{i}.jpg").write_bytes(_jpeg(im))
        captions[f"d{i}.jpg"] = caption(scene)
    (www / "images" / "d1-copy.jpg").write_bytes((www / "images" / "d1.jpg").read_bytes())
    small = scenes[2][1].resize((160, 136), Image.Resampling.BICUBIC)
    (www / "images" / "d2-small.jpg").write_bytes(_jpeg(small, quality=70))
    (www / "images" / "d4-mirror.jpg").write_bytes(_jpeg(ImageOps.mirror(scenes[4][1])))
    with DevServer(www) as server:
        urls = tmp / "urls.parquet"
        pd.DataFrame({
            "URL": [f"{server.base_url}/images/{name}" for name, _, _ in PLANTED],
            "TEXT": [captions[name.split("-")[0].removesuffix(".jpg") + ".jpg"] for name, _, _ in PLANTED],
            "truth": [reason or "distinct" for _, reason, _ in PLANTED],
        }).to_parquet(urls, index=False)
        config = write_config(
            tmp / "run.yaml", urls, tmp / "out",
            input={"rows_per_shard": 3},  # 4 shards: every planted pair crosses a shard
            clip={"enabled": True, "model": TINY_CLIP, "pretrained": None, "device": "cpu", "batch_size": 16},
            filters=[{"name": "dedup", "phash_max_distance": 4, "semantic_eps": 0.05,
                      "semantic_clusters": 2, "partitions": 2}],
            dask={"n_workers": 1},  # one worker process scores and dedups the 12 rows: one CLIP import
        )
        data = yaml.safe_load(config.read_text())
        data["output"]["keep_intermediate"] = True  # the rerun test rewrites shards from the raw ones
        config.write_text(yaml.safe_dump(data))
        env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
        result = run_curate(["run", str(config), "--no-progress"], env, timeout=240)
        yield {"result": result, "out": tmp / "out", "config": config, "env": env}


def _rows(out) -> pd.DataFrame:
    return pd.concat([pq.read_table(p).to_pandas() for p in sorted((out / "shards").glob("*.parquet"))],
                     ignore_index=True)


def test_run_drops_exactly_the_planted_duplicates(dedup_run):
    assert dedup_run["result"].returncode == 0, dedup_run["result"].stderr[-3000:]
    rows = _rows(dedup_run["out"])
    assert len(rows) == len(PLANTED)
    for i, (name, reason, original) in enumerate(PLANTED):
        row = rows.iloc[i]
        assert row["key"] == sample_key(i // 3, i % 3, 3)
        if reason is None:
            assert row["status"] == SUCCESS, (name, row["reason"])
        else:
            assert (row["status"], row["reason"]) == (FILTERED, reason), name
            assert row["duplicate_of"] == sample_key(original // 3, original % 3, 3), name
    # Each planted kind really tested what it says: the mirror is far by pHash.
    phash = {r["key"]: int(r["phash"], 16) for _, r in rows.iterrows()}
    assert bin(phash[sample_key(3, 0, 3)] ^ phash[sample_key(2, 1, 3)]).count("1") > 4


def test_run_stats_count_duplicates_per_kind(dedup_run):
    stats = json.loads((dedup_run["out"] / "stats.json").read_text())
    assert stats["rows_in"] == stats["written"] + stats["rejected"] == len(PLANTED)
    planted = pd.Series([r for _, r, _ in PLANTED if r]).value_counts().to_dict()
    assert stats["filters"]["dedup"] == {"kept": 7, **{f"dropped: {k}": v for k, v in planted.items()}}
    assert stats["dedup"]["partitions"] == 2 and stats["dedup"]["clusters"] == 2
    assert stats["dedup"]["samples"] == len(PLANTED)


def test_rerun_after_losing_shards_resumes_identically(dedup_run):
    out = dedup_run["out"]
    shards = out / "shards"
    # tar and parquet; the done-markers hold timings, which differ.
    before = {p.name: p.read_bytes() for p in shards.glob("0000[23].[tp]a*")}
    pass_marker = (out / "work" / "dedup" / "done.json").stat().st_mtime_ns
    for path in shards.glob("0000[23].*"):  # done-markers too: these shards are redone
        path.unlink()
    result = run_curate(["run", str(dedup_run["config"]), "--no-progress"], dedup_run["env"], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in shards.glob("0000[23].[tp]a*")} == before
    assert (out / "work" / "dedup" / "done.json").stat().st_mtime_ns == pass_marker  # the pass was not redone
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["filters"][0]["name"] == "dedup"
