"""Shard names, atomic writes and done-markers: the rules that make reruns resume.

A stage writes each output of a shard to a temporary name and renames it into
place; the done-marker (`NNNNN.done.json`, holding the shard's stats) is written
last. So a shard with a marker is complete, and a shard without one is cleaned
and redone. Killing the process at any moment loses nothing and duplicates nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

SHARD_DIGITS = 5


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def sample_key(shard_id: int, index: int) -> str:
    """Keys come from positions, never from input text, so they are always safe file names."""
    return f"{shard_id:0{SHARD_DIGITS}d}{index:05d}"


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only on success."""
    final = Path(final)
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def marker_path(stage_dir: Path, shard_id: int) -> Path:
    return Path(stage_dir) / f"{shard_name(shard_id)}.done.json"


def is_done(stage_dir: Path, shard_id: int) -> bool:
    return marker_path(stage_dir, shard_id).exists()


def read_marker(stage_dir: Path, shard_id: int) -> dict:
    return json.loads(marker_path(stage_dir, shard_id).read_text())


def mark_done(stage_dir: Path, shard_id: int, stats: dict) -> None:
    with atomic_path(marker_path(stage_dir, shard_id)) as tmp:
        tmp.write_text(json.dumps(stats, indent=1, sort_keys=True))


def clean_shard(stage_dir: Path, shard_id: int) -> None:
    """Remove whatever an interrupted attempt left for this shard (never a done shard)."""
    stage_dir = Path(stage_dir)
    if is_done(stage_dir, shard_id):
        return
    for leftover in stage_dir.glob(f"{shard_name(shard_id)}.*"):
        leftover.unlink(missing_ok=True)


def remove_shard(stage_dir: Path, shard_id: int) -> None:
    """Delete a finished shard's files, marker last (an intermediate stage no longer needed)."""
    stage_dir = Path(stage_dir)
    for path in stage_dir.glob(f"{shard_name(shard_id)}.*"):
        if not path.name.endswith(".done.json"):
            path.unlink(missing_ok=True)
    marker_path(stage_dir, shard_id).unlink(missing_ok=True)


def run_once(stage_dir: Path, shard_id: int, work: Callable[[], dict], also_clean: Iterable[Path] = ()) -> dict:
    """One shard's task of a stage under the done-marker protocol, which every stage uses:

    - a shard whose marker exists is done: its marker (the stats) is returned, nothing redone;
    - otherwise whatever an interrupted attempt left is removed (the stage folder's files of
      this shard, and `also_clean`: its outputs kept elsewhere), then `work()` writes the
      shard's outputs (each atomically) and returns its stats;
    - the stats, with the task's `seconds` unless `work` set them, become the marker, written last.
    """
    stage_dir = Path(stage_dir)
    if is_done(stage_dir, shard_id):
        return read_marker(stage_dir, shard_id)
    clean_shard(stage_dir, shard_id)
    for leftover in also_clean:
        Path(leftover).unlink(missing_ok=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    stats = work()
    stats.setdefault("seconds", round(time.time() - started, 3))
    mark_done(stage_dir, shard_id, stats)
    return stats
