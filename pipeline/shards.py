"""Shard names, atomic writes and done-markers: the rules that make reruns resume.

A stage writes each output of a shard to a temporary name and renames it into
place (in object storage: uploads it whole, pipeline/storage.py); the done-marker (`NNNNN.done.json`, holding the shard's stats) is written
last. So a shard with a marker is complete, and a shard without one is cleaned
and redone. Killing the process at any moment loses nothing and duplicates nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Iterable

from curate.pipeline import storage

# img2dataset's default `oom_shard_count`: shard names and keys start with 5 digits (more past 99999).
SHARD_DIGITS = 5


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def index_digits(per_shard: int) -> int:
    """Digits of a sample's index in its key: img2dataset's ceil(log10(samples per shard))."""
    return math.ceil(math.log10(per_shard))


def sample_key(shard_id: int, index: int, per_shard: int) -> str:
    """The key img2dataset gives row `index` of shard `shard_id` with `per_shard` rows a shard
    (its `compute_key`): the shard id, then the index in index_digits(per_shard) digits
    (10000 rows a shard: "000030042" is shard 3, row 42). Keys come from positions, never
    from input text, so they are always safe file names."""
    digits = index_digits(per_shard)
    if not 0 <= index < 10 ** digits:
        raise ValueError(f"row {index} of a shard of {per_shard} rows has no key: keys would collide")
    return f"{shard_id:0{SHARD_DIGITS}d}{index:0{digits}d}" if digits else shard_name(shard_id)


def atomic_path(final: str | os.PathLike):
    """Yield a temporary local path; put it in place at `final` only on success (a local
    rename, or one upload to object storage: pipeline/storage.py `publish`)."""
    return storage.publish(final)


def marker_path(stage_dir: str | os.PathLike, shard_id: int) -> str:
    return storage.join(stage_dir, f"{shard_name(shard_id)}.done.json")


def is_done(stage_dir: str | os.PathLike, shard_id: int) -> bool:
    return storage.exists(marker_path(stage_dir, shard_id))


def read_marker(stage_dir: str | os.PathLike, shard_id: int) -> dict:
    return json.loads(storage.read_text(marker_path(stage_dir, shard_id)))


def mark_done(stage_dir: str | os.PathLike, shard_id: int, stats: dict) -> None:
    with atomic_path(marker_path(stage_dir, shard_id)) as tmp:
        tmp.write_text(json.dumps(stats, indent=1, sort_keys=True))


def clean_shard(stage_dir: str | os.PathLike, shard_id: int, outputs: Iterable[str | os.PathLike] = ()) -> None:
    """Remove whatever an interrupted attempt left for this shard (never a done shard): its
    `outputs`, and what was being written of them and of the marker when it died."""
    if is_done(stage_dir, shard_id):
        return
    for path in outputs:
        storage.remove(path)
        storage.remove_temporaries(storage.parent(str(path)), storage.name(str(path)))
    name = shard_name(shard_id)  # the marker's, and those of outputs named after the shard
    storage.remove_temporaries(stage_dir, (f"{name}.", f"{name}_"))


def remove_shard(stage_dir: str | os.PathLike, shard_id: int, outputs: Iterable[str | os.PathLike]) -> None:
    """Delete a finished shard's `outputs`, then its marker (an intermediate stage no longer needed)."""
    for path in outputs:
        storage.remove(path)
    storage.remove(marker_path(stage_dir, shard_id))


def run_once(stage_dir: str | os.PathLike, shard_id: int, work: Callable[[], dict],
             outputs: Iterable[str | os.PathLike] = ()) -> dict:
    """One shard's task of a stage under the done-marker protocol, which every stage uses:

    - a shard whose marker exists is done: its marker (the stats) is returned, nothing redone;
    - otherwise whatever an interrupted attempt left is removed: the shard's `outputs` (every
      file `work` may write, in the stage folder or elsewhere, named so that nothing lists a
      folder: that would cost more the more shards are done), then `work()` writes them (each
      atomically) and returns the shard's stats;
    - the stats, with the task's `seconds` unless `work` set them, become the marker, written last.
    """
    if is_done(stage_dir, shard_id):
        return read_marker(stage_dir, shard_id)
    outputs = list(outputs)
    clean_shard(stage_dir, shard_id, outputs)
    storage.make_dirs(stage_dir)
    started = time.time()
    stats = work()
    stats.setdefault("seconds", round(time.time() - started, 3))
    mark_done(stage_dir, shard_id, stats)
    return stats
