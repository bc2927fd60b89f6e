"""`curate eval` as a user runs it: a pipeline folder `curate train` could have written (the tiny
model), held-out shards of a `curate run` output (prompts = their captions, reference = their
images, CLIP = the run's), a FID Inception weights file in the public format (random weights), two
schedulers; then a resumed run with one more, and a changed one refused. Nothing is downloaded."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from curate.pipeline.demo.synthetic import caption, random_scene, render
from curate.pipeline.errors import UserError
from curate.pipeline.models.clip import TINY_CLIP
from curate.pipeline.tarshard import TarShardWriter
from curate.train.eval.config import load_eval_config
from curate.train.eval.inception import write_random_weights
from curate.train.eval.metrics import frechet_distance
from curate.train.eval.run import evaluate
from curate.train.model import load_components, save_pipeline

PROMPTS, REFERENCE = 4, 6


def heldout_run(root: Path, n: int = REFERENCE) -> list[str]:
    """A `curate run` output as eval reads it: config.yaml (its clip model) and shards/*.tar."""
    rng = random.Random(4)
    (root / "shards").mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"clip": {"enabled": True, "model": TINY_CLIP, "pretrained": None}}))
    captions = []
    with TarShardWriter(root / "shards" / "00000.tar") as tar:
        for i in range(n):
            scene = random_scene(rng)
            data = io.BytesIO()
            render(scene, 64, 48, rng).save(data, format="JPEG", quality=90)
            captions.append(caption(scene))
            tar.write(f"{i:09d}", {"jpg": data.getvalue(), "txt": captions[-1].encode(),
                                   "json": json.dumps({"caption": captions[-1]}).encode()})
    return captions


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    captions = heldout_run(root / "heldout")
    parts = load_components("tiny")
    save_pipeline(parts, parts.unet, root / "train" / "pipeline")  # as `curate train` leaves it
    weights = write_random_weights(root / "pt_inception-2015-12-05-random.pth")
    config = root / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"pretrained": str(root / "train")},
        "prompts": {"shards": [str(root / "heldout")], "count": PROMPTS},
        "generation": {"schedulers": ["ddim:2", "dpm++:2"], "resolution": 32, "batch_size": 3, "guidance_scale": 3.0},
        "metrics": {"inception": str(weights), "kid_subsets": 3, "is_splits": 2},
        "output": {"path": str(root / "out")},
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a busy 2-core machine: one thread per process
    done = subprocess.run([sys.executable, "-m", "curate.pipeline.cli", "eval", str(config), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    return root, config, captions, done


def test_eval_writes_metrics_images_grids_and_page(setup):
    root, _, captions, done = setup
    assert done.returncode == 0, done.stderr[-3000:]
    out = root / "out"
    summary = json.loads((out / "eval.json").read_text())
    assert [(r["scheduler"], r["steps"]) for r in summary["results"]] == [("ddim", 2), ("dpm++", 2)]
    for r in summary["results"]:
        for key in ("fid", "kid", "fd_clip", "inception_score", "clip_score", "images_per_second", "seconds_per_image"):
            assert r[key] is not None and np.isfinite(r[key]), (key, r)
        assert r["images"] == PROMPTS and r["peak_gpu_gib"] is None  # CPU
    assert summary["inception"]["standard"] is False and summary["clip"]["model"] == TINY_CLIP  # the run's CLIP
    # The tiny CLIP knows its scenes: real images score high against their own captions.
    assert summary["reference"]["images"] == REFERENCE and summary["reference"]["clip_score"] > 50
    assert "ddim" in done.stdout and "FID" in done.stdout and "eval.html" in done.stdout

    # PNGs carry their prompt and seed: prompt i is caption i of the held-out shards, seed i.
    for i in range(PROMPTS):
        image = Image.open(out / "images" / "dpm++-2" / f"{i:05d}.png")
        assert image.size == (32, 32)
        assert (image.text["prompt"], int(image.text["seed"])) == (captions[i], i)
    index = [json.loads(line) for line in (out / "images" / "ddim-2" / "index.jsonl").read_text().splitlines()]
    assert [e["prompt"] for e in index] == captions[:PROMPTS]

    # The reference features are cached beside the held-out run, with pytorch-fid's statistics.
    cache = Path(summary["reference"]["cache"])
    assert cache.parent == root / "heldout" / ".curate-eval"
    with np.load(cache) as ref, np.load(out / "runs" / "ddim-2.npz") as gen:
        assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
        assert summary["results"][0]["fid"] == pytest.approx(frechet_distance(gen["inception_pool"], ref["inception_pool"]))
        assert gen["grid"].shape == (PROMPTS, 32, 32, 3)

    assert {p.name for p in out.glob("grid-*.png")} == {"grid-ddim.png", "grid-dpmpp.png"}
    html = (out / "eval.html").read_text()
    assert "chart-quality" in html and "data:image/png;base64," in html and "FID against sampling steps" in html


def test_eval_resumes_with_more_settings_and_refuses_other_ones(setup):
    root, config, _, done = setup
    assert done.returncode == 0, done.stderr[-3000:]
    out = root / "out"
    kept = {p: p.stat().st_mtime_ns for p in (out / "images" / "ddim-2").glob("*.png")}
    logged = []
    torch.set_num_threads(1)
    cfg = load_eval_config(str(config), ["generation.schedulers=[ddim:2, dpm++:2, ddim:3]"])
    summary = evaluate(cfg, progress=False, log=logged.append)
    assert [(r["scheduler"], r["steps"]) for r in summary["results"]] == [("ddim", 2), ("dpm++", 2), ("ddim", 3)]
    assert any("from the cache" in line for line in logged)
    assert not any(line.startswith(("ddim 2 ", "dpm++ 2 ")) for line in logged)  # not generated again
    assert {p: p.stat().st_mtime_ns for p in (out / "images" / "ddim-2").glob("*.png")} == kept
    before = json.loads((out / "eval.json").read_text())
    assert before["results"][0]["fid"] == summary["results"][0]["fid"]

    other = load_eval_config(str(config), ["generation.guidance_scale=5"])
    with pytest.raises(UserError, match=r"other settings \(generation\.guidance_scale\).*--overwrite"):
        evaluate(other, progress=False, log=logged.append)
