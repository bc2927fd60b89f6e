"""Sampling speed: `curate eval`'s generation against a plain StableDiffusionPipeline call, same run.

Model: Stable Diffusion 1.5's shapes with random weights (speed does not depend on them; the
configs are bench/train.py's): UNet2DConditionModel (860M), AutoencoderKL, CLIP ViT-L/14 text
encoder, built once in memory and shared by every variant. 512 px, guidance 7.5, the same
prompts and per-image seeds everywhere.

For each scheduler (DDPM 1000, DDIM 50, DPM-Solver++ 20 by default):

- baseline: `StableDiffusionPipeline(vae=..., unet=..., scheduler=...)` in fp16, called as a user
  does: `pipe(prompts, num_inference_steps=N, guidance_scale=7.5, generator=[per-image seeds])`,
  batch 8 (the issue measured 2.79 images/s for DDIM 50 this way on an H200);
- curate: `curate.train.eval.sampler.Sampler`, what `curate eval` generates with: bf16 weights,
  channels_last, fused QKV, SDPA, batch 8; `curate, compiled`: the same with torch.compile of
  the UNet; `curate, compiled, batch B`: larger batches (`--big-batch`, not for 1000-step
  schedulers: one batch would take minutes).

Each variant is built (and compiled) once and runs every scheduler: per scheduler one untimed
warm-up batch of 2 steps (same shapes: cuDNN autotuning, compilation on the first), then
`--batches` timed batches (one for 1000-step schedulers). images/s = timed
images / timed seconds; peak GPU memory = torch.cuda.max_memory_allocated over the timed batches.
Images: curate's first timed batch against the baseline's for the same seeds, as 8-bit pixels
(mean and max |Δ|, PSNR); bf16 against fp16 weights is the only difference, so they should look
the same (a stochastic scheduler draws the same noise: curate draws it as the pipeline does).

    python bench/eval.py                         # GPU; writes the "## Sampling" section of BENCHMARKS.md
    python bench/eval.py --schedulers ddim:50    # a subset (rows merge with earlier runs on this device)
    python bench/eval.py --quick                 # CPU smoke test of the whole script: tiny model, 32 px

--quick never writes BENCHMARKS.md. Results are kept per device in
bench-work/eval/results-DEVICE.json so schedulers run in separate invocations (to stay within a
time limit) end up in one table; `--fresh` forgets earlier ones.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.download import cpu_name, update_benchmarks  # noqa: E402

WORK = REPO / "bench-work" / "eval"
HEADING = "## Sampling"
TARGET = 1.3  # × the plain pipeline's images/s (issue 16)
PROMPTS = [
    "two red circles on the left of a blue background", "a photograph of an astronaut riding a horse",
    "one yellow square in the center of a green background", "a watercolor painting of a lighthouse at dusk",
    "three white triangles at the top of a black background", "a bowl of ramen, studio lighting",
    "four purple circles on an orange background", "an old map of an imaginary island",
]


def log(*args) -> None:
    print(*args, flush=True)


def build_parts(quick: bool, device: str):
    """SD 1.5's shapes with random weights (or curate's tiny model for --quick), fp32 on `device`."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from curate.train.model import SD_SCHEDULE, Components, load_components
    from curate.train.tokenizer import clip_tokenizer

    if quick:
        return load_components("tiny")
    from bench.train import CLIP_L_TEXT, SD15_UNET, SD15_VAE

    torch.manual_seed(0)
    with torch.device(device):  # initialising 1B parameters is much faster on the GPU
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                      noise_scheduler=DDPMScheduler(**SD_SCHEDULE), vae_name="", vae_fingerprint="")


def copy_parts(parts, dtype, device):
    """Each variant gets its own modules (curate's sampler fuses QKV and compiles in place)."""
    import copy

    out = copy.copy(parts)
    for name in ("unet", "vae", "text_encoder"):
        module = copy.deepcopy(getattr(parts, name)).to(device)
        {"float32": module.float, "float16": module.half, "bfloat16": module.bfloat16}[str(dtype).split(".")[-1]]()
        setattr(out, name, module)
    return out


def free_memory() -> None:
    import torch

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def batch_prompts(batch: int, index: int) -> tuple[list[str], list[int]]:
    """Batch `index` of the timed run: the prompts cycle, seed = position in the whole run."""
    seeds = [index * batch + i for i in range(batch)]
    return [PROMPTS[s % len(PROMPTS)] for s in seeds], seeds


class Baseline:
    """A plain StableDiffusionPipeline in fp16, called as a user calls it."""

    def __init__(self, parts, device: str, dtype):
        from diffusers import StableDiffusionPipeline

        from curate.train.eval.sampler import make_scheduler

        p = copy_parts(parts, dtype, device)
        self.pipe = StableDiffusionPipeline(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet,
                                            scheduler=make_scheduler("ddim", parts.noise_scheduler.config),
                                            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = parts.noise_scheduler.config

    def __call__(self, prompts, seeds, scheduler, steps, guidance, size):
        import numpy as np
        import torch

        from curate.train.eval.sampler import make_scheduler

        self.pipe.scheduler = make_scheduler(scheduler, self.scheduler_config, steps)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        images = self.pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                           generator=generators).images
        return np.stack([np.asarray(i) for i in images])


class Curate:
    """`curate eval`'s sampler (bf16, channels_last, fused QKV, SDPA; optionally compiled)."""

    def __init__(self, parts, device: str, dtype, compile_unet: bool):
        import torch

        from curate.train.eval.sampler import Sampler

        self.sampler = Sampler.from_components(copy_parts(parts, dtype, device), torch.device(device), dtype, compile_unet)

    def __call__(self, prompts, seeds, scheduler, steps, guidance, size):
        return self.sampler.sample(prompts, seeds, scheduler, steps, guidance, size, size).numpy()


def timed_run(generate, scheduler: str, steps: int, batch: int, batches: int, warmup_steps: int, size: int,
              guidance: float) -> tuple[dict, object]:
    """One untimed warm-up batch of a few steps (same shapes), then `batches` timed ones."""
    generate(*batch_prompts(batch, 0), scheduler, warmup_steps, guidance, size)
    sync()
    if torch_cuda():
        import torch

        torch.cuda.reset_peak_memory_stats()
    started, first = time.perf_counter(), None
    for b in range(batches):
        images = generate(*batch_prompts(batch, b), scheduler, steps, guidance, size)
        first = first if first is not None else images
    sync()
    seconds = time.perf_counter() - started
    return {"images_per_second": batches * batch / seconds, "peak_gib": peak_gib()}, first


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def compare(ours, theirs) -> dict:
    import numpy as np

    n = min(len(ours), len(theirs))
    a, b = ours[:n].astype(np.float64), theirs[:n].astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return {"mean_abs_diff": float(np.mean(np.abs(a - b))), "max_abs_diff": float(np.max(np.abs(a - b))),
            "psnr": 10 * np.log10(255 ** 2 / mse) if mse else float("inf")}


def fmt(value, spec: str = ",.2f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def report(rows: list[dict], meta: dict) -> str:
    lines = [
        f"{HEADING} (curate eval, {meta['date']}, {meta['device']})", "",
        f"`python bench/eval.py`: {meta['model']}; {meta['size']} px, guidance {meta['guidance']}, "
        f"the same prompts and per-image seeds for every variant; torch {meta['torch']}, diffusers {meta['diffusers']}. "
        "baseline: a plain `StableDiffusionPipeline(...)` call in fp16 (the same scheduler, `generator=[...]` per image); "
        "curate: `curate eval`'s sampler (train/eval/sampler.py: bf16 weights, channels_last, fused QKV, SDPA; "
        "compiled: + torch.compile of the UNet). One untimed warm-up batch (2 steps) per variant and scheduler; images/s over the timed "
        f"batches. |Δ|: curate's images against the baseline's for the same seeds, 8-bit levels. Target: ≥ {TARGET}× the baseline.",
        "",
        "| scheduler | variant | batch | images/s | s/image | × baseline | peak GiB | mean \\|Δ\\| | max \\|Δ\\| | PSNR dB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ips = r.get("images_per_second")
        lines.append(
            f"| {r['scheduler']} | {r['variant']} | {r['batch']} | {fmt(ips, none=r.get('error', '–'))} | "
            f"{fmt(1 / ips if ips else None, '.3f')} | {fmt(r.get('speedup'), '.2f')}"
            f"{'' if r.get('speedup') is None or r['variant'] == 'baseline' else (' ok' if r['speedup'] >= TARGET else ' MISSED')} | "
            f"{fmt(r.get('peak_gib'), '.1f')} | {fmt(r.get('mean_abs_diff'), '.2f')} | {fmt(r.get('max_abs_diff'), '.0f')} | "
            f"{fmt(r.get('psnr'), '.1f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedulers", default="ddpm:1000,ddim:50,dpm++:20")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--big-batch", type=int, default=32, help="batch of the extra compiled variant (0: none)")
    parser.add_argument("--batches", type=int, default=3, help="timed batches (1 for schedulers of >= 500 steps)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled variants")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: tiny model, 32 px, few steps")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--curate-dtype", choices=["bf16", "fp16"], default="bf16",
                        help="curate's weights dtype; fp16 = the baseline's, to compare images without the "
                             "bf16-vs-fp16 rounding difference")
    parser.add_argument("--fresh", action="store_true", help="forget earlier results of this device")
    args = parser.parse_args()

    import diffusers
    import torch

    from curate.train.eval.config import GenerationSection

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.quick:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU only: {cpu_name()}"
    settings = GenerationSection(schedulers=args.schedulers).settings()
    size, guidance, batch = (32, 7.5, 4) if args.quick else (512, 7.5, args.batch)
    if args.quick:  # the same schedulers, few steps
        settings = [(name, max(2, steps // 50)) for name, steps in settings]
    log(f"device: {device_name}; torch {torch.__version__}, diffusers {diffusers.__version__}")
    parts = build_parts(args.quick, device)
    n_params = sum(p.numel() for p in parts.unet.parameters())
    variants = [("baseline", None, batch), ("curate", False, batch)]
    if not args.no_compile:
        variants.append(("curate, compiled", True, batch))
        if args.big_batch and args.big_batch != batch:
            variants.append(("curate, compiled", True, args.big_batch))
    rows: dict[tuple[str, int], list[dict]] = {(n, s): [] for n, s in settings}
    baseline: dict[tuple[str, int], tuple[float, object]] = {}
    # Variant by variant, each built (and compiled) once for every scheduler: the UNet's graph
    # depends on the batch shape, not on the scheduler.
    for variant, compiled, b in variants:
        free_memory()
        t0 = time.perf_counter()
        try:
            generate = (Baseline(parts, device, torch.float16) if compiled is None
                        else Curate(parts, device, {"bf16": torch.bfloat16, "fp16": torch.float16}[args.curate_dtype],
                                    compiled))
        except Exception as exc:
            traceback.print_exc()
            for key in rows:
                rows[key].append({"scheduler": f"{key[0]} {key[1]}", "variant": variant, "batch": b,
                                  "error": f"failed: {type(exc).__name__}"})
            continue
        for name, steps in settings:
            long_run = steps >= 500
            if long_run and b != batch:
                continue
            batches = 1 if long_run or args.quick else args.batches
            row = {"scheduler": f"{name} {steps}", "variant": variant, "batch": b}
            t1 = time.perf_counter()
            try:
                result, images = timed_run(generate, name, steps, b, batches, 2, size, guidance)
                row.update(result)
                if compiled is None:
                    baseline[(name, steps)] = (result["images_per_second"], images)
                elif (name, steps) in baseline:
                    row.update(compare(images, baseline[(name, steps)][1]))
                if (name, steps) in baseline:
                    row["speedup"] = row["images_per_second"] / baseline[(name, steps)][0]
            except torch.cuda.OutOfMemoryError:
                row.update(error="out of memory", peak_gib=peak_gib())
            except Exception as exc:  # one failing variant must not lose the others' numbers
                traceback.print_exc()
                row.update(error=f"failed: {type(exc).__name__}")
            rows[(name, steps)].append(row)
            log(f"{name} {steps}, {variant}, batch {b}: {fmt(row.get('images_per_second'), none=row.get('error'))} images/s, "
                f"×{fmt(row.get('speedup'), '.2f')}, mean |Δ| {fmt(row.get('mean_abs_diff'), '.2f')}, "
                f"peak {fmt(row.get('peak_gib'), '.1f')} GiB ({time.perf_counter() - t1:.0f} s; "
                f"{time.perf_counter() - t0:.0f} s since the variant's start)")
        del generate
    rows = [r for key in rows for r in rows[key]]

    meta = {"date": datetime.date.today().isoformat(), "device": device_name, "size": size, "guidance": guidance,
            "model": ("curate's tiny model (--quick)" if args.quick else
                      f"SD-1.5-shaped UNet ({n_params / 1e6:.0f}M), VAE and CLIP ViT-L text encoder, random weights"),
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "minutes": (time.perf_counter() - started) / 60}
    if not args.quick:  # merge with earlier invocations' other schedulers (same device)
        WORK.mkdir(parents=True, exist_ok=True)
        results = WORK / f"results-{''.join(c if c.isalnum() else '-' for c in device_name)}.json"
        stored = {} if args.fresh or not results.exists() else json.loads(results.read_text())
        for name, steps in settings:
            stored[f"{name} {steps}"] = [r for r in rows if r["scheduler"] == f"{name} {steps}"]
        results.write_text(json.dumps(stored, indent=1))
        rows = [r for key in stored for r in stored[key]]
    table = report(rows, meta)
    log("\n" + table)
    log(f"({meta['minutes']:.1f} minutes)")
    if args.quick or args.no_write or device != "cuda":
        log("(BENCHMARKS.md not written: --quick, --no-write or no GPU)")
    else:
        update_benchmarks(HEADING, table)
        log("BENCHMARKS.md updated")


if __name__ == "__main__":
    main()
