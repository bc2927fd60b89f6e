"""Zero-shot concept filter: drop images whose CLIP embedding is close to a described concept.

The approach of the Stable Diffusion safety checker (one embedding per unsafe concept, a
cosine-similarity threshold per concept), with the concept embeddings made from text
prompts by the run's own CLIP model, so no other model is needed:

    - name: concepts
      concepts:
        - name: gore                     # the reason is "unsafe: concept gore"
          prompts: ["a photo of gore", "a bloody wound"]
          threshold: 0.24                # tune it on the scores written to the json

A concept's prompts are variants of one thing: their normalized text embeddings are
averaged into the concept's embedding (CLIP's prompt ensembling; with the project's tiny
CLIP it separated the 56 synthetic colour-on-background concepts better than the maximum
similarity over the prompts: median ROC AUC 0.989 against 0.985).
Distinct things are distinct concepts, each with its own threshold. Every sample the
filter sees gets `concept_<name>` (its cosine similarity to each concept) in its json and
the shard parquet, whether dropped or kept, so thresholds can be tuned on a run's output.
Concepts are checked in order; the first above its threshold is the reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from curate.filters.base import SAFETY, Decision, Filter
from curate.pipeline.models.cache import cached
from curate.pipeline.models.device import resolve_device



class Concept(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Goes into the reason and the json key (concept_<name>): a short identifier.
    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    prompts: list[str] = Field(min_length=1)
    threshold: float = Field(ge=-1, le=1)


def concept_embeddings(clip_cfg, prompts: list[list[str]]) -> np.ndarray:
    """[n_concepts, dim] L2-normalized: each concept's prompt embeddings averaged, once per
    process and model.

    Text is encoded on the CPU: a few prompts need no GPU, and this runs in the write
    stage, whose workers must not each open a CUDA context. On a CPU run this is the very
    model the score stage loaded in this process; on a GPU run each worker that writes
    loads a CPU copy once (for a large CLIP, about its size in memory per worker).
    """
    import torch

    from curate.pipeline.models.clip import load_clip

    on_cpu = resolve_device(clip_cfg.device) == "cpu"
    device, precision = (clip_cfg.device, clip_cfg.precision) if on_cpu else ("cpu", "fp32")

    def build() -> np.ndarray:
        clip = load_clip(clip_cfg.model, clip_cfg.pretrained, device, precision)
        rows = []
        with torch.inference_mode():
            for texts in prompts:
                tokens = clip.tokenizer(texts).to(clip.device)
                emb = clip.model.encode_text(tokens, normalize=True).float().mean(0)
                rows.append((emb / emb.norm()).cpu().numpy())
        return np.stack(rows).astype(np.float32)

    key = ("concepts", clip_cfg.model, clip_cfg.pretrained, device, precision, tuple(map(tuple, prompts)))
    return cached(key, build)


class ConceptFilter(Filter):
    """Drop images whose cosine similarity to a concept's embedding reaches its threshold,
    as "unsafe: concept <name>"."""

    name = "concepts"

    priority = SAFETY
    needs_clip = True
    needs_embeddings = True
    concepts: list[Concept] = Field(min_length=1)

    _matrix: Any = PrivateAttr(default=None)

    @field_validator("concepts")
    @classmethod
    def _unique_names(cls, concepts: list[Concept]) -> list[Concept]:
        names = [c.name for c in concepts]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"concept names must be unique; repeated: {', '.join(repeated)}")
        return concepts

    def setup(self, context: dict[str, Any]) -> None:
        self._matrix = concept_embeddings(context["clip"], [c.prompts for c in self.concepts])

    def keep(self, sample) -> Decision:
        emb = sample.get("img_emb")
        if emb is None:
            raise RuntimeError("concepts filter needs clip.enabled: true (the sample has no embedding)")
        emb = np.asarray(emb, dtype=np.float32)
        scores = self._matrix @ (emb / max(float(np.linalg.norm(emb)), 1e-12))
        for concept, score in zip(self.concepts, scores):
            sample["meta"][f"concept_{concept.name}"] = round(float(score), 4)
        for concept, score in zip(self.concepts, scores):
            if score >= concept.threshold:
                return self.reject(f"unsafe: concept {concept.name}", f"concept_{concept.name}", float(score),
                                   concept.threshold)
        return True

    def score_fields(self) -> list[str]:
        return [f"concept_{c.name}" for c in self.concepts]

    def thresholds(self) -> list[tuple[str, float]]:
        return [(f"concept_{c.name}", c.threshold) for c in self.concepts]
