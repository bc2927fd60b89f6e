"""The SD 1.5 UNet's training ceiling on one GPU (issue 18): images/s and MFU of the model alone.

How fast the model alone trains with PyTorch, so that we know whether issue 18's 50% MFU target is
reachable by curate's loop or above what this model can do on this GPU.

The model: UNet2DConditionModel with Stable Diffusion 1.5's published config (860M parameters,
random weights, bench/train.py's SD15_UNET), at 512 px (latents 64×64×4), batch 32. No data
loading, no VAE, no text encoder: random noisy latents, noise targets, timesteps and 77×768 text
embeddings are made on the GPU before timing (two batches, used in turn). SDPA attention
(AttnProcessor2_0) and channels_last in every UNet variant; cuDNN benchmark and TF32 on, as
train/loop.py sets them.

Variants (each in a fresh subprocess, so that no compile cache or allocator state carries over
from another; a variant that fails, runs out of memory or runs past its time records that and
the others go on):

  eager         fp32 master weights, bf16 autocast, fused AdamW, grad-norm clipping at 1.0: the
                step of curate's loop (train/loop.py: optimizer_step with the default
                max_grad_norm) without its data
  kernels       bf16 matrix products alone: torch.mm 8192² (the 790 TFLOP/s figure's check) and
                the UNet's own largest shapes (linear layers, 3×3 convolutions, attention;
                forward + backward), TFLOP/s each
  compiled      eager + torch.compile(unet) (default mode), as `training.compile: true`
  fwd-bwd       compiled, forward + backward only (no clipping, no optimizer step): the share of
                the optimizer
  bf16          bf16 weights (the UNet cast to bf16, no autocast), compiled, fused AdamW on the bf16
                parameters: the bound if master weights were bf16 (it changes numerics: updates
                smaller than a bf16 ulp of a weight are lost)
  max-autotune  compiled with mode="max-autotune-no-cudagraphs" (minutes of autotuning)

Each UNet variant: --warmup untimed steps (the first one compiles; its seconds are reported), then
--steps timed steps between torch.cuda.synchronize calls. images/s = timed images / timed seconds;
MFU = images/s × the UNet's forward + backward FLOPs per image (counted with
torch.utils.flop_counter.FlopCounterMode by bench/train.py's unet_flops_per_image) / 790 TFLOP/s
(bench/train.py's PEAK_FLOPS, the H200's bf16 rate); peak memory = torch.cuda.max_memory_allocated.

    python bench/unet_ceiling.py                        # GPU: every variant within --budget (470 s);
                                                        # max-autotune, last, gets what is left
    python bench/unet_ceiling.py --variants eager,kernels,compiled,fwd-bwd,bf16    # GPU, ~6 min
    python bench/unet_ceiling.py --variants max-autotune                           # GPU, ~3-8 min
    python bench/unet_ceiling.py --quick --no-write     # CPU dry run: tiny UNet, 2 steps, ~1-2 min

Time on an H200 (estimates, not yet measured: start-up ~10-15 s per variant, Inductor compiling
the UNet's forward + backward ~1-2 min cold, less with its on-disk cache warm): eager ~35 s,
kernels ~25 s, compiled ~2 min, fwd-bwd ~1 min (the compiled graphs come from the cache), bf16
~2 min, max-autotune ~3-8 min (autotuning every GEMM and convolution shape). All six rarely fit in
one 8-minute run: the two invocations above do, and their rows end up in one table.

Results are kept in bench-work/unet-ceiling/results.json (per device, size and batch), so
variants run by separate invocations (to stay within a time limit) end up in one table;
`--fresh` forgets earlier ones. The table ("## Training: the SD 1.5 UNet's ceiling (issue 18)" in
BENCHMARKS.md) is rewritten after every variant, so a run cut short keeps what it measured;
`--no-write` skips that, and --quick never writes it. --budget (seconds, default 470) bounds the
whole run: each variant gets at most what is left, and one that cannot start in time is skipped.

--quick: curate's tiny UNet (bench/train.py --quick's model) at 32 px, batch 4, 1 warm-up + 2
timed steps on the CPU; compiled variants use torch.compile's aot_eager backend there (dynamo and
AOTAutograd exercised, no Inductor code generation, so the compile modes are not), and it never
writes BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.train import PEAK_FLOPS, SD15_UNET, SD15_VAE, make_model, unet_flops_per_image  # noqa: E402
from bench.download import cpu_name, update_benchmarks  # noqa: E402

WORK = REPO / "bench-work" / "unet-ceiling"
HEADING = "## Training: the SD 1.5 UNet's ceiling (issue 18)"
LOOP_RATE, TARGET_MFU = 131.6, 0.50  # issue 18: curate's compiled loop at 512 px, batch 32 (H200); the target

# name: (what it is, compile mode or None, weights, optimizer step, seconds it may take on the GPU,
#        a rough estimate of its seconds on an H200 with 16 cores, start-up included)
VARIANTS = {
    "eager": ("fp32 weights, bf16 autocast, fused AdamW (+ clip 1.0): curate's step without data",
              None, "fp32", True, 180, 35),
    "kernels": ("bf16 matrix products alone (see the kernel table)", None, "bf16", False, 150, 25),
    "compiled": ("eager + torch.compile (default mode)", "default", "fp32", True, 330, 120),
    "fwd-bwd": ("compiled, forward + backward only (no clip, no optimizer step)", "default", "fp32", False, 300, 60),
    "bf16": ("bf16 weights (no autocast; changes numerics), compiled, fused AdamW on bf16", "default", "bf16",
             True, 330, 120),
    "max-autotune": ("eager + torch.compile(mode=\"max-autotune-no-cudagraphs\")", "max-autotune-no-cudagraphs",
                     "fp32", True, 480, 300),
}
MIN_START = 45  # seconds: a variant is not started with less of the budget left


def log(*args) -> None:
    now = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{now}]", *args, flush=True)


def fmt(x, spec=",.1f", none="—"):
    return none if x is None else format(x, spec)


def pct(x) -> str:
    """A fraction as a percentage (two significant digits below 0.1%, for --quick's tiny figures)."""
    return "—" if x is None else f"{x * 100:.1f}%" if x >= 0.001 or x == 0 else f"{x * 100:.2g}%"


# ---------------------------------------------------------------- the model's config and FLOPs


def config_folder(quick: bool) -> Path:
    """A diffusers-shaped folder holding unet/ and vae/ config.json (what unet_flops_per_image and
    the workers read): the published SD 1.5 configs, or bench/train.py's tiny model for --quick."""
    if quick:
        return make_model("sd15", True, "cpu")
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = WORK / "sd15-config"
    if not (folder / "unet" / "config.json").exists():
        with torch.device("meta"):  # configs only: no weights, nothing allocated
            UNet2DConditionModel(**SD15_UNET).save_config(folder / "unet")
            AutoencoderKL(**SD15_VAE).save_config(folder / "vae")
    return folder


def latent_side(folder: Path, size: int) -> int:
    from diffusers import AutoencoderKL

    return size // 2 ** (len(AutoencoderKL.load_config(folder, subfolder="vae")["block_out_channels"]) - 1)


def count_flops(folder: Path, size: int) -> tuple[float, dict]:
    """FLOPs per image (bench/train.py's count) and their shares by kind of operation."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as outer:  # nested: sees the same operations, by name
        total = unet_flops_per_image(folder, size, None)
    kinds: dict = {}
    for op, n in outer.get_flop_counts().get("Global", {}).items():
        name = str(op)
        kind = ("convolutions" if "convolution" in name else
                "attention" if "bmm" in name or "attention" in name else
                "linear layers" if "mm" in name else "other")
        kinds[kind] = kinds.get(kind, 0) + n
    return total, {k: v / total for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}


# ---------------------------------------------------------------- worker: one variant, in its own process


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def run_unet(name: str, folder: Path, args, device: str) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from curate.train.model import SD_SCHEDULE

    _, mode, weights, with_optimizer, _, _ = VARIANTS[name]
    config = UNet2DConditionModel.load_config(folder, subfolder="unet")
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device(device):  # random init on the GPU: seconds, not a minute
        unet = UNet2DConditionModel.from_config(config)
    unet.set_attn_processor(AttnProcessor2_0())
    unet.train()
    if weights == "bf16":
        unet.to(torch.bfloat16)
    unet.to(memory_format=torch.channels_last)
    params = [p for p in unet.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    log(f"  [{name}] UNet {n_params / 1e6:.0f}M parameters ({weights}) on {device} in "
        f"{time.perf_counter() - started:.1f} s")
    # curate's defaults (train/config.py): lr 1e-5, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2.
    optimizer = (torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, fused=True)
                 if with_optimizer else None)
    if mode is None:
        model = unet
    elif args.backend == "inductor":
        model = torch.compile(unet, **({} if mode == "default" else {"mode": mode}))
    else:
        model = torch.compile(unet, backend=args.backend)

    # Two batches of inputs, made once on the device: noisy latents (channels_last, as the loop
    # passes them), timesteps, text embeddings and the noise the UNet is to predict.
    side = latent_side(folder, args.size)
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    input_dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    batches = []
    for _ in range(2):
        latents = torch.randn(args.batch, 4, side, side, device=device)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps).contiguous(memory_format=torch.channels_last)
        embeddings = torch.randn(args.batch, 77, config["cross_attention_dim"], device=device)
        batches.append((noisy.to(input_dtype), timesteps, embeddings.to(input_dtype), noise))
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=weights == "fp32")

    def step(i: int) -> torch.Tensor:
        noisy, timesteps, embeddings, target = batches[i % 2]
        with autocast:
            prediction = model(noisy, timesteps, embeddings).sample
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).mean()
        loss.backward()
        if optimizer is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            unet.zero_grad(set_to_none=True)  # as the loop: fresh gradients each step, none accumulated
        return loss.detach()

    t0 = time.perf_counter()
    log(f"  [{name}] first step" + (" (compiling)" if mode else "") + " ...")
    step(0)
    synchronize(device)
    first = time.perf_counter() - t0
    log(f"  [{name}] first step done in {first:.1f} s; {args.warmup - 1} more warm-up, then {args.steps} timed steps")
    for i in range(1, args.warmup):
        step(i)
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    synchronize(device)
    seconds = time.perf_counter() - t0
    loss_value = float(loss)
    if loss_value != loss_value:  # NaN: the numbers would not be those of a working step
        raise RuntimeError("the loss is NaN")
    return {"images_per_second": args.steps * args.batch / seconds, "step_ms": seconds / args.steps * 1000,
            "first_step_s": first, "peak_gib": peak_gib(device), "params": n_params, "loss": loss_value}


def kernel_probes(folder: Path, args, device: str) -> list[tuple[str, str, object, list]]:
    """(name, shape, function, its input tensors) per probe: a square bf16 matrix product, and
    the UNet's largest shapes at this size and batch (inputs that need gradients get them)."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(folder, subfolder="unet")
    side, b = latent_side(folder, args.size), args.batch
    channels = list(config["block_out_channels"])
    heads = config["attention_head_dim"]  # SD 1.x's config names the number of heads so
    heads = heads[0] if isinstance(heads, (list, tuple)) else heads
    attn_levels = [i for i, kind in enumerate(config["down_block_types"]) if "CrossAttn" in kind]
    def t(*shape, grad=True, cl=False):
        x = torch.randn(*shape, device=device, dtype=torch.bfloat16)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.requires_grad_(grad)

    n = 8192 if device == "cuda" else 256
    probes = [("torch.mm, forward only", f"{n}×{n} @ {n}×{n}", torch.mm, [t(n, n, grad=False), t(n, n, grad=False)])]
    for level in dict.fromkeys((attn_levels[0], attn_levels[-1])):
        c, s = channels[level], side // 2 ** level
        rows, d = b * s * s, c // heads
        probes += [
            (f"linear, GEGLU in (level {level + 1})", f"{rows}×{c} → {8 * c}", F.linear, [t(rows, c), t(8 * c, c)]),
            (f"linear, feed-forward out (level {level + 1})", f"{rows}×{4 * c} → {c}", F.linear,
             [t(rows, 4 * c), t(c, 4 * c)]),
            (f"SDPA, self-attention (level {level + 1})", f"{b}×{heads} heads × {s * s} tokens × {d}",
             F.scaled_dot_product_attention, [t(b, heads, s * s, d) for _ in range(3)]),
        ]
    for level in dict.fromkeys((0, len(channels) - 1)):
        c, s = channels[level], side // 2 ** level
        probes.append((f"conv 3×3 (level {level + 1})", f"{b}×{c}×{s}×{s}, {c} → {c}",
                       lambda x, w: F.conv2d(x, w, padding=1), [t(b, c, s, s, cl=True), t(c, c, 3, 3, cl=True)]))
    return probes


def run_kernels(folder: Path, args, device: str) -> dict:
    """TFLOP/s of each probe: forward + backward (input and weight gradients, as in training;
    the plain torch.mm forward only), FLOPs counted by FlopCounterMode on the call itself."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    for name, shape, fn, inputs in kernel_probes(folder, args, device):
        try:
            wanted = [x for x in inputs if x.requires_grad]
            grad = torch.randn_like(fn(*inputs)) if wanted else None

            def call():
                out = fn(*inputs)
                if wanted:  # gradients returned, not accumulated into .grad
                    torch.autograd.grad(out, wanted, grad)

            with FlopCounterMode(display=False) as counter:
                call()
            flops = counter.get_total_flops()
            if not flops and fn is torch.nn.functional.scaled_dot_product_attention:
                # a backend FlopCounterMode has no formula for (the CPU's): its formulas, by shape
                from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

                shapes = [tuple(x.shape) for x in inputs]
                flops = sdpa_flop_count(*shapes) + sdpa_backward_flop_count(shapes[0], *shapes)
            for _ in range(3):
                call()
            synchronize(device)
            t0 = time.perf_counter()
            call()
            synchronize(device)
            once = max(time.perf_counter() - t0, 1e-6)
            reps = max(3, min(200, int((0.3 if device == "cuda" else 0.05) / once)))
            t0 = time.perf_counter()
            for _ in range(reps):
                call()
            synchronize(device)
            rate = flops * reps / (time.perf_counter() - t0)
            probe = name if not wanted else name + ", fwd + bwd"
            rows.append({"probe": probe, "shape": shape, "tflop": flops / 1e12, "tflops": rate / 1e12})
            log(f"  [kernels] {probe}, {shape}: {rate / 1e12:,.1f} TFLOP/s")
        except Exception as exc:  # one probe's failure (e.g. no kernel for a shape) keeps the others
            traceback.print_exc()
            rows.append({"probe": name, "shape": shape, "error": f"failed: {type(exc).__name__}"})
        finally:
            inputs = grad = None
            if device == "cuda":
                torch.cuda.empty_cache()
    return {"probes": rows, "peak_gib": peak_gib(device)}


def worker(args) -> None:
    import diffusers
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.quick:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    if device == "cuda":  # as train/loop.py
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else f"CPU only: {cpu_name()}",
              "torch": torch.__version__, "diffusers": diffusers.__version__}
    folder = Path(args.config)
    try:
        if args.worker == "kernels":
            result.update(run_kernels(folder, args, device))
        else:
            result.update(run_unet(args.worker, folder, args, device))
    except torch.cuda.OutOfMemoryError:
        result.update(error="out of memory", peak_gib=peak_gib(device))
    except Exception as exc:
        traceback.print_exc()
        text = str(exc).strip().splitlines()
        result.update(error=f"failed: {type(exc).__name__}" + (f": {text[0][:80]}" if text else ""),
                      peak_gib=peak_gib(device))
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------- parent: plan, run, report


def run_variant(name: str, args, folder: Path, timeout: float) -> dict:
    """One variant in a fresh Python process (its own session, so that a timeout also ends the
    compile workers it started); returns its result, or the reason it has none."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--result", str(result_path),
               "--config", str(folder), "--size", str(args.size), "--batch", str(args.batch),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--backend", args.backend]
        if args.quick:
            cmd.append("--quick")
        child = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
        try:
            rc = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the child's process group: it and its compile workers
            child.wait()
            return {"error": f"timed out after {timeout:.0f} s"}
        if result_path.exists():
            return json.loads(result_path.read_text())
        return {"error": f"crashed (exit status {rc})"}


def report(rows: dict, meta: dict) -> str:
    flops = meta["flops_per_image"]
    shares = ", ".join(f"{k} {v:.0%}" for k, v in meta["flop_shares"].items())
    lines = [
        HEADING, "",
        f"`bench/unet_ceiling.py` ({meta['date']}, {meta['device']}; host {meta['cores']} cores; torch "
        f"{meta['torch']}, diffusers {meta['diffusers']}): {meta['model']} at {meta['size']} px (latents "
        f"{meta['side']}×{meta['side']}×4), batch {meta['batch']}, full fine-tuning of the model alone: no data "
        f"loading, no VAE, no text encoder (random noisy latents, timesteps and 77×{meta['cross_dim']} text "
        f"embeddings already on the device). SDPA attention, channels_last (on a GPU: cuDNN benchmark, TF32, as "
        f"train/loop.py). Each variant in a fresh process: {meta['warmup']} warm-up step(s) (the first one "
        f"compiles: *first step*), then "
        f"{meta['steps']} timed steps between `torch.cuda.synchronize()` calls.", "",
        f"- **FLOPs**: the UNet's forward + backward = {flops / 1e12:.3g} TFLOP per image "
        f"(torch.utils.flop_counter.FlopCounterMode, bench/train.py's count; {shares}). **MFU** = images/s × "
        f"that / {PEAK_FLOPS / 1e12:.0f} TFLOP/s (H200 bf16)."
        + ("" if meta["backend"] == "inductor" else
           f" Compiled variants here: torch.compile backend {meta['backend']} (compile modes not applied)."),
    ]
    if (meta["size"], meta["batch"]) == (512, 32):
        lines.append(f"- For comparison (issue 18): curate's compiled loop did {LOOP_RATE} images/s at 512 px, batch 32 "
                     f"({LOOP_RATE * flops / PEAK_FLOPS:.0%} MFU with this count); the target ≥ {TARGET_MFU:.0%} is "
                     f"≥ {TARGET_MFU * PEAK_FLOPS / flops:.0f} images/s.")
    if any(name != "kernels" for name in rows):
        lines += [
            "",
            "| variant | what | images/s | MFU | step | first step | peak memory |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
    for name in VARIANTS:
        r = rows.get(name)
        if r is None or name == "kernels":
            continue
        rate = r.get("images_per_second")
        lines.append("| " + " | ".join([
            name, VARIANTS[name][0], fmt(rate, none=r.get("error", "—")),
            pct(rate and rate * flops / PEAK_FLOPS),
            fmt(r.get("step_ms"), ",.0f") + (" ms" if r.get("step_ms") else ""),
            fmt(r.get("first_step_s"), ",.1f") + (" s" if r.get("first_step_s") is not None else ""),
            fmt(r.get("peak_gib"), ".1f") + (" GiB" if r.get("peak_gib") is not None else "")]) + " |")
    if (meta["size"], meta["batch"]) == (512, 32):
        mfu = {n: r["images_per_second"] * flops / PEAK_FLOPS for n, r in rows.items()
               if n != "kernels" and r.get("images_per_second")}
        full = {n: v for n, v in mfu.items() if VARIANTS[n][2] == "fp32" and VARIANTS[n][3]}  # the loop's kind of step
        if full:
            best = max(full, key=full.get)
            others = "; ".join(f"{n}: {mfu[n]:.0%}" for n in ("bf16", "fwd-bwd") if n in mfu)
            verdict = ("within reach: the model alone gets there, so the loop's gap is the loop's" if full[best] >= TARGET_MFU
                       else "above what the model alone reaches with PyTorch here")
            missing = [n for n, v in VARIANTS.items() if v[2] == "fp32" and v[3] and n not in full]
            lines += ["", f"**The {TARGET_MFU:.0%} target with fp32 master weights is {verdict}**: best full step "
                          f"{full[best]:.1%} MFU ({best})" + (f" ({others})" if others else "")
                      + (f"; not measured: {', '.join(missing)}." if missing else ".")]
    rate = {n: (rows.get(n) or {}).get("images_per_second") for n in ("compiled", "fwd-bwd")}
    if rate["compiled"] and rate["fwd-bwd"]:
        share = 1 - rate["compiled"] / rate["fwd-bwd"]  # 1 - (fwd + bwd time) / (whole step time)
        lines += ["", f"Clipping + the optimizer step take {share:.0%} of the compiled step's time "
                      f"(compiled vs fwd-bwd)."]
    kernels = rows.get("kernels")
    if kernels:
        lines += ["", "Kernel probes (bf16, one operation at a time; the UNet's shapes at this size and batch; "
                      "FLOPs by FlopCounterMode; level 1 = the UNet's full-resolution level):", ""]
        if kernels.get("error"):
            lines.append(f"kernels: {kernels['error']}")
        else:
            lines += ["| operation | shape | TFLOP/s | of 790 |", "|---|---|---:|---:|"]
            for p in kernels.get("probes", []):
                rate_p = p.get("tflops")
                lines.append(f"| {p['probe']} | {p['shape']} | "
                             f"{fmt(rate_p, ',.1f' if (rate_p or 0) >= 1 else '.3g', none=p.get('error', '—'))} | "
                             f"{pct(rate_p and rate_p * 1e12 / PEAK_FLOPS)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU dry run: tiny UNet, 32 px, batch 4, 2 timed steps")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, run in this order (default: {','.join(VARIANTS)})")
    parser.add_argument("--size", type=int, default=None, help="image size in px (default 512; --quick 32)")
    parser.add_argument("--batch", type=int, default=None, help="default 32; --quick 4")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps, the first compiles (default 5; --quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --quick 2)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default 470; --quick 300): variants get what is left")
    parser.add_argument("--backend", default=None, help="torch.compile backend (default inductor; --quick aot_eager)")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--fresh", action="store_true", help="forget the results of earlier invocations")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    started = time.perf_counter()
    q = args.quick
    args.size = args.size or (32 if q else 512)
    args.batch = args.batch or (4 if q else 32)
    args.warmup = max(1, args.warmup or (1 if q else 5))
    args.steps = max(1, args.steps or (2 if q else 20))
    args.backend = args.backend or ("aot_eager" if q else "inductor")
    budget = args.budget or (300 if q else 470)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")

    import diffusers
    import torch

    cuda = torch.cuda.is_available() and not q  # the parent never touches the GPU itself
    if not cuda and not q:
        log("warning: no GPU; the defaults are meant for one (use --quick on a CPU)")
    folder = config_folder(q)
    flops, shares = count_flops(folder, args.size)
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(folder, subfolder="unet")
    side = latent_side(folder, args.size)
    estimate = sum(VARIANTS[n][5] for n in names)
    log(f"UNet config {folder.relative_to(REPO)}: {flops / 1e12:.3g} TFLOP per {args.size}-px image "
        f"(forward + backward; {', '.join(f'{k} {v:.0%}' for k, v in shares.items())})")
    log(f"variants: {', '.join(names)}; {args.warmup} warm-up + {args.steps} timed steps, batch {args.batch}; "
        f"budget {budget:.0f} s" + ("" if q else f"; estimated ~{estimate / 60:.1f} min on an H200 "
                                             f"(max-autotune's autotuning varies most)"))
    if not q and estimate > budget:
        log("note: the estimate exceeds the budget; the last variants may be cut short (a row says so): "
            "run them alone with --variants (their rows join this table)")
    meta = {"date": datetime.date.today().isoformat(), "cores": os.cpu_count() or 1, "size": args.size,
            "batch": args.batch, "warmup": args.warmup, "steps": args.steps, "side": side,
            "cross_dim": config["cross_attention_dim"], "flops_per_image": flops, "flop_shares": shares,
            "model": "curate's tiny UNet (--quick)" if q else "the SD 1.5-shaped UNet (860M parameters, random weights)",
            "device": "?", "backend": args.backend, "torch": torch.__version__, "diffusers": diffusers.__version__}
    results = WORK / "results.json"
    stored: dict = {}
    if not q:
        WORK.mkdir(parents=True, exist_ok=True)
        if args.fresh:
            results.unlink(missing_ok=True)
        stored = json.loads(results.read_text()) if results.exists() else {}

    rows: dict = {}
    shown: dict = {}
    for name in names:
        left = budget - (time.perf_counter() - started)
        if left < MIN_START:
            log(f"{name}: skipped, {left:.0f} s of the budget left")
            rows[name] = {"error": "skipped (time budget)"}
            continue
        timeout = min(VARIANTS[name][4] if not q else 240, left)
        log(f"{name}: {VARIANTS[name][0]} (at most {timeout:.0f} s)")
        t0 = time.perf_counter()
        row = run_variant(name, args, folder, timeout)
        row["seconds"] = time.perf_counter() - t0
        row["date"] = meta["date"]
        rows[name] = row
        if row.get("device"):
            meta.update(device=row["device"], torch=row.get("torch", meta["torch"]))
        rate = row.get("images_per_second")
        if name == "kernels" and not row.get("error"):
            best = max((p.get("tflops") or 0 for p in row.get("probes", [])), default=0)
            summary = f"best {best:,.1f} TFLOP/s ({best * 1e12 / PEAK_FLOPS:.0%} of {PEAK_FLOPS / 1e12:.0f})"
        else:
            summary = (f"{fmt(rate, none=row.get('error'))} images/s, MFU {pct(rate and rate * flops / PEAK_FLOPS)}, "
                       f"peak {fmt(row.get('peak_gib'), '.1f')} GiB")
        log(f"{name}: {summary} ({row['seconds']:.0f} s)")
        shown = rows
        if not q and meta["device"] != "?":
            key = f"{meta['device']}|{args.size}|{args.batch}"
            stored.setdefault(key, {}).update({name: row})
            stored[key]["_meta"] = meta
            results.write_text(json.dumps(stored, indent=1))
            shown = {k: v for k, v in stored[key].items() if k != "_meta"}
        text = report(shown, meta)
        if not (q or args.no_write or not cuda or meta["device"] == "?"):
            update_benchmarks(HEADING, text)
    log(f"done in {(time.perf_counter() - started) / 60:.1f} min\n")
    print(report(shown, meta))
    if q or args.no_write or not cuda:
        log("(BENCHMARKS.md not written: --quick, --no-write or no GPU)")
    else:
        log(f"BENCHMARKS.md: {HEADING!r} updated")


if __name__ == "__main__":
    main()
