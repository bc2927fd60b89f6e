"""Resolution rules (sample stage): which images are big enough, and the final resize to
the training resolution, optionally into Stable-Diffusion-style aspect-ratio buckets.

These run in the write stage on the image the download stage stored (already upright RGB
JPEG, possibly shrunk by `resize:`); `Resolution` judges the ORIGINAL size and bytes,
recorded in the sample's json as original_width / original_height / bytes.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Literal, Optional

from PIL import Image
from pydantic import Field, model_validator

from filters.base import Decision, Filter

BUCKET_STEP = 64  # latent-diffusion VAEs downsample by 8 and UNets by 8 more: sides in multiples of 64

# Pillow's own decompression-bomb limit, for what this filter would create by enlarging.
MAX_OUTPUT_PIXELS = 89_478_485

INTERPOLATIONS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,  # each output pixel the mean of its footprint (OpenCV's INTER_AREA)
}


class Resolution(Filter):
    """Drop images too small, too large or too elongated, judged on the original image.

    Reasons: "resolution: side<256", "resolution: area<65536", "resolution: area>4194304",
    "resolution: aspect>3", "resolution: bytes<10000".
    """

    name = "resolution"
    stage = "sample"
    min_side: int = Field(0, ge=0)  # of the shorter side
    min_area: int = Field(0, ge=0)
    max_area: Optional[int] = Field(None, ge=1)
    max_aspect_ratio: Optional[float] = Field(None, ge=1)  # long side / short side
    min_bytes: int = Field(0, ge=0)  # of the file as downloaded

    def keep(self, sample) -> Decision:
        meta = sample["meta"]
        width, height = meta["original_width"], meta["original_height"]
        if min(width, height) < self.min_side:
            return False, f"resolution: side<{self.min_side}"
        if width * height < self.min_area:
            return False, f"resolution: area<{self.min_area}"
        if self.max_area is not None and width * height > self.max_area:
            return False, f"resolution: area>{self.max_area}"
        if self.max_aspect_ratio is not None and max(width, height) > self.max_aspect_ratio * min(width, height):
            return False, f"resolution: aspect>{self.max_aspect_ratio:g}"
        if (meta.get("bytes") or 0) < self.min_bytes:
            return False, f"resolution: bytes<{self.min_bytes}"
        return True


@functools.lru_cache(maxsize=None)
def aspect_buckets(size: int, max_ratio: float) -> tuple[tuple[int, int], ...]:
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


def choose_bucket(width: int, height: int, buckets: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (compared as log ratios, so
    2:1 and 1:2 are equally far from 1:1); the first such in sorted order on a tie."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


class Resize(Filter):
    """Final resize to the training resolution `size`. Keeps every image it can decode.

    - keep_ratio:  the shorter side becomes `size`, the aspect ratio is kept.
    - center_crop: the shorter side becomes `size`, then the centre size × size square.
    - buckets:     the aspect bucket closest to the image's (see `aspect_buckets`; `size`
                   a multiple of 64, bucket aspects up to `max_ratio`): scaled to cover
                   the bucket, then the minimal excess cropped from the centre. The bucket
                   is recorded in the json as `bucket: [width, height]`, so training can
                   batch by shape without cropping content away.

    Images are enlarged as well as shrunk (every sample ends at the training resolution);
    drop small ones first with `resolution`. An image already at its target size is kept
    byte for byte, not re-encoded.
    """

    name = "resize"
    stage = "sample"
    size: int = Field(ge=1)
    mode: Literal["keep_ratio", "center_crop", "buckets"] = "keep_ratio"
    interpolation: Literal["lanczos", "bicubic", "bilinear", "area"] = "lanczos"
    quality: int = Field(95, ge=1, le=100)
    max_ratio: float = Field(2.0, ge=1)  # buckets only

    @model_validator(mode="after")
    def _bucket_size(self):
        if self.mode == "buckets" and self.size % BUCKET_STEP:
            raise ValueError(f"size: for mode buckets, a multiple of {BUCKET_STEP} (got {self.size})")
        return self

    def target(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(size to resize to, size to crop it to) for an image of width × height."""
        if self.mode == "buckets":
            crop = choose_bucket(width, height, aspect_buckets(self.size, self.max_ratio))
            scale = max(crop[0] / width, crop[1] / height)  # cover the bucket
            resized = (max(crop[0], round(width * scale)), max(crop[1], round(height * scale)))
            return resized, crop
        scale = self.size / min(width, height)
        resized = (max(1, round(width * scale)), max(1, round(height * scale)))
        return resized, ((self.size, self.size) if self.mode == "center_crop" else resized)

    def keep(self, sample) -> Decision:
        try:
            im = Image.open(io.BytesIO(sample["jpg"]))
            resized, crop = self.target(*im.size)
            meta = sample["meta"]
            if self.mode == "buckets":
                meta["bucket"] = list(crop)
            if resized[0] * resized[1] > MAX_OUTPUT_PIXELS:
                # keep_ratio enlarging a sliver (1 × 1000 → 256 × 256000): refuse, not run out of memory.
                return False, "image_area_too_large"
            if im.size == crop:  # already there: no re-encoding, no quality lost
                im.load()
                meta["width"], meta["height"] = im.size
                return True
            if im.format == "JPEG":
                im.draft("RGB", resized)  # decode at reduced scale when shrinking a lot; never below `resized`
            im = im.convert("RGB").resize(resized, INTERPOLATIONS[self.interpolation])
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return False, "decode_error"
        left, top = (resized[0] - crop[0]) // 2, (resized[1] - crop[1]) // 2
        if (left, top) != (0, 0) or resized != crop:
            im = im.crop((left, top, left + crop[0], top + crop[1]))
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=self.quality)
        sample["jpg"] = out.getvalue()
        meta["width"], meta["height"] = im.size
        return True
