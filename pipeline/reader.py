"""Read LAION-style URL lists and cut them into input shards: one cut task per input file,
run on the workers, each writing that file's shards (`InputShards`, `cut_file`).

Files are streamed in batches of `read_batch_rows` rows, only the needed columns,
so peak memory depends on the batch and the shard size, never on the file size.
Each input shard is a small parquet file with canonical columns: `url`, `caption`,
then the configured extra columns under their input names.
"""

from __future__ import annotations

import bisect
import errno
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Iterator, Optional

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from curate.pipeline import storage
from curate.pipeline.config import InputConfig
from curate.pipeline.errors import UserError
from curate.pipeline.executor import Wait
from curate.pipeline.input_tars import check_tars, has_samples, record_tars
from curate.pipeline.records import RECORD_COLUMNS
from curate.pipeline.shards import atomic_path, is_done, read_marker, run_once, shard_name

logger = logging.getLogger("curate")

_SUFFIX_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def file_format(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    name = path.lower()
    for ext in _COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
    for suffix, fmt in _SUFFIX_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    if name.endswith(".tar"):
        raise UserError(f"input {path}: a tar shard among URL lists; a run reads either URL lists or tar shards "
                        "(input.format: webdataset)")
    raise UserError(f"input {path}: cannot tell the format from its name; set input.format")


def resolve_inputs(cfg: InputConfig) -> list[str]:
    """Expand globs; every configured path must match at least one file."""
    files: list[str] = []
    for pattern in cfg.paths:
        try:
            fs, _, paths = fsspec.core.get_fs_token_paths(pattern)
        except (ValueError, ImportError) as exc:
            raise UserError(f"input {pattern}: {exc}") from exc
        paths = [p for p in sorted(paths) if not fs.isdir(p)]
        if not paths:
            raise UserError(f"input file not found: {pattern}")
        files.extend(fs.unstrip_protocol(p) if fs.protocol not in ("file", ("file", "local")) else p for p in paths)
    return files


def _columns_of(path: str, fmt: str) -> list[str]:
    """Column names from the file's header only (parquet footer, first csv/jsonl line)."""
    with fsspec.open(path, "rb", compression="infer") as f:
        if fmt == "parquet":
            return pq.ParquetFile(f).schema_arrow.names
        if fmt in ("csv", "tsv"):
            sep = "," if fmt == "csv" else "\t"
            try:
                return list(pd.read_csv(f, sep=sep, nrows=0, encoding_errors="replace").columns)
            except pd.errors.EmptyDataError:
                return []  # a zero-byte file: no header, no rows
        first = f.readline()
        if not first.strip():
            return []
        return list(json.loads(first.decode("utf-8", errors="replace")))


def check_inputs(cfg: InputConfig) -> list[str]:
    """Fail before any work if a file is missing, unreadable or lacks a configured column."""
    clashing = [c for c in cfg.extra_cols if c in RECORD_COLUMNS]
    if clashing:
        # An input column named `key` or `status` would overwrite what curate records about the
        # row (a `key` from the input would even become a file name in the tar).
        raise UserError(
            f"input.extra_cols: {', '.join(clashing)} clash(es) with columns curate writes itself "
            f"({', '.join(RECORD_COLUMNS)}); drop them from extra_cols"
        )
    if cfg.format == "webdataset":
        return check_tars(cfg)
    files = resolve_inputs(cfg)
    wanted = [cfg.url_col] + ([cfg.caption_col] if cfg.caption_col else []) + list(cfg.extra_cols)

    def columns_or_error(path: str):
        try:
            return _columns_of(path, file_format(path, cfg.format))
        except Exception as exc:  # raised below, in file order
            return exc

    # Each file's header, read ahead in threads (thousands of footers in object storage), judged in order.
    for path, columns in storage.read_ahead(files, columns_or_error):
        fmt = file_format(path, cfg.format)
        if isinstance(columns, FileNotFoundError):
            raise UserError(f"input file not found: {path}") from columns
        if isinstance(columns, Exception):  # pyarrow / pandas / json each raise their own types
            raise UserError(f"input {path}: not a readable {fmt} file ({type(columns).__name__}: {columns})") from columns
        if not columns:
            continue  # an empty file has no rows and no header; it contributes nothing
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise UserError(
                f"input {path}: missing column(s) {', '.join(missing)} (has: {', '.join(map(str, columns[:20]))})"
            )
    return files


def has_rows(cfg: InputConfig, files: list[str]) -> bool:
    """Whether any input file holds a row: parquet from its footer, csv/tsv/jsonl from their
    first lines, so an empty input is found before anything starts."""
    if cfg.format == "webdataset":
        return has_samples(files)
    for path in files:
        fmt = file_format(path, cfg.format)
        with fsspec.open(path, "rb", compression="infer") as f:
            if fmt == "parquet":
                if pq.ParquetFile(f).metadata.num_rows:
                    return True
            elif fmt in ("csv", "tsv"):
                try:
                    if len(pd.read_csv(f, sep="," if fmt == "csv" else "\t", nrows=1, encoding_errors="replace")):
                        return True
                except pd.errors.EmptyDataError:
                    continue
            elif any(line.strip() for line in f):
                return True
    return False


def _read_batches(path: str, fmt: str, cfg: InputConfig) -> Iterator[pd.DataFrame]:
    cols = [cfg.url_col] + ([cfg.caption_col] if cfg.caption_col else []) + list(cfg.extra_cols)
    with fsspec.open(path, "rb", compression="infer") as f:
        if fmt == "parquet":
            for batch in pq.ParquetFile(f).iter_batches(batch_size=cfg.read_batch_rows, columns=cols):
                yield batch.to_pandas()
        elif fmt in ("csv", "tsv"):
            sep = "," if fmt == "csv" else "\t"
            text_cols = {cfg.url_col: "string", **({cfg.caption_col: "string"} if cfg.caption_col else {})}
            try:
                reader = pd.read_csv(
                    f, sep=sep, usecols=cols, dtype=text_cols, chunksize=cfg.read_batch_rows,
                    encoding_errors="replace", keep_default_na=False, na_values=[""],
                )
            except pd.errors.EmptyDataError:
                return
            yield from reader
        else:
            text = io.TextIOWrapper(f, encoding="utf-8", errors="replace")
            for chunk in pd.read_json(text, lines=True, chunksize=cfg.read_batch_rows, dtype=False):
                yield chunk.reindex(columns=cols)


def _text(column: pd.Series) -> pd.Series:
    """A column as nullable strings; bytes (a parquet binary column) are decoded as UTF-8 with
    invalid bytes replaced, as the csv and jsonl readers do."""
    column = column.reset_index(drop=True)
    if column.dtype == object:
        column = column.map(lambda v: v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v)
    return column.astype("string")


def _canonical(frame: pd.DataFrame, cfg: InputConfig) -> pd.DataFrame:
    """Rename to canonical columns; url and caption become nullable strings."""
    out = pd.DataFrame(index=range(len(frame)))
    out["url"] = _text(frame[cfg.url_col])
    if cfg.caption_col:
        out["caption"] = _text(frame[cfg.caption_col])
    else:
        out["caption"] = pd.Series([None] * len(frame), dtype="string")
    for col in cfg.extra_cols:
        out[col] = frame[col].reset_index(drop=True)
    return out


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _as_text(values) -> pa.Array:
    """Values as text, nulls kept: strings as they are, anything else as JSON (3, 1.5, [1, 2])."""
    return pa.array([None if _missing(v) else v if isinstance(v, str) else json.dumps(v, default=str)
                     for v in values], pa.string())


def _column_array(column: pd.Series) -> pa.Array:
    """One column as arrow. A column of mixed kinds (jsonl's 12, "12px", [1, 2]) becomes text
    rather than failing the file."""
    try:
        return pa.array(column, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return _as_text(column)


def _concat(tables: list[pa.Table]) -> pa.Table:
    """Concatenate batches whose column types may disagree: csv and jsonl are typed batch by
    batch, and files differ. Numbers widen (int and float make float); a column whose batches
    disagree otherwise (numbers and text: a stray "n/a" in a WIDTH column) becomes text in this
    shard, as pandas makes it within one csv batch. No value is lost."""
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    names = tables[0].column_names

    def unifies(name: str) -> bool:
        try:
            pa.concat_tables([t.select([name]) for t in tables], promote_options="permissive")
            return True
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return False

    mixed = {n for n in names if not unifies(n)}
    return pa.concat_tables(
        [pa.table({n: _as_text(t[n].to_pylist()) if n in mixed else t[n] for n in names}) for t in tables],
        promote_options="permissive",
    )


def _write_input_shard(frames: list[pd.DataFrame], path: Path) -> None:
    tables = [pa.table({c: _column_array(f[c]) for c in f.columns}) for f in frames]
    table = _concat(tables)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def input_shard_path(out_dir: str | os.PathLike, file_index: int, local: int) -> str:
    """The `local`-th input shard cut from input file `file_index`: work/input/FFFFF_SSSSS.parquet."""
    return storage.join(out_dir, f"{shard_name(file_index)}_{shard_name(local)}.parquet")


def cut_file(cfg: InputConfig, path: str, file_index: int, out_dir: str) -> dict:
    """One input file cut into its own input shards of `rows_per_shard` rows (the last may be
    short; a shard never spans files), streamed batch by batch. A task on a worker, under the
    done-marker protocol (pipeline/shards.py, the file's index as its id): an interrupted cut is
    cleaned and redone whole, a finished one returns its marker ({"file", "rows", "shards"})."""
    # How many shards an interrupted cut wrote is not known (nor their size, if the config
    # changed): the file's shards are found by their name. One listing a file, not a shard.
    outputs = storage.listing(out_dir, f"{shard_name(file_index)}_")
    return run_once(out_dir, file_index, lambda: _cut(cfg, path, file_index, out_dir), outputs=outputs)


def _cut(cfg: InputConfig, path: str, file_index: int, out_dir: str) -> dict:
    fmt = file_format(path, cfg.format)
    shards, rows = 0, 0
    pending: list[pd.DataFrame] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal shards, pending, pending_rows
        _write_input_shard(pending, input_shard_path(out_dir, file_index, shards))
        shards += 1
        pending, pending_rows = [], 0

    try:
        for batch in _read_batches(path, fmt, cfg):
            frame = _canonical(batch, cfg)
            rows += len(frame)
            while len(frame):
                take = cfg.rows_per_shard - pending_rows
                pending.append(frame.iloc[:take])
                pending_rows += len(pending[-1])
                frame = frame.iloc[take:]
                if pending_rows == cfg.rows_per_shard:
                    flush()
        if pending_rows:
            flush()
    except UserError:
        raise
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the output's disk, not the input: the run's error
        raise UserError(f"input {path}: read failed ({type(exc).__name__}: {exc})") from exc
    return {"file": path, "rows": rows, "shards": shards}


def _footer_rows(path: str, fmt: str) -> Optional[int]:
    """A parquet file's row count from its footer (no data read); None for other formats, whose
    count is known only once they are cut."""
    if fmt != "parquet" or path.lower().endswith(_COMPRESSIONS):
        return None
    try:
        with fsspec.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    except Exception:  # unreadable footer: the cut task reports it, as one line
        return None


class InputShards:
    """The input shards of a run over URL lists, cut file by file by tasks on the executor's
    workers and handed out in global shard order as they become known.

    A file's shards are numbered after every earlier file's shards, so ids are deterministic:
    parquet counts come from the footers up front, csv/tsv/jsonl counts once their cut has
    finished. `stream()` yields (shard id, input shard path) for each shard as soon as its
    file is cut and the counts of the files before it are known, and `Wait` when nothing is
    ready yet, so downloads start while later files are still being cut. The state kept is
    per file (rows, shards, first shard id), never per shard.

    work/input/ holds: `_files.json` (the files, in order, fixed when the run first starts),
    `FFFFF_SSSSS.parquet` (shard SSSSS of file FFFFF), `FFFFF.done.json` (the file's cut:
    rows, shards) and, once every file is cut, `_done.json` (files, per-file first shard,
    shards and rows, totals), after which nothing is read or cut again.
    """

    def __init__(self, cfg: InputConfig, files: list[str], out_dir: str | os.PathLike, executor):
        self.cfg, self.out_dir, self.executor = cfg, str(out_dir), executor
        self.rows_per_shard = cfg.rows_per_shard
        self.legacy = False
        done = storage.join(self.out_dir, "_done.json")
        if storage.exists(done):
            summary = json.loads(storage.read_text(done))
            self.files = summary["files"]
            per_file = summary.get("per_file")
            if per_file is None:  # cut before shards stopped spanning files: one run of equal shards
                self.legacy = True
                per_file = [{"first": 0, "shards": summary["shards"], "rows": summary["rows"]}]
            self.rows = [f["rows"] for f in per_file]
            self.shards = [f["shards"] for f in per_file]
            self.cut = [True] * len(per_file)
            self._counted = sum(self.shards)
        else:
            self._counted = 0
            self.files = self._fixed_files(files)
            n = len(self.files)
            self.rows, self.shards, self.cut = [None] * n, [None] * n, [False] * n
            def known(i: int):  # a cut file's marker, or a parquet footer's count (None: known once cut)
                if is_done(self.out_dir, i):
                    return read_marker(self.out_dir, i)
                return _footer_rows(self.files[i], file_format(self.files[i], cfg.format))

            # Thousands of footers in object storage: read ahead in threads, counted in order.
            for i, found in storage.read_ahead(list(range(len(self.files))), known):
                if isinstance(found, dict):
                    self._record(i, found)
                elif found is not None:
                    self._count(i, found, math.ceil(found / self.rows_per_shard))
        self.first: list[Optional[int]] = [None] * len(self.rows)
        self._known, self._offset = 0, 0  # counts known for files [0, _known); their shards: _offset
        self._advance()

    def _fixed_files(self, files: list[str]) -> list[str]:
        """The file list of this run, recorded the first time: a rerun numbers the same files the
        same way even when a glob now matches other files."""
        listed = storage.join(self.out_dir, "_files.json")
        if storage.exists(listed):
            recorded = json.loads(storage.read_text(listed))
            if recorded != files:
                logger.warning(f"the input paths now match other files than when this run started; it goes on "
                               f"with the {len(recorded)} files it started with (--overwrite starts afresh)")
            return recorded
        storage.make_dirs(self.out_dir)
        with atomic_path(listed) as tmp:
            tmp.write_text(json.dumps(files, indent=1))
        return files

    def _record(self, i: int, marker: dict) -> None:
        expected = self.rows[i]
        if expected is not None and (expected != marker["rows"] or self.shards[i] != marker["shards"]):
            raise UserError(f"input {self.files[i]}: its footer says {expected} rows but {marker['rows']} were read; "
                            "was it changed during the run?")
        self._count(i, marker["rows"], marker["shards"])
        self.cut[i] = True

    def _count(self, i: int, rows: int, shards: int) -> None:
        if self.shards[i] is None:
            self._counted += shards
        self.rows[i], self.shards[i] = rows, shards

    def _advance(self) -> None:
        while self._known < len(self.shards) and self.shards[self._known] is not None:
            self.first[self._known] = self._offset
            self._offset += self.shards[self._known]
            self._known += 1
        if self._known < len(self.first):
            self.first[self._known] = self._offset  # its own count may be unknown: its first id is not

    @property
    def complete(self) -> bool:
        """Whether every file's shard count is known (the total no longer grows)."""
        return self._known == len(self.shards)

    @property
    def known_shards(self) -> int:
        """Shards known so far: every file whose count is known (the total once `complete`)."""
        return self._counted

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    def rows_of(self, shard: int) -> int:
        """Rows of input shard `shard`: rows_per_shard, but the last of its file may be short."""
        i = bisect.bisect_right(self.first, shard, hi=self._known) - 1
        local = shard - self.first[i]
        if local < self.shards[i] - 1:
            return self.rows_per_shard
        return self.rows[i] - self.rows_per_shard * (self.shards[i] - 1)

    def _path(self, i: int, local: int) -> str:
        if self.legacy:
            return storage.join(self.out_dir, f"{shard_name(local)}.parquet")
        return input_shard_path(self.out_dir, i, local)

    def _finished(self, i: int, handle) -> dict:
        try:
            return handle.result()
        except (UserError, OSError):
            raise
        except Exception as exc:  # the task's worker died, or an error the cut did not expect
            raise UserError(f"input {self.files[i]}: cutting it into shards failed "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})") from exc

    def stream(self) -> Iterator:
        """(shard, input shard path) in an order where each file's shards come as one block,
        and `Wait(handles)` while no file is ready; `_done.json` is written at the end."""
        n = len(self.shards)  # the files (one group for a run cut before shards stopped spanning files)
        emitted = [False] * n
        handles: dict[int, object] = {}
        position = 0  # the first file whose shards have not been handed out
        try:
            while position < n:
                window = range(position, min(n, position + max(1, self.executor.bound // 2)))
                for i in window:  # cut a few files ahead of the downloads, not every file at once
                    if not self.cut[i] and i not in handles:
                        handles[i] = self.executor.submit("cut", cut_file, (self.cfg, self.files[i], i, self.out_dir), i)
                for i, handle in list(handles.items()):
                    if handle.done():
                        self._record(i, self._finished(i, handle))
                        del handles[i]
                self._advance()
                ready = [i for i in window if self.cut[i] and not emitted[i] and i <= self._known]
                if not ready:
                    yield Wait(list(handles.values()))
                    continue
                for i in ready:
                    emitted[i] = True
                    for local in range(self.shards[i]):
                        yield self.first[i] + local, self._path(i, local)
                while position < n and emitted[position]:
                    position += 1
            self._write_done()
        finally:
            if handles:
                self.executor.cancel(list(handles.values()))

    def summary(self) -> dict:
        return {"shards": self.known_shards, "rows": self.total_rows, "files": self.files,
                "per_file": [{"file": f, "first": first, "shards": s, "rows": r}
                             for f, first, s, r in zip(self.files, self.first, self.shards, self.rows)]}

    def _write_done(self) -> None:
        done = storage.join(self.out_dir, "_done.json")
        if not self.legacy and not storage.exists(done):
            with atomic_path(done) as tmp:
                tmp.write_text(json.dumps(self.summary(), indent=1))


def write_input_shards(cfg: InputConfig, files: list[str], out_dir: str | os.PathLike) -> dict:
    """Cut every input file in this process, one after the other (tests, tools); returns the
    summary `_done.json` holds. A run cuts through `InputShards` on its executor instead.
    Input tars are not cut: each is a shard, recorded in `_done.json` (pipeline/input_tars.py)."""
    if cfg.format == "webdataset":
        return record_tars(files, out_dir)
    from curate.pipeline.executor import InProcessExecutor

    inputs = InputShards(cfg, files, out_dir, InProcessExecutor())
    for _ in inputs.stream():
        pass
    return inputs.summary()


def read_input_shard(path: str) -> pa.Table:
    return storage.read_parquet(path)
