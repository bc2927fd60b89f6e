"""What `curate train` logs: TensorBoard events (loss, learning rate, images/s, validation grids
with their prompts written in) beside log.jsonl; a resumed run replaces what it redoes; W&B only
when asked for, and then loudly when it is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curate.pipeline.cli import main as curate_main
from curate.train.samples import image_grid, labelled_grid
from train_helpers import train_config
from train_helpers import one_torch_thread  # noqa: F401 (an autouse fixture)
from train_scenes import scene_shard

PROMPTS = ["two red circles on the left of a blue background", "a yellow square"]


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_has_the_scalars_and_labelled_grids_and_resume_replaces_redone_steps(tmp_path):
    shards = scene_shard(tmp_path / "shards" / "00000.tar", n=24).parent
    out = tmp_path / "out"
    config = train_config(tmp_path / "t.yaml", shards, out, training__steps=4, data__workers=0,
                          data__shuffle_buffer=8, checkpoints__every=2, validation__every=2,
                          validation__prompts=PROMPTS)
    assert curate_main(["train", str(config), "--no-progress"]) == 0
    # A crash after step 3 was logged, before step 4's checkpoint: the rerun redoes 3 and 4.
    (out / "checkpoints" / f"step-{4:08d}.pt").unlink()
    assert curate_main(["train", str(config), "--no-progress"]) == 0

    acc = events(out / "logs")
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/images_per_second"} <= set(tags["scalars"])
    for tag in ("train/loss", "train/lr", "train/images_per_second"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3, 4], tag  # once each, redone ones replaced
    log = {e["step"]: e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines())}
    assert sorted(log) == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([log[s]["loss"] for s in range(1, 5)])
    assert acc.Scalars("train/lr")[0].value == pytest.approx(1e-3)

    grids = acc.Images("validation")
    assert sorted({g.step for g in grids}) == [2, 4]
    raw = Image.open(out / "samples" / f"step-{4:08d}.png")  # on disk: the images alone, prompts in metadata
    assert raw.size == (64, 32) and raw.info["prompts"].split("\n") == PROMPTS
    assert (grids[-1].width, grids[-1].height) != raw.size and grids[-1].height > grids[-1].width / 2


def test_labelled_grid_writes_each_prompt_under_its_image():
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    grid = labelled_grid(images, PROMPTS)
    tile = grid.width // 2
    assert tile >= 192 and grid.height > tile  # tiny images enlarged, a label strip below
    pixels = np.asarray(grid)
    assert (pixels[:tile, :tile] == [255, 0, 0]).all()  # the image itself, untouched (nearest)
    strip = pixels[tile:, :]
    assert (strip < 128).any(axis=2).sum() > 100  # dark text on the white strip, under both images
    assert (strip[:, :tile] < 128).any() and (strip[:, tile:] < 128).any()
    # Different prompts, different labels; the plain grid has none.
    assert not np.array_equal(strip[:, :tile], strip[:, tile:])
    assert image_grid(images).size == (64, 32)


def test_wandb_only_when_asked_and_installed(tmp_path, capsys):
    shards = scene_shard(tmp_path / "shards" / "00000.tar", n=8).parent
    config = train_config(tmp_path / "t.yaml", shards, tmp_path / "out", training__steps=1, data__workers=0,
                          validation__every=0, validation__prompts=[])
    try:
        import wandb  # noqa: F401
    except ImportError:
        assert curate_main(["train", str(config), "--set", "logging.wandb=true", "--no-progress"]) == 2
        assert "logging.wandb is on but the wandb package is not installed" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
    # Off (the default), nothing of W&B is touched.
    assert curate_main(["train", str(config), "--set", "logging.tensorboard=false", "--no-progress"]) == 0
    assert not (tmp_path / "out" / "logs").exists()
