"""Read LAION-style URL lists and cut them into input shards.

Files are streamed in batches of `read_batch_rows` rows, only the needed columns,
so peak memory depends on the batch and the shard size, never on the file size.
Each input shard is a small parquet file with canonical columns: `url`, `caption`,
then the configured extra columns under their input names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.errors import UserError
from pipeline.shards import atomic_path, shard_name

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
        return list(json.loads(first))


def check_inputs(cfg: InputConfig) -> list[str]:
    """Fail before any work if a file is missing, unreadable or lacks a configured column."""
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
            for chunk in pd.read_json(f, lines=True, chunksize=cfg.read_batch_rows, dtype=False):
                yield chunk.reindex(columns=cols)


def _canonical(frame: pd.DataFrame, cfg: InputConfig) -> pd.DataFrame:
    """Rename to canonical columns; url and caption become nullable strings."""
    out = pd.DataFrame(index=range(len(frame)))
    out["url"] = frame[cfg.url_col].reset_index(drop=True).astype("string")
    if cfg.caption_col:
        out["caption"] = frame[cfg.caption_col].reset_index(drop=True).astype("string")
    else:
        out["caption"] = pd.Series([None] * len(frame), dtype="string")
    for col in cfg.extra_cols:
        out[col] = frame[col].reset_index(drop=True)
    return out


def _write_input_shard(frames: list[pd.DataFrame], path: Path) -> None:
    tables = [pa.Table.from_pandas(f, preserve_index=False) for f in frames]
    table = pa.concat_tables(tables, promote_options="permissive")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_input_shards(cfg: InputConfig, files: list[str], out_dir: Path) -> dict:
    """Cut the inputs into shards of `rows_per_shard` rows under out_dir.

    Resumable: `_done.json`, written last, records the shard and row counts; when it
    exists the inputs are not read again. A half-finished pass is redone from scratch
    (it is deterministic) so shard boundaries never depend on where it stopped.
    """
    marker = out_dir / "_done.json"
    if marker.exists():
        return json.loads(marker.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.parquet*"):
        stale.unlink()

    shard_id, rows_total = 0, 0
    pending: list[pd.DataFrame] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal shard_id, pending, pending_rows
        _write_input_shard(pending, out_dir / f"{shard_name(shard_id)}.parquet")
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


def read_input_shard(path: Path) -> pa.Table:
    return pq.read_table(path)
