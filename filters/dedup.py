"""Dedup within a run: drop later copies of the same URL, the same image bytes, a
near-identical image (perceptual hash) or, optionally, a semantically identical image
(CLIP embeddings).

Whether a sample is a duplicate depends on the whole dataset, so it is decided by a
global pass over hashes saved per shard (pipeline/dedup.py) after every shard is
downloaded (and scored) and before any is written. This filter only reads the pass's
decisions for its shard and drops with "duplicate: url" | "duplicate: sha256" |
"duplicate: phash" | "duplicate: semantic"; `duplicate_of` (the key of the earlier
sample) lands in the shard parquet.

The first sample in (shard, row) order is kept, so reruns give identical output.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, PrivateAttr

from curate.filters.base import Decision, Filter
from curate.pipeline.dedup_store import read_decisions


class Dedup(Filter):
    """Params:

    url / sha256:        exact duplicates of the URL / of the downloaded image bytes.
    phash_max_distance:  near duplicates: 64-bit pHash (imagehash) of the normalized image
                         within this Hamming distance (None: off). 4 finds re-encoded and
                         resized copies; cost grows fast with it (see pipeline/dedup.py).
    semantic_eps:        SemDeDup: image embeddings with cosine >= 1 - eps (None: off;
                         needs clip.enabled).
    semantic_clusters:   k-means clusters for semantic dedup (None: one per ~5,000 images);
                         only images of the same cluster are compared.
    partitions:          hash partitions of the global pass (None: one per ~1M input rows);
                         a partition is what one task holds in memory.
    """

    name = "dedup"
    dataset_pass = "dedup"
    stage = "sample"

    url: bool = True
    sha256: bool = True
    phash_max_distance: Optional[int] = Field(4, ge=0, le=12)
    semantic_eps: Optional[float] = Field(None, gt=0, lt=1)
    semantic_clusters: Optional[int] = Field(None, ge=1)
    partitions: Optional[int] = Field(None, ge=1)

    _decisions: dict = PrivateAttr(default_factory=dict)

    def check(self, context: dict[str, Any]) -> None:
        # Only semantic dedup uses the CLIP embeddings, so needs_clip stays False.
        if self.semantic_eps is not None and not context["clip"].enabled:
            raise ValueError("semantic_eps needs clip.enabled: true")

    def setup(self, context: dict[str, Any]) -> None:

        if "shard" not in context:
            raise RuntimeError("dedup: the write stage must pass the shard id in the filter context")
        self._decisions = read_decisions(context["root"], context["shard"])

    def keep(self, sample) -> Decision:
        found = self._decisions.get(sample["key"])
        if found is None:
            return True
        kind, original = found
        sample["meta"]["duplicate_of"] = original
        return self.reject(f"duplicate: {kind}")


def dedup_spec(specs: list[dict]) -> Optional[dict]:
    """The configured dedup filter's spec (YAML name and parameters), or None."""
    return next((spec for spec in specs if spec["name"] == "dedup"), None)


def dedup_params(spec: dict) -> Dedup:
    return Dedup(**{k: v for k, v in spec.items() if k != "name"})


def needs_phash(specs: list[dict]) -> bool:
    """Whether the download stage must compute each image's perceptual hash (~1 ms an image)."""
    spec = dedup_spec(specs)
    return spec is not None and dedup_params(spec).phash_max_distance is not None
