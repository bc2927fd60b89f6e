"""The download stage: one input shard in, one raw shard out (tar + parquet of every row).

One call handles one shard and is one Dask task. Inside it a thread pool fetches
and normalizes images; results are consumed in row order through a bounded window,
so output is deterministic and memory is bounded by the window, not the shard.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from filters import apply_chain, build_stage_chain, chain_counts
from filters.base import Filter
from pipeline.config import RunConfig
from pipeline.dedup import needs_phash, phash_hex
from pipeline.fetch import fetch
from pipeline.image import ImageRejected, normalize_image
from pipeline.reader import read_input_shard
from pipeline.shards import atomic_path, clean_shard, is_done, mark_done, read_marker, sample_key, shard_name
from pipeline.tarshard import TarShardWriter

# Columns every stage's parquet carries, before the input's extra columns.
RECORD_COLUMNS = [
    "key", "url", "caption", "status", "reason", "error_message",
    "width", "height", "original_width", "original_height", "sha256", "bytes",
]


def _process_row(row: dict, cfg: RunConfig, bytes_chain: list[Filter], phash: bool = False,
                 check_url=None) -> tuple[dict, bytes | None]:
    """Fetch, check and normalize one row. Never raises: a failure is a rejection with a reason."""
    record = {"status": "rejected"}
    got = fetch(row["url"], cfg.download, check_url)
    if not got.ok:
        record.update(reason=got.reason, error_message=got.detail)
        return record, None
    record["sha256"] = hashlib.sha256(got.data).hexdigest()
    record["bytes"] = len(got.data)
    if bytes_chain:
        # Before anything is stored: an image these filters drop is never written anywhere.
        sample = {**row, "data": got.data, "sha256": record["sha256"]}
        reason = apply_chain(bytes_chain, sample)
        if reason is not None:
            record.update(reason=reason, error_message=None)
            return record, None
    try:
        img = normalize_image(got.data, cfg.resize)
        # For the dedup filter's near-duplicate pass: the hash of the image as it is stored.
        perceptual = phash_hex(img.data) if phash else None
    except ImageRejected as exc:
        record.update(reason=exc.reason, error_message=exc.detail)
        return record, None
    except Exception as exc:  # one strange image must never fail the shard
        record.update(reason="decode_error", error_message=f"{type(exc).__name__}: {exc}"[:200])
        return record, None
    record.update(
        status="ok", width=img.width, height=img.height,
        original_width=img.original_width, original_height=img.original_height,
    )
    if perceptual is not None:
        record["phash"] = perceptual
    return record, img.data


def sample_meta(record: dict) -> dict:
    """The json stored beside each image: everything known about the sample except bulky bytes."""
    return {k: v for k, v in record.items() if k not in ("status", "reason", "error_message")}


def redirect_check(row_chain: list[Filter]):
    """A check of redirect targets by the row filters that judge URLs (`url_reason`), so a
    redirect cannot lead onto a blocked domain; None when there are none."""
    judges = [f for f in row_chain if hasattr(f, "url_reason")]
    if not judges:
        return None

    def check(url: str):
        for f in judges:
            reason = f.url_reason(url)
            if reason:
                return reason
        return None

    return check


def download_shard(input_path: str, shard_id: int, stage_dir: str, cfg: RunConfig) -> dict:
    """Download one shard. Returns its stats; a done shard is not redone."""
    stage_dir = Path(stage_dir)
    if is_done(stage_dir, shard_id):
        return read_marker(stage_dir, shard_id)
    clean_shard(stage_dir, shard_id)
    stage_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    rows = read_input_shard(Path(input_path)).to_pylist()
    extra_cols = list(cfg.input.extra_cols)
    context = {"clip": cfg.clip, "root": str(stage_dir)}
    row_chain = build_stage_chain(cfg.filter_specs(), "row", context)
    check_url = redirect_check(row_chain)
    bytes_chain = build_stage_chain(cfg.filter_specs(), "bytes", context)
    phash = needs_phash(cfg.filter_specs())  # ~1 ms an image: only when dedup uses it
    records: list[dict] = []
    reasons: Counter = Counter()
    name = shard_name(shard_id)

    with atomic_path(stage_dir / f"{name}.tar") as tar_tmp:
        with TarShardWriter(tar_tmp) as tar, ThreadPoolExecutor(cfg.download.threads) as pool:
            window: deque = deque()
            todo = iter(enumerate(rows))
            # Keep a few tasks per thread queued so threads never idle, but never the whole shard.
            limit = cfg.download.threads * 4

            def submit_next() -> None:
                for index, row in todo:
                    sample = {
                        "key": sample_key(shard_id, index), "url": row["url"], "caption": row["caption"],
                        "meta": {c: row.get(c) for c in extra_cols},
                    }
                    # Rows the row filters drop are never fetched.
                    reason = apply_chain(row_chain, sample) if row_chain else None
                    if reason is not None:
                        done = Future()
                        done.set_result(({"status": "rejected", "reason": reason, "error_message": None}, None))
                        window.append((index, sample, done))
                        continue
                    window.append((index, sample, pool.submit(_process_row, sample, cfg, bytes_chain, phash, check_url)))
                    return

            for _ in range(limit):
                submit_next()
            while window:
                index, row, future = window.popleft()
                submit_next()
                outcome, image = future.result()
                record = {
                    "key": row["key"],
                    "url": row["url"],
                    "caption": row["caption"],  # as the row filters left it (e.g. cleaned)
                    **outcome,
                    **row["meta"],
                }
                records.append(record)
                if image is None:
                    reasons[record["reason"]] += 1
                    continue
                meta = sample_meta(record)
                tar.write(record["key"], {"jpg": image, "json": json.dumps(meta, default=str).encode()})

    with atomic_path(stage_dir / f"{name}.parquet") as pq_tmp:
        pq.write_table(records_table(records, extra_cols), pq_tmp)

    stats = {
        "shard": shard_id,
        "rows": len(records),
        "ok": sum(1 for r in records if r["status"] == "ok"),
        "rejected": dict(reasons),
        "bytes_downloaded": sum(r.get("bytes") or 0 for r in records),
        "filters": {**chain_counts(row_chain), **chain_counts(bytes_chain)},
        "seconds": round(time.time() - started, 3),
    }
    mark_done(stage_dir, shard_id, stats)
    return stats


def records_table(records: list[dict], extra_cols: list[str]) -> pa.Table:
    """Records as a table with a stable column order (missing values are nulls)."""
    columns = RECORD_COLUMNS + [c for c in extra_cols if c not in RECORD_COLUMNS]
    columns += sorted({k for r in records for k in r} - set(columns))
    return pa.Table.from_pydict({c: [r.get(c) for r in records] for c in columns})
