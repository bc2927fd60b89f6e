"""The latent diffusion model's parts, as diffusers and transformers classes.

    UNet2DConditionModel   the denoiser being trained
    AutoencoderKL          images <-> latents (frozen)
    CLIPTextModel          caption -> embeddings the UNet attends to (frozen)
    CLIPTokenizer          caption -> token ids (works offline, see train/tokenizer.py)
    DDPMScheduler          the noise schedule of the training objective

`pretrained` is a diffusers Stable Diffusion folder, a hub id (needs internet), or "tiny":
the same architecture, small enough to train on a CPU in seconds, with random weights
drawn from a fixed seed (so `curate run`'s latent cache and `curate train` build the
very same tiny VAE in different processes).
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from curate.train.tokenizer import clip_tokenizer, has_tokenizer
from curate.pipeline.models.vae import TINY, check_source, from_pretrained, load_vae, seeded, tiny_vae, vae_fingerprint, vae_name

# Shaped like SD 1.5 (cross-attention UNet; the VAE is in train/vae.py; CLIP text encoder
# with CLIP's 49,408-token vocabulary and 77 positions), scaled down.
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
)
TINY_TEXT = dict(
    vocab_size=49408, max_position_embeddings=77, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
# Stable Diffusion 1.x's training noise schedule.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)


@dataclass
class Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    vae_name: str  # what the latent cache records as the VAE
    vae_fingerprint: str  # a hash of the VAE's weights: cached latents must come from the same ones


def tiny_components(seed: int = 0) -> tuple:
    unet = seeded(seed, lambda: UNet2DConditionModel(**TINY_UNET))
    text_encoder = seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**TINY_TEXT)))
    return unet, tiny_vae(seed), text_encoder, clip_tokenizer(), DDPMScheduler(**SD_SCHEDULE)


def load_components(source: str, *, tiny_seed: int = 0, revision: Optional[str] = None,
                    variant: Optional[str] = None, tokenizer: str = "auto",
                    prediction_type: Optional[str] = None) -> Components:
    """All five parts, on the CPU in fp32; the training loop moves and casts them."""
    check_source(source)
    if source == TINY:
        unet, vae, text_encoder, tok, scheduler = tiny_components(tiny_seed)
    else:
        kw = {k: v for k, v in {"revision": revision, "variant": variant}.items() if v}
        unet = from_pretrained(UNet2DConditionModel, source, "unet", **kw)
        vae = load_vae(source, revision=revision, variant=variant)
        text_encoder = from_pretrained(CLIPTextModel, source, "text_encoder", **kw)
        scheduler = from_pretrained(DDPMScheduler, source, "scheduler",
                                     **({"revision": revision} if revision else {}))
        local = os.path.isdir(source)
        if tokenizer == "clip-bpe" or (local and not has_tokenizer(source)):
            tok = clip_tokenizer()
        else:
            tok = from_pretrained(CLIPTokenizer, source, "tokenizer",
                                   **({"revision": revision} if revision else {}))
        unet, vae, text_encoder = unet.float(), vae.float(), text_encoder.float()
    if prediction_type is not None:
        # A new scheduler, not register_to_config: from_config (used for the DDIM sampler and the
        # saved pipeline) drops values that were defaults at init, and would forget this one.
        scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=prediction_type)
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                      noise_scheduler=scheduler, vae_name=vae_name(source, tiny_seed),
                      vae_fingerprint=vae_fingerprint(vae))


def inference_pipeline(parts: Components, unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    """The standard diffusers pipeline around `unet`, sampling with DDIM on the training schedule."""
    return StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=unet,
        # set_alpha_to_one=False: the last DDIM step as in Stable Diffusion's own scheduler configs.
        scheduler=DDIMScheduler.from_config(parts.noise_scheduler.config, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_pipeline(parts: Components, unet: UNet2DConditionModel, folder: Path) -> None:
    """Write a StableDiffusionPipeline folder (`from_pretrained(folder)` loads it), atomically."""
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        inference_pipeline(parts, unet).save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
