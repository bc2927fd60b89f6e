"""LAION's own safety and watermark scores, when the input has them.

LAION-5B's metadata carries `punsafe` (its CLIP-based NSFW detector's probability) and
`pwatermark` (its watermark detector's). LAION recommends dropping punsafe ≥ 0.5; the
research-safe Re-LAION-5B release used 0.45. This filter reads them from the input row,
so it is a "row" filter: a dropped row is never downloaded.

The columns reach the filter only when listed in `input.extra_cols` (the reader carries
no column it was not asked for); a config that uses this filter without listing them is
refused before any work starts (see `input_columns`). A row whose value is missing
(null / NaN) passes that check, and is counted in the filter's stats as
"unchecked: no punsafe" (or pwatermark): a dataset with many of those is not filtered
by this rule, and the stats say so.
"""

from __future__ import annotations

import math
from typing import Optional

from pydantic import Field, model_validator

from curate.filters.base import SAFETY, Decision, Filter


def _value(meta: dict, column: str) -> Optional[float]:
    value = meta.get(column)
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None  # not a score: one odd row must not fail the shard
    return None if math.isnan(value) else value


class LaionColumns(Filter):
    """Drop rows with punsafe ≥ `punsafe_threshold` ("unsafe: laion_punsafe>=0.5") or
    pwatermark ≥ `pwatermark_threshold` ("watermark: pwatermark>=0.8"). A threshold of
    null turns its check off (pwatermark is off by default)."""

    name = "laion_columns"

    priority = SAFETY
    stage = "row"
    punsafe_threshold: Optional[float] = Field(0.5, ge=0, le=1)
    pwatermark_threshold: Optional[float] = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _something_to_check(self):
        if self.punsafe_threshold is None and self.pwatermark_threshold is None:
            raise ValueError("both thresholds are null: the filter would check nothing")
        return self

    def input_columns(self) -> list[str]:
        columns = []
        if self.punsafe_threshold is not None:
            columns.append("punsafe")
        if self.pwatermark_threshold is not None:
            columns.append("pwatermark")
        return columns

    def thresholds(self) -> list[tuple[str, float]]:
        limits = [("punsafe", self.punsafe_threshold), ("pwatermark", self.pwatermark_threshold)]
        return [(metric, t) for metric, t in limits if t is not None]

    def _missing(self, column: str) -> None:
        with self._lock:
            self._counts[f"unchecked: no {column}"] += 1

    def keep(self, sample) -> Decision:
        meta = sample["meta"]
        if self.punsafe_threshold is not None:
            punsafe = _value(meta, "punsafe")
            if punsafe is None:
                self._missing("punsafe")
            elif punsafe >= self.punsafe_threshold:
                return self.reject(f"unsafe: laion_punsafe>={self.punsafe_threshold:g}", "punsafe", punsafe,
                                   self.punsafe_threshold)
        if self.pwatermark_threshold is not None:
            pwatermark = _value(meta, "pwatermark")
            if pwatermark is None:
                self._missing("pwatermark")
            elif pwatermark >= self.pwatermark_threshold:
                return self.reject(f"watermark: pwatermark>={self.pwatermark_threshold:g}", "pwatermark", pwatermark,
                                   self.pwatermark_threshold)
        return True
