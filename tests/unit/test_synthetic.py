"""Tests for pipeline.synthetic: captions must describe the pixels, faults must be planted as labelled."""

from __future__ import annotations

import io
import random

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from curate.pipeline.demo.synthetic import (
    COLOURS,
    MAX_COUNT,
    SHAPES,
    Scene,
    SceneObject,
    caption,
    generate_dataset,
    layout,
    photo_like_jpeg,
    random_scene,
    render,
    wrong_caption,
    wrong_scene,
)

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _PALETTE_NAMES], dtype=np.int32)


def _colour_names(pixels: np.ndarray) -> np.ndarray:
    """Nearest palette colour name per pixel: how a consumer reads colour back after JPEG."""
    flat = pixels.reshape(-1, 3).astype(np.int32)
    distances = ((flat[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(axis=2)
    return np.array(_PALETTE_NAMES)[distances.argmin(axis=1)].reshape(pixels.shape[:-1])


def _pack(rgb: tuple[int, int, int]) -> int:
    return (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]


def _packed(pixels: np.ndarray) -> np.ndarray:
    """One int per pixel, so np.unique stays fast on 4-megapixel images."""
    p = pixels.astype(np.int32)
    return (p[..., 0] << 16) | (p[..., 1] << 8) | p[..., 2]


def _pairs(scene: Scene) -> set[tuple[str, str]]:
    return {(o.shape, o.colour) for o in scene.objects}


# -- scene model and captions -------------------------------------------------


def test_caption_wording():
    scene = Scene("yellow", [SceneObject("circle", "red", 3), SceneObject("square", "blue", 1)])
    assert caption(scene) == "three red circles and one blue square on a yellow background"
    scene = Scene("orange", [SceneObject("triangle", "black", 2)], position="left")
    assert caption(scene) == "two black triangles on the left of an orange background"
    scene = Scene("white", [SceneObject("square", "green", 4)], position="center")
    assert caption(scene) == "four green squares in the center of a white background"


@pytest.mark.parametrize(
    "make",
    [
        lambda: SceneObject("hexagon", "red"),
        lambda: SceneObject("circle", "teal"),
        lambda: SceneObject("circle", "red", 0),
        lambda: SceneObject("circle", "red", MAX_COUNT + 1),
        lambda: Scene("red", [SceneObject("circle", "red")]),  # invisible object
        lambda: Scene("red", [SceneObject("circle", "blue")], position="middle"),
        lambda: Scene("red", []),
    ],
)
def test_invalid_scenes_are_rejected(make):
    with pytest.raises(ValueError):
        make()


def test_random_scenes_use_the_small_vocabulary_and_caption_every_object():
    rng = random.Random(0)
    for _ in range(500):
        scene = random_scene(rng)
        text = caption(scene)
        assert 1 <= len(scene.objects) <= 2
        assert len(_pairs(scene)) == len(scene.objects)  # no duplicate groups
        assert text.endswith(f"{scene.background} background")
        for obj in scene.objects:
            assert obj.shape in SHAPES and obj.colour in COLOURS and 1 <= obj.count <= MAX_COUNT
            assert obj.colour != scene.background
            assert f"{obj.colour} {obj.shape}" in text


def test_random_scene_is_deterministic():
    assert random_scene(random.Random(7)) == random_scene(random.Random(7))


def test_wrong_caption_shares_no_coloured_shape_with_the_scene():
    rng = random.Random(1)
    for _ in range(300):
        scene = random_scene(rng)
        other = wrong_scene(scene, rng)
        assert _pairs(scene).isdisjoint(_pairs(other))
        wrong = wrong_caption(scene, rng)
        assert wrong != caption(scene)
        # None of the coloured shapes the image shows is named by the wrong caption.
        for obj in scene.objects:
            assert f"{obj.colour} {obj.shape}" not in wrong


# -- rendering ------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (2000, 2000), (2000, 300), (300, 2000), (37, 400), (640, 480)])
def test_render_any_size_shows_exactly_the_captioned_colours(size):
    rng = random.Random(sum(size))
    for _ in range(5):
        scene = random_scene(rng)
        image = render(scene, *size, rng)
        assert image.mode == "RGB" and image.size == size
        # Unantialiased drawing: every pixel is exactly a palette colour, and
        # the set of colours is exactly the background plus the objects'.
        seen = set(np.unique(_packed(np.asarray(image))).tolist())
        expected = {_pack(COLOURS[scene.background])} | {_pack(COLOURS[o.colour]) for o in scene.objects}
        assert seen == expected


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("colour", list(COLOURS))
def test_centre_of_a_single_large_object_has_its_colour(shape, colour):
    background = "black" if colour != "black" else "white"
    scene = Scene(background, [SceneObject(shape, colour, 1)])
    # layout() and render() consume the rng identically, so equal seeds give
    # the placement that was drawn.
    (placement,) = layout(scene, 300, 200, random.Random(5))
    image = render(scene, 300, 200, random.Random(5))
    x0, y0, x1, y1 = placement.box
    assert min(x1 - x0, y1 - y0) >= 50  # "large": a good part of the short side
    assert image.getpixel(placement.center) == COLOURS[colour]

    # The colour name survives a JPEG round trip, as the pipeline will see it.
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    decoded = np.asarray(Image.open(buffer).convert("RGB"))
    cx, cy = placement.center
    assert _colour_names(decoded[cy : cy + 1, cx : cx + 1])[0, 0] == colour


def test_layout_counts_objects_keeps_them_apart_and_honours_the_position_word():
    rng = random.Random(2)
    width, height = 640, 480
    for _ in range(200):
        scene = random_scene(rng)
        placements = layout(scene, width, height, rng)
        assert len(placements) == sum(o.count for o in scene.objects)
        boxes = [p.box for p in placements]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                disjoint = a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
                assert disjoint, (scene, a, b)
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            if scene.position == "left":
                assert x1 <= width // 2
            elif scene.position == "right":
                assert x0 >= width // 2
            elif scene.position == "top":
                assert y1 <= height // 2
            elif scene.position == "bottom":
                assert y0 >= height // 2
            elif scene.position == "center":
                assert x0 >= width // 4 and x1 <= 3 * width // 4
                assert y0 >= height // 4 and y1 <= 3 * height // 4


# -- photo-like JPEGs -----------------------------------------------------------------


def test_photo_like_jpeg_decodes_to_the_asked_size_with_a_realistic_file_size():
    data = photo_like_jpeg(1000, 750, random.Random(0))
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.size == (1000, 750)
    sizes = [len(photo_like_jpeg(1000, 1000, random.Random(seed))) for seed in range(5)]
    assert all(50_000 <= s <= 250_000 for s in sizes), sizes


def test_photo_like_jpeg_is_deterministic_per_seed():
    assert photo_like_jpeg(300, 200, random.Random(3)) == photo_like_jpeg(300, 200, random.Random(3))
    assert photo_like_jpeg(300, 200, random.Random(3)) != photo_like_jpeg(300, 200, random.Random(4))


def test_photo_like_jpeg_quality_changes_size():
    rng_seed = 9
    low = photo_like_jpeg(400, 400, random.Random(rng_seed), quality=50)
    high = photo_like_jpeg(400, 400, random.Random(rng_seed), quality=95)
    assert len(low) < len(high)


# -- datasets -----------------------------------------------------------------------------


BASE = "http://127.0.0.1:9/"  # trailing slash on purpose: must not double up


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    path = generate_dataset(
        out,
        n=400,
        base_url=BASE,
        seed=3,
        wrong_caption_rate=0.15,
        broken_url_rate=0.1,
        too_small_rate=0.1,
        extreme_aspect_rate=0.1,
        min_side=64,
        max_side=128,
    )
    return out, path, pd.read_parquet(path)


def test_dataset_has_laion_columns_and_roughly_the_asked_fault_rates(dataset):
    out, path, df = dataset
    assert path == out / "urls.parquet"
    assert list(df.columns) == ["URL", "TEXT", "WIDTH", "HEIGHT", "truth"]
    assert len(df) == 400
    counts = df["truth"].value_counts().to_dict()
    # Expected 60/40/40/40/220; bounds are ~4 standard deviations.
    assert 35 <= counts["wrong_caption"] <= 85, counts
    for name in ("broken_url", "too_small", "extreme_aspect"):
        assert 18 <= counts[name] <= 62, counts
    assert 180 <= counts["ok"] <= 260, counts


def test_dataset_urls_and_files_match_the_planted_faults(dataset):
    out, _, df = dataset
    for i, row in df.iterrows():
        name = f"{i:06d}.jpg"
        file = out / "images" / name
        if row.truth == "broken_url":
            assert row.URL == f"http://127.0.0.1:9/status/404/{name}"
            assert not file.exists()
            continue
        assert row.URL == f"http://127.0.0.1:9/images/{name}"
        with Image.open(file) as image:
            assert image.format == "JPEG"
            assert image.size == (row.WIDTH, row.HEIGHT)  # metadata tells the truth


def test_dataset_sizes_fit_their_labels(dataset):
    _, _, df = dataset
    short = df[["WIDTH", "HEIGHT"]].min(axis=1)
    long = df[["WIDTH", "HEIGHT"]].max(axis=1)
    normal = df["truth"].isin(["ok", "wrong_caption", "broken_url"])
    assert (short[normal] >= 64).all() and (long[normal] <= 128).all()
    assert (long[normal] / short[normal] <= 2.0 + 1e-9).all()
    assert (long[normal] / short[normal] > 1.3).any()  # aspect ratios do vary
    small = df["truth"] == "too_small"
    assert (long[small] < 64).all()
    extreme = df["truth"] == "extreme_aspect"
    assert (short[extreme] >= 64).all()  # fails only the aspect check
    assert (long[extreme] / short[extreme] >= 6).all()
    # Both orientations occur.
    assert (df["WIDTH"][extreme] > df["HEIGHT"][extreme]).any()
    assert (df["WIDTH"][extreme] < df["HEIGHT"][extreme]).any()


def test_correct_captions_name_colours_present_in_the_image(dataset):
    out, _, df = dataset
    for i, row in df[df["truth"] == "ok"].iterrows():
        with Image.open(out / "images" / f"{i:06d}.jpg") as image:
            names = _colour_names(np.asarray(image.convert("RGB")))
        present = set(np.unique(names))
        named = {word for word in row.TEXT.split() if word in COLOURS}
        assert named <= present, (row.TEXT, present)


def test_wrong_captions_are_caught_by_the_same_colour_check(dataset):
    out, _, df = dataset
    # The colour check above passes every correct caption; a mismatched caption
    # names colours absent from its image in most rows (not all: the two scenes
    # may happen to share colours, on different shapes).
    wrong = df[df["truth"] == "wrong_caption"]
    flagged = 0
    for i, row in wrong.iterrows():
        with Image.open(out / "images" / f"{i:06d}.jpg") as image:
            present = set(np.unique(_colour_names(np.asarray(image.convert("RGB")))))
        named = {word for word in row.TEXT.split() if word in COLOURS}
        flagged += not named <= present
    assert flagged >= 0.6 * len(wrong), (flagged, len(wrong))


def test_dataset_is_deterministic_for_a_seed(tmp_path):
    def make(name, seed):
        out = tmp_path / name
        generate_dataset(out, n=60, base_url="http://h", seed=seed, min_side=32, max_side=80)
        return out

    a, b, c = make("a", 11), make("b", 11), make("c", 12)
    assert (a / "urls.parquet").read_bytes() == (b / "urls.parquet").read_bytes()
    files_a = sorted(p.name for p in (a / "images").iterdir())
    assert files_a == sorted(p.name for p in (b / "images").iterdir())
    for name in files_a:
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes()
    assert not pd.read_parquet(a / "urls.parquet").equals(pd.read_parquet(c / "urls.parquet"))


def test_dataset_rejects_impossible_rates(tmp_path):
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, n=1, base_url="http://h", wrong_caption_rate=0.9, broken_url_rate=0.2)
