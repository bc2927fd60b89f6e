"""Tests for pipeline.image: the header probe, and normalize_image's one decode-resize-encode to the
`resize:` geometry (keep_ratio, center_crop, aspect buckets): sizes, rejections, orientation,
colour modes, broken files; and the download stage's order: header, bytes filters, one decode."""

from __future__ import annotations

import hashlib
import io
import math
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from curate.filters import build_stage_chain
from curate.filters.resolution import Resolution
from curate.pipeline.config import MAX_IMAGE_AREA, ResizeConfig, RunConfig
from curate.pipeline.geometry import aspect_buckets, choose_bucket
from curate.pipeline.image import ImageRejected, normalize_image, read_header
from curate.pipeline.records import FAILED_TO_RESIZE, FILTERED, SUCCESS
from curate.pipeline.stages.download import _process_row

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


def halves(width, height) -> bytes:
    """Left half red, right half blue, lossless: shows where a crop took its pixels from."""
    im = Image.new("RGB", (width, height), (220, 30, 30))
    ImageDraw.Draw(im).rectangle((width // 2, 0, width, height), fill=(30, 70, 220))
    return encode(im, "PNG")


def normalize(data: bytes, max_image_area: int = MAX_IMAGE_AREA, **cfg):
    """normalize_image, checking what must hold for every output: an RGB JPEG of the stated size."""
    result = normalize_image(data, ResizeConfig(**cfg), max_image_area)
    out = Image.open(io.BytesIO(result.data))
    assert out.format == "JPEG"
    assert out.mode == "RGB"
    assert out.size == (result.width, result.height)
    out.load()
    return result, out


def rejected(data: bytes, max_image_area: int = MAX_IMAGE_AREA, **cfg) -> ImageRejected:
    with pytest.raises(ImageRejected) as exc:
        normalize_image(data, ResizeConfig(**cfg), max_image_area)
    return exc.value


def judged(data: bytes, **rules):
    """The resolution filter's answer on the header, as the download stage asks it before decoding."""
    header = read_header(data)
    try:
        rejection = Resolution(**rules)({"data": data, "original_width": header.width, "original_height": header.height})
    finally:
        header.close()
    return rejection and rejection.reason


def close(pixel, colour, tol=30) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, colour))


# --- sizes: keep_ratio, center_crop, none -----------------------------------------------


def test_keep_ratio_shrinks_short_side_to_size():
    result, out = normalize(encode(solid((200, 100)), "PNG"), size=64)
    assert (result.width, result.height) == (128, 64)
    assert (result.original_width, result.original_height) == (200, 100)
    assert result.reencoded and result.bucket is None
    assert close(out.getpixel((64, 32)), RED)


def test_keep_ratio_portrait_jpeg():
    # JPEG decoded at reduced size (draft) before resizing: the size must still be exact.
    result, out = normalize(encode(solid((600, 1800), BLUE), "JPEG", quality=95), size=64)
    assert (result.width, result.height) == (64, 192)
    assert (result.original_width, result.original_height) == (600, 1800)
    assert close(out.getpixel((32, 96)), BLUE)


def test_keep_ratio_rounds_the_long_side():
    result, _ = normalize(encode(solid((800, 600)), "JPEG"), size=64)
    assert (result.width, result.height) == (85, 64)  # 800 * 64 / 600 = 85.3


def test_small_images_are_not_enlarged_by_default():
    assert ResizeConfig().upscale is False  # img2dataset's resize_only_if_bigger: true
    result, _ = normalize(encode(solid((50, 40)), "PNG"), size=64)
    assert (result.width, result.height) == (50, 40)


def test_small_upright_rgb_jpeg_passes_through_byte_for_byte():
    data = encode(noise((50, 40)), "JPEG", quality=80)
    result, _ = normalize(data, size=64)
    assert result.reencoded is False
    assert result.data == data
    assert (result.width, result.height) == (50, 40)


def test_jpeg_exactly_size_passes_through():
    data = encode(noise((64, 96)), "JPEG")
    result, _ = normalize(data, size=64)
    assert result.data == data


def test_upscale_enlarges_small_images():
    result, _ = normalize(encode(solid((50, 40)), "JPEG"), size=64, upscale=True)
    assert (result.width, result.height) == (80, 64)
    assert result.reencoded


@pytest.mark.parametrize("size_in", [(640, 480), (480, 640), (1000, 333), (200, 150), (97, 301), (256, 256)])
@pytest.mark.parametrize("interpolation", ["auto", "lanczos", "area"])
def test_keep_ratio_keeps_the_aspect_within_a_pixel(size_in, interpolation):
    w, h = size_in
    result, out = normalize(encode(solid(size_in, BLUE), "JPEG", quality=95), size=256, upscale=True,
                            interpolation=interpolation)
    assert min(out.size) == 256  # with upscale, small images are enlarged too
    assert abs(max(out.size) - max(w, h) * 256 / min(w, h)) <= 1
    assert (out.width >= out.height) == (w >= h)


def test_center_crop_gives_a_centred_square():
    # Red | green | blue stripes; the centre 100 of 200 columns are all green.
    im = solid((200, 100), GREEN)
    im.paste(RED, (0, 0, 40, 100))
    im.paste(BLUE, (160, 0, 200, 100))
    result, out = normalize(encode(im, "PNG"), size=64, mode="center_crop")
    assert (result.width, result.height) == (64, 64)
    assert (result.original_width, result.original_height) == (200, 100)
    pixels = np.asarray(out)[:, 3:-3].reshape(-1, 3).astype(int)
    assert (pixels[:, 1] > pixels[:, 0] + 60).all() and (pixels[:, 1] > pixels[:, 2] + 40).all()


@pytest.mark.parametrize("interpolation", ["auto", "lanczos", "bicubic", "bilinear", "area"])
def test_center_crop_takes_the_middle(interpolation):
    result, out = normalize(halves(400, 200), size=128, mode="center_crop", interpolation=interpolation)
    assert out.size == (128, 128) and result.bucket is None
    # 400x200 → 256x128, the middle 128 columns: the red/blue edge is in the middle.
    left, right = out.getpixel((40, 64)), out.getpixel((88, 64))
    assert left[0] > 150 > left[2] and right[2] > 150 > right[0]


def test_center_crop_portrait():
    result, _ = normalize(encode(solid((100, 300)), "JPEG"), size=64, mode="center_crop")
    assert (result.width, result.height) == (64, 64)


def test_center_crop_of_large_enough_image_without_resize():
    # Short side already size: no resize, but still cropped to a square.
    result, _ = normalize(encode(solid((64, 100)), "JPEG"), size=64, mode="center_crop")
    assert (result.width, result.height) == (64, 64)
    assert result.reencoded


def test_center_crop_leaves_small_image_uncropped():
    result, _ = normalize(encode(solid((50, 40)), "PNG"), size=64, mode="center_crop")
    assert (result.width, result.height) == (50, 40)


def test_mode_none_keeps_size():
    result, _ = normalize(encode(solid((300, 200)), "PNG"), size=64, mode="none")
    assert (result.width, result.height) == (300, 200)
    data = encode(noise((300, 200)), "JPEG")
    result, _ = normalize(data, size=64, mode="none")
    assert result.data == data and not result.reencoded


def test_auto_interpolation_is_area_to_shrink_and_lanczos_to_enlarge():
    big, small = encode(noise((300, 200)), "PNG"), encode(noise((40, 30)), "PNG")
    assert normalize(big, size=64)[0].data == normalize(big, size=64, interpolation="area")[0].data
    assert normalize(big, size=64)[0].data != normalize(big, size=64, interpolation="lanczos")[0].data
    enlarged = normalize(small, size=64, upscale=True)[0].data
    assert enlarged == normalize(small, size=64, upscale=True, interpolation="lanczos")[0].data
    assert enlarged != normalize(small, size=64, upscale=True, interpolation="area")[0].data


def test_quality_is_the_jpeg_quality_of_reencoded_images():
    data = encode(noise((300, 200)), "PNG")
    low, high = normalize(data, size=128, quality=40)[0], normalize(data, size=128, quality=95)[0]
    assert len(low.data) < 0.6 * len(high.data)


def test_an_enlargement_beyond_the_output_limit_is_refused_before_decoding():
    sliver = encode(solid((2, 4000)), "JPEG")  # 4096 x 8192000 if it were made
    for mode in ("keep_ratio", "center_crop"):
        assert rejected(sliver, size=4096, mode=mode, upscale=True).reason == "image_area_too_large"
    result, _ = normalize(sliver, size=4096, mode="keep_ratio")  # not enlarged: kept as it is
    assert (result.width, result.height) == (2, 4000)


# --- aspect buckets ------------------------------------------------------------------------


def test_aspect_buckets_are_multiples_of_64_with_about_the_target_area():
    assert aspect_buckets(256, 2.0) == ((192, 320), (256, 256), (320, 192))
    assert aspect_buckets(512, 2.0) == ((384, 640), (448, 576), (512, 512), (576, 448), (640, 384))
    for size, ratio in [(512, 2.0), (768, 3.0), (1024, 4.0)]:
        buckets = aspect_buckets(size, ratio)
        assert (size, size) in buckets
        for w, h in buckets:
            assert w % 64 == 0 and h % 64 == 0
            assert 0.75 * size * size <= w * h <= size * size
            assert 1 / ratio <= w / h <= ratio
            assert (h, w) in buckets


def test_bucket_choice_is_the_closest_aspect():
    buckets = aspect_buckets(512, 2.0)
    for w, h in [(1000, 700), (500, 900), (640, 641), (1234, 567)]:
        chosen = choose_bucket(w, h, buckets)
        best = min(abs(math.log(bw / bh) - math.log(w / h)) for bw, bh in buckets)
        assert abs(math.log(chosen[0] / chosen[1]) - math.log(w / h)) == best


@pytest.mark.parametrize(
    "size_in, bucket",
    [
        ((1000, 1000), (512, 512)),
        ((1920, 1080), (640, 384)),  # 16:9 → 5:3, the widest of max_ratio 2
        ((1080, 1920), (384, 640)),
        ((800, 600), (576, 448)),  # 4:3 → 9:7
        ((600, 800), (448, 576)),
        ((3000, 500), (640, 384)),  # beyond max_ratio: the most elongated bucket
        ((300, 280), (512, 512)),  # smaller than its bucket: enlarged, with upscale
    ],
)
def test_buckets_at_download_give_exactly_the_bucket_when_covering(size_in, bucket):
    assert choose_bucket(*size_in, aspect_buckets(512, 2.0)) == bucket
    result, out = normalize(encode(solid(size_in), "JPEG"), size=512, mode="buckets", bucket_max_ratio=2.0,
                            upscale=True)
    assert out.size == bucket and result.bucket == bucket
    assert (result.original_width, result.original_height) == size_in


def test_buckets_crop_only_the_minimal_excess_from_the_centre():
    # 400x600 (2:3) into bucket 192x320 (3:5): scaled to 213x320, 21 columns cropped, about half each side.
    result, out = normalize(halves(400, 600), size=256, mode="buckets", interpolation="bicubic")
    assert result.bucket == (192, 320) and out.size == (192, 320)
    red_columns = sum(1 for x in range(out.width) if out.getpixel((x, 160))[0] > 128)
    assert abs(red_columns - 96) <= 2  # the red/blue edge stays in the middle
    # An image of exactly a bucket's aspect loses nothing: both colours reach the borders.
    result, out = normalize(halves(384, 640), size=256, mode="buckets")
    assert out.size == (192, 320)
    assert out.getpixel((0, 160))[0] > 150 and out.getpixel((191, 160))[2] > 150


def test_an_image_at_its_bucket_is_not_reencoded():
    data = encode(noise((320, 192)), "JPEG")
    result, _ = normalize(data, size=256, mode="buckets")
    assert result.data == data and not result.reencoded and result.bucket == (320, 192)


def test_buckets_do_not_enlarge_without_upscale():
    # 200x150 → bucket 320x192 (5:3), which it cannot cover: cropped to 5:3 at its own scale,
    # 200x120; the loader of `curate train` resizes it to the bucket.
    result, out = normalize(halves(200, 150), size=256, mode="buckets")
    assert result.bucket == (320, 192) and out.size == (200, 120)
    assert out.getpixel((2, 60))[0] > 150 and out.getpixel((197, 60))[2] > 150  # only rows cropped
    # Of exactly the bucket's aspect, smaller: nothing to crop, passed through byte for byte.
    data = encode(noise((160, 96)), "JPEG")
    result, _ = normalize(data, size=256, mode="buckets")
    assert result.data == data and result.bucket == (320, 192)


def test_buckets_enlarge_with_upscale():
    result, out = normalize(halves(200, 150), size=256, mode="buckets", upscale=True)
    assert result.bucket == (320, 192) and out.size == (320, 192)


def test_buckets_judge_the_upright_image():
    # Stored 1200x800 with orientation 6: shown 800x1200, a portrait bucket.
    result, out = normalize(_oriented_jpeg((1200, 800), 6), size=256, mode="buckets")
    assert result.bucket == (192, 320) and out.size == (192, 320)
    assert close(_corner_colours(out)["top_right"], RED)


def test_bucket_size_must_be_a_multiple_of_64():
    with pytest.raises(ValueError, match="multiple of 64"):
        ResizeConfig(size=300, mode="buckets")
    assert ResizeConfig(size=300, mode="keep_ratio").size == 300


# --- the header, read once -------------------------------------------------------------------


def test_read_header_gives_the_upright_size_and_orientation():
    header = read_header(_oriented_jpeg((120, 80), 6))
    assert (header.width, header.height, header.orientation, header.stored) == (80, 120, 6, (120, 80))
    header.close()
    png = read_header(encode(solid((30, 20)), "PNG"))
    assert (png.width, png.height, png.orientation) == (30, 20, None)  # a PNG's is known once decoded
    png.close()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_read_header_decodes_nothing():
    data = _huge_png(10_000, 10_000)  # 100 M pixels if decoded
    start = time.monotonic()
    header = read_header(data)
    assert (header.width, header.height) == (10_000, 10_000)
    header.close()
    assert time.monotonic() - start < 0.5


def test_normalize_goes_on_from_the_header_it_is_given():
    data = encode(noise((300, 200)), "JPEG")
    header = read_header(data)
    assert normalize_image(data, ResizeConfig(size=64), header=header).data == normalize(data, size=64)[0].data


@pytest.mark.parametrize("data", [b"", b"<html>404</html>"])
def test_read_header_of_a_non_image_is_a_decode_error(data):
    with pytest.raises(ImageRejected) as exc:
        read_header(data)
    assert exc.value.reason == "decode_error"


# --- rejections --------------------------------------------------------------------


def test_min_side_from_the_header():
    assert judged(encode(solid((100, 63)), "PNG"), min_side=64) == "resolution: side<64"
    assert judged(encode(solid((100, 64)), "PNG"), min_side=64) is None
    result, _ = normalize(encode(solid((100, 64)), "PNG"), size=64)
    assert (result.width, result.height) == (100, 64)


@pytest.mark.parametrize("size", [(310, 100), (100, 310)])
def test_max_aspect_ratio(size):
    assert judged(encode(solid(size), "PNG"), max_aspect_ratio=3.0) == "resolution: aspect>3"


def test_aspect_ratio_at_the_limit_is_kept():
    data = encode(solid((300, 100)), "PNG")
    assert judged(data, max_aspect_ratio=3.0) is None
    result, _ = normalize(data, size=50)
    assert (result.width, result.height) == (150, 50)


def test_default_aspect_ratio_is_unlimited():
    data = encode(solid((2000, 10)), "PNG")
    assert judged(data) is None
    result, _ = normalize(data, size=64)
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
    result, out = normalize(data, mode="none")
    assert result.reencoded
    assert (result.original_width, result.original_height) == (80, 120)
    assert out.size == (80, 120)
    corners = _corner_colours(out)
    assert close(corners["top_right"], RED)
    for name in ("top_left", "bottom_left", "bottom_right"):
        assert close(corners[name], WHITE), name


def test_exif_orientation_6_with_resize():
    # Decoded at reduced size in its stored orientation, then rotated: upright size exact.
    result, out = normalize(_oriented_jpeg((1200, 800), 6), size=64)
    assert (result.original_width, result.original_height) == (800, 1200)
    assert out.size == (64, 96)
    assert close(_corner_colours(out)["top_right"], RED)
    assert close(_corner_colours(out)["top_left"], WHITE)


def test_small_image_with_orientation_is_not_passed_through():
    data = _oriented_jpeg((60, 40), 6)
    result, out = normalize(data, size=64)
    assert result.data != data
    assert out.size == (40, 60)


def test_exif_orientation_3_upside_down():
    result, out = normalize(_oriented_jpeg((120, 80), 3), mode="none")
    assert out.size == (120, 80)
    assert close(_corner_colours(out)["bottom_right"], RED)
    assert close(_corner_colours(out)["top_left"], WHITE)


def test_orientation_swaps_sides_before_the_size_checks():
    # Stored 300x100 but shown 100x300: min side and aspect are judged on the upright image.
    data = _oriented_jpeg((300, 100), 8)
    result, _ = normalize(data, size=50)
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
    for cfg in ({"size": 512}, {"size": 64}):  # pass-through check and resize path
        assert rejected(data[: len(data) // 2], **cfg).reason == "decode_error"


def test_an_image_decoded_elsewhere_passes_unchanged_without_a_second_decode_unless_cut_short():
    # decoded=True: the score stage's decoder read these bytes whole. The write stage then skips
    # its own checking decode: a file whose entropy data is garbage (but whole) passes, which
    # shows the decode was skipped; one cut short (no end marker) is still decoded and rejected.
    data = encode(noise((200, 150)), "JPEG", quality=90)
    start = data.index(b"\xff\xda") + 20  # inside the entropy-coded scan
    garbage = data[:start] + bytes(range(256)) * 8 + data[start + 2048:]
    cut = data[: len(data) // 2]
    resize = ResizeConfig(size=512)
    assert rejected(garbage, size=512).reason == "decode_error"
    passed = normalize_image(garbage, resize, decoded=True)
    assert (passed.data, passed.reencoded, passed.width, passed.height) == (garbage, False, 200, 150)
    assert normalize_image(data, resize, decoded=True).data == data
    with pytest.raises(ImageRejected, match="decode_error"):
        normalize_image(cut, resize, decoded=True)
    assert normalize_image(data, ResizeConfig(size=64), decoded=True).reencoded  # a resize decodes anyway


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


# --- in the download stage: the header first, then the bytes filters, then one decode ----------


def _png_truncated_after_header(size) -> bytes:
    """A PNG whose header says `size` and whose image data is cut off: unreadable past the header."""
    data = encode(noise(size), "PNG")
    return data[: data.index(b"IDAT") + 20]


def _download(server, tmp_path, files: dict[str, bytes], filters: list[dict], **resize) -> dict[str, tuple]:
    """Each file served over HTTP and run through the download stage's row processing."""
    cfg = RunConfig.model_validate({
        "input": {"paths": ["unused.parquet"]}, "output": {"path": str(tmp_path / "out")},
        "download": {"allow_private_addresses": True, "timeout": 10}, "resize": resize, "filters": filters,
    })
    chain = build_stage_chain(cfg.filter_specs(), "bytes", {"clip": cfg.clip, "root": str(tmp_path)})
    results = {}
    for name, data in files.items():
        (server.root_dir / "images").mkdir(exist_ok=True)
        (server.root_dir / "images" / name).write_bytes(data)
        row = {"key": "0000000000", "url": f"{server.base_url}/images/{name}", "caption": "x", "meta": {}}
        results[name] = _process_row(row, cfg, chain)
    return results


def test_resolution_rejects_from_the_header_before_decoding(server, tmp_path):
    files = {
        "tiny-truncated.png": _png_truncated_after_header((10, 10)),  # header 10x10, no readable pixels
        "big-truncated.png": _png_truncated_after_header((200, 150)),
        "wide.png": encode(solid((400, 100)), "PNG"),
        "garbage.jpg": b"\xff\xd8\xff\xe0" + bytes(5000),
    }
    assert rejected(files["tiny-truncated.png"]).reason == "decode_error"  # were it decoded
    got = _download(server, tmp_path, files, [{"name": "resolution", "min_side": 64, "max_aspect_ratio": 3}])
    tiny, image = got["tiny-truncated.png"]
    # Rejected by the rule on the header, not as a decode error: the pixels were never decoded.
    assert (tiny["reason"], image) == ("resolution: side<64", None)
    assert (tiny["original_width"], tiny["original_height"]) == (10, 10)  # for the report's size chart
    assert (tiny["reject_metric"], tiny["reject_value"], tiny["reject_threshold"], tiny["error_message"]) == (
        "side", 10, 64, "10x10")
    big, _ = got["big-truncated.png"]
    assert big["reason"] == "decode_error" and (big["original_width"], big["original_height"]) == (200, 150)
    # img2dataset's statuses: a filter's drop is curate's own, a decoder's is failed_to_resize.
    assert (tiny["status"], big["status"]) == (FILTERED, FAILED_TO_RESIZE)
    assert got["wide.png"][0]["reason"] == "resolution: aspect>3"
    # No header, no size: the rule keeps it and the decoder rejects it.
    garbage, _ = got["garbage.jpg"]
    assert garbage["reason"] == "decode_error" and garbage.get("original_width") is None


def test_the_hash_blocklist_runs_before_resolution(server, tmp_path):
    small = encode(solid((10, 10)), "PNG")
    (tmp_path / "blocked.txt").write_text(hashlib.sha256(small).hexdigest() + "\n")
    filters = [{"name": "resolution", "min_side": 64}, {"name": "hash_blocklist", "paths": [str(tmp_path / "blocked.txt")]}]
    got = _download(server, tmp_path, {"small.png": small}, filters)
    assert got["small.png"][0]["reason"] == "unsafe: hash_blocklist"


def test_a_kept_image_is_normalized_once_with_its_bucket(server, tmp_path):
    data = encode(noise((400, 600)), "JPEG", quality=90)
    got = _download(server, tmp_path, {"photo.jpg": data}, [{"name": "resolution", "min_side": 64}],
                    size=256, mode="buckets")
    record, image = got["photo.jpg"]
    assert record["status"] == SUCCESS and record["bucket"] == [192, 320]
    assert (record["width"], record["height"], record["original_width"], record["original_height"]) == (192, 320, 400, 600)
    assert image == normalize_image(data, ResizeConfig(size=256, mode="buckets")).data
