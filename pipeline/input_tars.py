"""Existing WebDataset / img2dataset tar shards as a run's input (`input.format: webdataset`):
which tars, checked before anything starts, and the shard each one becomes.

One input tar is one shard: shard N is the N-th tar of the expanded, sorted list of paths
(brace expansion `{00000..00999}`, then local or fsspec globs). The list is recorded in
work/input/_done.json when the run starts, so a rerun maps every tar to the same shard even
when a glob now matches more or fewer files. The read stage (pipeline/stages/read.py) then
reads each tar where it lies; nothing of it is copied into the run.
"""

from __future__ import annotations

import glob
import json
import logging
import os

import fsspec
from braceexpand import braceexpand

from curate.pipeline import storage
from curate.pipeline.config import InputConfig
from curate.pipeline.errors import UserError
from curate.pipeline.shards import atomic_path
from curate.pipeline.tarshard import BLOCK, looks_like_tar

logger = logging.getLogger("curate")

_GLOB_CHARS = "*?["


def _matches(path: str) -> list[str]:
    """The files a (brace-expanded) path names: itself, or what its glob matches, sorted."""
    if not any(c in path for c in _GLOB_CHARS):
        return [path]
    if not storage.is_url(path):
        return sorted(p for p in glob.glob(path) if not os.path.isdir(p))
    fs, _, found = fsspec.core.get_fs_token_paths(path)
    protocol = path.split("://", 1)[0]
    return sorted(f"{protocol}://{p}" for p in found if not fs.isdir(p))


def resolve_tars(cfg: InputConfig) -> list[str]:
    """Every configured path expanded (braces, then globs), one sorted list without repeats.
    A pattern that matches nothing is a UserError naming it."""
    files: set[str] = set()
    for pattern in cfg.paths:
        matched = []
        for path in braceexpand(pattern):
            try:
                matched += _matches(path)
            except UserError:
                raise
            except Exception as exc:  # a bucket that does not exist, refused credentials, no such protocol
                raise UserError(f"input {path}: {storage.describe_error(exc)}") from exc
        if not matched:
            if storage.is_url(pattern):
                try:  # a glob in a bucket that does not exist, or that these credentials may not list, matches nothing
                    storage.check_reachable(pattern)
                except Exception as exc:
                    raise UserError(f"input {pattern}: {storage.describe_error(exc)}") from exc
            raise UserError(f"input {pattern}: matches no file")
        files.update(matched)
    return sorted(files)


def _first_blocks(files: list[str]) -> list[bytes | BaseException]:
    """The first 512 bytes of each file (or the error reading them); remote files in one batched
    call per file system."""
    found: dict[str, bytes | BaseException] = {}
    remote = [f for f in files if storage.is_url(f)]
    for path in files:
        if path in remote:
            continue
        try:
            with open(path, "rb") as f:
                found[path] = f.read(BLOCK)
        except OSError as exc:
            found[path] = exc
    by_protocol: dict[str, list[str]] = {}
    for path in remote:
        by_protocol.setdefault(path.split("://", 1)[0], []).append(path)
    for paths in by_protocol.values():
        fs, _ = storage.filesystem(paths[0])
        inner = [storage.filesystem(p)[1] for p in paths]
        try:
            blocks = fs.cat_ranges(inner, [0] * len(inner), [BLOCK] * len(inner), on_error="return")
        except Exception as exc:
            blocks = [exc] * len(inner)
        found.update(zip(paths, blocks))
    return [found[f] for f in files]


def check_tars(cfg: InputConfig) -> list[str]:
    """The input tars, each checked to exist and to open as a tar; anything else is one
    UserError naming the file, before anything is written."""
    files = resolve_tars(cfg)
    for path, block in zip(files, _first_blocks(files)):
        if isinstance(block, FileNotFoundError):
            raise UserError(f"input file not found: {path}")
        if isinstance(block, IsADirectoryError):
            raise UserError(f"input {path}: a folder, not a tar file")
        if isinstance(block, BaseException):
            raise UserError(f"input {path}: {storage.describe_error(block)}")
        if not looks_like_tar(block):
            raise UserError(f"input {path}: not a tar file" + (" (empty)" if not block else ""))
    return files


def has_samples(files: list[str]) -> bool:
    """Whether any input tar holds a member (an empty tar starts with its end-of-archive block)."""
    for path in files:
        with storage.open_file(path) as f:
            if f.read(BLOCK) != bytes(BLOCK):
                return True
    return False


def record_tars(files: list[str], out_dir: str) -> dict:
    """work/input/_done.json: the tars in shard order. Once written, a rerun keeps its mapping."""
    marker = storage.join(out_dir, "_done.json")
    if storage.exists(marker):
        summary = json.loads(storage.read_text(marker))
        if summary.get("tars") != files:
            logger.warning(f"the input paths now match other tars than when this run started; it goes on with "
                           f"the {len(summary['tars'])} tars it started with (--overwrite starts afresh)")
        return summary
    summary = {"format": "webdataset", "shards": len(files), "rows": None, "tars": files}
    storage.make_dirs(out_dir)
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    return summary
