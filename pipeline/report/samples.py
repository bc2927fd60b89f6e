"""Thumbnails for the run report, kept while the write stage still has the images.

The report shows kept samples and the samples dropped near each threshold (the
borderline cases a user looks at to tune it). The images of dropped samples are gone
once a shard is written (the raw download shard is deleted), so the write stage feeds
every sample it decides on to a `ReportSamples`, which keeps a small bounded selection
per shard and writes it to `report/samples/NNNNN.parquet` before the shard's
done-marker:

- kept samples: a uniform random sample of at most `kept` per shard;
- dropped samples: at most `per_reason` for each reason; where the rejection compared a
  value with a threshold (`Rejection.value` / `.threshold`: CLIP similarity, aesthetic
  score, a side in pixels) the ones whose value is nearest the threshold, otherwise a
  uniform random sample.

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
from pathlib import Path
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curate.pipeline.records import Rejection, is_safety_reason  # re-exported for the report
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
    ("distance", pa.float64()),     # |value - threshold| of a threshold rejection, else null
    ("scores", pa.string()),        # json {name: value} of the sample's scores
    ("thumbnail", pa.binary()),     # JPEG, longest side THUMBNAIL_SIDE
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
    `caption`, `meta`), and a dropped sample's `Rejection`; `save` writes the thumbnails.
    `score_fields`: the meta fields shown as scores on a thumbnail (the run's declared
    score fields). Seeded by the shard id, so a rerun of the shard selects the same samples.
    """

    def __init__(self, shard_id: int, kept: int = KEPT_PER_SHARD, per_reason: int = DROPPED_PER_REASON,
                 score_fields: Iterable[str] = ()):
        self._rng = random.Random(shard_id)
        self._kept = BottomK(kept)
        self._per_reason = per_reason
        self._score_fields = list(score_fields)
        self._dropped: dict[str, BottomK] = {}

    def add_kept(self, sample: dict) -> None:
        self._kept.offer(self._rng.random(), self._entry(sample, "ok", None, None))

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
        self._dropped[reason].offer(priority, self._entry(sample, "rejected", reason, distance))

    def _entry(self, sample: dict, status: str, reason: Optional[str], distance: Optional[float]) -> dict:
        meta = sample.get("meta") or {}
        return {
            "key": sample["key"], "status": status, "reason": reason, "caption": sample.get("caption"),
            "width": meta.get("width"), "height": meta.get("height"), "distance": distance,
            "scores": json.dumps(scores_of(meta, self._score_fields), sort_keys=True), "jpg": sample["jpg"],
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
