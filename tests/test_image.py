"""Tests for pipeline.image.normalize_image: sizes, rejections, orientation, colour modes, broken files."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from curate.pipeline.config import ResizeConfig
from curate.pipeline.image import ImageRejected, normalize_image

RED, GREEN, BLUE, WHITE = (220, 30, 30), (30, 160, 50), (30, 70, 220), (255, 255, 255)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **kw)
    return out.getvalue()


def solid(size, colour=RED, mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def noise(size, seed=0) -> Image.Image:
    """Incompressible content, so that JPEG bytes are spread over the whole file."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def normalize(data: bytes, **cfg):
    """normalize_image, checking what must hold for every output: an RGB JPEG of the stated size."""
    result = normalize_image(data, ResizeConfig(**cfg))
    out = Image.open(io.BytesIO(result.data))
    assert out.format == "JPEG"
    assert out.mode == "RGB"
    assert out.size == (result.width, result.height)
    out.load()
    return result, out


def rejected(data: bytes, **cfg) -> ImageRejected:
    with pytest.raises(ImageRejected) as exc:
        normalize_image(data, ResizeConfig(**cfg))
    return exc.value


def close(pixel, colour, tol=30) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, colour))


# --- sizes ------------------------------------------------------------------------


def test_keep_ratio_shrinks_short_side_to_image_size():
    result, out = normalize(encode(solid((200, 100)), "PNG"), image_size=64)
    assert (result.width, result.height) == (128, 64)
    assert (result.original_width, result.original_height) == (200, 100)
    assert result.reencoded
    assert close(out.getpixel((64, 32)), RED)


def test_keep_ratio_portrait_jpeg():
    # JPEG decoded at reduced size (draft) before resizing: the size must still be exact.
    result, out = normalize(encode(solid((600, 1800), BLUE), "JPEG", quality=95), image_size=64)
    assert (result.width, result.height) == (64, 192)
    assert (result.original_width, result.original_height) == (600, 1800)
    assert close(out.getpixel((32, 96)), BLUE)


def test_keep_ratio_rounds_the_long_side():
    result, _ = normalize(encode(solid((800, 600)), "JPEG"), image_size=64)
    assert (result.width, result.height) == (85, 64)  # 800 * 64 / 600 = 85.3


def test_resize_only_if_bigger_leaves_small_images():
    result, _ = normalize(encode(solid((50, 40)), "PNG"), image_size=64)
    assert (result.width, result.height) == (50, 40)


def test_small_upright_rgb_jpeg_passes_through_byte_for_byte():
    data = encode(noise((50, 40)), "JPEG", quality=80)
    result, _ = normalize(data, image_size=64)
    assert result.reencoded is False
    assert result.data == data
    assert (result.width, result.height) == (50, 40)


def test_jpeg_exactly_image_size_passes_through():
    data = encode(noise((64, 96)), "JPEG")
    result, _ = normalize(data, image_size=64)
    assert result.data == data


def test_upscale_when_not_only_if_bigger():
    result, _ = normalize(encode(solid((50, 40)), "JPEG"), image_size=64, resize_only_if_bigger=False)
    assert (result.width, result.height) == (80, 64)
    assert result.reencoded


def test_center_crop_gives_a_centred_square():
    # Red | green | blue stripes; the centre 100 of 200 columns are all green.
    im = solid((200, 100), GREEN)
    im.paste(RED, (0, 0, 40, 100))
    im.paste(BLUE, (160, 0, 200, 100))
    result, out = normalize(encode(im, "PNG"), image_size=64, resize_mode="center_crop")
    assert (result.width, result.height) == (64, 64)
    assert (result.original_width, result.original_height) == (200, 100)
    pixels = np.asarray(out)[:, 3:-3].reshape(-1, 3).astype(int)
    assert (pixels[:, 1] > pixels[:, 0] + 60).all() and (pixels[:, 1] > pixels[:, 2] + 40).all()


def test_center_crop_portrait():
    result, _ = normalize(encode(solid((100, 300)), "JPEG"), image_size=64, resize_mode="center_crop")
    assert (result.width, result.height) == (64, 64)


def test_center_crop_of_large_enough_image_without_resize():
    # Short side already image_size: no resize, but still cropped to a square.
    result, _ = normalize(encode(solid((64, 100)), "JPEG"), image_size=64, resize_mode="center_crop")
    assert (result.width, result.height) == (64, 64)
    assert result.reencoded


def test_center_crop_leaves_small_image_uncropped():
    result, _ = normalize(encode(solid((50, 40)), "PNG"), image_size=64, resize_mode="center_crop")
    assert (result.width, result.height) == (50, 40)


def test_resize_mode_none_keeps_size():
    result, _ = normalize(encode(solid((300, 200)), "PNG"), image_size=64, resize_mode="none")
    assert (result.width, result.height) == (300, 200)
    data = encode(noise((300, 200)), "JPEG")
    result, _ = normalize(data, image_size=64, resize_mode="none")
    assert result.data == data and not result.reencoded


# --- rejections --------------------------------------------------------------------


def test_min_image_size():
    err = rejected(encode(solid((100, 63)), "PNG"), min_image_size=64)
    assert err.reason == "image_too_small"
    result, _ = normalize(encode(solid((100, 64)), "PNG"), min_image_size=64, image_size=64)
    assert (result.width, result.height) == (100, 64)


@pytest.mark.parametrize("size", [(310, 100), (100, 310)])
def test_max_aspect_ratio(size):
    assert rejected(encode(solid(size), "PNG"), max_aspect_ratio=3.0).reason == "aspect_ratio_too_large"


def test_aspect_ratio_at_the_limit_is_kept():
    result, _ = normalize(encode(solid((300, 100)), "PNG"), max_aspect_ratio=3.0, image_size=50)
    assert (result.width, result.height) == (150, 50)


def test_default_aspect_ratio_is_unlimited():
    result, _ = normalize(encode(solid((2000, 10)), "PNG"), image_size=64)
    assert (result.width, result.height) == (2000, 10)


def test_area_limit():
    assert rejected(encode(solid((101, 100)), "PNG"), max_image_area=10_000).reason == "image_area_too_large"
    result, _ = normalize(encode(solid((100, 100)), "PNG"), max_image_area=10_000)
    assert (result.width, result.height) == (100, 100)


def _huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height, all black: ~100 KB on disk, ~GB decoded."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    rows = bytes(1 + (width + 7) // 8) * 1000  # filter byte + packed bits, 1000 rows
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(rows) for _ in range(height // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("max_image_area", [89_478_485, 10**12])
def test_decompression_bomb_rejected_from_header(max_image_area):
    # 900 M pixels: PIL's own bomb check or ours must refuse it before decoding anything.
    data = _huge_png(30_000, 30_000)
    assert len(data) < 200_000
    start = time.monotonic()
    err = rejected(data, max_image_area=max_image_area)
    assert err.reason == "image_area_too_large"
    assert time.monotonic() - start < 1.0


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_area_checked_before_decoding_below_pils_own_limit():
    # 10000 x 10000 = 100 M pixels: under PIL's error threshold, over our configured limit.
    data = _huge_png(10_000, 10_000)
    start = time.monotonic()
    assert rejected(data, max_image_area=50_000_000).reason == "image_area_too_large"
    assert time.monotonic() - start < 1.0


# --- orientation -----------------------------------------------------------------------


def _oriented_jpeg(stored_size, orientation: int) -> bytes:
    """Stored pixels: white, with a red block in the stored top-left corner."""
    im = solid(stored_size, WHITE)
    im.paste(RED, (0, 0, stored_size[0] // 4, stored_size[1] // 4))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", exif=exif.tobytes(), quality=95)


def _corner_colours(out: Image.Image) -> dict[str, tuple]:
    w, h = out.size
    dx, dy = w // 10, h // 10
    return {
        "top_left": out.getpixel((dx, dy)),
        "top_right": out.getpixel((w - 1 - dx, dy)),
        "bottom_left": out.getpixel((dx, h - 1 - dy)),
        "bottom_right": out.getpixel((w - 1 - dx, h - 1 - dy)),
    }


def test_exif_orientation_6_comes_out_upright():
    # Orientation 6: the camera was turned; viewers rotate 90 degrees clockwise, so the
    # stored top-left corner is shown top-right and the stored 120x80 is shown 80x120.
    data = _oriented_jpeg((120, 80), 6)
    result, out = normalize(data, resize_mode="none")
    assert result.reencoded
    assert (result.original_width, result.original_height) == (80, 120)
    assert out.size == (80, 120)
    corners = _corner_colours(out)
    assert close(corners["top_right"], RED)
    for name in ("top_left", "bottom_left", "bottom_right"):
        assert close(corners[name], WHITE), name


def test_exif_orientation_6_with_resize():
    # Decoded at reduced size in its stored orientation, then rotated: upright size exact.
    result, out = normalize(_oriented_jpeg((1200, 800), 6), image_size=64)
    assert (result.original_width, result.original_height) == (800, 1200)
    assert out.size == (64, 96)
    assert close(_corner_colours(out)["top_right"], RED)
    assert close(_corner_colours(out)["top_left"], WHITE)


def test_small_image_with_orientation_is_not_passed_through():
    data = _oriented_jpeg((60, 40), 6)
    result, out = normalize(data, image_size=64)
    assert result.data != data
    assert out.size == (40, 60)


def test_exif_orientation_3_upside_down():
    result, out = normalize(_oriented_jpeg((120, 80), 3), resize_mode="none")
    assert out.size == (120, 80)
    assert close(_corner_colours(out)["bottom_right"], RED)
    assert close(_corner_colours(out)["top_left"], WHITE)


def test_orientation_swaps_sides_before_the_size_checks():
    # Stored 300x100 but shown 100x300: min side and aspect are judged on the upright image.
    data = _oriented_jpeg((300, 100), 8)
    result, _ = normalize(data, image_size=50)
    assert (result.original_width, result.original_height) == (100, 300)
    assert (result.width, result.height) == (50, 150)


# --- colour modes ------------------------------------------------------------------------


def test_rgba_composited_on_white():
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent black
    im.paste((30, 70, 220, 255), (16, 16, 48, 48))
    _, out = normalize(encode(im, "PNG"))
    assert close(out.getpixel((4, 4)), WHITE, tol=8)
    assert close(out.getpixel((32, 32)), BLUE)


def test_half_transparent_is_blended_with_white():
    im = Image.new("RGBA", (32, 32), (0, 0, 0, 128))
    _, out = normalize(encode(im, "PNG"))
    assert close(out.getpixel((16, 16)), (127, 127, 127), tol=6)


def test_palette_with_transparency_composited_on_white():
    im = Image.new("P", (64, 64), 0)
    im.putpalette([0, 0, 0, 220, 30, 30] + [0] * (256 * 3 - 6))
    im.paste(1, (16, 16, 48, 48))
    data = encode(im, "PNG", transparency=0)  # index 0 (black) is transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    _, out = normalize(data)
    assert close(out.getpixel((4, 4)), WHITE, tol=8)
    assert close(out.getpixel((32, 32)), RED)


def test_transparent_gif_composited_on_white():
    im = Image.new("P", (64, 64), 0)
    im.putpalette([0, 0, 0, 30, 70, 220] + [0] * (256 * 3 - 6))
    im.paste(1, (16, 16, 48, 48))
    _, out = normalize(encode(im, "GIF", transparency=0))
    assert close(out.getpixel((4, 4)), WHITE, tol=8)
    assert close(out.getpixel((32, 32)), BLUE)


def test_la_composited_on_white():
    im = Image.new("LA", (32, 32), (0, 0))
    _, out = normalize(encode(im, "PNG"))
    assert close(out.getpixel((16, 16)), WHITE, tol=8)


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG")  # pure red in CMYK
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    result, out = normalize(data)
    assert result.reencoded
    assert close(out.getpixel((32, 32)), (255, 0, 0))


def test_16_bit_png_keeps_its_greys():
    # Black, mid-grey and white stripes in 16 bits.
    values = np.repeat(np.array([0, 32768, 65535], dtype=np.uint16), 32)
    data = encode(Image.fromarray(np.tile(values, (32, 1))), "PNG")
    reopened = Image.open(io.BytesIO(data))
    assert reopened.mode.startswith("I") and reopened.getpixel((48, 16)) == 32768
    _, out = normalize(data)
    assert close(out.getpixel((16, 16)), (0, 0, 0), tol=4)
    assert close(out.getpixel((48, 16)), (128, 128, 128), tol=4)
    assert close(out.getpixel((80, 16)), (255, 255, 255), tol=4)


def test_one_bit_png():
    im = Image.new("1", (32, 32), 0)
    im.paste(1, (16, 0, 32, 32))
    _, out = normalize(encode(im, "PNG"))
    assert close(out.getpixel((4, 16)), (0, 0, 0), tol=8)
    assert close(out.getpixel((28, 16)), WHITE, tol=8)


@pytest.mark.parametrize(
    "fmt, mode, colour",
    [
        ("PNG", "L", 100),
        ("JPEG", "L", 100),
        ("WEBP", "RGB", RED),
        ("GIF", "RGB", RED),
        ("BMP", "RGB", GREEN),
        ("TIFF", "RGB", BLUE),
        ("TIFF", "CMYK", (0, 0, 0, 255)),  # black
        ("PNG", "RGB", GREEN),
    ],
)
def test_formats_and_modes_end_as_rgb_jpeg(fmt, mode, colour):
    data = encode(Image.new(mode, (48, 40), colour), fmt, **({"quality": 95} if fmt in ("WEBP", "JPEG") else {}))
    result, out = normalize(data)
    assert (result.width, result.height) == (48, 40)
    expected = {"L": (100, 100, 100), "CMYK": (0, 0, 0)}.get(mode, colour)
    assert close(out.getpixel((24, 20)), expected, tol=25)
    if fmt != "JPEG" or mode != "RGB":
        assert result.reencoded


# --- broken inputs --------------------------------------------------------------------------


def test_truncated_jpeg_is_a_decode_error():
    data = encode(noise((200, 150)), "JPEG", quality=90)
    for cfg in ({"image_size": 512}, {"image_size": 64}):  # pass-through check and resize path
        assert rejected(data[: len(data) // 2], **cfg).reason == "decode_error"


def test_truncated_png_is_a_decode_error():
    data = encode(noise((200, 150)), "PNG")
    assert rejected(data[: len(data) // 2]).reason == "decode_error"


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all" * 10, b"<html><body>404</body></html>", b"\xff\xd8\xff\xe0" + bytes(5000)],
    ids=["empty", "text", "html", "jpeg-magic-then-zeros"],
)
def test_garbage_is_a_decode_error(data):
    assert rejected(data).reason == "decode_error"
