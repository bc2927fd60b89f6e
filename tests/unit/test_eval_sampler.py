"""`curate eval`'s sampler makes the images diffusers' StableDiffusionPipeline makes (same
prompts, seeds and scheduler), and its config reads as the other configs do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curate.pipeline.errors import UserError
from curate.train.eval.config import load_eval_config
from curate.train.eval.sampler import Sampler, initial_latents, make_scheduler
from curate.train.model import inference_pipeline, load_components
from train_helpers import one_torch_thread  # noqa: F401 (an autouse fixture)

PROMPTS = ["two red circles on the left of a blue background", "one yellow square", "three white triangles"]
SEEDS = [11, 12, 11]


def assert_same_images(a: np.ndarray, b: np.ndarray) -> None:
    difference = np.abs(a.astype(int) - b.astype(int))
    assert difference.max() <= 1 and np.mean(difference > 0) < 1e-3, (difference.max(), np.mean(difference > 0))


@pytest.mark.parametrize("scheduler, steps, layout", [("ddpm", 4, False), ("ddim", 3, False), ("dpm++", 3, False),
                                                       ("euler-a", 3, False), ("ddim", 3, True)])
def test_sampler_makes_the_pipelines_images(scheduler, steps, layout):
    """Deterministic (DDIM, DPM-Solver++) and stochastic (DDPM, Euler ancestral: noise drawn at
    every step from the per-image generators) schedulers alike, in fp32 on a CPU: the same final
    latents, so the same 8-bit images but for a rare ±1 where two VAE instances' decodes differ
    by ~1e-6 on a rounding boundary. layout: the GPU's fused QKV projections and channels_last."""
    sampler = Sampler.from_components(load_components("tiny"), torch.device("cpu"), torch.float32, layout=layout)
    ours = sampler.sample(PROMPTS, SEEDS, scheduler, steps, 4.0, 32, 32).numpy()

    parts = load_components("tiny")
    pipe = inference_pipeline(parts, parts.unet)
    pipe.scheduler = make_scheduler(scheduler, parts.noise_scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]  # the usual per-image seeding
    theirs = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=4.0, height=32, width=32,
                  generator=generators, output_type="np").images
    theirs = (theirs * 255).round().astype(np.uint8)
    assert ours.shape == (3, 32, 32, 3) and ours.dtype == np.uint8
    assert_same_images(ours, theirs)
    # An image depends on its prompt and seed alone, not on its batch.
    alone = sampler.sample(PROMPTS[1:2], SEEDS[1:2], scheduler, steps, 4.0, 32, 32).numpy()
    assert_same_images(alone[0], ours[1])


def test_initial_latents_are_the_pipelines_per_seed_draws():
    noise, generators = initial_latents([3, 4], (4, 8, 8))
    again = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(noise[1:], again)
    assert len(generators) == 2


def test_config_errors_name_their_path(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    base = {"model": "tiny", "prompts": str(prompts), "output": str(tmp_path / "out")}
    cfg = load_eval_config(None, ["generation.resolution=32"], schedulers="ddim:50, dpm++:20", **base)
    assert cfg.generation.settings() == [("ddim", 50), ("dpm++", 20)] and cfg.prompts.file == str(prompts)
    assert load_eval_config(None, ["metrics.inception=off"], **base).metrics.inception == "off"  # YAML's false
    with pytest.raises(UserError, match=r"generation\.schedulers.*'ddim50'"):
        load_eval_config(None, [], schedulers="ddim50", **base)
    with pytest.raises(UserError, match=r"generation\.schedulers.*'heun:20'"):
        load_eval_config(None, [], schedulers="heun:20", **base)
    with pytest.raises(UserError, match=r"generation\.guidance: unknown key"):
        load_eval_config(None, ["generation.guidance=3"], **base)
    with pytest.raises(UserError, match="one of prompts.file or prompts.shards"):
        load_eval_config(None, ["prompts.shards=[x]"], **base)
    with pytest.raises(UserError, match=r"model"):
        load_eval_config(None, [], prompts=str(prompts), output="x")


def test_prompts_from_text_and_jsonl(tmp_path):
    from curate.train.eval.config import PromptsSection
    from curate.train.eval.data import Prompt, load_prompts

    text = tmp_path / "p.txt"
    text.write_text("a red circle\n\n  a blue square  \n")
    assert load_prompts(PromptsSection(file=str(text), seed=5)) == [Prompt("a red circle", 5), Prompt("a blue square", 6)]
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "one", "seed": 42}\n{"prompt": "two"}\n')
    assert load_prompts(PromptsSection(file=str(lines))) == [Prompt("one", 42), Prompt("two", 1)]
    lines.write_text('{"text": "one"}\n')
    with pytest.raises(UserError, match=r"p.jsonl:1"):
        load_prompts(PromptsSection(file=str(lines)))


def test_as_many_steps_as_training_timesteps_use_every_timestep():
    """DDPM 1000 on Stable Diffusion's schedule (steps_offset 1, leading spacing) would ask for
    timestep 1000; the scheduler is made to use 999..0 instead, and fewer steps keep the offset."""
    from curate.train.model import SD_SCHEDULE

    config = {**SD_SCHEDULE, "steps_offset": 1, "timestep_spacing": "leading"}
    full = make_scheduler("ddpm", config, 1000)
    full.set_timesteps(1000)
    assert full.timesteps[0] == 999 and full.timesteps[-1] == 0 and len(full.timesteps) == 1000
    fewer = make_scheduler("ddpm", config, 50)
    fewer.set_timesteps(50)
    assert fewer.timesteps[0] == 981 and fewer.timesteps[-1] == 1  # offset kept
