"""Read LAION-style URL lists and cut them into input shards.

Files are streamed in batches of `read_batch_rows` rows, only the needed columns,
so peak memory depends on the batch and the shard size, never on the file size.
Each input shard is a small parquet file with canonical columns: `url`, `caption`,
then the configured extra columns under their input names.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Iterator

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from curate.pipeline import storage
from curate.pipeline.config import InputConfig
from curate.pipeline.errors import UserError
from curate.pipeline.input_tars import check_tars, has_samples, record_tars
from curate.pipeline.records import RECORD_COLUMNS
from curate.pipeline.shards import atomic_path, shard_name

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
    for path in files:
        fmt = file_format(path, cfg.format)
        try:
            columns = _columns_of(path, fmt)
        except FileNotFoundError as exc:
            raise UserError(f"input file not found: {path}") from exc
        except Exception as exc:  # pyarrow / pandas / json each raise their own types
            raise UserError(f"input {path}: not a readable {fmt} file ({type(exc).__name__}: {exc})") from exc
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


def write_input_shards(cfg: InputConfig, files: list[str], out_dir: Path) -> dict:
    """Cut the inputs into shards of `rows_per_shard` rows under out_dir.

    Resumable: `_done.json`, written last, records the shard and row counts; when it
    exists the inputs are not read again. A half-finished pass is redone from scratch
    (it is deterministic) so shard boundaries never depend on where it stopped.
    Input tars are not cut: each is a shard, recorded in `_done.json` (pipeline/input_tars.py).
    """
    if cfg.format == "webdataset":
        return record_tars(files, out_dir)
    marker = storage.join(out_dir, "_done.json")
    if storage.exists(marker):
        return json.loads(storage.read_text(marker))
    storage.make_dirs(out_dir)
    for stale in storage.listing(out_dir):
        if ".parquet" in storage.name(stale):
            storage.remove(stale)

    shard_id, rows_total = 0, 0
    pending: list[pd.DataFrame] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal shard_id, pending, pending_rows
        _write_input_shard(pending, storage.join(out_dir, f"{shard_name(shard_id)}.parquet"))
        shard_id += 1
        pending, pending_rows = [], 0

    for path in files:
        fmt = file_format(path, cfg.format)
        try:
            for batch in _read_batches(path, fmt, cfg):
                frame = _canonical(batch, cfg)
                rows_total += len(frame)
                while len(frame):
                    take = cfg.rows_per_shard - pending_rows
                    pending.append(frame.iloc[:take])
                    pending_rows += len(pending[-1])
                    frame = frame.iloc[take:]
                    if pending_rows == cfg.rows_per_shard:
                        flush()
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"input {path}: read failed ({type(exc).__name__}: {exc})") from exc
    if pending_rows:
        flush()

    summary = {"shards": shard_id, "rows": rows_total, "files": files}
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    return summary


def read_input_shard(path: str) -> pa.Table:
    return storage.read_parquet(path)
