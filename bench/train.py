"""Training throughput: curate's loop against a diffusers train_text_to_image-style loop, same run.

Model: Stable Diffusion 1.5's shapes with random weights (speed does not depend on them):
UNet2DConditionModel (860M), AutoencoderKL (84M), CLIP ViT-L/14 text encoder (123M), written
once as a diffusers folder into bench-work/train/ and loaded from there by both loops.

Data: photo-like JPEGs (pipeline.synthetic), square at each training size as a
`resize: center_crop` curate run writes them, with synthetic captions, in real tar shards
made once into bench-work/train/; a second copy of the shards carries VAE latents made by
curate's own `vae_latents` filter (the latent cache of `curate run`).

For each size (256 px batch 64, 512 px batch 32 by default):

- baseline: the core of diffusers' examples/text_to_image/train_text_to_image.py without
  accelerate: `webdataset.WebDataset(shards, resampled=True).shuffle(1000).decode("pil")`,
  its torchvision transforms (Resize bilinear, CenterCrop, ToTensor, Normalize) and
  tokenizer in DataLoader workers; VAE and text encoder in bf16 (`weight_dtype`), UNet fp32
  under bf16 autocast (accelerate's mixed_precision="bf16"), online VAE encode
  (`latent_dist.sample()`), torch.optim.AdamW (not fused), grad-norm clipping, `loss.item()`
  every step as the script logs it.
- curate: `train.loop.train` itself on the latent-cached shards (data.latents: required),
  fused AdamW, channels_last, bf16 autocast over fp32 master weights; `--compile` adds a
  torch.compile variant, `--online` a variant encoding with the VAE on the fly.

Each variant: `--warmup` untimed steps (data loader start, cuDNN autotuning, compilation),
then `--steps` timed steps; images/s = timed images / timed seconds. Peak GPU memory is
torch.cuda.max_memory_allocated over the variant.

    python bench/train.py                      # GPU; writes the "## Training" section of BENCHMARKS.md
    python bench/train.py --compile --online   # more variants
    python bench/train.py --quick              # CPU smoke test of the whole script, tiny model, < 1 minute

--quick uses curate's tiny model at 32 px, a few steps, and never writes BENCHMARKS.md.

One size's rows always come from one invocation (its baseline measured beside it). Results are
kept per device in bench-work/train/results-DEVICE.json, so sizes run by separate invocations
(e.g. `--sizes 256:64 --compile`, then `--sizes 512:32 --compile`, to stay within a time limit)
end up in one table; `--fresh` forgets earlier ones.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.download import cpu_name, update_benchmarks  # noqa: E402
from curate.pipeline.shards import sample_key, shard_name  # noqa: E402
from curate.pipeline.demo.synthetic import caption, photo_like_jpeg, random_scene  # noqa: E402
from curate.pipeline.tarshard import TarShardWriter, iter_tar_samples  # noqa: E402

WORK = REPO / "bench-work" / "train"
HEADING = "## Training"

# Stable Diffusion 1.5's published configs (unet/, vae/, text_encoder/ config.json), as data.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, center_input_sample=False,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", norm_num_groups=32, sample_size=512,
    scaling_factor=0.18215,
)
CLIP_L_TEXT = dict(
    vocab_size=49408, max_position_embeddings=77, hidden_size=768, intermediate_size=3072,
    num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
# Targets for curate from the issue: 1.5x the online-VAE baseline measured on an H200.
TARGETS = {256: 370, 512: 95}


def log(*args) -> None:
    print(*args, flush=True)


# ---------------------------------------------------------------- data


def _sample(args: tuple[int, int]) -> tuple[bytes, str]:
    index, size = args
    rng = random.Random(1_000_003 * index + size)
    return photo_like_jpeg(size, size, rng, quality=90), caption(random_scene(rng))


def make_shards(size: int, n_images: int, shard_size: int, processes: int) -> Path:
    """Square JPEG + caption shards at `size`, as a center_crop curate run writes; made once."""
    folder = WORK / f"shards-{size}px-{n_images}"
    if (folder / "complete.json").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    with multiprocessing.Pool(processes) as pool:
        samples = pool.map(_sample, [(i, size) for i in range(n_images)], chunksize=16)
    for shard in range(-(-n_images // shard_size)):
        with TarShardWriter(folder / f"{shard_name(shard)}.tar") as tar:
            for i in range(shard * shard_size, min(n_images, (shard + 1) * shard_size)):
                jpg, text = samples[i]
                key = sample_key(shard, i - shard * shard_size)
                meta = {"key": key, "caption": text, "width": size, "height": size}
                tar.write(key, {"jpg": jpg, "txt": text.encode(), "json": json.dumps(meta).encode()})
    mean_kb = sum(len(s[0]) for s in samples) / len(samples) / 1024
    (folder / "complete.json").write_text(json.dumps({"images": n_images, "mean_kb": mean_kb}))
    log(f"data: {n_images} images at {size} px (mean {mean_kb:.1f} KB) in {time.perf_counter() - started:.1f} s")
    return folder


def make_latent_shards(plain: Path, model_dir: Path, size: int, device: str) -> Path:
    """The same samples with `latent.npy` added by curate's vae_latents filter (the latent cache)."""
    from curate.filters import latents as latent_filter
    from curate.pipeline.models.cache import forget
    from curate.pipeline.models.vae import load_vae, vae_fingerprint

    fingerprint = vae_fingerprint(load_vae(str(model_dir)))
    folder = plain.with_name(plain.name + f"-latents-{fingerprint}")
    if (folder / "complete.json").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    cache = latent_filter.VaeLatents(vae=str(model_dir), resolution=size, device=device)
    cache.setup({})
    n = 0
    for tar_path in sorted(plain.glob("*.tar")):
        with TarShardWriter(folder / tar_path.name) as tar:
            for key, fields in iter_tar_samples(tar_path):
                meta = json.loads(fields["json"])
                sample = {"key": key, "jpg": fields["jpg"], "caption": fields["txt"].decode(), "meta": meta, "extra": {}}
                assert cache(sample) is None
                tar.write(key, {**fields, "json": json.dumps(sample["meta"]).encode(), **sample["extra"]})
                n += 1
    forget("vae")
    (folder / "complete.json").write_text(json.dumps({"images": n}))
    log(f"data: latents of {n} images at {size} px cached by the vae_latents filter in "
        f"{time.perf_counter() - started:.1f} s")
    return folder


# ---------------------------------------------------------------- model


def make_model(quick: bool, device: str) -> Path:
    """A diffusers Stable Diffusion folder with random weights: SD 1.5's shapes, or curate's tiny model."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from curate.train.model import SD_SCHEDULE, Components, save_pipeline, tiny_components
    from curate.train.tokenizer import clip_tokenizer

    folder = WORK / ("model-tiny" if quick else "model-sd15-random")
    if (folder / "model_index.json").exists():
        return folder
    started = time.perf_counter()
    if quick:
        unet, vae, text_encoder, tokenizer, scheduler = tiny_components(0)
    else:
        torch.manual_seed(0)
        with torch.device(device):  # initialising 1B parameters is much faster on the GPU
            unet = UNet2DConditionModel(**SD15_UNET)
            vae = AutoencoderKL(**SD15_VAE)
            text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        tokenizer, scheduler = clip_tokenizer(), DDPMScheduler(**SD_SCHEDULE)
    parts = Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       noise_scheduler=scheduler, vae_name="", vae_fingerprint="")
    save_pipeline(parts, unet, folder)
    n = sum(p.numel() for p in unet.parameters())
    log(f"model: {folder.relative_to(REPO)} written in {time.perf_counter() - started:.1f} s (UNet {n / 1e6:.0f}M parameters)")
    return folder


def free_memory() -> None:
    import torch

    torch._dynamo.reset()  # a compiled variant's caches hold on to its model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


# ---------------------------------------------------------------- the two loops


class _BaselinePreprocess:
    """train_text_to_image.py's preprocess_train + tokenize_captions, per sample, in the workers."""

    def __init__(self, size: int, tokenizer):
        from torchvision import transforms

        self.transform = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
        self.tokenizer = tokenizer

    def __call__(self, sample):
        ids = self.tokenizer(sample["txt"], max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids[0]
        return self.transform(sample["jpg"].convert("RGB")), ids


def run_baseline(model_dir: Path, shards: Path, size: int, batch: int, warmup: int, steps: int,
                 workers: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F
    import webdataset as wds
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    cuda = device == "cuda"
    weight_dtype = torch.bfloat16  # on a CPU too (--quick): the smoke test runs the GPU's code path
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=warmup + steps)
    unet.to(device)
    text_encoder.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    autocast = torch.autocast(device, dtype=torch.bfloat16)

    urls = [str(p) for p in sorted(shards.glob("*.tar"))]
    dataset = (wds.WebDataset(urls, resampled=True, shardshuffle=False, handler=wds.warn_and_continue)
               .shuffle(1000).decode("pil").map(_BaselinePreprocess(size, tokenizer)).batched(batch))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=cuda,
                                         **({"prefetch_factor": 4} if workers else {}))
    batches = iter(loader)
    started = None
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        pixel_values, input_ids = next(batches)
        pixel_values, input_ids = pixel_values.to(device, non_blocking=True), input_ids.to(device, non_blocking=True)
        latents = vae.encode(pixel_values.to(weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
        with autocast:
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.item()  # the script gathers and logs the loss every step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    del batches, loader
    return {"images_per_second": steps * batch / seconds, "peak_gib": peak_gib()}


def run_curate(model_dir: Path, shards: Path, size: int, batch: int, warmup: int, steps: int, workers: int,
               cached: bool, compile_unet: bool, device: str, channels_last: bool = True) -> dict:
    from curate.train.config import TrainConfig
    from curate.train.loop import read_log, train

    out = WORK / "out"
    cfg = TrainConfig.model_validate({
        "data": {"shards": [str(shards)], "resolution": size, "workers": workers,
                 "latents": "required" if cached else "off"},
        "model": {"pretrained": str(model_dir)},
        # Timed steps in whole log windows; the first window (warm-up) is left out.
        # bf16, fused AdamW and channels_last on a CPU too (--quick): the GPU's code path.
        "training": {"steps": warmup + steps, "batch_size": batch, "lr": 1e-4, "log_every": warmup,
                     "precision": "bf16", "fused_adam": "on", "channels_last": channels_last, "compile": compile_unet,
                     "device": device},
        "output": {"path": str(out)},
    })
    train(cfg, overwrite=True, progress=False, save=False)
    entries = read_log(out / "log.jsonl")
    timed = [e for e in entries if e["step"] > warmup]
    # Each window's rate is (images in window / its seconds): recombine as total images / total seconds.
    seconds = sum(warmup * batch / e["images_per_second"] for e in timed)
    return {"images_per_second": len(timed) * warmup * batch / seconds, "peak_gib": peak_gib()}


# ---------------------------------------------------------------- report


def fmt(x, spec=",.1f", none="—"):
    return none if x is None else format(x, spec)


def report(rows: list[dict], meta: dict) -> str:
    lines = [f"{HEADING} ({meta['date']}, {meta['device']})", "",
             f"`bench/train.py`: {meta['model']}; {meta['data']}. torch {meta['torch']}, diffusers "
             f"{meta['diffusers']}, transformers {meta['transformers']}; {meta['cores']} cores, "
             f"{meta['workers']} DataLoader workers per loop; {meta['warmup']} warm-up + {meta['steps']} timed steps "
             f"per variant. Whole run {meta['minutes']:.1f} min.", "",
             "- **baseline**: diffusers train_text_to_image.py's loop (no accelerate): WebDataset + torchvision "
             "transforms + tokenizer in workers, VAE/text encoder bf16, UNet fp32 under bf16 autocast, online "
             "VAE encode, torch.optim.AdamW (foreach, not fused), `loss.item()` each step.",
             "- **curate**: `train.loop.train` on the latent-cached shards (`vae_latents` filter), fused AdamW, "
             "channels_last, bf16 autocast over fp32 master weights, SDPA; *online*: encoding with the VAE "
             "instead; *NCHW*: without channels_last; *compiled*: plus torch.compile of the UNet.", "",
             "| size | batch | loop | images/s | vs baseline | target | peak GPU memory |",
             "|---|---:|---|---:|---:|---|---:|"]
    for r in rows:
        base = next((b for b in rows if b["size"] == r["size"] and b["loop"] == "baseline"), None)
        rate = r.get("images_per_second")
        ratio = f"{rate / base['images_per_second']:.2f}×" if rate and base and base.get("images_per_second") else "—"
        target = ""
        if r["loop"] != "baseline" and r["size"] in TARGETS:
            goal = TARGETS[r["size"]]
            target = f"≥ {goal}: " + ("ok" if rate and rate >= goal else "MISSED")
        shown = fmt(rate) if rate is not None else r.get("error", "—")
        memory = f"{r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else "—"
        lines.append(f"| {r['size']} px | {r['batch']} | {r['loop']} | {shown} | {ratio} | {target} | {memory} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: tiny model, 32 px, a few steps")
    parser.add_argument("--sizes", default=None, help="SIZE:BATCH,... (default 256:64,512:32)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (a multiple of --warmup)")
    parser.add_argument("--images", type=int, default=None, help="distinct images per size")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile variant of curate's loop")
    parser.add_argument("--online", action="store_true", help="add curate's loop encoding with the VAE on the fly")
    parser.add_argument("--nchw", action="store_true", help="add curate's loop without channels_last")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--fresh", action="store_true", help="forget the results of earlier invocations")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    sizes = [tuple(int(v) for v in item.split(":")) for item in (args.sizes or ("32:4" if args.quick else "256:64,512:32")).split(",")]
    warmup = args.warmup or (2 if args.quick else 10)
    steps = args.steps or (2 if args.quick else 30)
    steps = max(warmup, steps // warmup * warmup)
    images = args.images or (64 if args.quick else 1024)
    workers = args.workers if args.workers is not None else (2 if args.quick else min(8, cores))
    started = time.perf_counter()

    plain = {size: make_shards(size, images, max(16, images // 8), cores) for size, _ in sizes}  # before torch (fork)

    import diffusers
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.quick:
        torch.set_num_threads(min(2, cores))
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU only: {cpu_name()}"
    log(f"device: {device_name}; torch {torch.__version__}, diffusers {diffusers.__version__}")
    if device == "cpu" and not args.quick:
        log("warning: no GPU; the default sizes are meant for a GPU (use --quick on a CPU)")
    model_dir = make_model(args.quick, device)
    cached = {size: make_latent_shards(plain[size], model_dir, size, device) for size, _ in sizes}
    free_memory()

    variants = [("baseline", None), ("curate", dict(cached=True, compile_unet=False))]
    if args.online:
        variants.append(("curate, online VAE", dict(cached=False, compile_unet=False)))
    if args.nchw:
        variants.append(("curate, NCHW", dict(cached=True, compile_unet=False, channels_last=False)))
    if args.compile:
        variants.append(("curate, compiled", dict(cached=True, compile_unet=True)))
    rows = []
    for size, batch in sizes:
        for name, options in variants:
            free_memory()
            row = {"size": size, "batch": batch, "loop": name}
            t0 = time.perf_counter()
            try:
                if options is None:
                    row.update(run_baseline(model_dir, plain[size], size, batch, warmup, steps, workers, device))
                else:
                    shards = cached[size] if options["cached"] else plain[size]
                    row.update(run_curate(model_dir, shards, size, batch, warmup, steps, workers, device=device, **options))
            except torch.cuda.OutOfMemoryError:
                row.update(error="out of memory", peak_gib=peak_gib())
            except Exception as exc:  # one failing variant must not lose the others' numbers
                traceback.print_exc()
                row.update(error=f"failed: {type(exc).__name__}")
            rows.append(row)
            log(f"{size} px, batch {batch}, {name}: {fmt(row.get('images_per_second'), none=row.get('error'))} images/s, "
                f"peak {fmt(row.get('peak_gib'), '.1f')} GiB ({time.perf_counter() - t0:.0f} s)")

    unet_params = "tiny UNet (curate's test model)" if args.quick else "SD-1.5-shaped UNet (860M), VAE and CLIP ViT-L text encoder, random weights"
    meta = {
        "date": datetime.date.today().isoformat(), "device": device_name, "model": unet_params,
        "data": f"{images} photo-like JPEGs per size in tar shards (+ a latent-cached copy)",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "cores": cores, "workers": workers, "warmup": warmup, "steps": steps,
        "minutes": (time.perf_counter() - started) / 60,
    }
    if not args.quick:  # merge with earlier invocations' other sizes (same device)
        results = WORK / f"results-{''.join(c if c.isalnum() else '-' for c in device_name)}.json"
        stored = {} if args.fresh or not results.exists() else json.loads(results.read_text())
        for size, _ in sizes:
            stored[str(size)] = [r for r in rows if r["size"] == size]
        results.write_text(json.dumps(stored, indent=1))
        rows = [r for key in sorted(stored, key=int) for r in stored[key]]
    table = report(rows, meta)
    log("\n" + table)
    if args.quick or args.no_write or device != "cuda":
        log("(BENCHMARKS.md not written: --quick, --no-write or no GPU)")
    else:
        update_benchmarks(HEADING, table)
        log("BENCHMARKS.md updated")


if __name__ == "__main__":
    main()
