"""Heads on the CLIP image embedding: LAION's NSFW detector and aesthetic predictor.

Both are small MLPs (pipeline/models/head_nets.py) reading the embedding the score stage saved,
so they cost no image decoding. Their weights come from a file the user gives: a torch
state_dict (`torch.save(net.state_dict(), path)`, loaded with `weights_only=True`) or a
.safetensors file. A missing or unreadable file, or one whose keys and shapes are not
the head's, is an error naming `filters.N.weights` when the config is read; weights for
another embedding size than the CLIP model's are refused before any work starts.

    - name: nsfw
      weights: models/laion-nsfw-vit-l-14.pt   # see LaionNsfwMlp for converting LAION's Keras model
      threshold: 0.5                           # LAION's advice; Re-LAION's research-safe set used 0.45
    - name: aesthetic
      weights: models/sac+logos+ava1-l14-linearMSE.pth
      min_score: 5

Paths are read where the config is loaded and by every worker: give absolute paths on a
cluster.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import numpy as np
from pydantic import Field, PrivateAttr, field_validator

from curate.filters.base import SAFETY, Decision, Filter
from curate.pipeline.models.heads import load_head

class _EmbeddingHead(Filter):
    """A head on `img_emb`: loads its weights when the config is read, scores each sample."""

    needs_clip = True
    needs_embeddings = True
    kind: ClassVar[str]
    weights: str

    _net: Any = PrivateAttr(default=None)

    @field_validator("weights")
    @classmethod
    def _loads(cls, weights: str) -> str:
        load_head(cls.kind, weights)  # errors name filters.N.weights, before any work
        return weights

    @property
    def input_dim(self) -> int:
        return load_head(self.kind, self.weights).input_dim

    def check(self, context: dict[str, Any]) -> None:
        from curate.pipeline.models.clip import embedding_dim

        clip = context["clip"]
        dim = embedding_dim(clip.model)
        if dim is not None and dim != self.input_dim:
            raise ValueError(f"{self.weights} takes {self.input_dim}-d embeddings, "
                             f"but clip.model {clip.model} gives {dim}-d ones")

    def setup(self, context: dict[str, Any]) -> None:
        self._net = load_head(self.kind, self.weights)

    def score(self, sample: dict[str, Any]) -> float:
        import torch

        emb = sample.get("img_emb")
        if emb is None:
            raise RuntimeError(f"{self.name} filter needs clip.enabled: true (the sample has no embedding)")
        if emb.shape[-1] != self._net.input_dim:
            # Only reachable for models whose size the config check cannot read (hf-hub:).
            from curate.pipeline.errors import UserError

            raise UserError(f"filters: {self.name}: {self.weights} takes {self._net.input_dim}-d embeddings, "
                            f"but the CLIP model gives {emb.shape[-1]}-d ones")
        x = np.asarray(emb, dtype=np.float32)
        x = x / max(float(np.linalg.norm(x)), 1e-12)  # both heads were trained on normalized embeddings
        with torch.inference_mode():
            return float(self._net(torch.from_numpy(x)[None])[0])


class NsfwHead(_EmbeddingHead):
    """P(unsafe) from LAION's CLIP-based NSFW detector, written as `punsafe` into every
    sample's json; drops punsafe ≥ threshold as "unsafe: nsfw punsafe>=0.5".

    The architecture, its state_dict keys and how LAION's Keras weights map onto them:
    `curate.pipeline.models.head_nets.LaionNsfwMlp`. Use the CLIP model the weights were trained on
    (LAION's: ViT-L/14 or ViT-B/32, OpenAI weights). An input column named punsafe
    (LAION's metadata) is replaced by this score in the samples the head sees;
    `laion_columns` judges the input's value, before the download.
    """

    name = "nsfw"

    priority = SAFETY
    kind = "nsfw"
    threshold: float = Field(0.5, ge=0, le=1)

    def keep(self, sample) -> Decision:
        punsafe = self.score(sample)
        sample["meta"]["punsafe"] = round(punsafe, 4)
        if punsafe >= self.threshold:
            return self.reject(f"unsafe: nsfw punsafe>={self.threshold:g}", "punsafe", punsafe, self.threshold)
        return True

    def score_fields(self) -> list[str]:
        return ["punsafe"]

    def thresholds(self) -> list[tuple[str, float]]:
        return [("punsafe", self.threshold)]


class AestheticHead(_EmbeddingHead):
    """The LAION aesthetic predictor's rating (about 1–10), written as `aesthetic_score`;
    drops scores below `min_score` as "aesthetic_score<5" (its rejection's metric is the json
    field, so the report can show the dropped samples nearest the threshold). Without `min_score`
    it only scores. LAION-Aesthetics V2 published the subsets scoring ≥ 4.5, 5, 6, 6.25 and
    6.5; Stable Diffusion v1 was fine-tuned on the 5+ one. Architecture and state_dict keys:
    `curate.pipeline.models.head_nets.AestheticMlp`."""

    name = "aesthetic"
    kind = "aesthetic"
    min_score: Optional[float] = None

    def keep(self, sample) -> Decision:
        score = self.score(sample)
        sample["meta"]["aesthetic_score"] = round(score, 4)
        if self.min_score is not None and score < self.min_score:
            return self.reject(f"aesthetic_score<{self.min_score:g}", "aesthetic_score", score, self.min_score)
        return True

    def score_fields(self) -> list[str]:
        return ["aesthetic_score"]

    def thresholds(self) -> list[tuple[str, float]]:
        return [] if self.min_score is None else [("aesthetic_score", self.min_score)]
