"""The one decode-resize-encode of a downloaded image, to the geometry of the `resize:`
section (pipeline/geometry.py: keep_ratio / center_crop with img2dataset's Resizer
semantics, or aspect buckets).

The download stage reads the header first (`read_header`): the `resolution` filter judges
that size before a pixel is decoded, and `normalize_image` goes on from the same opened
file. The write stage stores the bytes encoded here as they are.

Differences from img2dataset's OpenCV resizer, each for a reason:
- EXIF orientation is applied, so every written image is upright.
- The area check reads the header only, so a decompression bomb is rejected before a
  single pixel is decoded (PNG too: PIL would decode a whole PNG to look for its EXIF, so
  a PNG's orientation is read after the checks).
- The pixels decoded at once in a worker process are capped (`DECODE_BUDGET`), so many
  threads each holding a large but allowed image cannot exhaust memory together.
- JPEGs are decoded at reduced size (libjpeg's DCT scaling via PIL's `draft`) when
  they will be shrunk anyway: several times less decoding work for large photos.
- An upright RGB JPEG that needs no resize or crop is passed through byte for byte after
  a cheap validating decode, instead of being decoded and re-encoded (which costs time
  and quality).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from PIL import Image, ImageOps, UnidentifiedImageError

from curate.pipeline.config import MAX_IMAGE_AREA, ResizeConfig
from curate.pipeline.geometry import Geometry, plan
from curate.pipeline.records import FAILED_TO_RESIZE, Rejection

_ORIENTATION_TAG = 0x0112
_JPEG_END = b"\xff\xd9"  # the EOI marker: a JPEG cut short lacks it
_SWAPS_SIDES = {5, 6, 7, 8}
# Modes that resize as they are; the others (palette, CMYK, 16-bit ...) become RGB first.
_RESIZABLE_MODES = {"RGB", "RGBA", "L", "LA"}

# What an enlargement may create (Pillow's own decompression-bomb limit): with upscale, a
# 2 x 4000 sliver at size 4096 would become 4096 x 8192000.
MAX_OUTPUT_PIXELS = 89_478_485

INTERPOLATIONS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,  # each output pixel the mean of its footprint (OpenCV's INTER_AREA)
}


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


# About one and a half images of the default download.max_image_area: small images never wait.
DECODE_BUDGET = PixelBudget(128 * 1024 * 1024)


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail or reason


def image_rejection(exc: Exception, stage: str) -> Rejection:
    """Why an image did not read or normalize, as `stage`'s rejection (img2dataset's
    failed_to_resize): an ImageRejected's reason, or decode_error for whatever else a strange
    file raised (one image must never fail its shard)."""
    if not isinstance(exc, ImageRejected):
        exc = ImageRejected("decode_error", f"{type(exc).__name__}: {exc}"[:200])
    return Rejection(exc.reason, filter=stage, detail=exc.detail, status=FAILED_TO_RESIZE)


def examine_bytes(data: bytes, sample: dict, bytes_rejection: Callable[[dict], Optional[Rejection]],
                  stage: str) -> tuple[dict, Optional["ImageHeader"], Optional[Rejection]]:
    """The first look at an image's bytes, where the download and read stages both start:
    sha256 and size, the header (its size; no pixel decoded), then `bytes_rejection` (the bytes
    filters, given `sample` with the bytes, hash and size: they see the bytes before anything
    else, so a hash-listed image is never read on), then whether the header was readable at all.

    Returns (the columns found: sha256, bytes and, when the header read, original_width/height;
    the opened header, which the caller closes, or None; the rejection, or None). Never raises."""
    columns = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    header = unreadable = None
    try:
        header = read_header(data)
        columns.update(original_width=header.width, original_height=header.height)
    except Exception as exc:  # ImageRejected, or whatever a strange file raises
        unreadable = exc
    rejection = bytes_rejection({**sample, "data": data, "sha256": columns["sha256"],
                                 "original_width": columns.get("original_width"),
                                 "original_height": columns.get("original_height")})
    if rejection is None and unreadable is not None:
        rejection = image_rejection(unreadable, stage)
    return columns, header, rejection


@dataclass
class NormalizedImage:
    data: bytes  # JPEG bytes
    width: int
    height: int
    original_width: int  # upright, before resizing
    original_height: int
    reencoded: bool
    bucket: Optional[tuple[int, int]] = None  # resize.mode buckets: the aspect bucket chosen


@dataclass
class ImageHeader:
    """An image opened from its bytes with only its header read: no pixel decoded yet."""

    image: Image.Image
    stored: tuple[int, int]  # width, height as stored
    width: int  # upright (EXIF orientation applied), as far as the header tells
    height: int
    orientation: Optional[int]  # None: a PNG, whose orientation is known only once decoded

    def close(self) -> None:
        self.image.close()


def _upright(stored: tuple[int, int], orientation: Optional[int]) -> tuple[int, int]:
    return (stored[1], stored[0]) if orientation in _SWAPS_SIDES else stored


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


def read_header(data: bytes) -> ImageHeader:
    """Open an image and read its header: size and orientation, no pixels. Raises ImageRejected
    (`decode_error`: not an image; `image_area_too_large`: beyond PIL's own bomb limit)."""
    if not data:
        raise ImageRejected("decode_error", "empty body")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected("image_area_too_large", str(exc)) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageRejected("decode_error", f"not a recognised image ({type(exc).__name__})") from exc
    orientation = orientation_of(im)
    width, height = _upright(im.size, orientation)
    return ImageHeader(im, im.size, width, height, orientation)


def normalize_image(data: bytes, cfg: ResizeConfig, max_image_area: int = MAX_IMAGE_AREA,
                    header: Optional[ImageHeader] = None, decoded: bool = False) -> NormalizedImage:
    """Check the area, then orient, resize, crop and encode one image, decoding it once.
    `header`: the file as `read_header` opened it (closed here), so the header is read once.
    `decoded`: these bytes have been decoded whole already (the score stage's decoder read them),
    so an image passed through unchanged is not decoded again to check it.
    Raises ImageRejected with a reason."""
    if header is None:
        header = read_header(data)
    try:
        return _normalize_opened(header, data, cfg, max_image_area, decoded)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected("image_area_too_large", str(exc)) from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise ImageRejected("decode_error", f"{type(exc).__name__}: {exc}"[:200]) from exc
    finally:
        header.close()


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


def _resample(cfg: ResizeConfig, shrinking: bool) -> Image.Resampling:
    if cfg.interpolation == "auto":
        # Shrinking: BOX averages each output pixel's footprint, i.e. img2dataset's
        # default "area" interpolation, and is several times cheaper than LANCZOS.
        # Enlarging: LANCZOS, img2dataset's default upscale interpolation.
        return Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
    return INTERPOLATIONS[cfg.interpolation]


def _planned(width: int, height: int, cfg: ResizeConfig) -> Geometry:
    geometry = plan(width, height, cfg)
    if geometry.resize is not None and geometry.resize[0] * geometry.resize[1] > MAX_OUTPUT_PIXELS:
        w, h = geometry.resize
        raise ImageRejected("image_area_too_large", f"{width}x{height} would become {w}x{h} > {MAX_OUTPUT_PIXELS} pixels")
    return geometry


def _normalize_opened(header: ImageHeader, data: bytes, cfg: ResizeConfig, max_image_area: int,
                      decoded: bool) -> NormalizedImage:
    im, (stored_w, stored_h), width, height = header.image, header.stored, header.width, header.height
    # The area does not depend on the orientation: checked from the header even when the
    # orientation is known only after decoding.
    if width * height > max_image_area:
        raise ImageRejected("image_area_too_large", f"{width}x{height} > {max_image_area} pixels")

    geometry = _planned(width, height, cfg)
    if geometry.unchanged and im.format == "JPEG" and im.mode == "RGB" and header.orientation == 1:
        if decoded and data.rstrip(b"\0").endswith(_JPEG_END):
            # Decoded whole elsewhere, and not cut short: checking it costs as much as the
            # rest of the write stage together (~0.35 ms of a 32 KB photo's ~0.4 ms).
            return NormalizedImage(data, width, height, width, height, reencoded=False, bucket=geometry.bucket)
        # Decoding at 1/8 scale still reads every entropy-coded byte, so a truncated or
        # corrupt file is caught at a fraction of the cost of a full decode.
        im.draft("RGB", (max(1, stored_w // 8), max(1, stored_h // 8)))
        with DECODE_BUDGET.hold(im.width * im.height):
            im.load()
        return NormalizedImage(data, width, height, width, height, reencoded=False, bucket=geometry.bucket)

    if geometry.resize is not None and im.format == "JPEG":
        # draft() keeps the decoded image at least this large, so quality is unaffected.
        im.draft("RGB", _upright(geometry.resize, header.orientation))
    with DECODE_BUDGET.hold(im.width * im.height):  # after draft(): the size actually decoded
        return _decode_and_resize(header, geometry, cfg)


def _decode_and_resize(header: ImageHeader, geometry: Geometry, cfg: ResizeConfig) -> NormalizedImage:
    im = header.image
    im.load()
    orientation, width, height = header.orientation, header.width, header.height
    if orientation is None:  # a PNG: its eXIf chunk, if any, has been read with the pixels
        orientation = orientation_of(im, decoded=True)
        width, height = _upright(header.stored, orientation)
        if (width, height) != (header.width, header.height):
            geometry = _planned(width, height, cfg)
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode not in _RESIZABLE_MODES:
        im = _to_rgb(im)
    # Otherwise resize first, then make RGB: a large greyscale or RGBA image is never
    # held as a full-size RGB copy too (resizing RGBA premultiplies alpha, so the
    # composite on white comes out the same either way).
    if geometry.resize is not None:
        im = im.resize(geometry.resize, _resample(cfg, shrinking=geometry.resize[0] < im.width))
    if geometry.crop is not None:
        crop_w, crop_h = geometry.crop
        left, top = (im.width - crop_w) // 2, (im.height - crop_h) // 2
        im = im.crop((left, top, left + crop_w, top + crop_h))
    im = _to_rgb(im)
    return NormalizedImage(_encode_jpeg(im, cfg.quality), im.width, im.height, width, height,
                           reencoded=True, bucket=geometry.bucket)
