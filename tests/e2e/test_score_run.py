"""`curate run` with the tiny CLIP the project ships: mismatched captions dropped, a top fraction
resolved over the whole dataset, and a missing model or an unscored CLIP filter as one error line."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from curate.pipeline.models.clip import TINY_CLIP, TINY_CLIP_DIR
from curate.pipeline.records import SUCCESS
from conftest import RESOLUTION, curate_command, write_config

pytestmark = pytest.mark.skipif(not (TINY_CLIP_DIR / "open_clip_config.json").exists(), reason="tiny CLIP not built")


@pytest.fixture(scope="module")
def clip_run(dataset, tmp_path_factory):
    """`curate run` with the tiny CLIP and an absolute threshold on the served dataset. The tasks
    run in the CLI's own process (`dask.in_process`): what is checked is the scores and what the
    filter keeps, not where they were computed, and the tiny CLIP is then imported and loaded once
    instead of in every worker (tests/e2e/test_dedup_run.py and test_report_run.py score on workers)."""
    _, urls, _ = dataset
    tmp = tmp_path_factory.mktemp("cliprun")
    config = write_config(
        tmp / "run.yaml", urls, tmp / "out",
        clip={"enabled": True, "model": TINY_CLIP, "pretrained": None, "batch_size": 64},
        filters=[{"name": "clip_similarity", "min_similarity": 0.5}],
        dask={"in_process": True},
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
    assert n_emb == sum(1 for r in rows if r["status"] == SUCCESS or (r["reason"] or "").startswith("clip_similarity"))


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
