"""The filter contract: keep, or drop with a `Rejection`.

A filter is a small pydantic model: its fields are its parameters (so a misspelled
parameter in the YAML is an error naming it), and `keep(sample)` answers True or a
`Rejection` (pipeline/records.py), made with `self.reject(reason, metric, value,
threshold)`: the countable reason, and for a threshold decision the measure it compared,
this sample's value and the limit. Calling the filter counts kept and dropped-per-reason
by itself, so every filter's effect shows up in the shard's stats without any code of its
own; the stages store the rejection as columns of the row's record (the report reads them).

When a filter runs is its `stage`, chosen by what it needs to look at:

- "row":    only the input row (`key`, `url`, `caption`, `meta` = the input's extra
            columns). Runs in the download stage BEFORE the image is fetched, so a
            dropped row costs no bandwidth (caption rules, URL and keyword blocklists,
            LAION's punsafe / pwatermark columns).
- "bytes":  also `data`, the original image bytes as fetched, their `sha256`, and
            `original_width` / `original_height`, the upright size read from the image header
            (None when it cannot be read). Runs in the download stage before anything is
            decoded or stored (the image hash blocklist: a matched image is never written
            anywhere; resolution: a too-small image is never decoded).
- "sample": the normalized image (`jpg` bytes), `meta` (the json written beside it,
            with sizes, sha256 and scores), and, when the score stage ran, `img_emb` /
            `text_emb` (L2-normalized float32 CLIP embeddings). Runs in the write stage.

Within a stage filters run in the order of the YAML list; the stages run in the order
above. A filter may also change the sample (clean the caption, add a score to `meta`,
or add tar members to `sample["extra"]` as {extension: bytes}); the score fields it
writes into `meta` it declares in `score_fields()`.

Reasons of safety filters start with "unsafe:" (see `is_safety_reason`): the report
never shows the images of such rows.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import Counter
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, PrivateAttr

from curate.pipeline.records import Rejection, is_safety_reason

Decision = Union[Literal[True], Rejection]
Stage = Literal["row", "bytes", "sample"]
STAGES: tuple[str, ...] = ("row", "bytes", "sample")
CLEANING, SAFETY, OTHER = 0, 1, 2  # Filter.priority

__all__ = ["CLEANING", "OTHER", "SAFETY", "STAGES", "Decision", "Filter", "Rejection", "apply_chain",
           "chain_counts", "is_safety_reason"]


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
    # The dataset-wide pass this filter needs before any shard is written (its decision depends
    # on every shard: a top fraction, duplicates across shards), by its name in
    # pipeline/passes.py; None for filters that judge each sample alone. See needs_dataset_pass.
    dataset_pass: ClassVar[Optional[str]] = None
    # Its work belongs on a GPU (a model per sample): the run gets GPU workers (pipeline/plan.py),
    # `prepare` gets the samples in batches, and `setup`'s context["offload"] is a runner,
    # `runner(fn, *args)`, that runs a module-level function on a GPU worker (pipeline/offload.py;
    # in this process when there is none) and returns its result.
    needs_gpu: ClassVar[bool] = False

    _counts: Counter = PrivateAttr(default_factory=Counter)
    # "bytes" filters run in the download threads; the counts must not race.
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def setup(self, context: dict[str, Any]) -> None:
        """Called once before a shard is filtered. `context` holds `clip` (the run's
        ClipConfig), `root` (the run folder) and, in the write stage, `shard` (its id) and
        `offload` (see `needs_gpu`).
        Load models lazily here, cached per process, never per sample."""

    def warm_up(self, context: dict[str, Any]) -> None:
        """A `needs_gpu` filter's costly start that needs no data (its model loaded, compiled for the
        usual batch shape), done on each GPU worker as it joins a run (pipeline/cluster.py `WarmUp`),
        beside the first reads and writes instead of inside the first batch. `context["buckets"]`:
        whether the run crops samples to aspect buckets (their batches then come in the buckets'
        shapes). Nothing by default."""

    def input_columns(self) -> list[str]:
        """Input columns this filter reads from `sample["meta"]`: the config must list them
        in `input.extra_cols` (checked before any work starts)."""
        return []

    def score_fields(self) -> list[str]:
        """The numeric score fields this filter writes into `sample["meta"]` (so into the
        json beside the image and the shard parquet): the report charts them."""
        return []

    def needs_dataset_pass(self) -> bool:
        """Whether this configured filter needs its `dataset_pass` (e.g. only a top_fraction does)."""
        return self.dataset_pass is not None

    def thresholds(self) -> list[tuple[str, float]]:
        """(metric, threshold) of each threshold rule this filter applies, as its rejections
        record them (`reject_metric`, `reject_threshold`): the report shows the kept samples
        nearest each beside the dropped ones. `[("clip_similarity", 0.28)]`; none by default."""
        return []

    def measures(self, sample: dict[str, Any]) -> dict[str, float]:
        """This sample's value of each metric of `thresholds()` that can be told from a written
        sample (`caption`, `meta`): by default the metric's own field in `meta` (a score)."""
        meta = sample.get("meta") or {}
        return {metric: float(meta[metric]) for metric, _ in self.thresholds() if _is_number(meta.get(metric))}

    def check(self, context: dict[str, Any]) -> None:
        """Called when the config is read, before any work, with `clip` (the run's
        ClipConfig): raise ValueError for a parameter that does not fit the rest of the
        config (a head's input size vs the CLIP model's). Must be cheap: load no model."""

    def keep(self, sample: dict[str, Any]) -> Decision:
        """True to keep the sample, or `self.reject(...)` to drop it."""
        raise NotImplementedError

    def prepare(self, samples: list[dict[str, Any]]) -> None:
        """The samples this filter is about to judge, all at once, before `keep` sees each of them
        (`apply_chain_batched`): a filter whose work is faster in batches (a model on a GPU) does
        it here and leaves each result in its sample for `keep`. Nothing by default."""

    def reject(self, reason: str, metric: Optional[str] = None, value: Optional[float] = None,
               threshold: Optional[float] = None) -> Rejection:
        """This filter's drop: `reason` is what stats count; a threshold rule also says on what
        `metric` it decided, the sample's `value` and the `threshold`, e.g.
        `self.reject(f"clip_similarity<{t:.4g}", "clip_similarity", score, t)`."""
        return Rejection(reason, filter=self.name, metric=metric, value=value, threshold=threshold)

    def __call__(self, sample: dict[str, Any]) -> Optional[Rejection]:
        """Apply the filter; returns None to keep, or the Rejection."""
        decision = self.keep(sample)
        if decision is True:
            rejection, label = None, "kept"
        elif isinstance(decision, Rejection):
            rejection = decision if decision.filter is not None else dataclasses.replace(decision, filter=self.name)
            label = f"dropped: {rejection.reason}"
        else:
            raise TypeError(f"filter {self.name}: keep() must return True or a Rejection "
                            f"(self.reject(...)), not {decision!r}")
        with self._lock:
            self._counts[label] += 1
        return rejection

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._counts)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def apply_chain(chain: list[Filter], sample: dict[str, Any]) -> Optional[Rejection]:
    """Run filters in order; the first drop wins (later filters do not see the sample)."""
    for f in chain:
        rejection = f(sample)
        if rejection is not None:
            return rejection
    return None


def chain_counts(chain: list[Filter]) -> dict[str, dict[str, int]]:
    """Per-filter counts of a chain, for a shard's stats."""
    return {f.name: f.counts for f in chain}


def apply_chain_batched(chain: list[Filter], samples: list[dict[str, Any]]) -> list[Optional[Rejection]]:
    """`apply_chain` over several samples, filter by filter, so that each filter's `prepare` gets
    every sample it is about to judge in one batch; the same decisions as sample by sample (the
    first drop wins, later filters never see a dropped sample)."""
    decisions: list[Optional[Rejection]] = [None] * len(samples)
    alive = list(range(len(samples)))
    for f in chain:
        if not alive:
            break
        f.prepare([samples[i] for i in alive])
        still = []
        for i in alive:
            rejection = f(samples[i])
            if rejection is None:
                still.append(i)
            else:
                decisions[i] = rejection
        alive = still
    return decisions
