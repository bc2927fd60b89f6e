"""The latent diffusion model's parts, as diffusers and transformers classes.

    UNet2DConditionModel   the denoiser being trained
    AutoencoderKL          images <-> latents (frozen)
    CLIPTextModel          caption -> embeddings the UNet attends to (frozen)
    CLIPTokenizer          caption -> token ids (works offline, see train/tokenizer.py)
    DDPMScheduler          the noise schedule of the training objective

SDXL adds a second text encoder (CLIPTextModelWithProjection, OpenCLIP bigG's shape) and its
tokenizer: the UNet attends to both encoders' penultimate hidden states side by side and is
also conditioned on the second one's pooled, projected embedding and on six numbers of
"micro-conditioning" (original size, crop top-left, target size; train/data.py). A UNet
whose config says `addition_embed_type: text_time` is an SDXL UNet; nothing else decides.

`pretrained` is a diffusers folder, a hub id (needs internet), or "tiny" / "tiny-sdxl": the
same architectures, small enough to train on a CPU in seconds, with random weights drawn
from a fixed seed (so `curate run`'s latent cache and `curate train` build the very same
tiny VAE in different processes; both tiny models share it).
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from diffusers import (
    AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from curate.train.tokenizer import SDXL_PAD_TOKEN_2, clip_tokenizer, has_tokenizer
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
# Shaped like SDXL's UNet (linear projections in the transformers, more of them deeper down,
# "text_time" added conditioning: pooled text embedding + 6 size numbers, each embedded in
# addition_time_embed_dim), attending to two text encoders side by side (32 + 32 = 64).
TINY_SDXL = "tiny-sdxl"
TINY_SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
    cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=TINY_TEXT["projection_dim"] + 6 * 8,
)
# Stable Diffusion 1.x's (and SDXL's) training noise schedule.
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
    # SDXL only: the second text encoder (pooled, projected output) and its tokenizer.
    text_encoder_2: Optional[CLIPTextModelWithProjection] = None
    tokenizer_2: Optional[CLIPTokenizer] = None

    @property
    def sdxl(self) -> bool:
        return is_sdxl_unet(self.unet)

    @property
    def text_encoders(self) -> list:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]


def is_sdxl_unet(unet: UNet2DConditionModel) -> bool:
    return unet.config.addition_embed_type == "text_time"


def tiny_components(seed: int = 0) -> tuple:
    unet = seeded(seed, lambda: UNet2DConditionModel(**TINY_UNET))
    text_encoder = seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**TINY_TEXT)))
    return unet, tiny_vae(seed), text_encoder, clip_tokenizer(), DDPMScheduler(**SD_SCHEDULE)


def tiny_sdxl_components(seed: int = 0) -> tuple:
    """(unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2, tokenizer_2), SDXL-shaped."""
    unet = seeded(seed + 10, lambda: UNet2DConditionModel(**TINY_SDXL_UNET))
    text_encoder = seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**TINY_TEXT)))
    text_encoder_2 = seeded(seed + 3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT)))
    return (unet, tiny_vae(seed), text_encoder, clip_tokenizer(), DDPMScheduler(**SD_SCHEDULE),
            text_encoder_2, clip_tokenizer(SDXL_PAD_TOKEN_2))


def load_components(source: str, *, tiny_seed: int = 0, revision: Optional[str] = None,
                    variant: Optional[str] = None, tokenizer: str = "auto",
                    prediction_type: Optional[str] = None) -> Components:
    """All the parts (five; seven for SDXL), on the CPU in fp32; the training loop moves and casts them."""
    text_encoder_2 = tok_2 = None
    if source == TINY:
        unet, vae, text_encoder, tok, scheduler = tiny_components(tiny_seed)
    elif source == TINY_SDXL:
        unet, vae, text_encoder, tok, scheduler, text_encoder_2, tok_2 = tiny_sdxl_components(tiny_seed)
    else:
        check_source(source)
        kw = {k: v for k, v in {"revision": revision, "variant": variant}.items() if v}
        rev = {"revision": revision} if revision else {}
        unet = from_pretrained(UNet2DConditionModel, source, "unet", **kw)
        vae = load_vae(source, revision=revision, variant=variant)
        text_encoder = from_pretrained(CLIPTextModel, source, "text_encoder", **kw)
        scheduler = from_pretrained(DDPMScheduler, source, "scheduler", **rev)
        local = os.path.isdir(source)

        def load_tokenizer(subfolder: str, pad_token: str) -> CLIPTokenizer:
            if tokenizer == "clip-bpe" or (local and not has_tokenizer(source, subfolder)):
                return clip_tokenizer(pad_token)
            return from_pretrained(CLIPTokenizer, source, subfolder, **rev)

        tok = load_tokenizer("tokenizer", "<|endoftext|>")
        if is_sdxl_unet(unet):
            text_encoder_2 = from_pretrained(CLIPTextModelWithProjection, source, "text_encoder_2", **kw).float()
            tok_2 = load_tokenizer("tokenizer_2", SDXL_PAD_TOKEN_2)
        unet, vae, text_encoder = unet.float(), vae.float(), text_encoder.float()
    if prediction_type is not None:
        # A new scheduler, not register_to_config: from_config (used for the DDIM sampler and the
        # saved pipeline) drops values that were defaults at init, and would forget this one.
        scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=prediction_type)
    # Both tiny models share the tiny VAE (and so a latent cache made with `vae: tiny`).
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                      noise_scheduler=scheduler, vae_name=vae_name(TINY if source == TINY_SDXL else source, tiny_seed),
                      vae_fingerprint=vae_fingerprint(vae), text_encoder_2=text_encoder_2, tokenizer_2=tok_2)


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompts(parts: Components, ids: list[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(embeddings the UNet attends to, pooled embedding or None) of token ids, one tensor per
    tokenizer; as diffusers' pipelines encode a prompt (SD: the last hidden states; SDXL: both
    encoders' penultimate hidden states side by side, and the second's projected pooled output)."""
    if not parts.sdxl:
        return parts.text_encoder(ids[0])[0], None
    states, pooled = [], None
    for encoder, token_ids in zip(parts.text_encoders, ids):
        out = encoder(token_ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
    return torch.cat(states, dim=-1), pooled


def pipeline_class(parts: Components) -> type:
    return StableDiffusionXLPipeline if parts.sdxl else StableDiffusionPipeline


def inference_pipeline(parts: Components, unet: UNet2DConditionModel, text_encoder=None, text_encoder_2=None):
    """The standard diffusers pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline) around
    `unet` (and the given text encoders, else the parts'), sampling with DDIM on the training schedule."""
    # set_alpha_to_one=False: the last DDIM step as in Stable Diffusion's own scheduler configs.
    scheduler = DDIMScheduler.from_config(parts.noise_scheduler.config, set_alpha_to_one=False)
    text_encoder = text_encoder or parts.text_encoder
    if parts.sdxl:
        # force_zeros_for_empty_prompt: the unconditional input is zeros, as SDXL was trained
        # (and as curate's caption dropout trains it); no watermarker (an optional package).
        return StableDiffusionXLPipeline(
            vae=parts.vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2 or parts.text_encoder_2,
            tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=True, add_watermarker=False)
    return StableDiffusionPipeline(
        vae=parts.vae, text_encoder=text_encoder, tokenizer=parts.tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_pipeline(parts: Components, unet: UNet2DConditionModel, folder: Path) -> None:
    """Write a StableDiffusion(XL)Pipeline folder (`from_pretrained(folder)` loads it), atomically."""
    write_folder(folder, lambda tmp: inference_pipeline(parts, unet).save_pretrained(tmp))


def write_folder(folder: Path, write) -> None:
    """Call write(tmp) for a temporary sibling folder, then put it in place of `folder`."""
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
