"""The training objective of DDPM, as Stable Diffusion is trained.

Sample a timestep t and Gaussian noise ε, make x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε with the
scheduler, let the UNet predict ε (or v = √ᾱ_t·ε - √(1-ᾱ_t)·x_0 for v-prediction), and
take the mean squared error. Options as in diffusers' train_text_to_image.py: noise
offset, and Min-SNR-γ weighting (Hang et al. 2023), which stops the easy low-noise
timesteps from dominating the gradient.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ: min(SNR(t), γ) / SNR(t) for ε-prediction, / (SNR(t) + 1) for v-prediction."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(unet: Callable, scheduler, latents: torch.Tensor, text_embeddings: torch.Tensor,
                   generator: torch.Generator, *, noise_offset: float = 0.0, snr_gamma: Optional[float] = None,
                   autocast=contextlib.nullcontext, added_cond_kwargs: Optional[dict] = None) -> torch.Tensor:
    """The loss of one batch of (scaled) latents. All randomness comes from `generator`.
    added_cond_kwargs: SDXL's {"text_embeds": pooled embeddings, "time_ids": add_time_ids}."""
    batch, channels = latents.shape[:2]
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((batch, channels, 1, 1), generator=generator, device=device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
    with autocast():
        extra = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}
        prediction = unet(noisy, timesteps, text_embeddings, **extra).sample
    error = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        error = error * snr_weights(scheduler, timesteps, snr_gamma)
    return error.mean()
