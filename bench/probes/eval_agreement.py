"""Why `curate eval`'s images differ from a plain StableDiffusionPipeline's on a GPU (issue 16).

bench/eval.py found mean |Δ| 46 levels (PSNR 12.7 dB for every scheduler) between curate's sampler
and the pipeline on an H200, with SD 1.5's shapes and random weights, even with both in fp16; on
the CPU in fp32 they agree within ±1. This probe separates the suspects, same prompts and seeds
for every variant (DDIM, guidance 7.5):

- precision: both in fp32; both in fp16 (the pipeline keeps its latents and does its guidance
  and scheduler arithmetic in the weights' dtype, curate in fp32);
- layout: curate's fused QKV + channels_last on and off (fp32);
- the model: SD 1.5's shapes with random weights, and curate's tiny model (random too: the
  question is what the arithmetic does to whatever the UNet predicts);
- overflow: the largest |prediction| and |latent| of each run (a callback reads the
  pipeline's latents at every step), and whether any image holds NaN before it becomes 8-bit.

    python bench/probes/eval_agreement.py            # GPU: SD 1.5 shapes at 256 px, DDIM 20, batch 4
    python bench/probes/eval_agreement.py --quick    # CPU: the tiny model, 32 px

It prints its table; the findings go to BENCHMARKS.md by hand ("Sampling" section).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

PROMPTS = ["a red cube on a blue floor", "two green spheres in a white room",
           "a yellow triangle above a black square", "a purple cylinder beside an orange cone"]


def pixels(images):
    import numpy as np

    return np.asarray(images, dtype=np.float64)


def compare(a, b) -> str:
    import numpy as np

    d = np.abs(pixels(a) - pixels(b))
    mse = float(np.mean(d ** 2))
    psnr = 10 * np.log10(255 ** 2 / mse) if mse else float("inf")
    return f"mean |Δ| {d.mean():6.2f}  max {d.max():4.0f}  PSNR {psnr:5.1f} dB"


def run_pipeline(parts, dtype, device, steps, size, seeds):
    """The plain pipeline as a user calls it; returns (uint8 images, largest |latent| seen, NaN seen)."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from bench.eval import copy_parts
    from curate.train.eval.sampler import make_scheduler

    p = copy_parts(parts, dtype, device)
    pipe = StableDiffusionPipeline(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet,
                                   scheduler=make_scheduler("ddim", parts.noise_scheduler.config, steps),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    seen = {"latent": 0.0, "nan": False}

    def watch(pipeline, step, timestep, kwargs):
        latents = kwargs["latents"]
        seen["latent"] = max(seen["latent"], float(latents.float().abs().max()))
        seen["nan"] |= bool(torch.isnan(latents).any())
        return kwargs

    out = pipe(PROMPTS[: len(seeds)], num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
               generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np",
               callback_on_step_end=watch, callback_on_step_end_tensor_inputs=["latents"]).images
    seen["nan"] |= bool(np.isnan(out).any())
    images = (np.nan_to_num(out) * 255).round().astype("uint8")
    del pipe, p
    return images, seen


def run_curate(parts, dtype, device, steps, size, seeds, layout):
    import torch

    from bench.eval import copy_parts
    from curate.train.eval.sampler import Sampler

    sampler = Sampler.from_components(copy_parts(parts, dtype, device), torch.device(device), dtype, layout=layout)
    images = sampler.sample(PROMPTS[: len(seeds)], seeds, "ddim", steps, 7.5, size, size).numpy()
    del sampler
    return images


def prediction_scale(parts, device, size) -> float:
    """|UNet output| for pure noise at the first timestep, fp32: what random weights predict."""
    import torch

    from bench.eval import copy_parts

    p = copy_parts(parts, torch.float32, device)
    scale = 2 ** (len(p.vae.config.block_out_channels) - 1)
    x = torch.randn(1, p.vae.config.latent_channels, size // scale, size // scale, device=device)
    ids = p.tokenizer([PROMPTS[0]], padding="max_length", max_length=p.tokenizer.model_max_length,
                      return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        text = p.text_encoder(ids)[0]
        out = p.unet(x, torch.tensor([999], device=device), encoder_hidden_states=text).sample
    return float(out.abs().max()), float(out.std())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU: the tiny model at 32 px")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import torch

    from bench.eval import build_parts

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    size = args.size or (32 if args.quick else 256)
    seeds = [0, 1, 2, 3]
    started = time.perf_counter()
    models = [("tiny (random)", lambda: build_parts(True, device))]
    if not args.quick:
        models.insert(0, ("SD 1.5 shapes (random)", lambda: build_parts(False, device)))
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; {size} px, DDIM {args.steps}, "
          f"guidance 7.5, seeds {seeds}", flush=True)
    for label, build in models:
        parts = build()
        big, std = prediction_scale(parts, device, size)
        print(f"\n{label}: fp32 UNet output on noise at t=999: max |x| {big:.1f}, std {std:.2f}", flush=True)
        base32, seen32 = run_pipeline(parts, torch.float32, device, args.steps, size, seeds)
        rows = [("pipeline fp32", seen32)]
        ours32 = run_curate(parts, torch.float32, device, args.steps, size, seeds, layout=True)
        ours32_plain = run_curate(parts, torch.float32, device, args.steps, size, seeds, layout=False)
        print(f"  curate fp32, fused QKV + channels_last vs pipeline fp32: {compare(ours32, base32)}")
        print(f"  curate fp32, plain layout           vs pipeline fp32: {compare(ours32_plain, base32)}")
        print(f"  curate fp32, layout vs plain layout:                  {compare(ours32, ours32_plain)}")
        if device == "cuda":
            base16, seen16 = run_pipeline(parts, torch.float16, device, args.steps, size, seeds)
            rows.append(("pipeline fp16", seen16))
            ours16 = run_curate(parts, torch.float16, device, args.steps, size, seeds, layout=True)
            ours16_plain = run_curate(parts, torch.float16, device, args.steps, size, seeds, layout=False)
            oursbf = run_curate(parts, torch.bfloat16, device, args.steps, size, seeds, layout=True)
            print(f"  curate fp16 (layout) vs pipeline fp16:               {compare(ours16, base16)}")
            print(f"  curate fp16 (plain)  vs pipeline fp16:               {compare(ours16_plain, base16)}")
            print(f"  curate fp16 vs curate fp32:                          {compare(ours16, ours32)}")
            print(f"  pipeline fp16 vs pipeline fp32:                      {compare(base16, base32)}")
            print(f"  curate bf16 vs curate fp32:                          {compare(oursbf, ours32)}")
        for name, seen in rows:
            print(f"  {name}: largest |latent| {seen['latent']:.1f}, NaN {'yes' if seen['nan'] else 'no'}")
        del parts
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
