"""Where a run's files live: a local folder, or object storage / any fsspec URL (`s3://bucket/run`).

Every file a run writes goes through `publish`: it is written to a local temporary file first,
then put in place — renamed on a local file system (atomic), uploaded with one PUT to object
storage, which has no rename but shows an object whole or not at all. A shard's done marker is
published after its other objects, so a shard without its marker is unfinished whatever else of
it exists, and a rerun cleans and redoes it (pipeline/shards.py).

Paths are plain strings: a local path, or a URL whose parts are joined with "/" (`join`), never
through pathlib, which would fold `s3://` into `s3:/`. Credentials never pass through here: they
come from fsspec's and the object store client's own configuration (for S3: the AWS environment
variables or ~/.aws), and `configure` accepts only the non-secret options a config may name
(an endpoint, a region).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import posixpath
import shutil
import tempfile
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

import fsspec
import fsspec.config
from fsspec.core import url_to_fs

# fsspec options a config may give per protocol, none of them a secret: where the store is and how
# to reach it. Keys, secrets, tokens and passwords stay in the environment / the client's config files.
SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session")


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names a file through an fsspec protocol other than the local file system."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def join(base: str | os.PathLike, *parts: str) -> str:
    if is_url(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return str(Path(base, *parts))


def parent(path: str) -> str:
    return posixpath.dirname(str(path).rstrip("/")) if is_url(path) else str(Path(path).parent)


def name(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/")) if is_url(path) else Path(path).name


def secret_options(options: dict) -> list[str]:
    """The option names (dotted) that look like credentials, which a config must not hold."""
    found = []
    for key, value in options.items():
        if isinstance(value, dict):
            found += [f"{key}.{inner}" for inner in secret_options(value)]
        elif any(word in key.lower() for word in SECRET_WORDS) and not key.lower().endswith("_url"):
            found.append(key)
    return found


def configure(options: dict[str, dict]) -> None:
    """Apply the config's per-protocol fsspec options ({"s3": {"endpoint_url": ...}}) in this process.

    fsspec hands `fsspec.config.conf[protocol]` to every filesystem it makes for that protocol, so
    the driver and each worker call this once and every open, list and put after it reaches the
    same store."""
    for protocol, values in options.items():
        filesystem_class(protocol)
        current = fsspec.config.conf.setdefault(protocol, {})
        if any(current.get(k) != v for k, v in values.items()):
            current.update(values)
            fsspec.config.conf[protocol] = current
            # Filesystems made before this call hold the old options: make new ones.
            filesystem_class(protocol).clear_instance_cache()


def filesystem_class(protocol: str):
    """fsspec's filesystem for `protocol`, or a UserError naming what to install (s3:// needs s3fs)."""
    from curate.pipeline.errors import UserError, require_extra

    if protocol in ("s3", "s3a"):
        require_extra("s3", f"{protocol}:// paths")
    try:
        return fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        raise UserError(f"{protocol}:// paths: {str(exc).splitlines()[0]}") from exc


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    if is_url(path):
        filesystem_class(str(path).split("://", 1)[0])
    return url_to_fs(str(path))


def exists(path: str | os.PathLike) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, inner = filesystem(str(path))
    return fs.exists(inner)


def is_dir(path: str | os.PathLike) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, inner = filesystem(str(path))
    return fs.isdir(inner)


def read_bytes(path: str | os.PathLike) -> bytes:
    if not is_url(path):
        return Path(path).read_bytes()
    fs, inner = filesystem(str(path))
    return fs.cat_file(inner)


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def open_file(path: str | os.PathLike, mode: str = "rb"):
    """A file object to read (or stream-write) `path` anywhere; use as a context manager."""
    if not is_url(path):
        return open(path, mode)
    return fsspec.open(str(path), mode).open()


def listing(folder: str | os.PathLike, prefix: str | tuple[str, ...] = "", suffix: str | tuple[str, ...] = "") -> list[str]:
    """Full paths of the files directly in `folder` whose names start with `prefix` and end with
    `suffix`, sorted. A folder that does not exist lists nothing. (Filtered as the folder is read:
    a run's shards/ holds four files a shard, and the report wants one kind, so at 50,000 shards
    the list it keeps is 5 MB instead of 20.)"""
    if not is_url(folder):
        if not os.path.isdir(folder):
            return []
        with os.scandir(folder) as entries:
            return sorted(e.path for e in entries if e.name.startswith(prefix) and e.name.endswith(suffix) and e.is_file())
    fs, inner = filesystem(str(folder))
    try:
        entries = fs.ls(inner, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    protocol = str(folder).split("://", 1)[0]
    names = ((e, posixpath.basename(e["name"])) for e in entries if e.get("type") == "file")
    return sorted(f"{protocol}://{e['name']}" for e, name in names if name.startswith(prefix) and name.endswith(suffix))


def remove(path: str | os.PathLike) -> None:
    """Delete one file; a missing one is not an error."""
    if not is_url(path):
        Path(path).unlink(missing_ok=True)
        return
    fs, inner = filesystem(str(path))
    try:
        fs.rm_file(inner)
    except FileNotFoundError:
        pass


def remove_tree(path: str | os.PathLike) -> None:
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, inner = filesystem(str(path))
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


def make_dirs(path: str | os.PathLike) -> None:
    """Create a local folder and its parents; object storage has no folders, so nothing to do there."""
    if not is_url(path):
        Path(path).mkdir(parents=True, exist_ok=True)


# Local temporaries are written in this folder beside their final file (the same file system, so
# the rename stays atomic), not beside it: cleaning what a killed attempt left then lists only the
# files being written, never a stage folder of a whole dataset's shards (a listing per shard of a
# folder that grows with the run made the per-shard overhead grow with it: BENCHMARKS.md).
TEMPORARY_FOLDER = ".tmp"


def _temporary(final: Path) -> Path:
    """A new empty file in `final`'s temporary folder, named after `final`."""
    folder = final.parent / TEMPORARY_FOLDER
    tmp = folder / f"{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    for _ in range(5):
        try:
            # exist_ok still raises FileExistsError when another writer removes the empty folder
            # between mkdir's failed attempt and its is-a-folder check: then, as below, again.
            folder.mkdir(parents=True, exist_ok=True)
            tmp.touch(exist_ok=False)
            return tmp
        except (FileNotFoundError, FileExistsError):  # another writer removed the folder, empty, in between
            continue
    raise OSError(f"cannot create a temporary file in {folder}")


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # fails while another writer's temporary is in it: that one removes it later
    except OSError:
        pass


@contextlib.contextmanager
def publish(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a local temporary path to write; on success put it in place at `final`.

    Locally: a temporary file in `final`'s folder's TEMPORARY_FOLDER, fsync'd, then renamed
    (atomic); the temporary folder is removed once empty. In object storage: a temporary local
    file, uploaded whole to `final` (an object appears complete or not at all). Either way
    nothing is left at `final` when the writing fails."""
    if not is_url(final):
        final = Path(final)
        tmp = _temporary(final)
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
            _remove_if_empty(tmp.parent)
        return
    with tempfile.TemporaryDirectory(prefix="curate-publish-") as scratch:
        tmp = Path(scratch) / name(str(final))
        yield tmp
        fs, inner = filesystem(str(final))
        fs.put_file(str(tmp), inner)


def remove_temporaries(folder: str | os.PathLike, prefix: str | tuple[str, ...]) -> None:
    """Remove what killed writers of files in `folder` named `prefix`... left (their temporaries;
    `publish` removes its own otherwise). Object storage has none: an object is uploaded whole
    or not at all."""
    if is_url(folder):
        return
    temporaries = Path(folder) / TEMPORARY_FOLDER
    for leftover in listing(temporaries, prefix):
        remove(leftover)
    _remove_if_empty(temporaries)


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[Path]:
    """A local file holding `path`'s bytes, for readers that need one (memory maps, tarfile seeks):
    the file itself when it is local, else a temporary download removed afterwards."""
    if not is_url(path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="curate-read-") as scratch:
        tmp = Path(scratch) / (name(str(path)) or "object")
        fs, inner = filesystem(str(path))
        fs.get_file(inner, str(tmp))
        yield tmp


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None):
    """A parquet file as an arrow table, read through fsspec when `path` is a URL (pyarrow's own
    object store clients would not see the endpoint `configure` set)."""
    import pyarrow.parquet as pq

    if not is_url(path):
        return pq.read_table(path, columns=columns)
    with open_file(path) as f:
        return pq.read_table(f, columns=columns)


# Files read ahead, in threads, by `read_ahead`: reading (pyarrow's decoding, an object store's
# latency) runs without the GIL, while the caller works through the files in order.
READ_AHEAD = 8


def read_ahead(items: list, read: Callable[[Any], Any], depth: int = READ_AHEAD,
               threads: int | None = None) -> Iterator[tuple[Any, Any]]:
    """(item, read(item)) for each item (a path, or what names a file's part), in order, up to
    `depth` reads ahead in `threads` threads (default `depth`): the report reads every shard's
    files once, 7 small files a shard, and one after the other that took minutes at 50,000
    shards. Memory: at most `depth` results wait at once."""
    from concurrent.futures import ThreadPoolExecutor

    todo = iter(items)
    with ThreadPoolExecutor(threads or depth) as pool:
        window = deque((item, pool.submit(read, item)) for item in itertools.islice(todo, depth))
        while window:
            item, future = window.popleft()
            for following in itertools.islice(todo, 1):  # the next item, if any (None or 0 are items too)
                window.append((following, pool.submit(read, following)))
            yield item, future.result()


def load_npy(path: str | os.PathLike, mmap: bool = False):
    """A .npy array; memory-mapped when asked and the file is local (a remote one is read whole)."""
    import io

    import numpy as np

    if not is_url(path):
        return np.load(path, mmap_mode="r" if mmap else None)
    return np.load(io.BytesIO(read_bytes(path)))


def parquet_names(path: str | os.PathLike) -> list[str]:
    """The column names of a parquet file, from its footer alone."""
    import pyarrow.parquet as pq

    if not is_url(path):
        return pq.read_schema(path).names
    with open_file(path) as f:
        return pq.read_schema(f).names


def parquet_file(path: str | os.PathLike):
    """A `pyarrow.parquet.ParquetFile` (footer statistics, row groups) of a local or remote file."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path if not is_url(path) else open_file(path))


def has_files(folder: str | os.PathLike) -> bool:
    """Whether anything lies in (or under) `folder`; a missing folder has nothing."""
    if not is_url(folder):
        return os.path.isdir(folder) and any(os.scandir(folder))
    fs, inner = filesystem(str(folder))
    try:
        return bool(fs.ls(inner, refresh=True))
    except FileNotFoundError:
        return False


def check_reachable(path: str) -> None:
    """Raise (FileNotFoundError, PermissionError, ...) unless the bucket or container holding the URL
    `path` exists and these credentials may list it. Writes nothing."""
    fs, inner = filesystem(path)
    bucket = inner.split("/", 1)[0]
    fs.invalidate_cache()
    fs.ls(bucket, refresh=True)


def describe_error(exc: BaseException) -> str:
    """One line for a user about a failed storage call (the client's messages name no secret)."""
    if isinstance(exc, FileNotFoundError):
        return "no such bucket or path"
    if isinstance(exc, PermissionError):
        return f"access denied: check the credentials in the environment ({str(exc).splitlines()[0][:200]})"
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
