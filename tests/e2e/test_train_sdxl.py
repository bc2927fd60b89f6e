"""`curate train` on an SDXL-shaped model (`model.pretrained: tiny-sdxl`: two text encoders,
pooled embedding, size conditioning): the loss falls, the result is a folder that
StableDiffusionXLPipeline.from_pretrained loads and samples with, and a LoRA on it loads into
StableDiffusionXLPipeline. Also the size conditioning each sample gets from its json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from curate.pipeline.cli import main as curate_main
from curate.train.config import load_train_config
from curate.train.data import size_conditioning
from train_helpers import train_config
from train_helpers import one_torch_thread  # noqa: F401 (an autouse fixture)
from train_scenes import fixed_batch, fixed_loss, scene_shard

BUCKETS = [(32, 32), (48, 32)]  # wide samples too: the time ids carry each batch's bucket


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return scene_shard(tmp_path_factory.mktemp("sdxl-shards") / "00000.tar", size=(48, 40), buckets=BUCKETS).parent


def sdxl_config(path: Path, shards: Path, output: Path, **overrides) -> Path:
    options = dict(model__pretrained="tiny-sdxl", training__steps=6, data__workers=0, data__shuffle_buffer=16,
                   checkpoints__every=6, validation__every=0, validation__prompts=["two red circles"])
    return train_config(path, shards, output, **{**options, **overrides})


def test_size_conditioning_follows_diffusers_sdxl_example():
    """diffusers' train_text_to_image_sdxl.py: original (h, w); the image resized so that it covers
    the target, centre-cropped; the crop's top-left in the resized image."""
    # Stored as downloaded (keep_ratio: the same aspect), 200 x 100 -> 64 x 32; a 32 x 32 centre crop.
    meta = {"width": 64, "height": 32, "original_width": 200, "original_height": 100}
    assert size_conditioning(meta, (16, 0, 48, 32), (32, 32)) == [100, 200, 0, 16]
    # A bucketed sample: curate run cut 300 x 100 to a 2:1 bucket (its centre 200 x 100, stored as
    # 128 x 64); training crops the left half: 50 px of the original's excess + 0 -> 16 at 32 px.
    meta = {"width": 128, "height": 64, "original_width": 300, "original_height": 100}
    assert size_conditioning(meta, (0, 0, 64, 64), (32, 32)) == [100, 300, 0, 16]
    # Without original_* the stored size is the original; a tall crop's top.
    assert size_conditioning({"width": 40, "height": 80}, (0, 20, 40, 60), (64, 64)) == [80, 40, 32, 0]


def test_sdxl_trains_and_loads_with_the_xl_pipeline(shards, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from curate.train.loop import Ranks, Trainer

    out = tmp_path / "out"
    config = sdxl_config(tmp_path / "t.yaml", shards, out)
    batch = fixed_batch(shards / "00000.tar", 8, (32, 32))
    initial = Trainer(load_train_config(config), Ranks(), torch.device("cpu"))
    assert initial.parts.sdxl and initial.parts.text_encoder_2 is not None
    assert initial.parts.tokenizer_2.pad_token == "!"  # SDXL's second tokenizer pads with "!"
    before = fixed_loss(initial, batch)

    assert curate_main(["train", str(config), "--no-progress"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 7)) and all(np.isfinite(e["loss"]) for e in log)
    assert json.loads((out / "pipeline" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert (out / "checkpoints" / f"step-{6:08d}" / "model_index.json").is_file()

    pipe = StableDiffusionXLPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    after = fixed_loss(initial, batch, unet=pipe.unet)
    assert after < 0.8 * before, (before, after)
    image = pipe("three green triangles", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32) and np.asarray(image).std() > 0


def test_sdxl_lora_loads_into_the_xl_pipeline(shards, tmp_path):
    from curate.train.lora import LORA_WEIGHTS
    from curate.train.model import inference_pipeline, load_components

    out = tmp_path / "out"
    config = sdxl_config(tmp_path / "t.yaml", shards, out, training__steps=2, training__lr=1e-2,
                         model__lora={"rank": 4}, validation__prompts=[])
    assert curate_main(["train", str(config), "--no-progress"]) == 0
    parts = load_components("tiny-sdxl")
    pipe = inference_pipeline(parts, parts.unet)  # a StableDiffusionXLPipeline on the base weights
    pipe.set_progress_bar_config(disable=True)
    x, t = torch.ones(1, 4, 16, 16), torch.tensor([500])
    cond = {"text_embeds": torch.zeros(1, 32), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    with torch.no_grad():
        before = pipe.unet(x, t, torch.zeros(1, 77, 64), added_cond_kwargs=cond).sample
        pipe.load_lora_weights(out / "lora" / LORA_WEIGHTS)
        after = pipe.unet(x, t, torch.zeros(1, 77, 64), added_cond_kwargs=cond).sample
    assert not torch.allclose(before, after, atol=1e-6)
