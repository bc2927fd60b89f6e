"""The `vae_latents` filter inside `curate run` at 256 px, beside the VAE encoder alone, same run.

Data: photo-like JPEGs with sides of 256-512 px in img2dataset-style WebDataset tars, made by
bench/shards_e2e.py's `make_shards` (imported, not copied: `{key}.jpg` / `.txt` / `.json`, 1,000
samples a tar, 2,000 unique images repeated), once into bench-work/shards-e2e/ and reused. Many
more tars than CPU workers, so that write tasks end spread over the run (the rate once warm).
VAE: Stable Diffusion 1.5's AutoencoderKL shape (bench/train.py's SD15_VAE, 84M parameters) with
random weights (speed does not depend on them), saved once with `save_pretrained` into
bench-work/vae-filter/sd15-vae/ and reused; the filter and the encoder-alone rows load that folder.

- curate run: `python -m curate.pipeline.cli run CONFIG --progress-every 2` in a subprocess, as a
  user runs it: `input: {paths: [TARS], format: webdataset}`, a fresh output folder, clip disabled,
  `resize: {size: 256, mode: center_crop}` (every image 256 x 256), `filters: [{name: vae_latents,
  vae: FOLDER, resolution: 256}]` (its defaults otherwise: device auto, precision auto = bf16 +
  channels_last on the GPU, batch_size 32), then again with `compile: true`.
  images/s = images written (stats.json) / wall seconds of the subprocess (interpreter, Dask
  cluster, VAE loading included, as a user waits for them). The write stage apart: from the final
  shards' done-markers (`shards/NNNNN.done.json`, "seconds": {"read": .., "write": ..}, written at the
  task's end), the task seconds and the window from the first write task's start to the last one's
  end, with the images written per second of that window. One output tar is opened to check that
  its samples are 256 x 256 and carry a latent of the VAE's shape. With nvidia-smi, its compute apps
  every 0.2 s: how many of the run's processes used the GPU, and their peak memory.
- encoder alone: the same folder loaded with curate's `load_vae`, random 256 x 256 pixels in
  [-1, 1], batch 32 (the filter's batch_size), through curate's `encode` (pipeline/models/latents.py,
  the filter's own call), timed with torch.cuda.synchronize:
  - fp32 weights and input, NCHW, eager, torch's default TF32 settings: how the filter ran before
    it had `precision` (what `precision: fp32` gives);
  - bf16 + channels_last, eager, cuDNN benchmark mode: the filter's default on a GPU;
  - that + torch.compile of the encoder (`compile: true`; the issue's scale figures: 562 images/s
    eager, 1,412 compiled on an H200 at batch 64): the encoder's best.
  GFLOP per image: torch.utils.flop_counter over `encode` on the meta device.

Target (issue 15 item 8): vae_latents at 256 px >= 1,000 images/s inside `curate run` on one H200
(end to end: images written / wall seconds).

    python bench/vae_filter.py                      # GPU run: 120,000 images; writes BENCHMARKS.md after each measurement
    python bench/vae_filter.py --quick --no-write   # CPU dry run: a narrow VAE, 200 images in 10 tars, ~2 min

--quick runs everything on the CPU (the filter with `device: cpu`), 200 images in 10 tars, with
QUICK_VAE: SD 1.5's VAE layout (four blocks, 8x down, 4 latent channels: the same 4 x 32 x 32
latents at 256 px) narrowed to 8-16 channels, 0.5 GFLOP per 256-px image, random weights, saved
the same way into bench-work/vae-filter/quick-vae/, so that the dry run takes the GPU run's path (a
folder, loaded by every worker). Not curate's `vae: tiny`: built for 32-px images, it downsamples
by 2 only, so at 256 px its attention spans 128 x 128 positions, 79 GFLOP per image (SD 1.5's: 273),
minutes on a 2-core CPU (`--vae tiny` still runs it). --quick never writes BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.clip_score import _short_error, _version, fmt_rate  # noqa: E402
from bench.download import cpu_name  # noqa: E402
from bench.shards_e2e import (  # noqa: E402
    CurateRunFailed, GpuMemoryPoller, _cell, _mib, _print_traceback, finished_stats, log, make_shards, run_logged,
)
from bench.train import SD15_VAE  # noqa: E402
from curate.pipeline.benchmarks import update_section  # noqa: E402

WORK = REPO / "bench-work" / "vae-filter"
HEADING = "## vae_latents inside curate run (issue 15)"
SIZE = 256  # px: resize.size (center_crop) and the filter's resolution
TARGET = 1_000  # images/s inside curate run, one H200
# --quick's VAE: SD 1.5's layout, narrow (see the module docstring).
QUICK_VAE = dict(SD15_VAE, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8)


# ---------------------------------------------------------------- the VAE folder


def make_vae_folder(name: str, config: dict) -> Path:
    """An AutoencoderKL of `config` with random weights (seed 0), saved with save_pretrained into
    bench-work/vae-filter/NAME/ (a bare AutoencoderKL folder: load_vae reads it); made once, reused."""
    folder = WORK / name
    if (folder / "config.json").exists() and any(folder.glob("diffusion_pytorch_model.*")):
        log(f"vae: reusing {folder.relative_to(REPO)}")
        return folder
    import torch
    from diffusers import AutoencoderKL

    started = time.perf_counter()
    tmp = WORK / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    vae = AutoencoderKL(**config)
    vae.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # whole or not at all: a cut-off save is not reused
    n = sum(p.numel() for p in vae.parameters())
    log(f"vae: {folder.relative_to(REPO)} written in {time.perf_counter() - started:.1f} s ({n / 1e6:.1f}M parameters)")
    return folder


# ---------------------------------------------------------------- curate run


# The curate runs: the filter's defaults (bf16 + channels_last on a GPU, eager), and compiled.
# The compiled run twice: first with torch's compile caches as the machine has them (cold on a
# fresh one: the worker compiles the encoder, about a minute), then again, as a user's next run
# finds them (inductor's FX graph and Triton kernel caches under /tmp and ~/.triton, kept by torch).
# And the same run without the filter (compile None): reading, resizing and writing alone, the
# rate the rest of the pipeline allows on this machine, the filter's ceiling inside curate run.
RUNS = {"curate_no_filter": ("without `vae_latents` (read, resize, write: the rest of the run alone)", None),
        "curate": ("defaults (`precision: auto`: bf16 + channels_last, eager)", False),
        "curate_compiled": ("`compile: true`", True),
        "curate_compiled_again": ("`compile: true`, run again (torch's compile caches warm)", True)}


def curate_config(tars_dir: Path, out: Path, vae: str, quick: bool, compile: bool = False) -> dict:
    """The run's config; `compile` None: without the filter."""
    latents = {"name": "vae_latents", "vae": vae, "resolution": SIZE, **({"compile": True} if compile else {})}
    if quick:
        latents["device"] = "cpu"  # the dry run stays on the CPU even where a GPU is
    return {
        "input": {"paths": [str(tars_dir / "*.tar")], "format": "webdataset"},
        "output": {"path": str(out)},
        "resize": {"size": SIZE, "mode": "center_crop"},
        "clip": {"enabled": False},
        "filters": [] if compile is None else [latents],
    }


def run_curate(tars_dir: Path, vae: str, quick: bool, timeout: float, poll: bool, overrides: list[str],
               compile: bool = False) -> dict:
    """`curate run CONFIG --progress-every 2` in a subprocess, timed from start to exit; its output
    goes to a log file, and its first lines to ours as they come; nvidia-smi polled meanwhile."""
    import yaml

    base = WORK / "run"
    out = base / "out"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    config = curate_config(tars_dir, out, vae, quick, compile)
    config_path = base / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "curate.pipeline.cli", "run", str(config_path), "--progress-every", "2",
           "--log-level", "debug"] + [a for o in overrides for a in ("--set", o)]
    log(f"  curate: {' '.join(cmd[1:])}  (filters {config['filters']}, resize {config['resize']})")
    run = run_logged(cmd, base / "curate.log", timeout, poll)
    wall, rc, tree, poller, started_epoch = (run[k] for k in ("wall", "rc", "tree", "poller", "started_epoch"))
    result = {"wall": wall, "rc": rc, "log": run["log"]}
    if poller:
        ours = {pid: mib for pid, mib in poller.peak_by_pid.items() if pid in tree}
        result.update({"gpu_pids": len(ours), "gpu_peak_by_pid": ours, "gpu_peak_total": poller.peak_total,
                       "gpu_polls": poller.polls, "gpu_poll_error": poller.error,
                       "gpu_pids_other": sorted(set(poller.peak_by_pid) - set(ours))})
    result.update(_write_window(out, started_epoch))
    stats = finished_stats(run, out, timeout, result)
    result.update({
        "stats": stats, "images": stats.get("rows_in"), "written": stats.get("written") or 0,
        "rate": (stats.get("written") or 0) / wall,
    })
    result["check"] = _check_output(out, latents=compile is not None)
    for tar in (out / "shards").glob("*.tar"):  # the written copy of the input: not needed
        tar.unlink()
    return result


def _write_window(out: Path, started_epoch: float) -> dict:
    """From the final shards' done-markers (shards/NNNNN.done.json, written at the write task's end,
    holding its `seconds` by stage and `written`): the write tasks' seconds, and when the first write
    task started and the last ended, relative to the start of the subprocess."""
    spans, written, read_s = [], 0, 0.0
    try:
        for marker in (out / "shards").glob("*.done.json"):
            info = json.loads(marker.read_text())
            end = marker.stat().st_mtime - started_epoch
            seconds = info.get("seconds", {})
            spans.append((end - float(seconds["write"]), end, int(info.get("written", 0))))
            read_s += float(seconds.get("read", 0.0))
            written += int(info.get("written", 0))
    except Exception as exc:
        return {"write_window_error": _short_error(exc)}
    if not spans:
        return {}
    first, last = min(a for a, _, _ in spans), max(b for _, b, _ in spans)
    task_s = [b - a for a, b, _ in spans]
    result = {"write_tasks": len(spans), "write_task_s": sum(task_s), "write_task_max_s": max(task_s),
              "read_task_s": read_s, "write_first_start": first, "write_last_end": last,
              "write_written": written, "write_rate": written / (last - first) if last > first else None}
    # The rate once warm (compiled, caches filled): from the moment a quarter of the write tasks had
    # ended to the last end, the images of the tasks that ended in that window. Meaningful only with
    # many more write tasks than the CPU workers run at once (tasks then end spread over the run).
    ends = sorted(spans, key=lambda span: span[1])
    quarter = len(ends) // 4
    if quarter >= 2 and last > ends[quarter - 1][1]:
        since = ends[quarter - 1][1]
        images = sum(n for _, end, n in ends[quarter:])
        result.update({"steady_since": since, "steady_images": images, "steady_rate": images / (last - since)})
    return result


def _check_output(out: Path, latents: bool = True) -> str:
    """The first output tar's samples: 256 x 256 JPEGs, each with a latent of one shape (or, without
    the filter, none)."""
    import numpy as np
    from PIL import Image

    from curate.pipeline.models.latents import LATENT_EXT, META_SIZE
    from curate.pipeline.tarshard import iter_tar_samples

    tars = sorted((out / "shards").glob("*.tar"))
    if not tars:
        return "no output tar"
    sizes, shapes, meta_sizes, n, missing = set(), set(), set(), 0, 0
    for _, fields in iter_tar_samples(tars[0]):
        n += 1
        sizes.add(Image.open(io.BytesIO(fields["jpg"])).size)
        if LATENT_EXT not in fields:
            missing += 1
            continue
        shapes.add(tuple(np.load(io.BytesIO(fields[LATENT_EXT]), allow_pickle=False).shape))
        meta_sizes.add(tuple(json.loads(fields["json"]).get(META_SIZE) or ()))
    if latents:
        ok = sizes == {(SIZE, SIZE)} and not missing and len(shapes) == 1 and meta_sizes == {(SIZE, SIZE)}
    else:
        ok = sizes == {(SIZE, SIZE)} and missing == n
    text = (f"{tars[0].name}: {n} samples, image sizes {sorted(sizes)}, latent shapes {sorted(shapes)}, "
            f"latent_size {sorted(meta_sizes)}, {missing} without a latent")
    if not ok:
        raise RuntimeError(f"unexpected output: {text}")
    return text


# ---------------------------------------------------------------- the encoder alone


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_encode(vae, pixels, device: str, seconds: float, warmup: int) -> dict:
    """curate's `encode` (the filter's call) on one batch, again and again: `warmup` calls untimed,
    then enough calls for about `seconds`, synchronized at the end."""
    import torch

    from curate.pipeline.models.latents import encode

    batch = pixels.shape[0]
    with torch.no_grad():
        started = time.perf_counter()
        for _ in range(warmup):
            encode(vae, pixels)
        _sync(device)
        warm_s = time.perf_counter() - started
        t0 = time.perf_counter()
        encode(vae, pixels)
        _sync(device)
        one = time.perf_counter() - t0
        calls = max(2, min(1000, round(seconds / max(one, 1e-4))))
        t0 = time.perf_counter()
        for _ in range(calls):
            latents = encode(vae, pixels)
        _sync(device)
        elapsed = time.perf_counter() - t0
    return {"rate": calls * batch / elapsed, "seconds": elapsed, "calls": calls, "batch": batch, "warm_s": warm_s,
            "latent_shape": list(latents.shape[1:])}


def encode_gflop(config) -> Optional[float]:
    """GFLOP of `encode` for one SIZE² image, counted on the meta device (no memory, no compute)."""
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from curate.pipeline.models.latents import encode

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
        pixels = torch.zeros(1, 3, SIZE, SIZE)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encode(vae, pixels)
    return counter.get_total_flops() / 1e9


def run_alone(source: str, device: str, variant: str, batch: int, seconds: float) -> dict:
    """The encoder alone, one variant: "filter" (fp32, NCHW, eager: the filter before it had
    `precision`), "bf16_cl" (curate's `cached_vae` with precision bf16: bf16 + channels_last, cuDNN
    benchmark mode, eager: the filter's default on a GPU), "compiled" (that with `compile=True`)."""
    import torch

    from curate.pipeline.models.vae import cached_vae, load_vae

    started = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    # Pixels as the filter hands them to `encode`: NCHW in [-1, 1], in the VAE's dtype and layout.
    pixels = (torch.rand(batch, 3, SIZE, SIZE, generator=gen) * 2 - 1).to(device)
    if variant == "filter":
        # Built by hand: cached_vae always makes a CUDA VAE channels_last, and this row is the
        # fp32 NCHW encoder the filter used before it had `precision`.
        torch.backends.cudnn.benchmark = False
        vae = load_vae(source).float().to(torch.device(device)).eval().requires_grad_(False)
    else:
        # The filter's own loader (pipeline/models/vae.py), so this row is exactly its encoder.
        loaded = cached_vae(source, device=device, precision="bf16", compile=variant == "compiled")
        vae = loaded.compiled or loaded.vae
        pixels = pixels.to(loaded.dtype)
        if loaded.device.type == "cuda":
            pixels = pixels.contiguous(memory_format=torch.channels_last)
    load_s = time.perf_counter() - started
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = time_encode(vae, pixels, device, seconds, warmup=3 if variant == "compiled" else 2)
    result.update({"variant": variant, "load_s": load_s, "dtype": str(pixels.dtype).replace("torch.", ""),
                   "channels_last": pixels.is_contiguous(memory_format=torch.channels_last) and variant != "filter",
                   "compiled": variant == "compiled"})
    if device.startswith("cuda"):
        result["peak"] = torch.cuda.max_memory_allocated()
    if variant == "filter":
        try:
            result["gflop"] = encode_gflop(vae.config)
        except Exception as exc:
            result["gflop_error"] = _short_error(exc)
    from curate.pipeline.models.cache import forget

    del vae, pixels
    forget("vae")  # cached_vae's copy: the next variant gets its own
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


VARIANTS = {
    "filter": "encoder alone: fp32, NCHW, eager (the filter before `precision`)",
    "bf16_cl": "encoder alone: bf16 + channels_last, eager (the filter's default)",
    "compiled": "encoder alone: bf16 + channels_last + torch.compile (`compile: true`)",
}


# ---------------------------------------------------------------- table


def _best_run(state: dict) -> Optional[dict]:
    runs = [r for name, r in state["runs"].items() if RUNS[name][1] is not None]  # with the filter
    return max(runs, key=lambda r: r["rate"]) if runs else None


def verdict(state: dict) -> str:
    c = _best_run(state)
    rate = f"best {fmt_rate(c['rate'])} images/s end to end" if c else "the curate runs failed"
    if not state["gpu"]:
        return f"missed, CPU dry run ({rate}; the target is for one H200)"
    return ("met" if c and c["rate"] >= TARGET else "**MISSED**") + f" ({rate})"


def render(state: dict, args) -> str:
    import torch

    date = datetime.date.today().isoformat()
    cores = os.cpu_count() or 1
    info, gpu, device = state["info"], state["gpu"], state["device"]
    alone = state.get("alone", {})
    gflop = (alone.get("filter") or {}).get("gflop")
    lines = [
        f"{HEADING} ({date}, {state['device_name']}, {cores} cores)",
        "",
        f"`bench/vae_filter.py{' --quick' if args.quick else ''}`: {info['images']:,} photo-like JPEGs "
        f"({info['unique']:,} unique, repeated), sides 256–512 px, mean {info['mean_kb']:.1f} KB, in "
        f"{info['shards']} img2dataset-style tars of {info['shard_size']:,} (bench/shards_e2e.py's). VAE: "
        f"{state['vae_label']}, random weights"
        + (f", {gflop:.3g} GFLOP per {SIZE}-px image (flop counter)" if gflop else "")
        + f". {cpu_name()}, {cores} cores; torch {torch.__version__}, diffusers {_version('diffusers')}, "
        f"dask {_version('dask')}. Whole run {(time.perf_counter() - state['t0']) / 60:.1f} min.",
        "",
        f"- **curate run**: `curate run CONFIG --progress-every 2` in a subprocess, as a user runs it: "
        f"`input.format: webdataset` over the tars, clip disabled, `resize: {{size: {SIZE}, mode: center_crop}}`, "
        f"`filters: [{{name: vae_latents, vae: FOLDER, resolution: {SIZE}}}]` (device "
        f"{'cpu' if args.quick else 'auto'}, batch_size {state['filter_batch']}; the write stage judges "
        f"{state['write_batch']} samples at a time): without the filter (the rest of the run "
        "alone), with the filter's defaults, with `compile: true`, and compiled again (torch's compile caches then "
        "warm, as for a user's next run)"
        + "".join(f", `--set {o}`" for o in args.set) + ", fresh output folder. **images/s = images written / wall s** "
        "of the subprocess (interpreter, Dask cluster, VAE loads included).",
        "- **once warm**: from the done-markers, the images of the write tasks that ended after a quarter of them "
        "had ended, per second from then to the last end: the rate once compiling and start-up are behind.",
        "- **write stage**: from the final shards' done-markers (`shards/NNNNN.done.json`, task seconds and file "
        "time): the window from the first write task's start to the last one's end, images written per second "
        "of it; and the write tasks' seconds (summed / longest).",
        f"- **encoder alone**: the same VAE loaded with curate's `load_vae`, random {SIZE}×{SIZE} pixels, batch "
        f"{args.alone_batch}, curate's `encode` (posterior mean), on {device}, timed with "
        f"{'torch.cuda.synchronize' if gpu else 'the wall clock'} after warm-up calls (compilation included in "
        "them). fp32 weights and pixels, NCHW, eager, torch's default TF32 settings "
        f"(cuDNN {torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32}): how the filter "
        "ran before it had `precision` (and what `precision: fp32` gives); then bf16 + channels_last eager (the "
        "filter's default on a GPU), and with the encoder torch.compile'd (`compile: true`).",
        "",
        "| measurement | images/s | how | best curate run / this | TFLOP/s |",
        "|---|---:|---|---:|---:|",
    ]

    def tflops(rate):
        return f"{rate * gflop / 1e3:.3g}" if gflop and rate else "—"

    best = _best_run(state)
    for name, (label, compile) in RUNS.items():
        run_tflops = tflops if compile is not None else (lambda rate: "—")  # no VAE without the filter
        c = state["runs"].get(name)
        part = c or state.get(f"{name}_partial") or {}
        if c:
            lines.append(f"| curate run, {label}, end to end | **{fmt_rate(c['rate'])}** | {c['written']:,} written "
                         f"of {c['images']:,} read in {c['wall']:.1f} s wall (stats.json "
                         f"{c['stats'].get('duration_seconds', '—')} s) | — | {run_tflops(c['rate'])} |")
        elif f"{name}_error" in state:
            wall = f" after {part['wall']:.1f} s" if part.get("wall") else ""
            lines.append(f"| curate run, {label}, end to end | failed{wall} | {_cell(state[name + '_error'], 300)} "
                         "| — | — |")
        if part.get("write_rate"):
            window = part["write_last_end"] - part["write_first_start"]
            lines.append(
                f"| curate run, {label}, write stage | {fmt_rate(part['write_rate'])} | {part['write_written']:,} "
                f"images over {window:.1f} s from {part['write_first_start']:.1f} s to "
                f"{part['write_last_end']:.1f} s; {part['write_tasks']} write tasks, {part['write_task_s']:.1f} "
                f"task-s summed (longest {part['write_task_max_s']:.1f} s), read tasks {part['read_task_s']:.1f} "
                "task-s | " + (f"{c['rate'] / part['write_rate']:.2f}×" if c else "—")
                + f" | {run_tflops(part['write_rate'])} |")
        if part.get("steady_rate"):
            lines.append(
                f"| curate run, {label}, once warm | {fmt_rate(part['steady_rate'])} | {part['steady_images']:,} images "
                f"of the write tasks that ended from {part['steady_since']:.1f} s (a quarter of the tasks had ended) "
                f"to {part['write_last_end']:.1f} s | — | {run_tflops(part['steady_rate'])} |")
    for variant, label in VARIANTS.items():
        a = alone.get(variant)
        if a:
            how = (f"batch {a['batch']}, {a['dtype']}{', channels_last' if a['channels_last'] else ''}, "
                   f"{a['calls']} calls in {a['seconds']:.1f} s (warm-up {a['warm_s']:.1f} s)"
                   + (f", peak {a['peak'] / 2**30:.1f} GiB" if a.get("peak") else ""))
            share = f"{best['rate'] / a['rate']:.2f}×" if best else "—"
            lines.append(f"| {label} | {fmt_rate(a['rate'])} | {how} | {share} | {tflops(a['rate'])} |")
        elif f"{variant}_error" in state:
            lines.append(f"| {label} | failed | {_cell(state[variant + '_error'], 200)} | — | — |")
    lines += ["", f"Target (issue 15 item 8): `vae_latents` at {SIZE} px ≥ {TARGET:,} images/s inside curate run: "
              + verdict(state) + ".", ""]
    notes = []
    for name, (label, _) in RUNS.items():
        c = state["runs"].get(name)
        part = c or state.get(f"{name}_partial") or {}
        said = []
        if part.get("check"):
            said.append(f"output checked: {part['check']}")
        if "gpu_pids" in part:
            said.append(f"the run's processes on the GPU (nvidia-smi, {part['gpu_polls']} polls): {part['gpu_pids']}, "
                        "peak per process " + (", ".join(_mib(m) for _, m in sorted(part["gpu_peak_by_pid"].items()))
                                               or "—")
                        + f"; all processes at once {_mib(part['gpu_peak_total'])}"
                        + (f"; other pids {part['gpu_pids_other']}" if part.get("gpu_pids_other") else "")
                        + (f"; nvidia-smi: {part['gpu_poll_error']}" if part.get("gpu_poll_error") else ""))
        if c and c["stats"].get("task_seconds_by_stage"):
            said.append(f"stats.json task seconds by stage {c['stats']['task_seconds_by_stage']}")
        if part.get("write_window_error"):
            said.append(f"done-markers: {part['write_window_error']}")
        if part.get("log"):
            said.append(f"log: `{part['log']}`")
        if said:
            notes.append(f"{label}: " + "; ".join(said))
    if (alone.get("filter") or {}).get("gflop_error"):
        notes.append(f"flop count failed: {alone['filter']['gflop_error']}")
    if notes:
        lines += ["Details:", "", *[f"- {note}." for note in notes], ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="images in the tars (default 120000; quick 200)")
    parser.add_argument("--shard-size", type=int, default=None, help="samples per tar (default 1000, so that the rate once warm has many tasks to go by; quick 20)")
    parser.add_argument("--unique", type=int, default=None, help="distinct JPEGs, repeated (default 2000; quick 100)")
    parser.add_argument("--vae", default=None,
                        help="the filter's vae: a folder, hub id or 'tiny' (default: SD 1.5's shape, random "
                             "weights, made in bench-work/vae-filter/sd15-vae; quick: QUICK_VAE, likewise)")
    parser.add_argument("--alone-batch", type=int, default=None, help="encoder-alone batch (default: the filter's, 32)")
    parser.add_argument("--alone-seconds", type=float, default=None, help="timed seconds per encoder variant (default 5; quick 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="passed on to curate run (e.g. dask.n_workers=4); repeatable; named in the table")
    parser.add_argument("--skip-curate", action="store_true")
    parser.add_argument("--skip-curate-compiled", action="store_true", help="only the curate run with the defaults")
    parser.add_argument("--skip-curate-eager", action="store_true", help="only the compiled curate runs")
    parser.add_argument("--skip-no-filter", action="store_true", help="not the run without the filter")
    parser.add_argument("--once", action="store_true", help="the compiled curate run once (not again with warm caches)")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--run-timeout", type=float, default=None,
                        help="seconds before the curate run is stopped and marked failed (default 420; quick 240)")
    parser.add_argument("--quick", action="store_true", help="CPU dry run: a narrow VAE, 200 images in 10 tars")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    args.images = args.images or (200 if args.quick else 120_000)
    args.shard_size = args.shard_size or (20 if args.quick else 1_000)
    args.unique = min(args.unique or (100 if args.quick else 2_000), args.images)
    args.alone_seconds = args.alone_seconds or (1.0 if args.quick else 5.0)
    args.run_timeout = args.run_timeout or (240 if args.quick else 420)
    t0 = time.perf_counter()
    log(f"vae_filter: {args.images:,} images in tars of {args.shard_size:,}; {SIZE} px; {cores} cores")

    # Data first, before torch is imported here (the generator's pools fork).
    tars_dir, info = make_shards(args.images, args.shard_size, args.unique, cores)

    import torch

    from curate.filters.latents import VaeLatents
    from curate.pipeline.models.vae import TINY
    from curate.pipeline.stages.write import FILTER_BATCH

    filter_batch = VaeLatents.model_fields["batch_size"].default
    args.alone_batch = args.alone_batch or filter_batch
    gpu = torch.cuda.is_available() and not args.quick
    device = "cuda" if gpu else "cpu"
    device_name = torch.cuda.get_device_name() if gpu else f"CPU only: {cpu_name()}"
    if args.vae:
        vae, vae_label = args.vae, (f"curate's built-in `{TINY}`" if args.vae == TINY else f"`{args.vae}`")
    elif args.quick:
        vae, vae_label = (str(make_vae_folder("quick-vae", QUICK_VAE)),
                          "QUICK_VAE (SD 1.5's VAE layout, 8–16 channels, 0.1M parameters) in a folder")
    else:
        vae, vae_label = str(make_vae_folder("sd15-vae", SD15_VAE)), "SD 1.5's AutoencoderKL shape (84M parameters)"
    log(f"device: {device_name}; torch {torch.__version__}, diffusers {_version('diffusers')}; vae {vae}; "
        f"nvidia-smi {'found' if GpuMemoryPoller.available() else 'not found'}")
    if not gpu and not args.quick:
        log("warning: no GPU; the default sizes are meant for a GPU (use --quick on a CPU)")

    state = {"info": info, "gpu": gpu, "device": device, "device_name": device_name, "vae_label": vae_label,
             "filter_batch": filter_batch, "write_batch": FILTER_BATCH, "t0": t0, "alone": {}, "runs": {}}
    table_path = WORK / "table.md"

    def publish(what: str) -> None:
        """After every measurement, so that a run cut off by a time limit keeps what it measured."""
        table = render(state, args)
        table_path.write_text(table)
        if not args.quick and not args.no_write:
            update_section(REPO / "BENCHMARKS.md", HEADING, table)
            log(f"BENCHMARKS.md updated ({what})")

    steps = []
    for name, (_, compile) in RUNS.items():
        if (args.skip_curate or (compile and (args.skip_curate_compiled or args.skip_compile))
                or (compile is False and args.skip_curate_eager) or (compile is None and args.skip_no_filter)
                or (name == "curate_compiled_again" and args.once)):
            continue
        steps.append((name, lambda c=compile: run_curate(
            tars_dir, vae, args.quick, args.run_timeout, gpu and GpuMemoryPoller.available(), args.set, c)))
    for variant in VARIANTS:
        if variant == "compiled" and args.skip_compile:
            continue
        steps.append((variant, lambda v=variant: run_alone(vae, device, v, args.alone_batch, args.alone_seconds)))
    for name, fn in steps:
        log(f"== {name}: starting")
        try:
            result = fn()
        except Exception as exc:
            if isinstance(exc, CurateRunFailed):
                state[f"{name}_partial"] = exc.result
                state[f"{name}_error"] = str(exc)[:400]
            else:
                _print_traceback()
                state[f"{name}_error"] = _short_error(exc)
            log(f"== {name}: FAILED {state.get(f'{name}_error')}")
            publish(f"{name} failed")
            continue
        if name in RUNS:
            state["runs"][name] = r = result
            window = (f"write window {r['write_last_end'] - r['write_first_start']:.1f} s = "
                      f"{fmt_rate(r['write_rate'])} images/s" if r.get("write_rate") else "write window unknown")
            if r.get("steady_rate"):
                window += f"; once warm {fmt_rate(r['steady_rate'])} images/s"
            log(f"== {name}: {r['written']:,} of {r['images']:,} images written in {r['wall']:.1f} s wall = "
                f"{fmt_rate(r['rate'])} images/s end to end; {window}; {r.get('write_tasks')} write tasks, "
                f"{r.get('write_task_s', 0):.1f} task-s; {r['check']}")
        else:
            state["alone"][name] = a = result
            log(f"== {name}: {fmt_rate(a['rate'])} images/s ({a['calls']} calls of {a['batch']} in {a['seconds']:.1f} s, "
                f"warm-up {a['warm_s']:.1f} s, latents {a['latent_shape']}"
                + (f", {a['gflop']:.3g} GFLOP/image" if a.get("gflop") else "") + ")")
        publish(name)

    log("target: " + verdict(state).replace("**", ""))
    log("table:\n" + render(state, args))
    log("done" + (" (BENCHMARKS.md not written)" if args.quick or args.no_write else ""))


if __name__ == "__main__":
    main()
