"""`curate eval`'s metrics against independent implementations (pytorch-fid's Fréchet distance,
torchmetrics' FID, KID and Inception Score, fed the same features) and against known answers;
the FID Inception network against pytorch-fid's own, loaded from a weights file in the public
format. `curate eval` as a command: tests/e2e/test_eval_run.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from curate.pipeline.errors import UserError
from curate.train.eval.metrics import (
    _mmd2_polynomial, clip_score, frechet_distance, inception_score, kernel_distance,
)
from train_helpers import one_torch_thread  # noqa: F401 (an autouse fixture)

RTOL = 1e-4




class Passthrough(torch.nn.Module):
    """torchmetrics' metrics accept a custom feature network: this one hands our features on."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def two_sets(n: int, m: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(m, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.2  # another mean, a full covariance
    return x, y


def torchmetrics_fid(x: np.ndarray, y: np.ndarray) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=Passthrough(x.shape[1]))
    fid.update(torch.from_numpy(x), real=True)
    fid.update(torch.from_numpy(y), real=False)
    return float(fid.compute())


@pytest.mark.parametrize("n, m, d", [(300, 200, 32), (40, 50, 64), (20, 300, 48)])
def test_frechet_distance_equals_pytorch_fid_and_torchmetrics(n, m, d):
    """More images than dimensions, fewer, and one of each: the cases the factor choice differs in."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    x, y = two_sets(n, m, d)
    ours = frechet_distance(x, y)
    assert ours == pytest.approx(torchmetrics_fid(x, y), rel=RTOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's deprecation of sqrtm's disp argument, pytorch-fid's eps notice
        theirs = calculate_frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    # With fewer images than dimensions the product of covariances is singular and pytorch-fid
    # may add 1e-6 to both diagonals: a difference far below RTOL either way.
    assert ours == pytest.approx(theirs, rel=RTOL)
    assert frechet_distance(y, x) == pytest.approx(ours, rel=1e-9)


def test_identical_sets_are_at_distance_zero():
    x, _ = two_sets(500, 1, 64)
    scale = frechet_distance(x, x + 1.0)  # = 64: the means differ by 1 in each dimension
    assert scale == pytest.approx(64.0, rel=1e-9)
    assert abs(frechet_distance(x, x)) < 1e-9 * scale
    few, _ = two_sets(30, 1, 64)  # fewer images than dimensions: a singular covariance
    assert abs(frechet_distance(few, few)) < 1e-9 * frechet_distance(few, few + 1.0)


def gaussian_set(mean: np.ndarray, variances: np.ndarray, rotation: np.ndarray, n: int, rng) -> np.ndarray:
    """n points whose sample mean is exactly `mean` and whose sample covariance (ddof=1) is
    exactly rotation · diag(variances) · rotationᵀ."""
    d = len(mean)
    z = rng.normal(size=(n, d))
    z -= z.mean(axis=0)
    # whiten: sample covariance exactly I
    values, vectors = np.linalg.eigh(z.T @ z / (n - 1))
    z = z @ vectors @ np.diag(values ** -0.5) @ vectors.T
    return z @ np.diag(np.sqrt(variances)) @ rotation.T + mean


def test_frechet_distance_of_gaussians_is_the_analytic_value():
    """Covariances R·diag(a)·Rᵀ and R·diag(b)·Rᵀ commute, so (Σ1 Σ2)^½ = R·diag(√(ab))·Rᵀ and
    FD = |μ1 − μ2|² + Σ (√a − √b)²."""
    rng = np.random.default_rng(7)
    d = 24
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 4.0, size=d), rng.uniform(0.1, 4.0, size=d)
    x = gaussian_set(mu1, a, rotation, 400, rng)
    y = gaussian_set(mu2, b, rotation, 300, rng)
    assert np.allclose(np.cov(y, rowvar=False), rotation @ np.diag(b) @ rotation.T)
    analytic = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(x, y) == pytest.approx(analytic, rel=1e-8)
    # Same covariance, means 3 apart along one axis: 9.
    shifted = x + 3.0 * rotation[:, 0]
    assert frechet_distance(x, shifted) == pytest.approx(9.0, rel=1e-8)


def test_kid_equals_torchmetrics():
    from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd

    x, y = two_sets(60, 60, 32, seed=3)
    # One subset of every image: torchmetrics' random subset order no longer matters.
    kid = KernelInceptionDistance(feature=Passthrough(32), subsets=1, subset_size=60)
    kid.update(torch.from_numpy(x), real=True)
    kid.update(torch.from_numpy(y), real=False)
    theirs, _ = kid.compute()
    ours, std = kernel_distance(x, y, subsets=1, subset_size=60)
    assert ours == pytest.approx(float(theirs), rel=RTOL) and std == 0.0
    # Each subset's MMD² is torchmetrics' poly_mmd with the same (default) kernel.
    a, b = x[:25], y[10:35]
    assert _mmd2_polynomial(a, b) == pytest.approx(float(poly_mmd(torch.from_numpy(a), torch.from_numpy(b))), rel=RTOL)
    # Seeded subsets: the same value twice; smaller than the whole-set sizes allowed.
    assert kernel_distance(x, y, subsets=10, subset_size=20) == kernel_distance(x, y, subsets=10, subset_size=20)


def test_kid_of_one_distribution_is_zero_within_its_spread():
    """KID is unbiased: two samples of one distribution give 0 up to the estimator's noise,
    two distributions clearly more."""
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, same_std = kernel_distance(x, y, subsets=10, subset_size=200)
    different, _ = kernel_distance(x, y + 0.5, subsets=10, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3 * different
    assert different > 20 * abs(same)


def test_inception_score_equals_torchmetrics_and_known_answers():
    from torchmetrics.image.inception import InceptionScore

    logits = np.random.default_rng(5).normal(size=(64, 1008)) * 3
    metric = InceptionScore(feature=Passthrough(1008), splits=1)
    metric.update(torch.from_numpy(logits))
    theirs, _ = metric.compute()
    assert inception_score(logits, splits=1)[0] == pytest.approx(float(theirs), rel=RTOL)
    # Every image the same class distribution: IS = 1. Ten images, each surely one of ten
    # different classes: IS = 10.
    assert inception_score(np.zeros((20, 1008)), splits=2) == pytest.approx((1.0, 0.0))
    sure = np.full((10, 1008), -1e4)
    sure[np.arange(10), np.arange(10) * 7] = 0.0
    assert inception_score(sure, splits=1)[0] == pytest.approx(10.0, rel=1e-9)


def test_clip_score_is_torchmetrics_definition():
    """100 × the mean cosine of each image with its own prompt, floored at 0 (torchmetrics)."""
    rng = np.random.default_rng(2)
    text = rng.normal(size=(6, 32))
    assert clip_score(3.0 * text, text) == pytest.approx(100.0)
    image = rng.normal(size=(6, 32))
    cosine = np.sum(image * text, 1) / np.linalg.norm(image, axis=1) / np.linalg.norm(text, axis=1)
    assert clip_score(image, text) == pytest.approx(max(100 * cosine.mean(), 0.0))
    assert clip_score(-text, text) == 0.0


def test_too_few_images_is_an_error_not_a_number():
    one = np.ones((1, 8))
    with pytest.raises(ValueError):
        frechet_distance(one, one)
    with pytest.raises(ValueError):
        kernel_distance(one, one)


# ---------------------------------------------------------------- the FID Inception network

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random FID Inception saved as a state_dict, named like pytorch-fid's public file."""
    from curate.train.eval.inception import write_random_weights

    return write_random_weights(tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-random.pth", seed=1)


def test_inception_loads_a_public_format_file_and_gives_pytorch_fid_features(weights, monkeypatch):
    import pytorch_fid.inception
    from pytorch_fid.inception import InceptionV3

    from curate.train.eval.inception import CLASSES, POOL_DIM, load_inception

    loaded = load_inception(str(weights), "cpu")
    assert not loaded.standard and loaded.source == str(weights)
    # pytorch-fid's own network takes the same file through its own loading path, where it
    # would otherwise download the public file...
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url",
                        lambda url, **kw: torch.load(weights, map_location="cpu", weights_only=True))
    reference = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[POOL_DIM]]).eval()
    # ...and both give the same 2048-d pool features for the same images (any size: both resize to 299).
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pool, logits = loaded.model(images)
        expected = reference(images)[0].flatten(1)
    assert pool.shape == (2, POOL_DIM) and logits.shape == (2, CLASSES)
    assert float(pool.std()) > 1e-3  # not a dead network: the comparison means something
    torch.testing.assert_close(pool, expected, rtol=1e-4, atol=1e-5)
    fc = loaded.model.net.fc.weight
    torch.testing.assert_close(logits, pool @ fc.T)  # IS: the logits without the bias


def test_inception_refuses_other_weights_naming_what_differs(tmp_path, weights):
    from torchvision.models import inception_v3

    from curate.train.eval.inception import load_inception

    plain = tmp_path / "torchvision_inception.pth"  # torchvision's Inception-v3: not the FID variant
    torch.save(inception_v3(weights=None, aux_logits=False, init_weights=False).state_dict(), plain)
    with pytest.raises(UserError, match="not the FID Inception-v3 .*(missing|other shape)"):
        load_inception(str(plain), "cpu")
    with pytest.raises(UserError, match="no such file"):
        load_inception(str(tmp_path / "missing.pth"), "cpu")


def test_inception_auto_uses_torch_hubs_cached_file(tmp_path, monkeypatch, weights):
    """metrics.inception: auto finds the file where pytorch-fid / torch hub keep it, offline."""
    import shutil

    from curate.train.eval.inception import FID_WEIGHTS_FILE, weights_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / FID_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    shutil.copy(weights, cached)
    assert weights_file("auto") == cached
