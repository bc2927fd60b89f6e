"""The output geometry of an image: from its upright size and the `resize:` section, the size
to resize it to, the centre crop taken after, and (mode buckets) its aspect bucket.

Pure arithmetic, no pixels: `pipeline/image.py` applies it where the image is decoded, once.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Protocol

BUCKET_STEP = 64  # latent-diffusion VAEs downsample by 8 and UNets by 8 more: sides in multiples of 64

Size = tuple[int, int]


class ResizeSettings(Protocol):
    """What `plan` reads of the `resize:` section (pipeline/config.py ResizeConfig, which imports
    this module for BUCKET_STEP)."""

    size: int
    mode: str
    upscale: bool
    bucket_max_ratio: float


@functools.lru_cache(maxsize=None)
def aspect_buckets(size: int, max_ratio: float) -> tuple[Size, ...]:
    """Stable-Diffusion-style buckets (as in NovelAI's aspect-ratio bucketing): every
    (width, height) with both sides multiples of 64, the largest height that keeps
    width * height ≤ size², and the aspect within [1/max_ratio, max_ratio], plus their
    transposes. E.g. size 256, max_ratio 2 → (192, 320), (256, 256), (320, 192)."""
    area = size * size
    found = set()
    for width in range(BUCKET_STEP, area // BUCKET_STEP + 1, BUCKET_STEP):
        height = area // width // BUCKET_STEP * BUCKET_STEP
        if height < BUCKET_STEP:
            break
        if 1 / max_ratio <= width / height <= max_ratio:
            found.update([(width, height), (height, width)])
    return tuple(sorted(found))


def choose_bucket(width: int, height: int, buckets: tuple[Size, ...]) -> Size:
    """The bucket whose aspect ratio is closest to the image's (compared as log ratios, so
    2:1 and 1:2 are equally far from 1:1); the first such in sorted order on a tie."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


@dataclass(frozen=True)
class Geometry:
    resize: Optional[Size]  # size to resize the upright image to; None: it keeps its scale
    crop: Optional[Size]  # centre crop taken after the resize; None: none
    bucket: Optional[Size]  # mode buckets: the bucket chosen (recorded as `bucket: [w, h]`)

    @property
    def unchanged(self) -> bool:
        return self.resize is None and self.crop is None


def plan(width: int, height: int, cfg: ResizeSettings) -> Geometry:
    """The geometry of an upright width × height image under `cfg`.

    - keep_ratio:  the shorter side becomes `size`.
    - center_crop: the same, then the centre size × size square (img2dataset: an image that is
                   not enlarged, being smaller than size, is not cropped either).
    - buckets:     the bucket closest in aspect; scaled to cover it, then the minimal excess
                   cropped from the centre. An image smaller than its bucket, when not
                   enlarged, is cropped to the bucket's aspect at its own scale (the training
                   loader resizes it to the bucket).
    - none:        as it is.
    Images are enlarged only with `upscale` (img2dataset's resize_only_if_bigger: false).
    """
    if cfg.mode == "none":
        return Geometry(None, None, None)
    if cfg.mode == "buckets":
        bucket = choose_bucket(width, height, aspect_buckets(cfg.size, cfg.bucket_max_ratio))
        scale = max(bucket[0] / width, bucket[1] / height)  # to cover the bucket
        if scale == 1:
            resize, crop = None, bucket
        elif scale < 1 or cfg.upscale:
            resize = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
            crop = bucket
        elif width * bucket[1] > height * bucket[0]:  # wider than the bucket: crop the sides
            resize, crop = None, (max(1, min(width, round(height * bucket[0] / bucket[1]))), height)
        else:
            resize, crop = None, (width, max(1, min(height, round(width * bucket[1] / bucket[0]))))
        if crop == (resize or (width, height)):
            crop = None
        return Geometry(resize, crop, bucket)
    short = min(width, height)
    resize = None
    if short != cfg.size and (cfg.upscale or short > cfg.size):
        scale = cfg.size / short
        resize = (max(1, round(width * scale)), max(1, round(height * scale)))
    sized = resize or (width, height)
    crop = None
    if cfg.mode == "center_crop" and min(sized) >= cfg.size and sized[0] != sized[1]:
        crop = (cfg.size, cfg.size)
    return Geometry(resize, crop, None)
