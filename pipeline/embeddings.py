"""The score stage's saved outputs, as the later steps read them: per-shard CLIP embeddings
and similarities (files named by pipeline/layout.py), and similarity histograms merged into
a dataset-wide threshold. Shared by the write stage, the dedup pass and `curate run`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq

from curate.pipeline.layout import embedding_files

# Fixed bins over [-1, 1] for similarity histograms: merged across shards, they give
# the dataset-wide quantile for `top_fraction` without holding any scores in memory.
HIST_BINS = 20_000


def histogram(similarities: np.ndarray) -> dict[str, int]:
    """Sparse histogram {bin index: count}, small enough for a shard's done-marker."""
    counts, _ = np.histogram(similarities, bins=HIST_BINS, range=(-1.0, 1.0))
    return {str(i): int(counts[i]) for i in np.flatnonzero(counts)}


def merge_histograms(sparse: list[dict[str, int]]) -> np.ndarray:
    total = np.zeros(HIST_BINS, dtype=np.int64)
    for h in sparse:
        for i, c in h.items():
            total[int(i)] += c
    return total


def threshold_for_top_fraction(hist: np.ndarray, fraction: float) -> float:
    """The similarity above which `fraction` of all scored samples lie (bin resolution 1e-4)."""
    total = int(hist.sum())
    if total == 0:
        return 1.0
    keep = fraction * total
    above = np.cumsum(hist[::-1])  # samples in this bin or higher, from the top bin down
    top_bin = int(np.searchsorted(above, keep))  # first bin (from the top) reaching the fraction
    edges = np.linspace(-1.0, 1.0, HIST_BINS + 1)
    return float(edges[HIST_BINS - 1 - min(top_bin, HIST_BINS - 1)])


def read_embeddings(emb_dir: Path, shard_id: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key → (image embedding, text embedding), float32 and L2-normalized, for one scored shard."""
    out = embedding_files(emb_dir, shard_id)
    keys = pq.read_table(out["metadata"], columns=["key"]).column("key").to_pylist()
    img = np.load(out["img_emb"]).astype(np.float32)
    txt = np.load(out["text_emb"]).astype(np.float32)
    return {k: (img[i], txt[i]) for i, k in enumerate(keys)}


def read_scores(emb_dir: Path, shard_id: int) -> dict[str, tuple[Optional[float], str, Optional[str]]]:
    """key → (clip_similarity, clip_model, rejection reason or None) for one scored shard."""
    table = pq.read_table(embedding_files(emb_dir, shard_id)["metadata"])
    return {
        r["key"]: (r["clip_similarity"], r["clip_model"], r["reason"])
        for r in table.to_pylist()
    }
