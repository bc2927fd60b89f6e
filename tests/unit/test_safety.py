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

The scenes, their embeddings, the calibrated threshold and the trained head are
tests/safety_scenes.py's; the runs with these filters: tests/e2e/test_safety_run.py.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from conftest import write_config
from curate.filters import FilterConfigError, build_chain
from curate.filters.concepts import ConceptFilter
from curate.filters.hashes import HashBlocklist
from curate.pipeline.models.head_nets import AestheticMlp, LaionNsfwMlp
from curate.filters.heads import AestheticHead, NsfwHead
from curate.pipeline.models.clip import TINY_CLIP, TINY_CLIP_DIR
from curate.pipeline.config import ClipConfig, load_config
from curate.pipeline.errors import UserError
from safety_scenes import CLIP, NSFW_CONCEPT, ZERO_SHOT_CONCEPT, concept_spec
from safety_scenes import concept_threshold, data, nsfw_weights  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not (TINY_CLIP_DIR / "open_clip_config.json").exists(), reason="tiny CLIP not built")


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
