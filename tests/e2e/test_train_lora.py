"""`curate train` with `model.lora`: only the adapters learn, the base weights stay as they were,
the result is a LoRA file that diffusers' `load_lora_weights` loads (and that changes what the
pipeline makes), and a resumed run is exact. Tiny model, 32 px, hand-made shards."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from curate.pipeline.cli import main as curate_main
from curate.train.config import load_train_config
from curate.train.lora import LORA_WEIGHTS
from curate.train.model import inference_pipeline, load_components, tokenize
from train_helpers import RESOLUTION, losses, run_train, train_config
from train_helpers import one_torch_thread  # noqa: F401 (an autouse fixture)
from train_scenes import fixed_batch, fixed_loss, scene_shard

STEPS, EVERY = 8, 4
LORA = {"rank": 4, "alpha": 8.0}  # alpha != rank: the saved file must carry the scale


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return scene_shard(tmp_path_factory.mktemp("lora-shards") / "00000.tar").parent


def lora_config(path: Path, shards: Path, output: Path, **overrides) -> Path:
    options = dict(model__lora=LORA, training__steps=STEPS, training__lr=1e-2, data__workers=0,
                   data__shuffle_buffer=16, checkpoints__every=EVERY, validation__every=0,
                   validation__prompts=["two red circles"])
    return train_config(path, shards, output, **{**options, **overrides})


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    run_train(str(lora_config(tmp / "train.yaml", shards, tmp / "out")))
    return tmp / "out"


def base_name(name: str) -> str:
    """A parameter's name before peft wrapped its layer."""
    return name.replace(".base_layer", "")


def test_only_the_adapters_learn(shards, tmp_path):
    """On a fixed batch the loss falls, every trained parameter is an adapter's, and the UNet's and
    text encoder's own weights are bit for bit those of the base model (text encoder adapters on)."""
    from curate.train.loop import Ranks, Trainer

    cfg = load_train_config(lora_config(tmp_path / "t.yaml", shards, tmp_path / "out", training__lr=5e-2,
                                        model__lora={**LORA, "text_encoder": True}))
    trainer = Trainer(cfg, Ranks(), torch.device("cpu"))
    batch = fixed_batch(shards / "00000.tar", 8, (RESOLUTION, RESOLUTION))
    before = fixed_loss(trainer, batch)
    for _ in range(20):
        trainer.optimizer_step(itertools.repeat(batch))
    after = fixed_loss(trainer, batch)
    # Rank-4 adapters on the tiny UNet's few attention layers: a small but steady fall (with
    # peft 0.21 / diffusers 0.42 / transformers 5.24: 4.4% after 10 steps, 5.8% after 20, 7% after
    # 30; the full model falls ~40% in 10, tests/e2e/test_train_run.py). The loss on a fixed batch
    # is deterministic, so 3% is a fall, not noise.
    assert after < 0.97 * before, (before, after)

    base = load_components("tiny")
    for model, original in ((trainer.unet, base.unet), (trainer.parts.text_encoder, base.text_encoder)):
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
        frozen = {base_name(n): p for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen.keys() == dict(original.named_parameters()).keys()
        assert all(torch.equal(p, frozen[n]) for n, p in original.named_parameters())
    assert sum(p.numel() for p in trainer.params) == sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])

    trainer.save_result(tmp_path / "lora")  # the text encoder's adapter goes into the file too
    with safe_open(tmp_path / "lora" / LORA_WEIGHTS, "pt") as f:
        prefixes = {key.split(".")[0] for key in f.keys()}
    assert prefixes == {"unet", "text_encoder"}


def test_the_lora_file_loads_into_a_diffusers_pipeline(trained):
    out = trained
    assert not (out / "pipeline").exists()
    state = torch.load(out / "checkpoints" / f"step-{STEPS:08d}.pt", weights_only=True)
    assert state["unet"] and all(".lora_" in k for k in state["unet"])  # the checkpoint holds the adapter only
    for step in (EVERY, STEPS):  # beside each checkpoint, the adapter as diffusers opens it
        assert (out / "checkpoints" / f"step-{step:08d}" / LORA_WEIGHTS).is_file()
    with safe_open(out / "lora" / LORA_WEIGHTS, "pt") as f:
        assert all(k.startswith("unet.") and "lora" in k for k in f.keys())
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == LORA["alpha"]

    parts = load_components("tiny")
    pipe = inference_pipeline(parts, parts.unet)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return np.asarray(pipe("two red circles", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION,
                               generator=torch.Generator().manual_seed(0), output_type="np").images[0])

    def predict(unet):
        ids = tokenize(parts.tokenizer, ["two red circles"])
        with torch.no_grad():
            return unet(torch.ones(1, 4, 16, 16), torch.tensor([500]), parts.text_encoder(ids)[0]).sample

    without, base_prediction = sample(), predict(pipe.unet)
    pipe.load_lora_weights(out / "lora")  # plain diffusers, as for any LoRA
    assert not np.allclose(sample(), without)
    # What the pipeline computes is what training computed: base + adapter at alpha / rank.
    from curate.train.config import LoraConfig
    from curate.train.lora import add_lora, load_adapter_state

    reference = load_components("tiny")
    add_lora(reference, LoraConfig(**LORA), 0, torch.device("cpu"), torch.float32)
    load_adapter_state(reference.unet, state["unet"], "unet")
    expected = predict(reference.unet)
    assert not torch.allclose(expected, base_prediction, atol=1e-4)
    torch.testing.assert_close(predict(pipe.unet), expected, atol=1e-5, rtol=1e-4)


def test_resume_covers_the_adapter(trained, shards, tmp_path):
    out = tmp_path / "resumed"
    config = lora_config(tmp_path / "resumed.yaml", shards, out)
    run_train(str(config), "--until-step", str(EVERY))
    assert sorted(losses(out)) == list(range(1, EVERY + 1)) and not (out / "lora").exists()
    run_train(str(config))
    uninterrupted, resumed = losses(trained), losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7), step
    a = torch.load(trained / "checkpoints" / f"step-{STEPS:08d}.pt", weights_only=True)
    b = torch.load(out / "checkpoints" / f"step-{STEPS:08d}.pt", weights_only=True)
    assert a["unet"].keys() == b["unet"].keys()
    assert all(torch.allclose(a["unet"][k], b["unet"][k], atol=1e-6) for k in a["unet"])
    # A rerun that changes the adapter's settings is refused (it would mix two runs).
    assert curate_main(["train", str(config), "--set", "model.lora.rank=8", "--no-progress"]) == 2
