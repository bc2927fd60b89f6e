"""Safety and aesthetic filters on data whose answer is known.

The designated "unsafe" concepts are synthetic scenes: objects of one colour on a
background of another. The zero-shot filter is judged on `yellow_on_purple`, the NSFW head
is trained on `green_on_white`; thresholds and weights come from scenes of one seed and are
judged on fresh scenes of another.

What the tiny CLIP can do zero-shot (measured while writing these tests, 3,000 random
scenes): colour-on-background concepts have ROC AUC 0.97-0.999 (median 0.989 over the 56
pairs), and only the best few reach 95% caught with <= 5% false drops: yellow_on_purple
does (AUC 0.999), green_on_white is borderline (AUC 0.997, about 5% false drops). Shape
concepts ("any triangle") are not separable zero-shot at all (AUC about 0.5). A head
trained on the embeddings separates green_on_white cleanly (AUC 1.0).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import run_curate, write_config
from curate.filters import FilterConfigError, build_chain
from curate.filters.concepts import ConceptFilter, concept_embeddings
from curate.filters.hashes import HashBlocklist
from curate.pipeline.models.head_nets import AestheticMlp, LaionNsfwMlp
from curate.filters.heads import AestheticHead, NsfwHead
from curate.pipeline.models.clip import TINY_CLIP, TINY_CLIP_DIR, load_clip
from curate.pipeline.config import ClipConfig, ResizeConfig, load_config
from curate.pipeline.demo.devserver import DevServer
from curate.pipeline.errors import UserError
from curate.pipeline.image import normalize_image
from curate.pipeline.demo.synthetic import POSITIONS, SHAPES, Scene, SceneObject, caption, random_scene, render

pytestmark = pytest.mark.skipif(not (TINY_CLIP_DIR / "open_clip_config.json").exists(), reason="tiny CLIP not built")

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


def run_filter(f, emb: np.ndarray) -> tuple[list, list[dict]]:
    """The filter's Rejection (or None) for each embedding, and the json each sample got."""
    f.setup({"clip": CLIP})
    metas = [{} for _ in emb]
    rejections = [f({"key": str(i), "jpg": b"", "meta": metas[i], "img_emb": e}) for i, e in enumerate(emb)]
    return rejections, metas


def reasons_of(rejections: list) -> list:
    return [None if r is None else r.reason for r in rejections]


# --- zero-shot concepts -------------------------------------------------------------------


def test_concept_filter_drops_the_designated_concept_and_keeps_the_rest(data, concept_threshold):
    test = data["test"]
    f = ConceptFilter(concepts=[concept_spec(concept_threshold)])
    rejections, metas = run_filter(f, test["emb"])
    reasons, unsafe = np.array(reasons_of(rejections), dtype=object), test["labels"] == ZERO_SHOT_CONCEPT
    caught = np.mean(reasons[unsafe] == f"unsafe: concept {ZERO_SHOT_CONCEPT}")
    false_drops = np.mean([r is not None for r in reasons[~unsafe]])
    assert caught >= 0.95 and false_drops <= 0.05, (caught, false_drops, concept_threshold)
    # Every sample carries its score, dropped or kept, for tuning.
    scores = np.array([m[f"concept_{ZERO_SHOT_CONCEPT}"] for m in metas])
    assert ((scores >= concept_threshold) == (reasons != None)).all()  # noqa: E711 (elementwise)
    assert f.counts == {"kept": int((reasons == None).sum()),  # noqa: E711
                        f"dropped: unsafe: concept {ZERO_SHOT_CONCEPT}": int((reasons != None).sum())}  # noqa: E711
    # Each drop says on what it decided: the concept's score field, the sample's score, the threshold.
    field = f"concept_{ZERO_SHOT_CONCEPT}"
    assert f.score_fields() == [field]
    for rejection, meta in zip(rejections, metas):
        if rejection is not None:
            assert (rejection.filter, rejection.metric, rejection.threshold) == ("concepts", field, concept_threshold)
            assert rejection.value >= concept_threshold and rejection.value == pytest.approx(meta[field], abs=1e-4)


def test_concept_filter_config_errors():
    with pytest.raises(FilterConfigError, match=r"filters\.0\.concepts\.0\.threshold"):
        build_chain([{"name": "concepts", "concepts": [{"name": "a", "prompts": ["x"], "treshold": 0.2}]}])
    with pytest.raises(FilterConfigError, match="repeated: a"):
        build_chain([{"name": "concepts", "concepts": [{"name": "a", "prompts": ["x"], "threshold": 0.2}] * 2}])
    with pytest.raises(FilterConfigError, match=r"filters\.0\.concepts\.0\.prompts"):
        build_chain([{"name": "concepts", "concepts": [{"name": "a", "prompts": [], "threshold": 0.2}]}])


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


def test_trained_nsfw_head_loads_from_its_file_and_separates_fresh_data(data, nsfw_weights):
    test = data["test"]
    f = NsfwHead(weights=str(nsfw_weights))
    rejections, metas = run_filter(f, test["emb"])
    reasons = np.array(reasons_of(rejections), dtype=object)
    unsafe = test["labels"] == NSFW_CONCEPT
    caught = np.mean(reasons[unsafe] == "unsafe: nsfw punsafe>=0.5")
    false_drops = np.mean([r is not None for r in reasons[~unsafe]])
    assert caught >= 0.95 and false_drops <= 0.05, (caught, false_drops)
    punsafe = np.array([m["punsafe"] for m in metas])  # written for every sample
    assert ((punsafe >= 0) & (punsafe <= 1)).all()
    assert ((punsafe >= 0.5) == (reasons != None)).all()  # noqa: E711 (elementwise)
    assert f.score_fields() == ["punsafe"]
    for rejection, meta in zip(rejections, metas):
        if rejection is not None:
            assert (rejection.filter, rejection.metric, rejection.threshold) == ("nsfw", "punsafe", 0.5)
            assert rejection.value >= 0.5 and rejection.value == pytest.approx(meta["punsafe"], abs=1e-4)
    # A lower threshold (Re-LAION's research-safe 0.45) drops at least as much.
    stricter, _ = run_filter(NsfwHead(weights=str(nsfw_weights), threshold=0.45), test["emb"])
    assert sum(r is not None for r in stricter) >= sum(r is not None for r in reasons)


LAION_NSFW_KEYS = {
    "vit-l-14": (768, (64, 512, 256), ["norm.mean", "norm.variance"] + [
        f"linear_{i}.{p}" for i in range(1, 5) for p in ("weight", "bias")]),
    "vit-b-32": (512, (32, 32), ["norm.mean", "norm.variance"] + [
        f"linear_{i}.{p}" for i in range(1, 4) for p in ("weight", "bias")]),
}


def nsfw_reference(state: dict, x: np.ndarray) -> float:
    """LAION's detector written out in numpy: normalize, Dense+ReLU layers, Dense, sigmoid."""
    s = {k: v.numpy().astype(np.float64) for k, v in state.items()}
    h = x / np.linalg.norm(x)
    h = (h - s["norm.mean"]) / np.sqrt(s["norm.variance"])
    n = sum(1 for k in s if k.endswith(".weight"))
    for i in range(1, n + 1):
        h = s[f"linear_{i}.weight"] @ h + s[f"linear_{i}.bias"]
        if i < n:
            h = np.maximum(h, 0)
    return float(1 / (1 + np.exp(-h[0])))


@pytest.mark.parametrize("layout", sorted(LAION_NSFW_KEYS))
def test_state_dict_with_laion_key_names_loads(layout, tmp_path):
    dim, hidden, keys = LAION_NSFW_KEYS[layout]
    torch.manual_seed(1)
    state = LaionNsfwMlp(dim, hidden).state_dict()
    state["norm.mean"] = torch.randn(dim) * 0.01
    state["norm.variance"] = torch.rand(dim) * 0.01 + 1e-3
    assert list(state) == keys
    path = tmp_path / f"{layout}.pt"
    torch.save(state, path)
    f = NsfwHead(weights=str(path), threshold=0.5)
    assert f.input_dim == dim
    x = np.random.default_rng(2).normal(size=(8, dim)).astype(np.float32)
    _, metas = run_filter(f, x)
    for row, meta in zip(x, metas):
        assert meta["punsafe"] == pytest.approx(nsfw_reference(state, row), abs=1e-4)


def test_safetensors_weights_load(tmp_path):
    from safetensors.torch import save_file

    state = LaionNsfwMlp(512, (32, 32)).state_dict()
    save_file(state, str(tmp_path / "head.safetensors"))
    assert NsfwHead(weights=str(tmp_path / "head.safetensors")).input_dim == 512


def test_bad_weights_are_one_config_error_naming_the_parameter(tmp_path):
    def error(weights) -> str:
        with pytest.raises(FilterConfigError) as exc:
            build_chain([{"name": "nsfw", "weights": str(weights)}])
        message = str(exc.value)
        assert message.startswith("filters.0.weights:") and "\n" not in message, message
        return message

    assert "weights file not found" in error(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00not a torch file" * 10)
    assert "cannot read" in error(tmp_path / "corrupt.pt")
    wrong = LaionNsfwMlp(768, (64, 512, 256)).state_dict()
    wrong["linear_2.weight"] = torch.zeros(512, 32)  # a layer that does not fit the one before
    torch.save(wrong, tmp_path / "wrong-shape.pt")
    assert "size mismatch for linear_2.weight" in error(tmp_path / "wrong-shape.pt")
    torch.save(AestheticMlp(768).state_dict(), tmp_path / "aesthetic.pt")
    assert "expected the keys norm.mean" in error(tmp_path / "aesthetic.pt")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "not-tensors.pt")
    assert "does not hold a state_dict" in error(tmp_path / "not-tensors.pt")


def test_head_for_another_embedding_size_is_refused_when_the_config_is_read(tmp_path):
    torch.save(LaionNsfwMlp(768, (64, 512, 256)).state_dict(), tmp_path / "l14.pt")
    config = write_config(
        tmp_path / "run.yaml", tmp_path / "urls.parquet", tmp_path / "out",
        clip={"enabled": True, "model": TINY_CLIP, "pretrained": None},
        filters=[{"name": "nsfw", "weights": str(tmp_path / "l14.pt")}],
    )
    with pytest.raises(UserError, match=r"filters\.0: nsfw: .*takes 768-d embeddings, but clip\.model .* gives 128-d"):
        load_config(config)
    config = write_config(tmp_path / "noclip.yaml", tmp_path / "urls.parquet", tmp_path / "out",
                          filters=[{"name": "nsfw", "weights": str(tmp_path / "l14.pt")}])
    with pytest.raises(UserError, match="needs clip.enabled"):
        load_config(config)


# --- aesthetic head -----------------------------------------------------------------------


class ImprovedAestheticPredictorMLP(torch.nn.Module):
    """The predictor's `MLP` class as published (improved-aesthetic-predictor), the reference."""

    def __init__(self, input_size):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def test_aesthetic_head_loads_the_predictors_state_dict_and_scores_like_it(tmp_path):
    torch.manual_seed(3)
    reference = ImprovedAestheticPredictorMLP(768).eval()
    with torch.no_grad():  # a realistic output range: about 1-10
        reference.layers[7].bias.fill_(5.5)
    assert [k for k in reference.state_dict()] == [
        f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    torch.save(reference.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    x = np.random.default_rng(4).normal(size=(6, 768)).astype(np.float32)
    with torch.no_grad():  # the predictor's own inference: on the L2-normalized embedding
        expected = reference(torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))).squeeze(1).numpy()

    f = AestheticHead(weights=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"))
    rejections, metas = run_filter(f, x)
    assert rejections == [None] * 6  # no min_score: scores only
    assert f.score_fields() == ["aesthetic_score"]
    assert [m["aesthetic_score"] for m in metas] == pytest.approx(expected.tolist(), abs=1e-4)

    cut = float(np.median(expected))
    rejections, _ = run_filter(AestheticHead(weights=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), min_score=cut), x)
    reasons = reasons_of(rejections)
    assert reasons == [f"aesthetic_score<{cut:g}" if e < cut else None for e in expected]
    assert 0 < reasons.count(None) < 6
    # The rejection names the json field it thresholds, with the sample's score and the
    # threshold, so the report can rank dropped samples by their distance to the threshold.
    for rejection, score in zip(rejections, expected):
        if rejection is not None:
            assert (rejection.filter, rejection.metric, rejection.threshold) == ("aesthetic", "aesthetic_score", cut)
            assert rejection.value == pytest.approx(score, abs=1e-4) and rejection.metric in metas[0]


def test_aesthetic_head_takes_other_embedding_sizes(tmp_path):
    torch.save(ImprovedAestheticPredictorMLP(128).state_dict(), tmp_path / "tiny.pth")
    f = AestheticHead(weights=str(tmp_path / "tiny.pth"), min_score=-100)
    assert f.input_dim == 128
    f.check({"clip": CLIP})  # fits the tiny CLIP
    with pytest.raises(ValueError, match="takes 128-d"):
        f.check({"clip": ClipConfig(enabled=True, model="ViT-L-14")})


# --- hash blocklist (unit) ----------------------------------------------------------------


def test_hash_blocklist_matches_listed_digests_only(tmp_path):
    images = [f"image {i}".encode() * 50 for i in range(4)]
    sha = [hashlib.sha256(d).hexdigest() for d in images]
    md5 = [hashlib.md5(d).hexdigest() for d in images]
    (tmp_path / "sha256.txt").write_text(
        "# known images\n\n" + sha[0].upper() + "\n" + f"{sha[1]}  some/file.jpg  # sha256sum output\n")
    (tmp_path / "md5.txt").write_text(md5[2] + "\n")
    f = HashBlocklist(paths=[str(tmp_path / "sha256.txt"), str(tmp_path / "md5.txt")])
    rejections = [f({"data": d, "sha256": s}) for d, s in zip(images, sha)]
    assert reasons_of(rejections) == ["unsafe: hash_blocklist"] * 3 + [None]
    # A list match is no threshold decision: the filter, and no measure.
    assert {(r.filter, r.metric, r.value, r.threshold) for r in rejections[:3]} == {("hash_blocklist", None, None, None)}
    # An image one byte away from a listed one has another digest: kept.
    near = bytearray(images[0])
    near[-1] ^= 1
    assert f({"data": bytes(near)}) is None
    assert f.counts == {"dropped: unsafe: hash_blocklist": 3, "kept": 2}


def test_hash_blocklist_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "bad.txt").write_text("# header\n" + "ab" * 32 + "\nnot-a-digest\n")
    with pytest.raises(FilterConfigError, match=r"filters\.0\.paths: .*bad\.txt:3: 'not-a-digest' is not a sha256"):
        build_chain([{"name": "hash_blocklist", "paths": [str(tmp_path / "bad.txt")]}])
    (tmp_path / "short.txt").write_text("ab" * 20 + "\n")  # 40 digits: sha1 is not supported
    with pytest.raises(FilterConfigError, match="short.txt:1"):
        build_chain([{"name": "hash_blocklist", "paths": [str(tmp_path / "short.txt")]}])
    with pytest.raises(FilterConfigError, match="hash list not found"):
        build_chain([{"name": "hash_blocklist", "paths": [str(tmp_path / "missing.txt")]}])


# --- end to end ---------------------------------------------------------------------------


def rows_of(out: Path) -> pd.DataFrame:
    return pd.concat([pq.read_table(p).to_pandas() for p in sorted((out / "shards").glob("*.parquet"))],
                     ignore_index=True).set_index("key")


def tar_members(out: Path) -> dict[str, bytes]:
    members = {}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    return members


def files_holding(root: Path, needle: bytes) -> list[Path]:
    """Every file under root whose bytes contain `needle`, also inside parquet cells (a
    parquet file compresses its pages, so its raw bytes would not show an image it holds)."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if needle in path.read_bytes():
            found.append(path)
        elif path.suffix == ".parquet":
            table = pq.read_table(path)
            for column in table.columns:
                if any(isinstance(v, bytes) and needle in v for v in column.to_pylist()):
                    found.append(path)
                    break
    return found


@pytest.fixture(scope="module")
def e2e(dataset, concept_threshold, nsfw_weights, tmp_path_factory):
    """Two runs of the same config on the same served rows, with the tiny CLIP, the NSFW
    head and the concept filter, keeping every intermediate file; the second also has a
    hash blocklist listing the sha256 of one served image and the md5 of another."""
    _, urls, data_dir = dataset
    tmp = tmp_path_factory.mktemp("safety-run")
    # Rows: 100 of the shared dataset (with its planted faults) and 40 scenes of our own,
    # a quarter of each concept, served from a second server.
    www = tmp / "www"
    (www / "images").mkdir(parents=True)
    rng = random.Random(77)
    ours = []
    with DevServer(www) as own:
        for i, (scene, label) in enumerate(labelled_scenes(13, per_concept=10, others=20)):
            (www / "images" / f"c{i:03d}.jpg").write_bytes(rendered(scene, rng))
            ours.append({"URL": f"{own.base_url}/images/c{i:03d}.jpg", "TEXT": caption(scene), "truth": label})
        inputs = pd.concat([pd.read_parquet(urls).iloc[:100][["URL", "TEXT", "truth"]], pd.DataFrame(ours)],
                           ignore_index=True)
        inputs.to_parquet(tmp / "urls.parquet", index=False)

        # The blocked images: rows the shared dataset serves fine, one small enough to be
        # stored byte for byte (short side <= 128) and one that is resized.
        full = pd.read_parquet(urls).iloc[:100]
        fine = full[full["truth"] == "ok"]
        small = fine[fine[["WIDTH", "HEIGHT"]].min(axis=1) <= 128].iloc[0]
        large = fine[fine[["WIDTH", "HEIGHT"]].min(axis=1) > 160].iloc[0]
        blocked = {}
        for row in (small, large):
            raw = (data_dir / "images" / row["URL"].rsplit("/", 1)[1]).read_bytes()
            blocked[row["URL"]] = {"original": raw, "normalized": normalize_image(raw, RESIZE).data}
        small_raw, large_raw = blocked[small["URL"]]["original"], blocked[large["URL"]]["original"]
        assert blocked[small["URL"]]["normalized"] == small_raw != blocked[large["URL"]]["normalized"]
        (tmp / "blocked.txt").write_text(
            "# sha256 of one image\n" + hashlib.sha256(small_raw).hexdigest() + "\n")
        (tmp / "blocked-md5.txt").write_text(hashlib.md5(large_raw).hexdigest().upper() + "  image.jpg\n")

        safety = [
            {"name": "nsfw", "weights": str(nsfw_weights), "threshold": 0.5},
            {"name": "concepts", "concepts": [concept_spec(concept_threshold)]},
        ]
        hashes = {"name": "hash_blocklist", "paths": [str(tmp / "blocked.txt"), str(tmp / "blocked-md5.txt")]}
        for name, chain in (("plain", safety), ("blocklist", [hashes, *safety])):
            config = write_config(
                tmp / f"{name}.yaml", tmp / "urls.parquet", tmp / name,
                input={"rows_per_shard": 70},
                download={"timeout": 10},
                clip={"enabled": True, "model": TINY_CLIP, "pretrained": None, "batch_size": 64},
                filters=chain,
            )
            env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
            result = run_curate(["run", str(config), "--no-progress", "--set", "output.keep_intermediate=true"],
                                env, timeout=240)
            assert result.returncode == 0, result.stderr[-3000:]
    return {"plain": tmp / "plain", "blocklist": tmp / "blocklist", "blocked": blocked,
            "concept_threshold": concept_threshold}


def test_run_records_safety_reasons_and_scores(e2e):
    out = e2e["plain"]
    rows = rows_of(out)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_in"] == len(rows) == 140 == stats["written"] + stats["rejected"]
    ours = rows[rows["url"].str.contains("/images/c")]  # our 40 scenes, of known concepts
    nsfw_reason, concept_reason = "unsafe: nsfw punsafe>=0.5", f"unsafe: concept {ZERO_SHOT_CONCEPT}"
    reasons = ours.groupby("truth")["reason"]
    # The head (first in the chain) was trained on one concept, the concept filter looks for
    # the other. (Their rates are measured above on 400 scenes; here 10 of each go through a run.)
    assert (reasons.get_group(NSFW_CONCEPT) == nsfw_reason).mean() >= 0.8
    assert (reasons.get_group(ZERO_SHOT_CONCEPT) == concept_reason).mean() >= 0.8
    assert reasons.get_group("other").isna().mean() >= 0.9
    # Scores land in the parquet for every sample a filter saw, dropped ones too ...
    assert ours["punsafe"].notna().all()
    assert (ours["punsafe"] >= 0.5).eq(ours["reason"] == nsfw_reason).all()
    score = ours[f"concept_{ZERO_SHOT_CONCEPT}"]
    assert score[ours["reason"] != nsfw_reason].notna().all()  # the first drop wins: later filters do not run
    assert (score >= e2e["concept_threshold"]).eq(ours["reason"] == concept_reason).all()
    # ... and in the json of every written sample.
    members = tar_members(out)
    for key in rows.index[rows["status"] == "ok"]:
        meta = json.loads(members[f"{key}.json"])
        assert 0 <= meta["punsafe"] < 0.5 and meta[f"concept_{ZERO_SHOT_CONCEPT}"] < e2e["concept_threshold"]
    # Rows dropped for safety have no image in the shards; the filters' counts chain up.
    unsafe = rows.index[rows["reason"].fillna("").str.startswith("unsafe:")]
    assert len(unsafe) >= 18 and not any(f"{k}.jpg" in members for k in unsafe)
    nsfw, concepts = stats["filters"]["nsfw"], stats["filters"]["concepts"]
    assert nsfw["kept"] == sum(concepts.values()) and concepts["kept"] == stats["written"]
    assert nsfw[f"dropped: {nsfw_reason}"] == stats["rejected_by_reason"][nsfw_reason]


def test_hash_blocklist_removes_exactly_the_listed_images_end_to_end(e2e):
    plain, blocked_run = rows_of(e2e["plain"]), rows_of(e2e["blocklist"])
    listed = blocked_run["url"].isin(list(e2e["blocked"]))
    assert listed.sum() == 2
    # The listed rows: rejected for the hash, with their digest; before the run they were written.
    assert (blocked_run.loc[listed, "reason"] == "unsafe: hash_blocklist").all()
    assert (plain.loc[blocked_run.index[listed], "status"] == "ok").all()
    assert blocked_run.loc[listed, "sha256"].notna().all() and blocked_run.loc[listed, "width"].isna().all()
    # Nothing else changed: every other row has the same status, reason and scores (within
    # float noise: the score stage's batches hold two images fewer).
    others = blocked_run.index[~listed]
    same = ["url", "caption", "status", "reason", "sha256", "width", "height", "punsafe", "clip_similarity"]
    pd.testing.assert_frame_equal(plain.loc[others, same], blocked_run.loc[others, same], check_exact=False, atol=2e-3)
    plain_members, blocked_members = tar_members(e2e["plain"]), tar_members(e2e["blocklist"])
    gone = {f"{k}.{ext}" for k in blocked_run.index[listed] for ext in ("jpg", "txt", "json")}
    assert set(plain_members) - set(blocked_members) == gone
    for name, data in blocked_members.items():
        if name.endswith(".json"):
            a, b = json.loads(data), json.loads(plain_members[name])
            assert a.keys() == b.keys() and all(
                a[k] == pytest.approx(b[k], abs=2e-3) if isinstance(a[k], float) else a[k] == b[k] for k in a), name
        else:
            assert data == plain_members[name], name
    stats = json.loads((e2e["blocklist"] / "stats.json").read_text())
    assert stats["rejected_by_reason"]["unsafe: hash_blocklist"] == 2
    assert stats["filters"]["hash_blocklist"]["dropped: unsafe: hash_blocklist"] == 2


def test_a_blocked_image_is_in_no_file_of_the_run(e2e):
    for url, forms in e2e["blocked"].items():
        for form, data in forms.items():
            # The search finds the image where it is: the run without the list stored its
            # normalized bytes (the original ones too when it was small enough to pass as is).
            if data == forms["normalized"]:
                assert files_holding(e2e["plain"], data), (url, form)
            # With the list, no file anywhere under the output holds it: not the shards, not
            # work/ (kept here), not embeddings/, not the report.
            assert files_holding(e2e["blocklist"], data) == [], (url, form)
    assert (e2e["blocklist"] / "work" / "download").is_dir() and list((e2e["blocklist"] / "work" / "download").glob("*.tar"))
    keys = set(rows_of(e2e["blocklist"]).query("reason == 'unsafe: hash_blocklist'").index)
    for samples in (e2e["blocklist"] / "report" / "samples").glob("*.parquet"):
        assert keys.isdisjoint(pq.read_table(samples, columns=["key"]).column("key").to_pylist())
