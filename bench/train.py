"""Training throughput: curate's loop against diffusers' example training loops, same run.

Three kinds of rows, each beside its baseline measured in the same invocation:

- **full** fine-tuning of Stable Diffusion 1.5 (`--sizes`, default 256 px batch 64 and 512 px
  batch 32) against the core of diffusers' examples/text_to_image/train_text_to_image.py;
- **LoRA** on Stable Diffusion 1.5 (`--lora-sizes`, e.g. 512:32; rank `--rank`, 64) against
  train_text_to_image_lora.py;
- **SDXL** (`--sdxl-sizes`, e.g. 1024:4), full fine-tuning against train_text_to_image_sdxl.py
  and LoRA against train_text_to_image_lora_sdxl.py (`--sdxl-methods`: auto = full fine-tuning,
  and LoRA if that runs out of memory; or full, lora, full,lora).

Models: the published shapes with random weights (speed does not depend on them), written
once as diffusers folders into bench-work/train/ and loaded from there by every loop.
SD 1.5: UNet2DConditionModel (860M), AutoencoderKL (84M), CLIP ViT-L/14 text encoder (123M).
SDXL: UNet (2.6B), the same VAE shape, CLIP ViT-L/14 + OpenCLIP bigG/14 text encoders (818M).

Data: photo-like JPEGs (pipeline.synthetic), square at each training size as a
`resize: center_crop` curate run writes them, with synthetic captions, in real tar shards
made once into bench-work/train/; a second copy of the shards carries VAE latents made by
curate's own `vae_latents` filter (the latent cache of `curate run`).

Baselines (what diffusers' scripts do per step, without accelerate):
- SD 1.5 full: `webdataset.WebDataset(shards, resampled=True).shuffle(1000).decode("pil")`, the
  script's torchvision transforms (Resize bilinear, CenterCrop, ToTensor, Normalize) and tokenizer
  in DataLoader workers; VAE and text encoder in bf16 (`weight_dtype`), UNet fp32 under bf16
  autocast (accelerate's mixed_precision="bf16"), online VAE encode (`latent_dist.sample()`),
  torch.optim.AdamW (foreach, not fused), grad-norm clipping, `loss.item()` every step.
- SD 1.5 LoRA: the same data and step; the UNet frozen in bf16, peft LoRA (gaussian init,
  to_k/to_q/to_v/to_out.0, alpha = rank) added after the cast, so its weights are bf16 too, AdamW
  over the adapter only.
- SDXL full: the script's precomputation (datasets.map: both text encoders' prompt embeddings and
  VAE latents of every image, before training, untimed; the text encoders then deleted), then per
  step: the precomputed batch to the GPU, add_time_ids from original size / crop / target, UNet
  fp32 under bf16 autocast, AdamW, clipping, `loss.item()`.
- SDXL LoRA: online as that script: VAE encode (bf16 here; the script keeps the stock SDXL VAE
  in fp32 unless given the fp16-fix VAE, which would only slow the baseline) and both text
  encoders every step, UNet bf16 + bf16 LoRA, AdamW over the adapter.

curate: `train.loop.train` itself on the latent-cached shards (data.latents: required), fused
AdamW, channels_last, bf16 autocast over fp32 master weights (LoRA: frozen bf16 UNet, fp32
adapters), SDPA; `--compile` adds a torch.compile variant to the SD 1.5 rows, `--compile-sdxl` to
the SDXL rows; `--online` a variant encoding with the VAE on the fly; `--nchw` one without
channels_last.

Each variant: `--warmup` untimed steps (data loader start, cuDNN autotuning, compilation),
then `--steps` timed steps; images/s = timed images / timed seconds. Peak GPU memory is
torch.cuda.max_memory_allocated over the variant. MFU (model FLOPs utilisation) = images/s x
the UNet's forward + backward FLOPs per image (counted with torch.utils.flop_counter on the
meta device: with LoRA, the backward pass has no weight gradients of the frozen layers) / 790
TFLOP/s, the H200's measured bf16 matrix rate. VAE and text encoder work is not counted.

    python bench/train.py                          # GPU: full fine-tuning rows ("## Training" in BENCHMARKS.md)
    python bench/train.py --sizes 512:32 --compile # GPU: the 512 px full fine-tuning rows, compiled too
    python bench/train.py --sizes none --lora-sizes 512:32 --sdxl-sizes 1024:4 --compile
                                                   # GPU: LoRA and SDXL rows ("## Training: LoRA and SDXL"), ~7 min
    python bench/train.py --quick                  # CPU smoke test of every kind of row, tiny models, ~2-3 minutes

Tables are rewritten after every row, and torch.compile variants run last, so a run cut short by a
time limit (`timeout 500 python bench/train.py ...`) keeps what it measured.

--quick uses curate's tiny models (tiny, tiny-sdxl) at 32 px, a few steps, and never writes
BENCHMARKS.md.

One size's rows always come from one invocation (its baseline measured beside it). Results are
kept per device in bench-work/train/results-DEVICE.json, so rows run by separate invocations
(to stay within a time limit) end up in one table; `--fresh` forgets earlier ones.
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
HEADING = "## Training"  # full fine-tuning rows
LORA_SDXL_HEADING = "## Training: LoRA and SDXL"
PEAK_FLOPS = 790e12  # H200, bf16 dense matrix products, measured (see the device notes)
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' LoRA examples

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
# stabilityai/stable-diffusion-xl-base-1.0's unet/, vae/ and text_encoder_2/ configs.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0,
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
OPENCLIP_BIGG_TEXT = dict(
    vocab_size=49408, max_position_embeddings=77, hidden_size=1280, intermediate_size=5120,
    num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
)
# Targets from the issues: full fine-tuning 1.5x the online-VAE baseline measured on an H200
# (images/s by size); LoRA 1.5x its baseline's images/s at no more than its peak memory.
TARGETS = {256: 370, 512: 95}
MFU_TARGETS = {512: 0.50}  # full fine-tuning, toward the hardware's limit (issue 18)
LORA_SPEEDUP = 1.5


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
        samples = pool.map(_sample, [(i, size) for i in range(n_images)], chunksize=4)
    for shard in range(-(-n_images // shard_size)):
        with TarShardWriter(folder / f"{shard_name(shard)}.tar") as tar:
            for i in range(shard * shard_size, min(n_images, (shard + 1) * shard_size)):
                jpg, text = samples[i]
                key = sample_key(shard, i - shard * shard_size, shard_size)
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


# ---------------------------------------------------------------- models


def make_model(kind: str, quick: bool, device: str) -> Path:
    """A diffusers folder with random weights: SD 1.5's or SDXL's shapes, or curate's tiny models."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from curate.train.model import SD_SCHEDULE, Components, load_components, save_pipeline
    from curate.train.tokenizer import SDXL_PAD_TOKEN_2, clip_tokenizer

    folder = WORK / (f"model-tiny-{kind}" if quick else f"model-{kind}-random")
    if (folder / "model_index.json").exists():
        return folder
    started = time.perf_counter()
    if quick:
        parts = load_components("tiny" if kind == "sd15" else "tiny-sdxl")
    else:
        torch.manual_seed(0)
        with torch.device(device):  # initialising billions of parameters is much faster on the GPU
            unet = UNet2DConditionModel(**(SD15_UNET if kind == "sd15" else SDXL_UNET))
            vae = AutoencoderKL(**(SD15_VAE if kind == "sd15" else SDXL_VAE))
            text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
            text_encoder_2 = None if kind == "sd15" else CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG_TEXT))
        if kind == "sdxl":  # half the bytes to write and read (the loops load fp32 master weights from them)
            for model in (unet, vae, text_encoder, text_encoder_2):
                model.to(torch.bfloat16)
        parts = Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                           noise_scheduler=DDPMScheduler(**SD_SCHEDULE), vae_name="", vae_fingerprint="",
                           text_encoder_2=text_encoder_2,
                           tokenizer_2=None if kind == "sd15" else clip_tokenizer(SDXL_PAD_TOKEN_2))
    save_pipeline(parts, parts.unet, folder)
    n = sum(p.numel() for p in parts.unet.parameters())
    log(f"model: {folder.relative_to(REPO)} written in {time.perf_counter() - started:.1f} s (UNet {n / 1e6:.0f}M parameters)")
    return folder


def unet_flops_per_image(model_dir: Path, size: int, lora_rank: int | None) -> float:
    """Forward + backward FLOPs of the UNet for one size² image, counted on the meta device (no
    memory, no compute): what a training step computes per image besides the VAE and text encoders."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.utils.flop_counter import FlopCounterMode

    config = UNet2DConditionModel.load_config(model_dir, subfolder="unet")
    vae_config = AutoencoderKL.load_config(model_dir, subfolder="vae")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet.set_attn_processor(AttnProcessor2_0())
    if lora_rank:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    side = size // 2 ** (len(vae_config["block_out_channels"]) - 1)
    meta = dict(device="meta")
    extra = {}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(1, pooled, **meta), "time_ids": torch.zeros(1, 6, **meta)}}
    with FlopCounterMode(display=False) as counter:
        out = unet(torch.zeros(1, 4, side, side, **meta), torch.tensor([500], **meta),
                   torch.zeros(1, 77, config["cross_attention_dim"], **meta), **extra).sample
        out.float().square().mean().backward()
    return float(counter.get_total_flops())


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


def timed(step, batches, warmup: int, steps: int, batch: int, device: str) -> dict:
    """Run warmup + steps steps of `step(next(batches))`; images/s over the timed ones."""
    import torch

    started = None
    for i in range(warmup + steps):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        step(next(batches))
    if device == "cuda":
        torch.cuda.synchronize()
    return {"images_per_second": steps * batch / (time.perf_counter() - started), "peak_gib": peak_gib()}


# ---------------------------------------------------------------- baselines: diffusers' example loops


class _BaselinePreprocess:
    """The scripts' preprocess_train + tokenize_captions, per sample, in the DataLoader workers:
    (pixels, token ids per tokenizer, original (h, w), crop top-left (y, x))."""

    def __init__(self, size: int, tokenizers: list):
        from torchvision import transforms

        self.resize = transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR)
        self.crop = transforms.CenterCrop(size)
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
        self.size, self.tokenizers = size, tokenizers

    def __call__(self, sample):
        import torch

        image = sample["jpg"].convert("RGB")
        original = (image.height, image.width)
        image = self.resize(image)
        top, left = max(0, round((image.height - self.size) / 2)), max(0, round((image.width - self.size) / 2))
        ids = [tok(sample["txt"], max_length=tok.model_max_length, padding="max_length", truncation=True,
                   return_tensors="pt").input_ids[0] for tok in self.tokenizers]
        return (self.to_tensor(self.crop(image)), *ids, torch.tensor(original), torch.tensor([top, left]))


def baseline_batches(shards: Path, size: int, batch: int, workers: int, tokenizers: list, cuda: bool):
    import torch
    import webdataset as wds

    urls = [str(p) for p in sorted(shards.glob("*.tar"))]
    dataset = (wds.WebDataset(urls, resampled=True, shardshuffle=False, handler=wds.warn_and_continue)
               .shuffle(1000).decode("pil").map(_BaselinePreprocess(size, tokenizers)).batched(batch))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=cuda,
                                         **({"prefetch_factor": 4} if workers else {}))
    return iter(loader)


def add_baseline_lora(unet, rank: int) -> list:
    """As the LoRA scripts: frozen UNet already cast to weight_dtype, then add_adapter (so the
    adapter is in that dtype too); returns the trainable parameters."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    return [p for p in unet.parameters() if p.requires_grad]


def run_baseline(model_dir: Path, shards: Path, size: int, batch: int, warmup: int, steps: int,
                 workers: int, device: str, lora_rank: int | None = None) -> dict:
    """train_text_to_image.py (full) or train_text_to_image_lora.py (lora_rank), SD 1.x."""
    import torch
    import torch.nn.functional as F
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
    if lora_rank:
        unet.requires_grad_(False)
        unet.to(device, dtype=weight_dtype)
        params = add_baseline_lora(unet, lora_rank)
        lr = 1e-4
    else:
        unet.train()
        unet.to(device)
        params, lr = list(unet.parameters()), 1e-5
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=warmup + steps)
    text_encoder.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    autocast = torch.autocast(device, dtype=torch.bfloat16)

    def step(batch_):
        pixel_values, input_ids = batch_[0].to(device, non_blocking=True), batch_[1].to(device, non_blocking=True)
        latents = vae.encode(pixel_values.to(weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
        with autocast:
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.item()  # the scripts gather and log the loss every step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()

    batches = baseline_batches(shards, size, batch, workers, [tokenizer], cuda)
    result = timed(step, batches, warmup, steps, batch, device)
    del batches
    return result


def run_baseline_sdxl(model_dir: Path, shards: Path, size: int, batch: int, warmup: int, steps: int,
                      workers: int, device: str, lora_rank: int | None = None, images: int = 0) -> dict:
    """train_text_to_image_sdxl.py (full: embeddings and latents precomputed) or
    train_text_to_image_lora_sdxl.py (lora_rank: both encoded every step)."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    cuda = device == "cuda"
    weight_dtype = torch.bfloat16
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    tokenizers = [CLIPTokenizer.from_pretrained(model_dir, subfolder=f) for f in ("tokenizer", "tokenizer_2")]
    text_encoders = [CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").to(device, weight_dtype),
                     CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2").to(device, weight_dtype)]
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to(device, weight_dtype)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    for model in (vae, *text_encoders):
        model.requires_grad_(False)

    @torch.no_grad()
    def encode(batch_) -> dict:
        """The scripts' encode_prompt + VAE encode + the batch's add_time_ids."""
        pixels, ids, ids_2, original, crop = batch_
        embeds, pooled = [], None
        for encoder, token_ids in zip(text_encoders, (ids, ids_2)):
            out = encoder(token_ids.to(device), output_hidden_states=True, return_dict=False)
            pooled = out[0]
            embeds.append(out[-1][-2])
        latents = vae.encode(pixels.to(device, weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
        target = torch.tensor([size, size]).expand(len(original), 2)
        time_ids = torch.cat([original, crop, target], dim=1).to(device, weight_dtype)
        return {"latents": latents, "embeds": torch.cat(embeds, dim=-1), "pooled": pooled, "time_ids": time_ids}

    batches = baseline_batches(shards, size, batch, workers, tokenizers, cuda)
    if lora_rank:
        unet.requires_grad_(False)
        unet.to(device, dtype=weight_dtype)
        params, lr = add_baseline_lora(unet, lora_rank), 1e-4
        inputs = (encode(b) for b in batches)
    else:
        # datasets.map(compute_embeddings_fn) and map(compute_vae_encodings_fn) before training:
        # every image once, kept on the CPU; then the text encoders are deleted.
        cache = [{k: v.cpu() for k, v in encode(next(batches)).items()} for _ in range(-(-images // batch))]
        del batches, text_encoders
        free_memory()
        unet.train()
        unet.to(device)
        params, lr = list(unet.parameters()), 1e-6

        def cycle():
            while True:
                for i in torch.randperm(len(cache)).tolist():
                    yield {k: v.to(device, non_blocking=True) for k, v in cache[i].items()}

        inputs = cycle()
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=warmup + steps)
    autocast = torch.autocast(device, dtype=torch.bfloat16)

    def step(x):
        latents = x["latents"].float() if not lora_rank else x["latents"]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            model_pred = unet(noisy, timesteps, x["embeds"], return_dict=False,
                              added_cond_kwargs={"text_embeds": x["pooled"], "time_ids": x["time_ids"]})[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()

    result = timed(step, inputs, warmup, steps, batch, device)
    del inputs
    return result


# ---------------------------------------------------------------- curate


def run_curate(model_dir: Path, shards: Path, size: int, batch: int, warmup: int, steps: int, workers: int,
               cached: bool, compile_unet: bool, device: str, channels_last: bool = True,
               lora_rank: int | None = None, lr: float = 1e-4) -> dict:
    from curate.train.config import TrainConfig
    from curate.train.logs import read_log
    from curate.train.loop import train

    out = WORK / "out"
    cfg = TrainConfig.model_validate({
        "data": {"shards": [str(shards)], "resolution": size, "workers": workers,
                 "latents": "required" if cached else "off"},
        "model": {"pretrained": str(model_dir),
                  **({"lora": {"rank": lora_rank, "alpha": lora_rank, "target_modules": LORA_TARGETS}} if lora_rank else {})},
        # Timed steps in whole log windows; the first window (warm-up) is left out.
        # bf16, fused AdamW and channels_last on a CPU too (--quick): the GPU's code path.
        "training": {"steps": warmup + steps, "batch_size": batch, "lr": lr, "log_every": warmup,
                     "precision": "bf16", "fused_adam": "on", "channels_last": channels_last, "compile": compile_unet,
                     "device": device},
        "output": {"path": str(out)},
    })
    train(cfg, overwrite=True, progress=False, save=False)
    entries = read_log(out / "log.jsonl")
    timed_entries = [e for e in entries if e["step"] > warmup]
    # Each window's rate is (images in window / its seconds): recombine as total images / total seconds.
    seconds = sum(warmup * batch / e["images_per_second"] for e in timed_entries)
    return {"images_per_second": len(timed_entries) * warmup * batch / seconds, "peak_gib": peak_gib()}


# ---------------------------------------------------------------- report


def fmt(x, spec=",.1f", none="—"):
    return none if x is None else format(x, spec)


def row_key(r: dict) -> tuple:
    return (r["group"], r["size"])


def target_of(r: dict, base: dict | None) -> str:
    rate = r.get("images_per_second")
    if r["loop"] == "baseline":
        return ""
    if r["group"] == "full" and r["size"] in TARGETS:
        goal = TARGETS[r["size"]]
        text = f"≥ {goal}: " + ("ok" if rate and rate >= goal else "MISSED")
        if r["size"] in MFU_TARGETS and r.get("flops_per_image"):
            mfu = (rate or 0) * r["flops_per_image"] / PEAK_FLOPS
            text += f"; MFU ≥ {MFU_TARGETS[r['size']]:.0%}: " + ("ok" if mfu >= MFU_TARGETS[r["size"]] else "MISSED")
        return text
    if r["group"] == "lora" and base and base.get("images_per_second"):
        fast = bool(rate) and rate >= LORA_SPEEDUP * base["images_per_second"]
        lean = r.get("peak_gib") is None or base.get("peak_gib") is None or r["peak_gib"] <= base["peak_gib"]
        return f"≥ {LORA_SPEEDUP}× at ≤ its memory: " + ("ok" if fast and lean else "MISSED")
    return ""


def table(rows: list[dict], with_model: bool) -> list[str]:
    head = ["model", "method"] if with_model else []
    lines = ["| " + " | ".join(head + ["size", "batch", "loop", "images/s", "vs baseline", "target",
                                       "peak GPU memory", "TFLOP/image", "MFU"]) + " |",
             "|" + "---|" * len(head) + "---|---:|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        base = next((b for b in rows if row_key(b) == row_key(r) and b["loop"] == "baseline"), None)
        rate = r.get("images_per_second")
        ratio = f"{rate / base['images_per_second']:.2f}×" if rate and base and base.get("images_per_second") else "—"
        shown = fmt(rate) if rate is not None else r.get("error", "—")
        memory = f"{r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else "—"
        flops = r.get("flops_per_image")
        mfu = f"{rate * flops / PEAK_FLOPS:.1%}" if rate and flops else "—"
        model = [r["model"], r["method"]] if with_model else []
        lines.append("| " + " | ".join(model + [f"{r['size']} px", str(r["batch"]), r["loop"], shown, ratio,
                                                 target_of(r, base), memory, fmt(flops and flops / 1e12, ".3g"), mfu]) + " |")
    return lines


def report(heading: str, rows: list[dict], meta: dict) -> str:
    common = (f"{meta['model']}; {meta['data']}. torch {meta['torch']}, diffusers {meta['diffusers']}, "
              f"transformers {meta['transformers']}, peft {meta['peft']}; {meta['cores']} cores, {meta['workers']} "
              f"DataLoader workers per loop; {meta['warmup']} warm-up + {meta['steps']} timed steps per variant. "
              f"Whole run {meta['minutes']:.1f} min.")
    mfu = (f"- **MFU**: images/s × the UNet's forward + backward FLOPs per image (TFLOP/image, counted with "
           f"torch.utils.flop_counter.FlopCounterMode; LoRA's backward has no weight gradients of the frozen "
           f"layers) / {PEAK_FLOPS / 1e12:.0f} TFLOP/s (H200 bf16, measured); VAE and text encoders not counted.")
    if heading == HEADING:
        lines = [f"{heading} ({meta['date']}, {meta['device']})", "", f"`bench/train.py`: {common}", "",
                 "- **baseline**: diffusers train_text_to_image.py's loop (no accelerate): WebDataset + torchvision "
                 "transforms + tokenizer in workers, VAE/text encoder bf16, UNet fp32 under bf16 autocast, online "
                 "VAE encode, torch.optim.AdamW (foreach, not fused), `loss.item()` each step.",
                 "- **curate**: `train.loop.train` on the latent-cached shards (`vae_latents` filter), fused AdamW, "
                 "channels_last, bf16 autocast over fp32 master weights, SDPA; *online*: encoding with the VAE "
                 "instead; *NCHW*: without channels_last; *compiled*: plus torch.compile of the UNet.", mfu, ""]
        return "\n".join(lines + table(rows, with_model=False)) + "\n"
    lines = [f"{heading} ({meta['date']}, {meta['device']})", "", f"`bench/train.py`: {common}", "",
             f"- **LoRA**: rank {meta['rank']}, alpha = rank, on to_k/to_q/to_v/to_out.0. *baseline*: "
             "train_text_to_image_lora.py's loop (SD 1.5) / train_text_to_image_lora_sdxl.py's (SDXL): UNet and "
             "adapter in bf16 under autocast, VAE encode and text encoders every step, AdamW (foreach) over the "
             "adapter, `loss.item()` each step. *curate*: `train.loop.train` with `model.lora`: frozen UNet bf16, "
             "adapter fp32, latent-cached shards, fused AdamW, channels_last, SDPA.",
             "- **SDXL full**: *baseline*: train_text_to_image_sdxl.py's loop: prompt embeddings and VAE latents "
             "precomputed for every image before training (untimed), UNet fp32 under bf16 autocast, AdamW "
             "(foreach). *curate*: `train.loop.train` on the latent-cached shards (both text encoders run every "
             "step), fused AdamW, channels_last.",
             f"- Target for SD 1.5 LoRA: ≥ {LORA_SPEEDUP}× the baseline's images/s at no more than its peak memory.",
             mfu, ""]
    return "\n".join(lines + table(rows, with_model=True)) + "\n"


# ---------------------------------------------------------------- main


def parse_sizes(text: str | None, default: str) -> list[tuple[int, int]]:
    text = default if text is None else text
    if text in ("", "none"):
        return []
    return [tuple(int(v) for v in item.split(":")) for item in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: tiny models, 32 px, a few steps")
    parser.add_argument("--sizes", default=None, help="full fine-tuning, SD 1.5: SIZE:BATCH,... (default 256:64,512:32; none)")
    parser.add_argument("--lora-sizes", default=None, help="LoRA, SD 1.5: SIZE:BATCH,... (default none; e.g. 512:32)")
    parser.add_argument("--sdxl-sizes", default=None, help="SDXL: SIZE:BATCH,... (default none; e.g. 1024:4)")
    parser.add_argument("--sdxl-methods", default="auto",
                        help="SDXL rows: full, lora, full,lora, or auto: full, and LoRA if full runs out of memory")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (alpha = rank)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (a multiple of --warmup)")
    parser.add_argument("--images", type=int, default=None, help="distinct images per size (default 512; 128 above 512 px)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile variant of curate's SD 1.5 loops")
    parser.add_argument("--compile-sdxl", action="store_true", help="add a torch.compile variant of curate's SDXL loops")
    parser.add_argument("--online", action="store_true", help="add curate's loop encoding with the VAE on the fly")
    parser.add_argument("--nchw", action="store_true", help="add curate's loop without channels_last")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--fresh", action="store_true", help="forget the results of earlier invocations")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    quick = "32:4" if args.quick else None
    methods = ["full", "lora"] if args.quick and args.sdxl_methods == "auto" else args.sdxl_methods.split(",")
    sdxl_groups = [group for method, group in (("full", "sdxl"), ("auto", "sdxl"), ("lora", "sdxl-lora"))
                   if method in methods]
    # (group, model kind, size, batch) per table block: its baseline and curate's variants.
    plan = ([("full", "sd15", s, b) for s, b in parse_sizes(args.sizes, quick or "256:64,512:32")]
            + [("lora", "sd15", s, b) for s, b in parse_sizes(args.lora_sizes, quick or "none")]
            + [(g, "sdxl", s, b) for s, b in parse_sizes(args.sdxl_sizes, quick or "none") for g in sdxl_groups])
    warmup = args.warmup or (2 if args.quick else 10)
    steps = args.steps or (2 if args.quick else 30)
    steps = max(warmup, steps // warmup * warmup)
    workers = args.workers if args.workers is not None else (1 if args.quick else min(8, cores))
    started = time.perf_counter()

    def n_images(size: int) -> int:
        return args.images or (16 if args.quick else (512 if size <= 512 else 128))  # resampled: enough

    sizes = sorted({s for _, _, s, _ in plan})
    plain = {s: make_shards(s, n_images(s), max(16, n_images(s) // 8), cores) for s in sizes}  # before torch (fork)

    import diffusers
    import peft
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.quick:
        torch.set_num_threads(min(2, cores))
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU only: {cpu_name()}"
    log(f"device: {device_name}; torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}")
    if device == "cpu" and not args.quick:
        log("warning: no GPU; the default sizes are meant for a GPU (use --quick on a CPU)")
    models = {kind: make_model(kind, args.quick, device) for kind in sorted({k for _, k, _, _ in plan})}
    cached = {(kind, s): make_latent_shards(plain[s], models[kind], s, device)
              for _, kind, s, _ in plan}
    free_memory()

    described = ("curate's tiny models (tiny, tiny-sdxl)" if args.quick else
                 "SD-1.5-shaped (UNet 860M, VAE, CLIP ViT-L text encoder) and SDXL-shaped (UNet 2.6B, VAE, "
                 "CLIP ViT-L + OpenCLIP bigG text encoders) models, random weights")
    meta = {
        "date": datetime.date.today().isoformat(), "device": device_name, "model": described,
        "data": "photo-like JPEGs in tar shards (+ a latent-cached copy): "
                + ", ".join(f"{n_images(s)} at {s} px" for s in sizes),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "cores": cores, "workers": workers, "warmup": warmup, "steps": steps,
        "rank": args.rank,
    }
    run = {"args": args, "device": device, "meta": meta, "started": started}
    # One task per (block, variant); torch.compile variants (minutes of compiling) after all the
    # others, so that a run stopped by a time limit has every block's eager rows.
    def variants(group: str, kind: str) -> list[tuple[str, dict | None]]:
        found = [("baseline", None), ("curate", dict(cached=True, compile_unet=False))]
        if args.online:
            found.append(("curate, online VAE", dict(cached=False, compile_unet=False)))
        if args.nchw:
            found.append(("curate, NCHW", dict(cached=True, compile_unet=False, channels_last=False)))
        if (args.compile and kind == "sd15") or (args.compile_sdxl and kind == "sdxl"):
            found.append(("curate, compiled", dict(cached=True, compile_unet=True)))
        return found

    tasks = [(block, name, options) for block in plan for name, options in variants(block[0], block[1])]
    tasks.sort(key=lambda task: bool(task[2] and task[2]["compile_unet"]))
    flops_cache: dict = {}
    rows: list[dict] = []
    while tasks:
        (group, kind, size, batch), name, options = tasks.pop(0)
        lora_rank = args.rank if group in ("lora", "sdxl-lora") else None
        if (kind, size, lora_rank) not in flops_cache:
            flops_cache[(kind, size, lora_rank)] = unet_flops_per_image(models[kind], size, lora_rank)
        flops = flops_cache[(kind, size, lora_rank)]
        free_memory()
        row = {"group": group, "model": "SD 1.5" if kind == "sd15" else "SDXL",
               "method": f"LoRA r{lora_rank}" if lora_rank else "full", "size": size, "batch": batch,
               "loop": name, "flops_per_image": flops}
        t0 = time.perf_counter()
        try:
            if options is None and kind == "sd15":
                row.update(run_baseline(models[kind], plain[size], size, batch, warmup, steps, workers, device,
                                        lora_rank=lora_rank))
            elif options is None:
                row.update(run_baseline_sdxl(models[kind], plain[size], size, batch, warmup, steps, workers,
                                             device, lora_rank=lora_rank, images=n_images(size)))
            else:
                shards = cached[(kind, size)] if options["cached"] else plain[size]
                lr = 1e-4 if lora_rank else (1e-5 if kind == "sd15" else 1e-6)
                row.update(run_curate(models[kind], shards, size, batch, warmup, steps, workers, device=device,
                                      lora_rank=lora_rank, lr=lr, **options))
        except torch.cuda.OutOfMemoryError:
            row.update(error="out of memory", peak_gib=peak_gib())
        except Exception as exc:  # one failing variant must not lose the others' numbers
            traceback.print_exc()
            row.update(error=f"failed: {type(exc).__name__}")
        rows.append(row)
        publish(rows, run, final=False)
        rate = row.get("images_per_second")
        log(f"{row['model']} {row['method']}, {size} px, batch {batch}, {name}: "
            f"{fmt(rate, none=row.get('error'))} images/s, peak {fmt(row.get('peak_gib'), '.1f')} GiB, "
            f"MFU {fmt(rate and rate * flops / PEAK_FLOPS * 100, '.1f')}% ({time.perf_counter() - t0:.0f} s)")
        # SDXL "auto": full fine-tuning if it fits, else LoRA (the rule).
        if group == "sdxl" and args.sdxl_methods == "auto" and row.get("error") == "out of memory":
            block = ("sdxl-lora", kind, size, batch)
            if not any(task[0] == block for task in tasks) and not any(r["group"] == "sdxl-lora" for r in rows):
                log(f"SDXL full fine-tuning at {size} px, batch {batch} does not fit: LoRA rows instead")
                tasks[:0] = [(block, n, o) for n, o in variants("sdxl-lora", kind)]

    publish(rows, run, final=True)


def publish(rows: list[dict], run: dict, final: bool) -> None:
    """Merge this invocation's rows with earlier ones (same device) and write the tables; called
    after every row too, so a run stopped by a time limit keeps what it measured."""
    args, device = run["args"], run["device"]
    meta = {**run["meta"], "minutes": (time.perf_counter() - run["started"]) / 60}
    measured = {r["group"] for r in rows}
    if not args.quick:
        results = WORK / f"results-{''.join(c if c.isalnum() else '-' for c in meta['device'])}.json"
        if args.fresh and not run.get("forgot"):  # --fresh: the earlier invocations', not this one's rows
            results.unlink(missing_ok=True)
            run["forgot"] = True
        stored = json.loads(results.read_text()) if results.exists() else {}
        stored = {k: v for k, v in stored.items() if ":" in k}  # GROUP:SIZE (older files: SIZE, no MFU)
        for key in {f"{r['group']}:{r['size']}" for r in rows}:
            stored[key] = [r for r in rows if f"{r['group']}:{r['size']}" == key]
        results.write_text(json.dumps(stored, indent=1))
        rows = [r for block in stored.values() for r in block]
    groups, loops = ["full", "lora", "sdxl", "sdxl-lora"], ["baseline", "curate", "curate, online VAE", "curate, NCHW"]
    rows = sorted(rows, key=lambda r: (groups.index(r["group"]), r["size"],
                                       loops.index(r["loop"]) if r["loop"] in loops else len(loops)))
    sections = []
    if "full" in measured:
        sections.append((HEADING, report(HEADING, [r for r in rows if r["group"] == "full"], meta)))
    if measured - {"full"}:
        sections.append((LORA_SDXL_HEADING, report(LORA_SDXL_HEADING, [r for r in rows if r["group"] != "full"], meta)))
    if final:
        for _, text in sections:
            log("\n" + text)
    if args.quick or args.no_write or device != "cuda":
        if final:
            log("(BENCHMARKS.md not written: --quick, --no-write or no GPU)")
        return
    for heading, text in sections:
        update_benchmarks(f"{heading} (", text)  # "## Training (": not the start of "## Training: LoRA ..."
    if final:
        log("BENCHMARKS.md updated")


if __name__ == "__main__":
    main()
