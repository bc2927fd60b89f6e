"""The score stage's saved outputs, as the later steps read them: per-shard CLIP embeddings
and similarities (files named by pipeline/layout.py), and similarity histograms merged into
a dataset-wide threshold. Shared by the write stage, the dedup pass and `curate run`.

The write stage completes each metadata file for the tools that read clip-retrieval's layout
(`mark_written`): an index built from img_emb/ (autofaiss) numbers its vectors in file order,
row by row, and finds each one's `url` and `caption` in the metadata row of the same number."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.pipeline import storage
from curate.pipeline.layout import embedding_files
from curate.pipeline.records import SUCCESS
from curate.pipeline.shards import atomic_path

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


def read_embeddings(emb_dir: str, shard_id: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key → (image embedding, text embedding), float32 and L2-normalized, for one scored shard."""
    out = embedding_files(emb_dir, shard_id)
    keys = storage.read_parquet(out["metadata"], columns=["key"]).column("key").to_pylist()
    img = storage.load_npy(out["img_emb"]).astype(np.float32)
    txt = storage.load_npy(out["text_emb"]).astype(np.float32)
    return {k: (img[i], txt[i]) for i, k in enumerate(keys)}


def read_scores(emb_dir: str, shard_id: int) -> dict[str, tuple[Optional[float], str, Optional[str]]]:
    """key → (clip_similarity, clip_model, rejection reason or None) for one scored shard."""
    table = storage.read_parquet(embedding_files(emb_dir, shard_id)["metadata"])
    return {
        r["key"]: (r["clip_similarity"], r["clip_model"], r["reason"])
        for r in table.to_pylist()
    }


# What the write stage adds to a shard's metadata, row-aligned with its embeddings.
WRITTEN_COLUMNS = ("url", "caption", "written")


def mark_written(emb_dir: str, shard_id: int, records: list[dict]) -> None:
    """Give each row of one shard's metadata its sample's `url`, `caption` (as written) and
    `written` (whether it is in the shard's tar), keeping every row: the embeddings of dropped
    samples stay for tuning thresholds. Columns: key, url, caption, the score stage's, written.
    A redone write sets them again."""
    path = embedding_files(emb_dir, shard_id)["metadata"]
    table = storage.read_parquet(path)
    by_key = {r["key"]: r for r in records}
    rows = [by_key[k] for k in table.column("key").to_pylist()]
    scored = table.drop_columns([c for c in WRITTEN_COLUMNS if c in table.column_names])
    columns = {
        "key": scored.column("key"),
        "url": pa.array([r["url"] for r in rows], pa.string()),
        "caption": pa.array([r["caption"] for r in rows], pa.string()),
        **{c: scored.column(c) for c in scored.column_names if c != "key"},
        "written": pa.array([r["status"] == SUCCESS for r in rows], pa.bool_()),
    }
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)
