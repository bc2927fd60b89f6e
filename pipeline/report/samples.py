"""Thumbnails for the run report, kept while a stage still has the images.

The report shows kept samples, and on both sides of each threshold the samples nearest it
(the borderline cases a user looks at to tune it). The images of dropped samples are gone
once a shard is written (the raw download shard is deleted), so the stages feed the
samples they decide on to a `ReportSamples`, which keeps a small bounded selection per
shard and writes it before the shard's done-marker:

- the write stage (`report/samples/NNNNN.parquet`): kept samples, a uniform random sample
  of at most `kept`; for each threshold rule of the chain's filters (`Filter.thresholds()`,
  e.g. clip_similarity ≥ 0.28), the `per_rule` kept samples whose value
  (`Filter.measures(sample)`) is nearest the threshold; dropped samples, at most `per_reason`
  for each reason: where the rejection compared a value with a threshold
  (`Rejection.value` / `.threshold`) the ones nearest it, otherwise a uniform random sample;
- the download stage (`report/samples/NNNNN.download.parquet`): images it dropped after
  fetching them (too small or too elongated for the `resolution` filter, undecodable), the
  same way per reason. Those are thumbnailed as they are chosen (an original may be large),
  and only where they can be: an image that does not decode has no picture.

All of it is one mechanism: keep the K entries with the smallest priority, where the
priority is the distance to the threshold, or a random number (the K smallest of random
keys are a uniform sample). Memory: the selected images, K per group.

Images of rows rejected for safety (`unsafe: ...`, see `is_safety_reason`) are never
kept, thumbnailed or written, whoever calls this; and the rules of safety filters have no
"kept nearest the threshold" pictures either (those are the kept images nearest to being
judged unsafe).
"""

from __future__ import annotations

import heapq
import io
import itertools
import json
import math
import random
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curate.filters.base import SAFETY, Filter
from curate.pipeline import storage
from curate.pipeline.records import SUCCESS, Rejection, is_safety_reason  # re-exported for the report
from curate.pipeline.shards import atomic_path

THUMBNAIL_SIDE = 128
KEPT_PER_SHARD = 8
DROPPED_PER_REASON = 8
KEPT_PER_RULE = 8
# An original (the download stage's pictures) is decoded for its thumbnail only up to this
# many pixels; JPEGs decode at reduced size, other formats in full.
THUMBNAIL_MAX_PIXELS = 24_000_000
# Reasons are short and countable, but a filter could put a value into its reason: cap
# the groups so a shard's selection stays bounded whatever the reasons look like.
MAX_REASONS = 32

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("status", pa.string()),        # the row's status (pipeline/records.py): SUCCESS for kept samples
    ("reason", pa.string()),        # null for kept samples
    ("caption", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("distance", pa.float64()),     # |value - threshold| of a threshold rule (kept or rejected), else null
    ("scores", pa.string()),        # json {name: value} of the sample's scores
    ("thumbnail", pa.binary()),     # JPEG, longest side THUMBNAIL_SIDE
    ("stage", pa.string()),         # the stage that kept it: write | download
    ("rule_filter", pa.string()),   # the threshold rule it is near (kept) or failed (rejected): filter,
    ("rule_metric", pa.string()),   #   metric,
    ("threshold", pa.float64()),    #   threshold,
    ("value", pa.float64()),        #   and this sample's value; null for random picks
])

__all__ = ["BottomK", "ReportSamples", "distance_to_threshold", "is_safety_reason"]


def distance_to_threshold(rejection: Rejection) -> Optional[float]:
    """How far the rejected value lay from the threshold it failed, or None where the
    rejection compared no value with a threshold (a blocklist, a failed download)."""
    if rejection.value is None or rejection.threshold is None:
        return None
    distance = abs(float(rejection.value) - float(rejection.threshold))
    return distance if math.isfinite(distance) else None


def scores_of(meta: dict[str, Any], fields: Iterable[str]) -> dict[str, float]:
    """The sample's values of the score fields (those it has, numeric and finite)."""
    out = {}
    for name in fields:
        value = meta.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def thumbnail(jpg: bytes, side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG thumbnail of any image Pillow reads (the first frame); raises where it cannot."""
    with Image.open(io.BytesIO(jpg)) as im:
        if im.width * im.height > THUMBNAIL_MAX_PIXELS:
            raise ValueError(f"{im.width}x{im.height}: too many pixels to decode for a thumbnail")
        im.draft("RGB", (side * 2, side * 2))  # JPEG: decode at reduced size, much faster
        im = im.convert("RGB")
        im.thumbnail((side, side))
        out = io.BytesIO()
        im.save(out, "JPEG", quality=80)
        return out.getvalue()


class BottomK:
    """The k items with the smallest priority seen so far (a max-heap of size k)."""

    def __init__(self, k: int):
        self.k = k
        self._heap: list = []
        self._order = itertools.count()  # ties keep the earlier item; entries never compare

    def offer(self, priority: float, item: dict) -> None:
        if self.k <= 0:
            return
        entry = (-priority, -next(self._order), item)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        elif entry > self._heap[0]:
            heapq.heapreplace(self._heap, entry)

    def accepts(self, priority: float) -> bool:
        """Whether `offer(priority, ...)` would keep the item now (a later offer may evict it)."""
        return len(self._heap) < self.k or (self.k > 0 and -priority > self._heap[0][0])

    def items(self) -> list[dict]:
        return [item for _, _, item in sorted(self._heap, reverse=True)]


class ReportSamples:
    """The report's bounded selection of one shard's samples.

    `add_kept` / `add_dropped` take a stage's sample dict (`key`, `jpg`: the image bytes,
    `caption`, `meta`), and a dropped sample's `Rejection`; `save` writes the thumbnails.
    `score_fields`: the meta fields shown as scores on a thumbnail (the run's declared score
    fields). `filters`: the run's filters, whose threshold rules get their nearest kept
    samples (`Filter.thresholds()`, `Filter.measures()`; safety filters' rules are left out).
    `stage`: the stage that keeps them; "download" thumbnails each image as it is chosen.
    Seeded by the shard id, so a rerun of the shard selects the same samples.
    """

    def __init__(self, shard_id: int, kept: int = KEPT_PER_SHARD, per_reason: int = DROPPED_PER_REASON,
                 score_fields: Iterable[str] = (), filters: Iterable[Filter] = (), per_rule: int = KEPT_PER_RULE,
                 stage: str = "write"):
        self._rng = random.Random(shard_id)
        self._kept = BottomK(kept)
        self._per_reason = per_reason
        self._score_fields = list(score_fields)
        self._dropped: dict[str, BottomK] = {}
        self._stage = stage
        self._rules = [(f, [(metric, float(t)) for metric, t in f.thresholds()])
                       for f in filters if f.priority != SAFETY]
        self._rules = [(f, limits) for f, limits in self._rules if limits]
        self._near = {(f.name, metric, t): BottomK(per_rule) for f, limits in self._rules for metric, t in limits}

    def add_kept(self, sample: dict) -> None:
        entry = None
        if self._kept.k:
            entry = self._entry(sample, SUCCESS, None, None)
            self._kept.offer(self._rng.random(), entry)
        for f, limits in self._rules:
            values = f.measures(sample)
            for metric, threshold in limits:
                value = values.get(metric)
                distance = None if value is None else abs(value - threshold)
                if distance is None or not math.isfinite(distance):
                    continue
                near = self._near[(f.name, metric, threshold)]
                if near.accepts(distance):
                    entry = entry or self._entry(sample, SUCCESS, None, None)
                    near.offer(distance, {**entry, "distance": distance, "rule_filter": f.name,
                                          "rule_metric": metric, "threshold": threshold, "value": value})

    def add_dropped(self, sample: dict, rejection: Rejection) -> None:
        reason = rejection.reason
        if is_safety_reason(reason):
            return  # never keep, thumbnail or write the image of an unsafe sample
        if reason not in self._dropped:
            if len(self._dropped) >= MAX_REASONS:
                return
            self._dropped[reason] = BottomK(self._per_reason)
        distance = distance_to_threshold(rejection)
        priority = distance if distance is not None else self._rng.random()
        group = self._dropped[reason]
        if not group.accepts(priority):
            return
        entry = self._entry(sample, rejection.status, reason, distance)
        if distance is not None:
            entry.update(rule_filter=rejection.filter, rule_metric=rejection.metric,
                         threshold=float(rejection.threshold), value=float(rejection.value))
        if self._stage == "download":
            # Thumbnailed now: the selection then holds thumbnails, not originals of any size;
            # an image without one is not chosen.
            try:
                entry["thumbnail"] = thumbnail(entry.pop("jpg"))
            except Exception:
                return
        group.offer(priority, entry)

    def _entry(self, sample: dict, status: str, reason: Optional[str], distance: Optional[float]) -> dict:
        meta = sample.get("meta") or {}
        return {
            "key": sample["key"], "status": status, "reason": reason, "caption": sample.get("caption"),
            "width": meta.get("width"), "height": meta.get("height"), "distance": distance,
            "scores": json.dumps(scores_of(meta, self._score_fields), sort_keys=True), "jpg": sample["jpg"],
            "stage": self._stage, "rule_filter": None, "rule_metric": None, "threshold": None, "value": None,
        }

    def entries(self) -> list[dict]:
        """The selection: kept samples first (at random, then nearest each rule), then dropped ones
        by reason (image bytes, or the thumbnail where it was made as it was chosen)."""
        chosen = self._kept.items()
        for rule in sorted(self._near):
            chosen += self._near[rule].items()
        for reason in sorted(self._dropped):
            chosen += self._dropped[reason].items()
        return chosen

    def save(self, path: str) -> int:
        """Write the selection's thumbnails to `path` atomically; returns how many."""
        rows = []
        for entry in self.entries():
            if is_safety_reason(entry["reason"]):  # defence in depth: add_dropped refuses them
                continue
            if "thumbnail" not in entry:
                try:
                    entry = {**entry, "thumbnail": thumbnail(entry["jpg"])}
                except Exception:  # an image a filter left undecodable has no thumbnail, not a failed shard
                    continue
            rows.append({k: v for k, v in entry.items() if k != "jpg"})
        storage.make_dirs(storage.parent(str(path)))
        storage.remove_temporaries(storage.parent(str(path)), storage.name(str(path)))  # an attempt killed mid-write
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return len(rows)
