"""Resolution normalization of one downloaded image (the semantics of img2dataset's Resizer).

Differences from img2dataset's OpenCV resizer, each for a reason:
- EXIF orientation is applied, so every written image is upright.
- The size and aspect checks read the header only, so a decompression bomb is
  rejected before a single pixel is decoded (PNG too: PIL would decode a whole PNG to
  look for its EXIF, so a PNG's orientation is read after the checks).
- The pixels decoded at once in a worker process are capped (`DECODE_BUDGET`), so many
  threads each holding a large but allowed image cannot exhaust memory together.
- JPEGs are decoded at reduced size (libjpeg's DCT scaling via PIL's `draft`) when
  they will be shrunk anyway: several times less decoding work for large photos.
- An upright RGB JPEG that needs no resize is passed through byte for byte after a
  cheap validating decode, instead of being decoded and re-encoded (which costs time
  and quality).
"""

from __future__ import annotations

import contextlib
import io
import threading
from dataclasses import dataclass
from typing import Iterator

from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.config import ResizeConfig

_ORIENTATION_TAG = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}
# Modes that resize as they are; the others (palette, CMYK, 16-bit ...) become RGB first.
_RESIZABLE_MODES = {"RGB", "RGBA", "L", "LA"}


class PixelBudget:
    """Caps the pixels being decoded at once in this process.

    Every image passes the area check alone, but a download task decodes with many threads:
    32 legal 9000x9000 PNGs of 80 KB each would together need over 10 GB. Decoding waits
    until its pixels fit in the budget, so a worker's decode memory stays near one budget's
    worth however hostile a shard is. An image larger than the whole budget runs alone.
    """

    def __init__(self, pixels: int):
        self.pixels = pixels
        self.in_use = 0
        # What the tests read back from a worker: the most pixels ever held at once, and
        # how many decodes had to wait for the budget.
        self.peak = 0
        self.waits = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.pixels)
        with self._cond:
            if self.in_use + pixels > self.pixels:
                self.waits += 1
            while self.in_use + pixels > self.pixels:
                self._cond.wait()
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= pixels
                self._cond.notify_all()


# About one and a half images of the default max_image_area: small images never wait.
DECODE_BUDGET = PixelBudget(128 * 1024 * 1024)


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


def orientation_of(im: Image.Image, decoded: bool = False) -> int | None:
    """The EXIF orientation, or None when it cannot be known without decoding the pixels: PIL
    decodes a whole PNG to look for an eXIf chunk after the image data, which must not happen
    before the size checks (a bomb would be decoded to be rejected)."""
    if im.format == "PNG" and "exif" not in im.info and not decoded:
        return None
    try:
        return im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block is not worth losing the image for
        return 1


def _plan(width: int, height: int, cfg: ResizeConfig) -> tuple[tuple[int, int] | None, bool]:
    """(size to resize to or None, whether to center-crop) for an upright width x height."""
    resize_to = target_size(width, height, cfg)
    sized_w, sized_h = resize_to or (width, height)
    # An image left smaller than image_size (resize_only_if_bigger) is not cropped.
    crop = cfg.resize_mode == "center_crop" and min(sized_w, sized_h) >= cfg.image_size and sized_w != sized_h
    return resize_to, crop


def _normalize_opened(im: Image.Image, data: bytes, cfg: ResizeConfig) -> NormalizedImage:
    stored_w, stored_h = im.size  # from the header; nothing decoded yet
    orientation = orientation_of(im)
    width, height = (stored_h, stored_w) if orientation in _SWAPS_SIDES else (stored_w, stored_h)

    # Area, shortest side and aspect ratio do not depend on the orientation: checked from the
    # header even when the orientation is known only after decoding.
    if width * height > cfg.max_image_area:
        raise ImageRejected("image_area_too_large", f"{width}x{height} > {cfg.max_image_area} pixels")
    if min(width, height) < cfg.min_image_size:
        raise ImageRejected("image_too_small", f"{width}x{height}, min side {cfg.min_image_size}")
    if max(width, height) / max(1, min(width, height)) > cfg.max_aspect_ratio:
        raise ImageRejected("aspect_ratio_too_large", f"{width}x{height} > {cfg.max_aspect_ratio}")

    resize_to, crop = _plan(width, height, cfg)
    if resize_to is None and not crop and im.format == "JPEG" and im.mode == "RGB" and orientation == 1:
        # Decoding at 1/8 scale still reads every entropy-coded byte, so a truncated or
        # corrupt file is caught at a fraction of the cost of a full decode.
        im.draft("RGB", (max(1, stored_w // 8), max(1, stored_h // 8)))
        with DECODE_BUDGET.hold(im.width * im.height):
            im.load()
        return NormalizedImage(data, width, height, width, height, reencoded=False)

    if resize_to is not None and im.format == "JPEG":
        # draft() keeps the decoded image at least this large, so quality is unaffected.
        want = (resize_to[1], resize_to[0]) if orientation in _SWAPS_SIDES else resize_to
        im.draft("RGB", want)
    with DECODE_BUDGET.hold(im.width * im.height):  # after draft(): the size actually decoded
        return _decode_and_resize(im, orientation, (stored_w, stored_h), cfg)


def _decode_and_resize(im: Image.Image, orientation: int | None, stored: tuple[int, int],
                       cfg: ResizeConfig) -> NormalizedImage:
    im.load()
    if orientation is None:  # a PNG: its eXIf chunk, if any, has been read with the pixels
        orientation = orientation_of(im, decoded=True)
    width, height = (stored[1], stored[0]) if orientation in _SWAPS_SIDES else stored
    resize_to, crop = _plan(width, height, cfg)
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode not in _RESIZABLE_MODES:
        im = _to_rgb(im)
    # Otherwise resize first, then make RGB: a large greyscale or RGBA image is never
    # held as a full-size RGB copy too (resizing RGBA premultiplies alpha, so the
    # composite on white comes out the same either way).
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
    im = _to_rgb(im)
    return NormalizedImage(_encode_jpeg(im, cfg.encode_quality), im.width, im.height, width, height, reencoded=True)
