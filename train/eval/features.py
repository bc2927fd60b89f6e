"""Image sets -> the features the metrics compare: FID Inception pool features and logits, and
CLIP image embeddings (plus CLIP text embeddings of the prompts for the CLIP score).

Generated images arrive batch by batch and only their features are kept, so memory does not
grow with the number of images. The reference set's features are computed once and cached
next to it (REFERENCE/.curate-eval/KEY.npz; the key covers the files, their sizes and times,
the resolution and both networks), with pytorch-fid's statistics format inside (`mu`, `sigma`:
`python -m pytorch_fid KEY.npz other/` reads it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from curate.pipeline.shards import atomic_path
from curate.train.eval.data import ReferenceSet
from curate.train.eval.inception import LoadedInception

CACHE_VERSION = 1


class FeatureSet:
    """Features of one image set, accumulated batch by batch."""

    def __init__(self, inception: Optional[LoadedInception], clip, batch_size: int = 50):
        self.inception, self.clip, self.batch_size = inception, clip, batch_size
        self._pool: list[np.ndarray] = []
        self._logits: list[np.ndarray] = []
        self._clip: list[np.ndarray] = []

    @torch.no_grad()
    def add(self, images: np.ndarray) -> None:
        """uint8 images (N, H, W, 3)."""
        for start in range(0, len(images), self.batch_size):
            part = images[start:start + self.batch_size]
            if self.inception is not None:
                pixels = torch.from_numpy(np.ascontiguousarray(part)).to(self.inception.device)
                pixels = pixels.permute(0, 3, 1, 2).float() / 255.0
                pool, logits = self.inception.model(pixels)
                self._pool.append(pool.double().cpu().numpy())
                self._logits.append(logits.double().cpu().numpy())
            if self.clip is not None:
                batch = torch.stack([self.clip.preprocess(Image.fromarray(image)) for image in part])
                self._clip.append(self.clip.encode_image(batch.to(self.clip.device)).float().cpu().numpy())

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        if self._pool:
            out["inception_pool"] = np.concatenate(self._pool)
            out["inception_logits"] = np.concatenate(self._logits)
        if self._clip:
            out["clip"] = np.concatenate(self._clip)
        return out


@torch.no_grad()
def text_embeddings(clip, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """L2-normalized CLIP text embeddings, in order."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = clip.prepare_tokens(clip.tokenizer(texts[start:start + batch_size]))
        out.append(clip.encode_text(tokens.to(clip.device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def reference_features(reference: ReferenceSet, resolution: int, inception: Optional[LoadedInception], clip,
                       clip_name: str, batch_size: int = 50, use_cache: bool = True,
                       log=print) -> tuple[dict[str, np.ndarray], Optional[Path]]:
    """The reference set's features (and CLIP text embeddings of its captions, where it has
    them), from the cache when it holds them; returns (arrays, cache file)."""
    key = reference.fingerprint(CACHE_VERSION, resolution, inception.sha256 if inception else "no-inception", clip_name)
    path = reference.cache_dir / f"{key}.npz"
    if use_cache and path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            log(f"reference features from the cache: {path}")
            return {k: cached[k] for k in cached.files}, path
    features, captions, count = FeatureSet(inception, clip, batch_size), [], 0
    pending: list[np.ndarray] = []
    for image, caption in reference.images(resolution):
        pending.append(image)
        captions.append(caption)
        count += 1
        if len(pending) == batch_size:
            features.add(np.stack(pending))
            pending = []
    if pending:
        features.add(np.stack(pending))
    if count < 2:
        from curate.pipeline.errors import UserError

        raise UserError(f"reference: {count} images found; the metrics need at least 2")
    arrays = features.arrays()
    if all(c is not None for c in captions) and clip is not None:
        arrays["clip_text"] = text_embeddings(clip, captions)
    if "inception_pool" in arrays:  # pytorch-fid's statistics file format
        arrays["mu"] = arrays["inception_pool"].mean(axis=0)
        arrays["sigma"] = np.cov(arrays["inception_pool"], rowvar=False)
    log(f"reference features of {count} images computed")
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        meta = {"images": count, "resolution": resolution, "clip": clip_name,
                "inception_sha256": inception.sha256 if inception else None,
                "files": [str(p) for p in reference.files[:1000]]}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        return arrays, path
    return arrays, None
