"""The score stage on the CPU path, with the tiny CLIP the project ships."""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from curate.pipeline.models.clip import TINY_CLIP, TINY_CLIP_DIR
from curate.pipeline.config import ClipConfig
from curate.pipeline.embeddings import HIST_BINS, histogram, merge_histograms, read_scores, threshold_for_top_fraction
from curate.pipeline.layout import embedding_files
from curate.pipeline.stages.score import score_shard
from curate.pipeline.shards import sample_key
from curate.pipeline.demo.synthetic import caption, random_scene, render, wrong_caption
from curate.pipeline.tarshard import TarShardWriter
from conftest import RESOLUTION, curate_command, write_config

pytestmark = pytest.mark.skipif(not (TINY_CLIP_DIR / "open_clip_config.json").exists(), reason="tiny CLIP not built")

CLIP = ClipConfig(enabled=True, model=TINY_CLIP, pretrained=None, device="cpu", batch_size=16)


def test_top_fraction_threshold_matches_the_quantile():
    rng = np.random.default_rng(0)
    scores = [rng.normal(0.2, 0.1, 5000).clip(-1, 1) for _ in range(4)]
    merged = merge_histograms([histogram(s) for s in scores])
    assert merged.sum() == 20000 and len(merged) == HIST_BINS
    everything = np.concatenate(scores)
    for fraction in (0.1, 0.3, 0.9):
        t = threshold_for_top_fraction(merged, fraction)
        kept = (everything >= t).mean()
        assert abs(kept - fraction) < 0.002, (fraction, t, kept)


def _raw_shard(path, n, seed, corrupt=()):
    """A raw download shard: jpg + json(caption) per key; half the captions are wrong."""
    import random

    rng = random.Random(seed)
    truth = []
    with TarShardWriter(path) as tar:
        for i in range(n):
            scene = random_scene(rng)
            right = i % 2 == 0
            text = caption(scene) if right else wrong_caption(scene, rng)
            buf = io.BytesIO()
            render(scene, rng.randint(96, 200), rng.randint(96, 200), rng).save(buf, "JPEG", quality=90)
            jpg = b"not a jpeg at all" if i in corrupt else buf.getvalue()
            tar.write(sample_key(0, i), {"jpg": jpg, "json": json.dumps({"caption": text}).encode()})
            truth.append(right)
    return truth


def test_score_shard_writes_row_aligned_embeddings_and_separates_captions(tmp_path):
    download = tmp_path / "download"
    download.mkdir()
    truth = _raw_shard(download / "00000.tar", 40, seed=123, corrupt={5})
    stats = score_shard(0, {}, str(download), str(tmp_path / "emb"), str(tmp_path / "markers"), CLIP)

    out = embedding_files(tmp_path / "emb", 0)
    img, txt = np.load(out["img_emb"]), np.load(out["text_emb"])
    meta = pq.read_table(out["metadata"]).to_pylist()
    assert img.dtype == np.float16 and img.shape == txt.shape and img.shape[0] == 40 == len(meta)
    assert [m["key"] for m in meta] == [sample_key(0, i) for i in range(40)]
    assert stats["scored"] == 39 and stats["decode_errors"] == 1
    assert 0 < stats["embed_seconds"] <= stats["seconds"]  # embedding, then writing the files
    assert meta[5]["reason"] == "decode_error" and meta[5]["clip_similarity"] is None

    # The saved similarity is the cosine of the saved (normalized) embeddings.
    ok = [i for i in range(40) if i != 5]
    cos = (img[ok].astype(np.float32) * txt[ok].astype(np.float32)).sum(1)
    saved = np.array([meta[i]["clip_similarity"] for i in ok])
    assert np.abs(cos - saved).max() < 5e-3
    assert np.allclose(np.linalg.norm(img[ok].astype(np.float32), axis=1), 1, atol=5e-3)

    # Meaning: right captions score higher than wrong ones.
    right = [meta[i]["clip_similarity"] for i in ok if truth[i]]
    wrong = [meta[i]["clip_similarity"] for i in ok if not truth[i]]
    assert np.mean(right) > np.mean(wrong) + 0.1

    # Done shards are not redone.
    before = out["img_emb"].stat().st_mtime_ns
    again = score_shard(0, {}, str(download), str(tmp_path / "emb"), str(tmp_path / "markers"), CLIP)
    assert again == stats and out["img_emb"].stat().st_mtime_ns == before
    assert read_scores(tmp_path / "emb", 0)[sample_key(0, 0)][0] == pytest.approx(meta[0]["clip_similarity"])


@pytest.fixture(scope="module")
def clip_run(dataset, tmp_path_factory):
    """`curate run` with the tiny CLIP and an absolute threshold on the served dataset."""
    _, urls, _ = dataset
    tmp = tmp_path_factory.mktemp("cliprun")
    config = write_config(
        tmp / "run.yaml", urls, tmp / "out",
        clip={"enabled": True, "model": TINY_CLIP, "pretrained": None, "batch_size": 64},
        filters=[{"name": "clip_similarity", "min_similarity": 0.5}],
    )
    proc = subprocess.run(curate_command("run", str(config), "--no-progress"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out"


def test_run_with_clip_filters_mismatched_captions(clip_run):
    rows = [r for p in sorted((clip_run / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    stats = json.loads((clip_run / "stats.json").read_text())
    assert stats["rows_in"] == len(rows) == stats["written"] + stats["rejected"]
    wrong = [r for r in rows if r["truth"] == "wrong_caption"]
    ok = [r for r in rows if r["truth"] == "ok"]
    wrong_dropped = sum(r["reason"] == "clip_similarity<0.5" for r in wrong) / len(wrong)
    ok_dropped = sum(r["reason"] == "clip_similarity<0.5" for r in ok) / len(ok)
    assert wrong_dropped >= 0.95, wrong_dropped
    assert ok_dropped <= 0.05, ok_dropped
    # Scores are in the parquet for dropped rows too, and in the json of written samples.
    assert all(r["clip_similarity"] is not None for r in wrong if r["reason"] == "clip_similarity<0.5")
    assert stats["filters"]["clip_similarity"]["kept"] == stats["written"]
    n_emb = sum(np.load(p).shape[0] for p in (clip_run / "embeddings" / "img_emb").glob("*.npy"))
    assert n_emb == sum(1 for r in rows if r["status"] == "ok" or (r["reason"] or "").startswith("clip_similarity"))


def test_top_fraction_is_resolved_over_the_whole_dataset(clip_run, tmp_path):
    config = yaml.safe_load((clip_run / "config.yaml").read_text())
    config["output"]["path"] = str(tmp_path / "top")
    config["filters"] = [{"name": "clip_similarity", "top_fraction": 0.5}, {"name": "resolution", **RESOLUTION}]
    (tmp_path / "top.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run(curate_command("run", str(tmp_path / "top.yaml"), "--no-progress"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "top" / "stats.json").read_text())
    resolved = stats["resolved_thresholds"]["clip_similarity"]
    assert resolved["top_fraction"] == 0.5
    scored = stats["filters"]["clip_similarity"]
    kept, dropped = scored["kept"], sum(v for k, v in scored.items() if k != "kept")
    assert abs(kept / (kept + dropped) - 0.5) < 0.02


def test_missing_model_is_one_error_line_before_any_work(dataset, tmp_path):
    _, urls, _ = dataset
    config = write_config(
        tmp_path / "run.yaml", urls, tmp_path / "out",
        clip={"enabled": True, "model": f"local-dir:{tmp_path}/nowhere", "pretrained": None},
    )
    proc = subprocess.run(curate_command("run", str(config)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("curate: error: clip.model:") and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_clip_filter_without_scoring_is_a_config_error(dataset, tmp_path):
    _, urls, _ = dataset
    config = write_config(tmp_path / "run.yaml", urls, tmp_path / "out",
                          filters=[{"name": "clip_similarity", "min_similarity": 0.5}])
    proc = subprocess.run(curate_command("run", str(config)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "clip_similarity needs clip.enabled" in proc.stderr
