"""The filter contract: keep, or drop with a reason.

A filter is a small pydantic model: its fields are its parameters (so a misspelled
parameter in the YAML is an error naming it), and `keep(sample)` answers True or
(False, reason). Calling the filter counts kept and dropped-per-reason by itself,
so every filter's effect shows up in the shard's stats without any code of its own.

When a filter runs is its `stage`, chosen by what it needs to look at:

- "row":    only the input row (`key`, `url`, `caption`, `meta` = the input's extra
            columns). Runs in the download stage BEFORE the image is fetched, so a
            dropped row costs no bandwidth (caption rules, URL and keyword blocklists,
            LAION's punsafe / pwatermark columns).
- "bytes":  also `data`, the original image bytes as fetched, and their `sha256`. Runs
            in the download stage before anything is stored (the image hash blocklist:
            a matched image is never written anywhere).
- "sample": the normalized image (`jpg` bytes), `meta` (the json written beside it,
            with sizes, sha256 and scores), and, when the score stage ran, `img_emb` /
            `text_emb` (L2-normalized float32 CLIP embeddings). Runs in the write stage.

Within a stage filters run in the order of the YAML list; the stages run in the order
above. A filter may also change the sample (clean the caption, resize the image, add
a score to `meta`, or add tar members to `sample["extra"]` as {extension: bytes}).

Reasons of safety filters start with "unsafe:" (see `is_safety_reason`): the report
never shows the images of such rows.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, PrivateAttr

Decision = Union[bool, tuple[bool, str]]
Stage = Literal["row", "bytes", "sample"]
STAGES: tuple[str, ...] = ("row", "bytes", "sample")
CLEANING, SAFETY, OTHER = 0, 1, 2  # Filter.priority

SAFETY_PREFIX = "unsafe"


def is_safety_reason(reason: Optional[str]) -> bool:
    """True for rejections made for safety (their images are never shown or stored)."""
    return bool(reason) and reason.startswith(SAFETY_PREFIX)


class Filter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The name used in the YAML `filters:` list.
    name: ClassVar[str]
    # When it runs: see the module docstring.
    stage: ClassVar[Stage] = "sample"
    # Needs the score stage (CLIP scores or embeddings): the config then requires clip.enabled.
    needs_clip: ClassVar[bool] = False
    # Reads sample["img_emb"] / ["text_emb"]: the write stage loads a shard's saved
    # embeddings only when a filter of the chain does.
    needs_embeddings: ClassVar[bool] = False
    # Within a stage filters run by priority, then in YAML order: CLEANING (caption_clean)
    # first, so every rule sees the cleaned caption; then SAFETY, so that an unsafe sample is
    # always rejected for safety, whatever the YAML order (its image then never reaches the
    # report, which shows samples dropped for other reasons); then the rest.
    priority: ClassVar[int] = OTHER

    _counts: Counter = PrivateAttr(default_factory=Counter)
    # "bytes" filters run in the download threads; the counts must not race.
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def setup(self, context: dict[str, Any]) -> None:
        """Called once before a shard is filtered. `context` holds `clip` (the run's
        ClipConfig), `root` (the run folder) and, in the write stage, `shard` (its id).
        Load models lazily here, cached per process, never per sample."""

    def input_columns(self) -> list[str]:
        """Input columns this filter reads from `sample["meta"]`: the config must list them
        in `input.extra_cols` (checked before any work starts)."""
        return []

    def check(self, context: dict[str, Any]) -> None:
        """Called when the config is read, before any work, with `clip` (the run's
        ClipConfig): raise ValueError for a parameter that does not fit the rest of the
        config (a head's input size vs the CLIP model's). Must be cheap: load no model."""

    def keep(self, sample: dict[str, Any]) -> Decision:
        raise NotImplementedError

    def __call__(self, sample: dict[str, Any]) -> Optional[str]:
        """Apply the filter; returns None to keep, or the drop reason."""
        decision = self.keep(sample)
        if decision is True or decision == (True, ""):
            reason, label = None, "kept"
        else:
            reason = decision[1] if isinstance(decision, tuple) else self.name
            label = f"dropped: {reason}"
        with self._lock:
            self._counts[label] += 1
        return reason

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._counts)


def apply_chain(chain: list[Filter], sample: dict[str, Any]) -> Optional[str]:
    """Run filters in order; the first drop wins (later filters do not see the sample)."""
    for f in chain:
        reason = f(sample)
        if reason is not None:
            return reason
    return None


def chain_counts(chain: list[Filter]) -> dict[str, dict[str, int]]:
    """Per-filter counts of a chain, for a shard's stats."""
    return {f.name: f.counts for f in chain}
