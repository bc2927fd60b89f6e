"""The numbers `curate eval` reports, computed from features (numpy, float64).

    frechet_distance(x, y)      FID on Inception pool features, FD in CLIP space on CLIP embeddings
    kernel_distance(x, y)       KID: unbiased MMD² with the cubic polynomial kernel, over random subsets
    inception_score(logits)     IS: exp E[KL(p(y|x) || p(y))], over splits in order
    clip_score(images, texts)   100 × the mean cosine of image and caption embeddings, floored at 0

Each follows its reference definition (pytorch-fid / clean-fid for the Fréchet distance,
Bińkowski et al. and torch-fidelity for KID, Salimans et al. for IS, torchmetrics for the
CLIP score); tests/unit/test_eval_metrics.py checks them against pytorch-fid and torchmetrics
on the same features and against known answers.

The Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2) is |μ1 − μ2|² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½.
pytorch-fid takes a general matrix square root (scipy's sqrtm) of the 2048 × 2048 product,
which is slow and, with fewer images than dimensions, singular (it then adds ε to the
diagonals). Here tr (Σ1 Σ2)^½ is the sum of the singular values of F1 F2ᵀ for any factors
with Fᵢᵀ Fᵢ = Σᵢ (the eigenvalues of Σ1 Σ2 are those of F1 F2ᵀ F2 F1ᵀ): the centred features
themselves when a set has fewer images than dimensions, else the covariance's symmetric square
root. Exact in both cases, and for a few hundred images a 2048-d FID takes milliseconds.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def _features(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-d array (images × dimensions), got shape {x.shape}")
    return x


def covariance_factor(features) -> np.ndarray:
    """F with Fᵀ F = the features' covariance (unbiased, as np.cov and pytorch-fid): the
    centred, scaled features when there are no more images than dimensions, else the
    covariance's symmetric square root (d × d)."""
    x = _features(features)
    n, d = x.shape
    if n < 2:
        raise ValueError("a covariance needs at least 2 images")
    centred = (x - x.mean(axis=0)) / np.sqrt(n - 1)
    if n <= d:
        return centred
    values, vectors = np.linalg.eigh(centred.T @ centred)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(x, y) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets (FID on Inception
    pool features). Equal sets give 0 (up to rounding); it is symmetric."""
    x, y = _features(x), _features(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} and {y.shape[1]}")
    diff = x.mean(axis=0) - y.mean(axis=0)
    fx, fy = covariance_factor(x), covariance_factor(y)
    cross = np.linalg.svd(fx @ fy.T, compute_uv=False).sum()  # tr (Σx Σy)^½
    return float(diff @ diff + np.sum(fx * fx) + np.sum(fy * fy) - 2.0 * cross)


def _mmd2_polynomial(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of two equal-size sets with k(a, b) = (a·b / d + 1)³."""
    m, d = x.shape
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def kernel_distance(x, y, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: (mean, std) of the unbiased polynomial-kernel MMD² over `subsets` random subsets
    of min(subset_size, len(x), len(y)) images from each set (torch-fidelity's defaults).
    Seeded: the same features give the same value."""
    x, y = _features(x), _features(y)
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError("KID needs at least 2 images in each set")
    rng = np.random.default_rng(seed)
    values = [_mmd2_polynomial(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """IS: (mean, std) over `splits` consecutive parts of exp E_x KL(p(y|x) || p(y)), p the
    softmax of the Inception's unbiased logits (its 1008 classes; the original TF code's)."""
    z = _features(logits)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    scores = []
    for part in np.array_split(log_p, min(splits, len(log_p))):
        p = np.exp(part)
        with np.errstate(divide="ignore", invalid="ignore"):
            # 0 · log 0 = 0: a class no image of the split predicts adds nothing
            terms = np.where(p > 0, p * (part - np.log(p.mean(axis=0))), 0.0)
        scores.append(np.exp(np.mean(np.sum(terms, axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


def clip_score(image_embeddings, text_embeddings) -> float:
    """torchmetrics' CLIP score: 100 × the mean cosine similarity of each image with its
    prompt, floored at 0."""
    a, b = _features(image_embeddings), _features(text_embeddings)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(max(100.0 * np.mean(np.sum(a * b, axis=1)), 0.0))


def maybe(function, *args, **kw) -> Optional[float]:
    """A metric, or None where the sets are too small for it (reported as missing)."""
    try:
        return function(*args, **kw)
    except ValueError:
        return None
