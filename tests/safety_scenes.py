"""Scenes whose safety answer is known, for tests/unit/test_safety.py and
tests/e2e/test_safety_run.py (that module's docstring says what the tiny CLIP can do with them):
the designated concepts, fresh scenes embedded as the pipeline embeds them, a zero-shot
threshold calibrated on one seed, and an NSFW head of LAION's layout trained on one concept.
Its fixtures are module-scoped: a test module imports the ones it uses."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from curate.filters.concepts import concept_embeddings
from curate.pipeline.models.head_nets import LaionNsfwMlp
from curate.pipeline.models.clip import TINY_CLIP, load_clip
from curate.pipeline.config import ClipConfig, ResizeConfig
from curate.pipeline.image import normalize_image
from curate.pipeline.demo.synthetic import POSITIONS, SHAPES, Scene, SceneObject, caption, random_scene, render

CLIP = ClipConfig(enabled=True, model=TINY_CLIP, pretrained=None, device="cpu", batch_size=64)
RESIZE = ResizeConfig(size=128)  # as write_config's runs normalize the served images
# name → (object colour, background colour)
CONCEPTS = {"yellow_on_purple": ("yellow", "purple"), "green_on_white": ("green", "white")}
ZERO_SHOT_CONCEPT = "yellow_on_purple"  # what the concept filter is asked to find
NSFW_CONCEPT = "green_on_white"  # what the trained NSFW head learns to call unsafe


def concept_of(scene: Scene) -> str:
    for name, (colour, background) in CONCEPTS.items():
        if scene.background == background and any(o.colour == colour for o in scene.objects):
            return name
    return "other"


def concept_prompts(name: str) -> list[str]:
    """Captions in the training captions' own words for every single group of the concept's
    objects: each shape, count and position ("two yellow squares on the left of a purple background")."""
    colour, background = CONCEPTS[name]
    return [
        caption(Scene(background, [SceneObject(shape, colour, count)], position))
        for shape in SHAPES for count in range(1, 5) for position in (None, *POSITIONS)
    ]


def rendered(scene: Scene, rng: random.Random) -> bytes:
    """A served-size JPEG of the scene (sides 96-320, as the dataset fixture's)."""
    buf = io.BytesIO()
    render(scene, rng.randint(96, 320), rng.randint(96, 320), rng).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def labelled_scenes(seed: int, per_concept: int, others: int) -> list[tuple[Scene, str]]:
    """Random scenes, kept until each concept has `per_concept` and the rest `others`."""
    rng = random.Random(seed)
    want = {**{name: per_concept for name in CONCEPTS}, "other": others}
    out: list[tuple[Scene, str]] = []
    total = sum(want.values())
    while len(out) < total:
        scene = random_scene(rng)
        label = concept_of(scene)
        if want[label]:
            want[label] -= 1
            out.append((scene, label))
    return out


def embedded(seed: int, per_concept: int = 80, others: int = 320) -> dict:
    """Fresh scenes through the pipeline's steps: JPEG, normalization, CLIP image embedding
    (the score stage's CPU path: the model's own preprocess), stored as fp16 as it stores it."""
    rng = random.Random(seed + 1000)
    scenes = labelled_scenes(seed, per_concept, others)
    jpgs = [normalize_image(rendered(scene, rng), RESIZE).data for scene, _ in scenes]
    clip = load_clip(CLIP.model, CLIP.pretrained, CLIP.device, CLIP.precision)
    parts = []
    with torch.inference_mode():
        for i in range(0, len(jpgs), CLIP.batch_size):
            pixels = torch.stack([clip.preprocess(Image.open(io.BytesIO(j)).convert("RGB"))
                                  for j in jpgs[i:i + CLIP.batch_size]])
            parts.append(clip.model.encode_image(pixels, normalize=True).float().numpy())
    emb = np.concatenate(parts).astype(np.float16).astype(np.float32)
    return {"emb": emb, "labels": np.array([label for _, label in scenes])}


@pytest.fixture(scope="module")
def data():
    """Calibration scenes (seed 11) and test scenes (seed 12)."""
    return {"calibration": embedded(11), "test": embedded(12)}


def calibrated_threshold(positive: np.ndarray, negative: np.ndarray) -> float:
    """Halfway between the 2nd percentile of the concept's scores and the 98th of the rest."""
    return float((np.quantile(positive, 0.02) + np.quantile(negative, 0.98)) / 2)


@pytest.fixture(scope="module")
def concept_threshold(data) -> float:
    cal, name = data["calibration"], ZERO_SHOT_CONCEPT
    scores = cal["emb"] @ concept_embeddings(CLIP, [concept_prompts(name)])[0]
    return round(calibrated_threshold(scores[cal["labels"] == name], scores[cal["labels"] != name]), 4)


def concept_spec(threshold: float) -> dict:
    return {"name": ZERO_SHOT_CONCEPT, "prompts": concept_prompts(ZERO_SHOT_CONCEPT), "threshold": threshold}


# --- NSFW head ----------------------------------------------------------------------------


def train_nsfw_head(x: np.ndarray, unsafe: np.ndarray, steps: int = 100) -> LaionNsfwMlp:
    """LAION's ViT-L/14 head layout (hidden 64, 512, 256) on tiny-CLIP embeddings: the
    normalization adapted to the data as Keras' adapt() does, then weighted cross-entropy."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small net: threads only contend on a busy machine
    x_t = torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))
    y = torch.from_numpy(unsafe.astype(np.float32))
    net = LaionNsfwMlp(x.shape[1], (64, 512, 256))
    with torch.no_grad():
        net.norm.mean.copy_(x_t.mean(0))
        net.norm.variance.copy_(x_t.var(0, unbiased=False))
    weight = torch.where(y > 0, (1 - y).sum() / y.sum(), torch.tensor(1.0))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy(net(x_t).clamp(1e-6, 1 - 1e-6), y, weight=weight)
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return net.eval()


@pytest.fixture(scope="module")
def nsfw_weights(data, tmp_path_factory) -> Path:
    cal = data["calibration"]
    net = train_nsfw_head(cal["emb"], cal["labels"] == NSFW_CONCEPT)
    path = tmp_path_factory.mktemp("nsfw") / "nsfw-head.pt"
    torch.save(net.state_dict(), path)
    return path
