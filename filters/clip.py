"""CLIP image-text similarity threshold (needs `clip.enabled: true`)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from curate.filters.base import Decision, Filter


class ClipSimilarity(Filter):
    """Drop pairs whose image and caption disagree.

    Either an absolute threshold (LAION-5B kept ViT-B/32 similarity ≥ 0.28), or the top
    fraction of the whole dataset (DataComp kept the top 30%): `curate run` turns a
    fraction into a threshold after every shard is scored, from merged per-shard
    histograms, and records it in stats.json.
    """

    name = "clip_similarity"
    needs_clip = True
    dataset_pass = "clip_top_fraction"
    min_similarity: Optional[float] = Field(None, ge=-1, le=1)
    top_fraction: Optional[float] = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _one_of(self):
        if (self.min_similarity is None) == (self.top_fraction is None):
            raise ValueError("give exactly one of min_similarity or top_fraction")
        return self

    def needs_dataset_pass(self) -> bool:
        return self.top_fraction is not None

    def keep(self, sample) -> Decision:
        if self.min_similarity is None:
            raise RuntimeError("clip_similarity: top_fraction was not resolved to a threshold before writing")
        score = sample["meta"].get("clip_similarity")
        if score is None:
            raise RuntimeError("clip_similarity filter needs clip.enabled: true (the sample has no score)")
        if score < self.min_similarity:
            return self.reject(f"clip_similarity<{self.min_similarity:.4g}", "clip_similarity", score, self.min_similarity)
        return True

    def thresholds(self) -> list[tuple[str, float]]:
        # A top_fraction is a threshold once resolved (the write stage's chain has it as min_similarity).
        return [] if self.min_similarity is None else [("clip_similarity", self.min_similarity)]
