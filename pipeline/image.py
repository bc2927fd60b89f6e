"""Resolution normalization of one downloaded image (the semantics of img2dataset's Resizer).

Differences from img2dataset's OpenCV resizer, each for a reason:
- EXIF orientation is applied, so every written image is upright.
- The size and aspect checks read the header only, so a decompression bomb is
  rejected before a single pixel is decoded.
- JPEGs are decoded at reduced size (libjpeg's DCT scaling via PIL's `draft`) when
  they will be shrunk anyway: several times less decoding work for large photos.
- An upright RGB JPEG that needs no resize is passed through byte for byte after a
  cheap validating decode, instead of being decoded and re-encoded (which costs time
  and quality).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.config import ResizeConfig

_ORIENTATION_TAG = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail or reason


@dataclass
class NormalizedImage:
    data: bytes  # JPEG bytes
    width: int
    height: int
    original_width: int  # upright, before resizing
    original_height: int
    reencoded: bool


def target_size(width: int, height: int, cfg: ResizeConfig) -> tuple[int, int] | None:
    """Size to resize to (before any crop), or None when the image keeps its size."""
    if cfg.resize_mode == "none":
        return None
    short = min(width, height)
    if short == cfg.image_size or (cfg.resize_only_if_bigger and short <= cfg.image_size):
        return None
    scale = cfg.image_size / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB for every mode PIL opens: alpha is composited on white, 16-bit is scaled to 8."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return im.convert("I").point(lambda v: v * (1 / 256)).convert("L").convert("RGB")
    if im.mode == "F":
        return im.convert("L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _encode_jpeg(im: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def normalize_image(data: bytes, cfg: ResizeConfig) -> NormalizedImage:
    """Check, orient, resize and encode one image. Raises ImageRejected with a reason."""
    if not data:
        raise ImageRejected("decode_error", "empty body")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected("image_area_too_large", str(exc)) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageRejected("decode_error", f"not a recognised image ({type(exc).__name__})") from exc

    try:
        return _normalize_opened(im, data, cfg)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected("image_area_too_large", str(exc)) from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise ImageRejected("decode_error", f"{type(exc).__name__}: {exc}"[:200]) from exc
    finally:
        im.close()


def _normalize_opened(im: Image.Image, data: bytes, cfg: ResizeConfig) -> NormalizedImage:
    stored_w, stored_h = im.size  # from the header; nothing decoded yet
    try:
        orientation = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block is not worth losing the image for
        orientation = 1
    width, height = (stored_h, stored_w) if orientation in _SWAPS_SIDES else (stored_w, stored_h)

    if width * height > cfg.max_image_area:
        raise ImageRejected("image_area_too_large", f"{width}x{height} > {cfg.max_image_area} pixels")
    if min(width, height) < cfg.min_image_size:
        raise ImageRejected("image_too_small", f"{width}x{height}, min side {cfg.min_image_size}")
    if max(width, height) / max(1, min(width, height)) > cfg.max_aspect_ratio:
        raise ImageRejected("aspect_ratio_too_large", f"{width}x{height} > {cfg.max_aspect_ratio}")

    resize_to = target_size(width, height, cfg)
    sized_w, sized_h = resize_to or (width, height)
    # An image left smaller than image_size (resize_only_if_bigger) is not cropped.
    crop = cfg.resize_mode == "center_crop" and min(sized_w, sized_h) >= cfg.image_size and sized_w != sized_h

    if resize_to is None and not crop and im.format == "JPEG" and im.mode == "RGB" and orientation == 1:
        # Decoding at 1/8 scale still reads every entropy-coded byte, so a truncated or
        # corrupt file is caught at a fraction of the cost of a full decode.
        im.draft("RGB", (max(1, stored_w // 8), max(1, stored_h // 8)))
        im.load()
        return NormalizedImage(data, width, height, width, height, reencoded=False)

    if resize_to is not None and im.format == "JPEG":
        # draft() keeps the decoded image at least this large, so quality is unaffected.
        want = (resize_to[1], resize_to[0]) if orientation in _SWAPS_SIDES else resize_to
        im.draft("RGB", want)
    im.load()
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    im = _to_rgb(im)
    if resize_to is not None:
        # Shrinking: BOX averages each output pixel's footprint, i.e. img2dataset's
        # default "area" interpolation, and is several times cheaper than LANCZOS.
        # Enlarging: LANCZOS, img2dataset's default upscale interpolation.
        shrinking = resize_to[0] < im.width
        im = im.resize(resize_to, Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS)
    if crop:
        side = cfg.image_size
        left = (im.width - side) // 2
        top = (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side))
    return NormalizedImage(_encode_jpeg(im, cfg.encode_quality), im.width, im.height, width, height, reencoded=True)
