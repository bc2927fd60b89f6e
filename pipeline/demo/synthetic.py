"""Synthetic captioned images whose captions say exactly what they show.

The demo, the tests and the benchmarks need image/caption data without the
internet, and a tiny CLIP model trained later needs captions that are
verifiably right (or deliberately wrong).  A small scene model (coloured
shapes on a coloured background) gives both: the caption is derived from the
same `Scene` the pixels are drawn from, so it can never drift from them.

`photo_like_jpeg` is separate: it makes content-free images whose JPEG size
and decode cost resemble real photos, for throughput benchmarks.
"""

from __future__ import annotations

import io
import math
import pathlib
import random
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from PIL import Image, ImageChops, ImageDraw, ImageFilter

# Fixed, well-separated RGB values so that a colour name can be recovered
# from a pixel even after JPEG compression.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (130, 50, 170),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
MAX_COUNT = 4
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}

# The planted faults of `generate_dataset`, in the order their rates are
# applied; 'ok' is whatever probability mass is left over.
TRUTHS: tuple[str, ...] = ("ok", "wrong_caption", "broken_url", "too_small", "extreme_aspect")

# Phrase joining the objects to the background, per position word; None means
# the objects are spread over the whole image.
_POSITION_PHRASES: dict[str | None, str] = {
    None: "on",
    "left": "on the left of",
    "right": "on the right of",
    "top": "at the top of",
    "bottom": "at the bottom of",
    "center": "in the center of",
}


@dataclass(frozen=True)
class SceneObject:
    """`count` identical shapes of one colour."""

    shape: str
    colour: str
    count: int = 1

    def __post_init__(self) -> None:
        # Fail at construction: a typo here would otherwise surface only as a
        # KeyError deep inside rendering, or worse as a silently wrong caption.
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be 1..{MAX_COUNT}, got {self.count}")


@dataclass
class Scene:
    """What an image shows: the single source of truth for pixels and caption."""

    background: str
    objects: list[SceneObject] = field(default_factory=list)
    position: str | None = None  # where the objects cluster; None = anywhere

    def __post_init__(self) -> None:
        if self.background not in COLOURS:
            raise ValueError(f"unknown background colour {self.background!r}")
        if self.position not in _POSITION_PHRASES:
            raise ValueError(f"unknown position {self.position!r}; expected None or one of {POSITIONS}")
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        for obj in self.objects:
            # An object the colour of the background would be invisible, so the
            # caption would describe something that is not in the picture.
            if obj.colour == self.background:
                raise ValueError(f"object colour {obj.colour!r} equals the background")


@dataclass(frozen=True)
class Placement:
    """One drawn shape: its pixel box is [x0, x1) x [y0, y1)."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) // 2, (y0 + y1) // 2


def random_scene(rng: random.Random) -> Scene:
    """A random scene of one or two object groups, all visible on the background."""
    background = rng.choice(list(COLOURS))
    object_colours = [c for c in COLOURS if c != background]
    n_groups = rng.randint(1, 2)
    objects: list[SceneObject] = []
    while len(objects) < n_groups:
        shape = rng.choice(SHAPES)
        colour = rng.choice(object_colours)
        # Two groups of the same coloured shape would read as "two red circles
        # and one red circle"; keep each (shape, colour) pair to one group.
        if any(o.shape == shape and o.colour == colour for o in objects):
            continue
        objects.append(SceneObject(shape, colour, rng.randint(1, MAX_COUNT)))
    position = rng.choice(POSITIONS) if rng.random() < 0.5 else None
    return Scene(background, objects, position)


def caption(scene: Scene) -> str:
    """E.g. "three red circles and one blue square on a yellow background"."""
    phrases = []
    for obj in scene.objects:
        noun = obj.shape if obj.count == 1 else obj.shape + "s"
        phrases.append(f"{NUMBER_WORDS[obj.count]} {obj.colour} {noun}")
    if len(phrases) == 1:
        objects = phrases[0]
    else:
        objects = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    article = "an" if scene.background[0] in "aeiou" else "a"
    return f"{objects} {_POSITION_PHRASES[scene.position]} {article} {scene.background} background"


def wrong_scene(scene: Scene, rng: random.Random) -> Scene:
    """A random scene sharing no (shape, colour) pair with `scene`.

    Sharing none, rather than merely differing somewhere, makes the mismatch
    unambiguous: no object of the wrong caption appears in the image.
    """
    shown = {(o.shape, o.colour) for o in scene.objects}
    while True:  # terminates fast: most random scenes already qualify
        candidate = random_scene(rng)
        if shown.isdisjoint((o.shape, o.colour) for o in candidate.objects):
            return candidate


def wrong_caption(scene: Scene, rng: random.Random) -> str:
    """The caption of a different scene: a deliberately mismatched caption."""
    return caption(wrong_scene(scene, rng))


def _region(position: str | None, width: int, height: int) -> tuple[int, int, int, int]:
    """The part of the image (x0, y0, x1, y1) that the position word refers to."""
    half_w, half_h = max(1, width // 2), max(1, height // 2)
    if position == "left":
        return 0, 0, half_w, height
    if position == "right":
        return width - half_w, 0, width, height
    if position == "top":
        return 0, 0, width, half_h
    if position == "bottom":
        return 0, height - half_h, width, height
    if position == "center":
        x0, y0 = width // 4, height // 4
        return x0, y0, x0 + half_w, y0 + half_h
    return 0, 0, width, height


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    # The gap keeps same-coloured neighbours from touching: two touching red
    # squares look like one red rectangle, and the caption's count would lie.
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _try_place(
    rng: random.Random,
    region: tuple[int, int, int, int],
    size: int,
    taken: list[tuple[int, int, int, int]],
    tries: int = 60,
) -> tuple[int, int, int, int] | None:
    rx0, ry0, rx1, ry1 = region
    for _ in range(tries):
        x = rng.randint(rx0, max(rx0, rx1 - size))
        y = rng.randint(ry0, max(ry0, ry1 - size))
        box = (x, y, x + size, y + size)
        if not any(_overlaps(box, other, gap=max(1, size // 8)) for other in taken):
            return box
    return None


def layout(scene: Scene, width: int, height: int, rng: random.Random) -> list[Placement]:
    """Where `render` draws each shape (exposed so tests and training can use it)."""
    region = _region(scene.position, width, height)
    region_w, region_h = region[2] - region[0], region[3] - region[1]
    total = sum(obj.count for obj in scene.objects)
    # Sized from the region's area so that all shapes together cover about a
    # quarter of it, whatever the resolution or aspect ratio; capped by the
    # short side so a shape always fits in a thin strip.
    size = min(0.9 * min(region_w, region_h), 0.5 * math.sqrt(region_w * region_h / total))

    placements: list[Placement] = []
    taken: list[tuple[int, int, int, int]] = []
    for obj in scene.objects:
        for _ in range(obj.count):
            side = max(2, int(size * rng.uniform(0.75, 1.0)))
            box = None
            # Shrink rather than overlap; only a hopelessly crowded tiny image
            # falls through to an overlapping spot.
            for _attempt in range(4):
                box = _try_place(rng, region, side, taken)
                if box is not None:
                    break
                side = max(2, int(side * 0.8))
            if box is None:
                box = _try_place(rng, region, side, [], tries=1)
            taken.append(box)
            placements.append(Placement(obj.shape, obj.colour, box))
    return placements


def render(scene: Scene, width: int, height: int, rng: random.Random) -> Image.Image:
    """Draw `scene` as an RGB image of the given size (works from ~32 px up)."""
    image = Image.new("RGB", (width, height), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    for p in layout(scene, width, height, rng):
        x0, y0, x1, y1 = p.box
        fill = COLOURS[p.colour]
        # PIL's shape coordinates are inclusive, hence the -1s.
        if p.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif p.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:  # triangle, apex up: its box centre lies inside it
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    return image


def photo_like_jpeg(width: int, height: int, rng: random.Random, quality: int = 90) -> bytes:
    """A content-free JPEG whose size and decode cost resemble a real photo's.

    Flat synthetic drawings compress to a few KB, which would make download
    and decode benchmarks unrealistically cheap.  Real photos are mostly
    smooth regions plus sensor noise, and the noise is what costs bytes, so
    that is what this imitates.
    """
    gen = np.random.default_rng(rng.getrandbits(64))

    # Smooth content is built at 1/8 scale and upscaled: it has no fine
    # detail to lose, and it keeps the cost independent of blur radius.
    small_w, small_h = max(4, width // 8), max(4, height // 8)
    grid = gen.integers(0, 256, size=(3, 3, 3), dtype=np.uint8)
    small = Image.fromarray(grid, "RGB").resize((small_w, small_h), Image.BILINEAR)
    draw = ImageDraw.Draw(small)
    for _ in range(int(gen.integers(3, 8))):
        x0, x1 = sorted(int(v) for v in gen.integers(0, small_w, size=2))
        y0, y1 = sorted(int(v) for v in gen.integers(0, small_h, size=2))
        fill = tuple(int(v) for v in gen.integers(0, 256, size=3))
        if gen.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
    small = small.filter(ImageFilter.GaussianBlur(radius=max(1.0, min(small_w, small_h) / 40)))
    image = small.resize((width, height), Image.BILINEAR)

    # Luma-only noise centred on 128 and added with offset -128: the add runs
    # in C, and one channel instead of three keeps generation cheap.
    amplitude = int(gen.integers(3, 7))
    noise = gen.integers(128 - amplitude, 128 + amplitude + 1, size=(height, width), dtype=np.uint8)
    noise_image = Image.fromarray(noise, "L")
    image = ImageChops.add(image, Image.merge("RGB", (noise_image,) * 3), scale=1.0, offset=-128)

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _normal_size(rng: random.Random, min_side: int, max_side: int) -> tuple[int, int]:
    # Choose the aspect ratio first, then a short side small enough that the
    # long side stays within max_side: both sides end up in [min_side, max_side].
    ratio = rng.uniform(1.0, min(2.0, max_side / min_side))
    short = rng.randint(min_side, max(min_side, int(max_side / ratio)))
    long = min(max_side, round(short * ratio))
    return (long, short) if rng.random() < 0.5 else (short, long)


def _too_small_size(rng: random.Random, min_side: int) -> tuple[int, int]:
    # Tiny, and always below min_side, so that the fault is unambiguous even
    # when a caller asks for small "normal" images.
    hi = max(2, min(48, min_side // 2))
    lo = min(16, hi)
    short = rng.randint(lo, hi)
    long = rng.randint(short, min(hi, 2 * short))
    return (long, short) if rng.random() < 0.5 else (short, long)


def _extreme_aspect_size(rng: random.Random, min_side: int) -> tuple[int, int]:
    # The short side is exactly min_side, so these images fail only an aspect
    # check, not a size check.
    long = round(min_side * rng.uniform(6.0, 8.0))
    return (long, min_side) if rng.random() < 0.5 else (min_side, long)


def generate_dataset(
    out_dir: str | pathlib.Path,
    n: int,
    base_url: str,
    seed: int = 0,
    wrong_caption_rate: float = 0.1,
    broken_url_rate: float = 0.05,
    too_small_rate: float = 0.05,
    extreme_aspect_rate: float = 0.05,
    min_side: int = 256,
    max_side: int = 768,
) -> pathlib.Path:
    """Write n rendered scenes plus a LAION-style `urls.parquet` with planted faults.

    Rows get `out_dir/images/{i:06d}.jpg` served as `{base_url}/images/...`
    (see `pipeline.devserver`), except broken_url rows, which point at a 404
    route and have no file.  The `truth` column names the planted fault so a
    pipeline's filtering can be scored.  Same seed, same bytes.
    """
    rates = {
        "wrong_caption": wrong_caption_rate,
        "broken_url": broken_url_rate,
        "too_small": too_small_rate,
        "extreme_aspect": extreme_aspect_rate,
    }
    if any(r < 0 for r in rates.values()) or sum(rates.values()) > 1:
        raise ValueError(f"fault rates must be >= 0 and sum to <= 1, got {rates}")
    if not 1 <= min_side <= max_side:
        raise ValueError(f"need 1 <= min_side <= max_side, got {min_side}, {max_side}")

    out_dir = pathlib.Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    base_url = base_url.rstrip("/")
    # One generator drives everything, so the output depends on the seed alone.
    rng = random.Random(seed)

    rows = []
    for i in range(n):
        u = rng.random()
        truth = "ok"
        cumulative = 0.0
        for name, rate in rates.items():
            cumulative += rate
            if u < cumulative:
                truth = name
                break

        if truth == "too_small":
            width, height = _too_small_size(rng, min_side)
        elif truth == "extreme_aspect":
            width, height = _extreme_aspect_size(rng, min_side)
        else:
            width, height = _normal_size(rng, min_side, max_side)

        scene = random_scene(rng)
        text = wrong_caption(scene, rng) if truth == "wrong_caption" else caption(scene)
        filename = f"{i:06d}.jpg"
        if truth == "broken_url":
            url = f"{base_url}/status/404/{filename}"
        else:
            url = f"{base_url}/images/{filename}"
            render(scene, width, height, rng).save(images_dir / filename, format="JPEG", quality=90)
        # WIDTH/HEIGHT are the metadata's claim, as in LAION; for broken URLs
        # there is simply nothing behind the claim.
        rows.append({"URL": url, "TEXT": text, "WIDTH": width, "HEIGHT": height, "truth": truth})

    df = pd.DataFrame(rows, columns=["URL", "TEXT", "WIDTH", "HEIGHT", "truth"])
    df = df.astype({"WIDTH": "int64", "HEIGHT": "int64"})
    parquet_path = out_dir / "urls.parquet"
    df.to_parquet(parquet_path, index=False)
    return parquet_path
