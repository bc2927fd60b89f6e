"""Validation samples: a few prompts through the standard diffusers pipeline (DDIM), as one grid."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from PIL import Image

from curate.train.config import ValidationConfig
from curate.train.model import Components, inference_pipeline


def image_grid(images: list[Image.Image], columns: int = 4) -> Image.Image:
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


@torch.no_grad()
def sample_grid(parts: Components, unet, cfg: ValidationConfig, resolution: int, device: torch.device,
                autocast=contextlib.nullcontext) -> Image.Image:
    pipe = inference_pipeline(parts, unet)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    with autocast():
        images = pipe(list(cfg.prompts), num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                      height=resolution, width=resolution, generator=generator).images
    return image_grid(images)


def save_grid(grid: Image.Image, folder: Path, step: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.png"
    grid.save(path)
    return path
