"""Validation samples: a few prompts through the standard diffusers pipeline (DDIM), as one grid.

Two forms of the grid: `samples/step-N.png` holds the images alone, side by side at their
size (the prompts are in its PNG text metadata), and the loggers (TensorBoard, W&B) get a
labelled grid, each prompt written under its image.
"""

from __future__ import annotations

import contextlib
import math
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from curate.train.config import ValidationConfig
from curate.train.model import Components, inference_pipeline

LABEL_MIN_WIDTH = 192  # tiles narrower than this are enlarged in the labelled grid, so a label fits
LABEL_LINES = 3


def image_grid(images: list[Image.Image], columns: int = 4) -> Image.Image:
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def labelled_grid(images: list[Image.Image], prompts: list[str], columns: int = 4) -> Image.Image:
    """The images in a grid, each with its prompt written under it (wrapped, at most 3 lines)."""
    w, h = images[0].size
    if w < LABEL_MIN_WIDTH:  # tiny validation images: enlarge (nearest: the pixels stay visible)
        factor = math.ceil(LABEL_MIN_WIDTH / w)
        w, h = w * factor, h * factor
        images = [image.resize((w, h), Image.NEAREST) for image in images]
    try:
        font = ImageFont.load_default(size=max(11, w // 28))  # scales with the tile (FreeType, Pillow >= 10.1)
    except TypeError:  # an older Pillow: its one bitmap size
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = probe.textbbox((0, 0), "Ag", font=font)[3] + 3
    chars = max(8, int(w / max(1.0, probe.textlength("abcdefghij", font=font) / 10)) - 1)
    labels = []
    for prompt in prompts:
        lines = textwrap.wrap(prompt, chars) or [""]
        if len(lines) > LABEL_LINES:
            lines = lines[:LABEL_LINES - 1] + [textwrap.shorten(" ".join(lines[LABEL_LINES - 1:]), chars, placeholder="…")]
        labels.append(lines)
    label_height = max(len(lines) for lines in labels) * line_height + 6
    tiles = []
    for image, lines in zip(images, labels):
        tile = Image.new("RGB", (w, h + label_height), "white")
        tile.paste(image, (0, 0))
        draw = ImageDraw.Draw(tile)
        for i, line in enumerate(lines):
            draw.text((4, h + 3 + i * line_height), line, fill="black", font=font)
        tiles.append(tile)
    return image_grid(tiles, columns)


@torch.no_grad()
def sample_images(parts: Components, models: dict, cfg: ValidationConfig, resolution: int, device: torch.device,
                  autocast=contextlib.nullcontext) -> list[Image.Image]:
    """One image per validation prompt; `models`: {"unet": ..., and text encoders if trained}."""
    pipe = inference_pipeline(parts, models["unet"], models.get("text_encoder"), models.get("text_encoder_2"))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    with autocast():
        return pipe(list(cfg.prompts), num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                    height=resolution, width=resolution, generator=generator).images


def save_grid(images: list[Image.Image], prompts: list[str], folder: Path, step: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("prompts", "\n".join(prompts))
    image_grid(images).save(path, pnginfo=info)
    return path
