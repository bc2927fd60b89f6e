"""Thumbnails for the run report, kept while the write stage still has the images.

The report shows kept samples and the samples dropped near each threshold (the
borderline cases a user looks at to tune it). The images of dropped samples are gone
once a shard is written (the raw download shard is deleted), so the write stage feeds
every sample it decides on to a `ReportSamples`, which keeps a small bounded selection
per shard and writes it to `report/samples/NNNNN.parquet` before the shard's
done-marker:

- kept samples: a uniform random sample of at most `kept` per shard;
- dropped samples: at most `per_reason` for each reason; where the reason ends in a
  score threshold (`clip_similarity<0.28`, `aesthetic<5`, `resolution: side<256`: any
  `metric<value` or `metric>=value`) the ones whose score is nearest the threshold,
  otherwise a uniform random sample.

Both are one mechanism: keep the K entries with the smallest priority, where the
priority is the distance to the threshold, or a random number (the K smallest of
random keys are a uniform sample). Memory: the selected JPEG bytes, K per group.

Images of rows rejected for safety (`unsafe: ...`, see `is_safety_reason`) are never
kept, thumbnailed or written, whoever calls this.
"""

from __future__ import annotations

import heapq
import io
import itertools
import json
import math
import random
import re
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curate.filters.base import is_safety_reason  # the one definition; re-exported for the report
from curate.pipeline.shards import atomic_path

THUMBNAIL_SIDE = 128
KEPT_PER_SHARD = 8
DROPPED_PER_REASON = 8
# Reasons are short and countable, but a filter could put a value into its reason: cap
# the groups so a shard's selection stays bounded whatever the reasons look like.
MAX_REASONS = 32

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("status", pa.string()),        # ok | rejected
    ("reason", pa.string()),        # null for kept samples
    ("caption", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("distance", pa.float64()),     # |score - threshold| for a threshold reason, else null
    ("scores", pa.string()),        # json {name: value} of the sample's float scores
    ("thumbnail", pa.binary()),     # JPEG, longest side THUMBNAIL_SIDE
])

# `metric<value` at the end of a reason, after any "kind: " prefix.
_THRESHOLD = re.compile(
    r"(?:^|[\s:])(?P<metric>[A-Za-z_][\w.]*)\s*(?P<op><=|>=|<|>)\s*(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$"
)

__all__ = ["BottomK", "ReportSamples", "is_safety_reason", "metric_matches", "metric_value", "parse_threshold"]


def parse_threshold(reason: Optional[str]) -> Optional[tuple[str, str, float]]:
    """(metric, operator, value) for a reason ending in a threshold, like `clip_similarity<0.28`
    or `resolution: side<256`, else None."""
    match = _THRESHOLD.search((reason or "").strip())
    if not match:
        return None
    return match["metric"], match["op"], float(match["value"])


def metric_matches(metric: str, field: str) -> bool:
    """Does a reason's metric name this score field? Filters name their reasons briefly:
    `aesthetic<5` is about aesthetic_score, `laion_punsafe>=0.5` about punsafe."""
    return metric == field or field.startswith(metric + "_") or metric.endswith("_" + field)


def metric_value(meta: dict[str, Any], metric: str) -> Optional[float]:
    """The sample's value of a reason's metric: its score field (see metric_matches), or for
    resolution rules a measure of the original image (side: the shorter one, area, aspect)."""
    for name, value in meta.items():
        if metric_matches(metric, name) and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) if math.isfinite(value) else None
    w, h = meta.get("original_width"), meta.get("original_height")
    if isinstance(w, int) and isinstance(h, int) and min(w, h) > 0:
        return {"side": float(min(w, h)), "area": float(w * h), "aspect": max(w, h) / min(w, h)}.get(metric)
    return None


def scores_of(meta: dict[str, Any]) -> dict[str, float]:
    """The sample's scores: its float-valued fields (sizes and counts are integers)."""
    return {k: v for k, v in meta.items() if isinstance(v, float) and math.isfinite(v)}


def thumbnail(jpg: bytes, side: int = THUMBNAIL_SIDE) -> bytes:
    with Image.open(io.BytesIO(jpg)) as im:
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
        entry = (-priority, -next(self._order), item)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        elif entry > self._heap[0]:
            heapq.heapreplace(self._heap, entry)

    def items(self) -> list[dict]:
        return [item for _, _, item in sorted(self._heap, reverse=True)]


class ReportSamples:
    """The report's bounded selection of one shard's samples.

    `add_kept` / `add_dropped` take the write stage's sample dict (`key`, `jpg`,
    `caption`, `meta`); `save` writes the thumbnails. Seeded by the shard id, so a
    rerun of the shard selects the same samples.
    """

    def __init__(self, shard_id: int, kept: int = KEPT_PER_SHARD, per_reason: int = DROPPED_PER_REASON):
        self._rng = random.Random(shard_id)
        self._kept = BottomK(kept)
        self._per_reason = per_reason
        self._dropped: dict[str, BottomK] = {}

    def add_kept(self, sample: dict) -> None:
        self._kept.offer(self._rng.random(), self._entry(sample, "ok", None, None))

    def add_dropped(self, sample: dict, reason: str) -> None:
        if is_safety_reason(reason):
            return  # never keep, thumbnail or write the image of an unsafe sample
        if reason not in self._dropped:
            if len(self._dropped) >= MAX_REASONS:
                return
            self._dropped[reason] = BottomK(self._per_reason)
        distance = self._distance(sample["meta"], reason)
        priority = distance if distance is not None else self._rng.random()
        self._dropped[reason].offer(priority, self._entry(sample, "rejected", reason, distance))

    @staticmethod
    def _distance(meta: dict, reason: str) -> Optional[float]:
        threshold = parse_threshold(reason)
        if threshold is None:
            return None
        score = metric_value(meta, threshold[0])
        return None if score is None else abs(score - threshold[2])

    @staticmethod
    def _entry(sample: dict, status: str, reason: Optional[str], distance: Optional[float]) -> dict:
        meta = sample.get("meta") or {}
        return {
            "key": sample["key"], "status": status, "reason": reason, "caption": sample.get("caption"),
            "width": meta.get("width"), "height": meta.get("height"), "distance": distance,
            "scores": json.dumps(scores_of(meta), sort_keys=True), "jpg": sample["jpg"],
        }

    def entries(self) -> list[dict]:
        """The selection: kept samples first, then dropped ones by reason (JPEG bytes, no thumbnails yet)."""
        chosen = self._kept.items()
        for reason in sorted(self._dropped):
            chosen += self._dropped[reason].items()
        return chosen

    def save(self, path: Path) -> int:
        """Write the selection's thumbnails to `path` atomically; returns how many."""
        rows = []
        for entry in self.entries():
            if is_safety_reason(entry["reason"]):  # defence in depth: add_dropped refuses them
                continue
            try:
                thumb = thumbnail(entry["jpg"])
            except Exception:  # an image a filter left undecodable has no thumbnail, not a failed shard
                continue
            rows.append({**{k: v for k, v in entry.items() if k != "jpg"}, "thumbnail": thumb})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for leftover in path.parent.glob(f"{path.name}.tmp-*"):  # from an attempt killed mid-write
            leftover.unlink(missing_ok=True)
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return len(rows)
