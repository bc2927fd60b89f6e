"""The shipped tiny CLIP (pipeline/assets/tiny-clip, trained by train/tiny_clip.py).

It is loaded the way the pipeline loads any model (`pipeline.clip_model.load_clip`,
open_clip's `local-dir:` path) and scored on freshly generated scenes with a
seed training never used: its cosine similarity must separate each image's own
caption from a deliberately wrong one (`pipeline.synthetic.wrong_caption`).
"""

from __future__ import annotations

import io
import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from PIL import Image  # noqa: E402

from curate.pipeline.demo import synthetic  # noqa: E402
from curate.pipeline.models.clip import TINY_CLIP, TINY_CLIP_DIR, load_clip  # noqa: E402
from curate.pipeline.errors import UserError  # noqa: E402

N_SCENES = 200
FRESH_SEED = "test-tiny-clip-fresh-data"  # training uses random.Random(int) and "tiny-clip-eval-{seed}"


def roc_auc(positives: list[float], negatives: list[float]) -> float:
    """Mann-Whitney: the fraction of (positive, negative) pairs ranked right, ties counting half."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def test_roc_auc_by_hand():
    assert roc_auc([3, 4], [1, 2]) == 1.0
    assert roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1, 2, 3], [0, 2, 1.5]) == pytest.approx(6.5 / 9)


def _fresh_scenes(n: int):
    """Scenes rendered at varied sizes and aspect ratios, JPEG-encoded and decoded as the pipeline does."""
    rng = random.Random(FRESH_SEED)
    out = []
    for _ in range(n):
        scene = synthetic.random_scene(rng)
        short = rng.randint(64, 200)
        long = min(400, round(short * rng.uniform(1.0, 2.0)))
        size = (long, short) if rng.random() < 0.5 else (short, long)
        buffer = io.BytesIO()
        synthetic.render(scene, *size, rng).save(buffer, format="JPEG", quality=90)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        out.append((image, synthetic.caption(scene), synthetic.wrong_caption(scene, rng)))
    return out


def test_tiny_clip_separates_right_from_wrong_captions():
    clip = load_clip(TINY_CLIP, device="cpu")
    assert clip.image_size == 64
    assert clip.tokenizer.context_length == 32
    triples = _fresh_scenes(N_SCENES)

    with torch.no_grad():
        images = torch.stack([clip.preprocess(image) for image, _, _ in triples])
        image_features = torch.nn.functional.normalize(clip.model.encode_image(images.to(clip.dtype)).float(), dim=-1)
        scores = {}
        for name, column in (("right", 1), ("wrong", 2)):
            text = clip.tokenizer([t[column] for t in triples])
            text_features = torch.nn.functional.normalize(clip.model.encode_text(text).float(), dim=-1)
            scores[name] = (image_features * text_features).sum(-1).tolist()

    auc = roc_auc(scores["right"], scores["wrong"])
    assert auc >= 0.95, f"tiny CLIP ROC AUC {auc:.4f} on fresh data"


def test_tiny_clip_is_loaded_once_per_process():
    first = load_clip(TINY_CLIP, device="cpu")
    assert load_clip(TINY_CLIP, device="cpu") is first
    assert first.device == "cpu"
    assert not first.model.training


def test_tiny_clip_folder_is_small_and_open_clip_shaped():
    names = {p.name for p in TINY_CLIP_DIR.iterdir()}
    assert {"open_clip_config.json", "open_clip_model.safetensors"} <= names
    total = sum(p.stat().st_size for p in TINY_CLIP_DIR.iterdir())
    assert total < 12 * 2**20


def test_missing_local_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="open_clip_config.json"):
        load_clip(f"local-dir:{tmp_path / 'no-such-model'}", device="cpu")
