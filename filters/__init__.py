"""Filters: each answers keep, or drop with a Rejection (reason, and the measure it compared).

Adding a filter: write a module with a `Filter` subclass, import it and add it to FILTERS
below, add a test file (filters/repetition.py and tests/unit/test_filter_repetition.py are a
small complete example). The YAML names it in `filters:` with its parameters, in order.
"""

from __future__ import annotations

from pydantic import ValidationError

from curate.filters.base import (
    STAGES, Filter, Rejection, apply_chain, apply_chain_batched, chain_counts, is_safety_reason,
)
from curate.filters.blocklist import CaptionBlocklist, UrlBlocklist
from curate.filters.caption import CaptionBoilerplate, CaptionClean, CaptionLanguage, CaptionLength
from curate.filters.clip import ClipSimilarity
from curate.filters.concepts import ConceptFilter
from curate.filters.dedup import Dedup
from curate.filters.hashes import HashBlocklist
from curate.filters.heads import AestheticHead, NsfwHead
from curate.filters.laion import LaionColumns
from curate.filters.latents import VaeLatents
from curate.filters.repetition import CaptionRepetition
from curate.filters.resolution import Resolution

# The registry: YAML name → filter class. One line per filter.
FILTERS: dict[str, type[Filter]] = {f.name: f for f in [
    # row: on the input row, before the fetch
    CaptionClean,
    CaptionBoilerplate,
    CaptionLength,
    CaptionRepetition,
    CaptionLanguage,
    CaptionBlocklist,
    UrlBlocklist,
    LaionColumns,
    # bytes: on the fetched bytes and the image header, before anything is decoded or stored
    HashBlocklist,
    Resolution,
    # sample: in the write stage, with CLIP scores and embeddings
    ClipSimilarity,
    NsfwHead,
    AestheticHead,
    ConceptFilter,
    Dedup,
    VaeLatents,
]}


class FilterConfigError(ValueError):
    pass


def build_chain(specs: list[dict]) -> list[Filter]:
    """Instantiate the configured filters; errors name `filters.N.param`."""
    chain = []
    for i, spec in enumerate(specs):
        params = dict(spec)
        name = params.pop("name", None)
        if name not in FILTERS:
            known = ", ".join(sorted(FILTERS))
            raise FilterConfigError(f"filters.{i}.name: unknown filter {name!r} (known: {known})")
        try:
            chain.append(FILTERS[name](**params))
        except ValidationError as exc:
            parts = []
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"])
                msg = "unknown parameter" if err["type"] == "extra_forbidden" else err["msg"]
                parts.append(f"filters.{i}.{where}: {msg}")
            raise FilterConfigError("; ".join(parts)) from exc
    return chain


def build_stage_chain(specs: list[dict], stage: str, context: dict | None = None) -> list[Filter]:
    """The configured filters that run at `stage` ("row", "bytes" or "sample"), in YAML
    order, each set up with `context` (see Filter.setup)."""
    assert stage in STAGES, stage
    chain = sorted((f for f in build_chain(specs) if f.stage == stage), key=lambda f: f.priority)
    for f in chain:
        f.setup(context or {})
    return chain


def score_fields(chain: list[Filter]) -> list[str]:
    """The score fields the filters of a chain write into the samples' json, each once."""
    return list(dict.fromkeys(field for f in chain for field in f.score_fields()))


__all__ = [
    "FILTERS", "Filter", "FilterConfigError", "Rejection", "apply_chain", "apply_chain_batched", "build_chain",
    "build_stage_chain",
    "chain_counts", "is_safety_reason", "score_fields",
]
