"""The download stage: one input shard in, one raw shard out (tar + parquet of every row).

One call handles one shard and is one Dask task. Inside it a thread pool fetches
and normalizes images; results are consumed in row order through a bounded window,
so output is deterministic and memory is bounded by the window, not the shard.

Images it drops after fetching them (the `resolution` filter's, undecodable ones) are gone
after this stage, so it keeps thumbnails of a bounded few per reason for the report
(pipeline/report/samples.py), never of a safety rejection, and only when the run has no
sample-stage safety filter (nsfw, concepts): those judge images in the write stage, so an
image dropped here has not been screened by them.
"""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import pyarrow.parquet as pq

from curate.filters import apply_chain, build_chain, build_stage_chain, chain_counts
from curate.filters.base import SAFETY, Filter
from curate.pipeline import storage
from curate.pipeline.config import RunConfig
from curate.filters.dedup import needs_phash
from curate.pipeline.dedup_store import phash_hex
from curate.pipeline.fetch import fetch
from curate.pipeline.image import examine_bytes, image_rejection, normalize_image
from curate.pipeline.reader import read_input_shard
from curate.pipeline.layout import RunLayout
from curate.pipeline.records import SUCCESS, Rejection, records_table, sample_meta
from curate.pipeline.report.samples import ReportSamples
from curate.pipeline.shards import atomic_path, run_once, sample_key, shard_name
from curate.pipeline.tarshard import TarShardWriter


# The stage's name in the rejections it makes itself (the fetch's and the decoder's).
DOWNLOAD = "download"



def _process_row(row: dict, cfg: RunConfig, bytes_chain: list[Filter], phash: bool = False,
                 check_url=None) -> tuple[dict, bytes | None]:
    """Fetch, check and normalize one row: its record, and the normalized image (None when
    rejected). Never raises: a failure is a rejection with a reason."""
    record, image, _ = _process(row, cfg, bytes_chain, phash, check_url)
    return record, image


def _process(row: dict, cfg: RunConfig, bytes_chain: list[Filter], phash: bool = False,
             check_url=None) -> tuple[dict, bytes | None, Optional[tuple[bytes, Rejection]]]:
    """`_process_row`, and for a row rejected after its bytes were fetched, those bytes with the
    rejection (for the report's pictures; never for a safety rejection)."""
    record: dict = {}  # every outcome sets the status: a rejection's columns, or SUCCESS
    got = fetch(row["url"], cfg.download, check_url)
    if not got.ok:
        record.update(got.rejection.columns(), http_status=got.http_status)
        return record, None, None

    def dropped(rejection: Rejection):
        record.update(rejection.columns())
        return record, None, (None if rejection.is_safety else (got.data, rejection))

    # The header, read once: the size the bytes filters judge (resolution) and the report charts,
    # and the opened file normalize_image goes on from. The bytes filters judge before anything is
    # decoded or stored: an image they drop is never written anywhere.
    columns, header, rejection = examine_bytes(got.data, row, lambda s: apply_chain(bytes_chain, s), DOWNLOAD)
    record.update(columns)
    try:
        if rejection is not None:
            return dropped(rejection)
        try:
            img = normalize_image(got.data, cfg.resize, cfg.download.max_image_area, header)
            # For the dedup filter's near-duplicate pass: the hash of the image as it is stored.
            perceptual = phash_hex(img.data) if phash else None
        except Exception as exc:  # ImageRejected, or whatever a strange file raises
            return dropped(image_rejection(exc, DOWNLOAD))
    finally:
        if header is not None:
            header.close()  # normalize_image has closed it already when it ran; twice is harmless
    record.update(
        status=SUCCESS, width=img.width, height=img.height,
        original_width=img.original_width, original_height=img.original_height,
    )
    if img.bucket is not None:
        record["bucket"] = list(img.bucket)  # resize.mode buckets: training batches by it
    if perceptual is not None:
        record["phash"] = perceptual
    return record, img.data, None


def redirect_check(row_chain: list[Filter]):
    """A check of redirect targets by the row filters that judge URLs (`url_rejection`), so a
    redirect cannot lead onto a blocked domain; None when there are none."""
    judges = [f for f in row_chain if hasattr(f, "url_rejection")]
    if not judges:
        return None

    def check(url: str) -> Optional[Rejection]:
        for f in judges:
            rejection = f.url_rejection(url)
            if rejection is not None:
                return rejection
        return None

    return check


def download_shard(input_path: str, shard_id: int, stage_dir: str, cfg: RunConfig) -> dict:
    """Download one shard. Returns its stats; a done shard is not redone."""
    layout = RunLayout(cfg.output.path)
    outputs = [*layout.download_files(shard_id).values(), layout.report_download_samples_file(shard_id)]
    return run_once(stage_dir, shard_id, lambda: _download(input_path, shard_id, stage_dir, cfg), outputs=outputs)


def screened_by_every_safety_filter(filter_specs: list[dict]) -> bool:
    """Whether an image this stage drops has been through every safety filter of the run:
    not when a sample-stage one (nsfw, concepts) is configured, which judges only later."""
    return not any(f.priority == SAFETY and f.stage == "sample" for f in build_chain(filter_specs))


def _download(input_path: str, shard_id: int, stage_dir: str, cfg: RunConfig) -> dict:
    started = time.time()  # the shard's start_time in its _stats.json (the write stage writes it)
    rows = read_input_shard(input_path).to_pylist()
    extra_cols = list(cfg.input.extra_cols)
    context = {"clip": cfg.clip, "root": str(stage_dir)}
    row_chain = build_stage_chain(cfg.filter_specs(), "row", context)
    check_url = redirect_check(row_chain)
    bytes_chain = build_stage_chain(cfg.filter_specs(), "bytes", context)
    phash = needs_phash(cfg.filter_specs())  # ~1 ms an image: only when dedup uses it
    # The report's pictures of images dropped here (bounded; thumbnailed as chosen).
    pictures = (ReportSamples(shard_id, kept=0, stage="download")
                if screened_by_every_safety_filter(cfg.filter_specs()) else None)
    records: list[dict] = []
    reasons: Counter = Counter()
    name = shard_name(shard_id)

    with atomic_path(storage.join(stage_dir, f"{name}.tar")) as tar_tmp:
        with TarShardWriter(tar_tmp) as tar, ThreadPoolExecutor(cfg.download.threads) as pool:
            window: deque = deque()
            todo = iter(enumerate(rows))
            # Keep a few tasks per thread queued so threads never idle, but never the whole shard.
            limit = cfg.download.threads * 4

            def submit_next() -> None:
                for index, row in todo:
                    sample = {
                        "key": sample_key(shard_id, index, cfg.input.rows_per_shard),
                        "url": row["url"], "caption": row["caption"],
                        "meta": {c: row.get(c) for c in extra_cols},
                    }
                    # Rows the row filters drop are never fetched.
                    rejection = apply_chain(row_chain, sample) if row_chain else None
                    if rejection is not None:
                        done = Future()
                        done.set_result((rejection.columns(), None, None))
                        window.append((index, sample, done))
                        continue
                    window.append((index, sample, pool.submit(_process, sample, cfg, bytes_chain, phash, check_url)))
                    return

            for _ in range(limit):
                submit_next()
            while window:
                index, row, future = window.popleft()
                submit_next()
                outcome, image, dropped = future.result()
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
                    if dropped is not None and pictures is not None:
                        data, rejection = dropped
                        pictures.add_dropped({"key": record["key"], "caption": record["caption"], "jpg": data, "meta": {
                            "width": record.get("original_width"), "height": record.get("original_height")}}, rejection)
                    continue
                meta = sample_meta(record)
                tar.write(record["key"], {"jpg": image, "json": json.dumps(meta, default=str).encode()})

    with atomic_path(storage.join(stage_dir, f"{name}.parquet")) as pq_tmp:
        pq.write_table(records_table(records, extra_cols), pq_tmp)
    if pictures is not None:
        pictures.save(RunLayout(cfg.output.path).report_download_samples_file(shard_id))

    return {
        "shard": shard_id,
        "rows": len(records),
        "successes": sum(1 for r in records if r["status"] == SUCCESS),
        "start_time": started,
        "rejected": dict(reasons),
        "bytes_downloaded": sum(r.get("bytes") or 0 for r in records),
        "filters": {**chain_counts(row_chain), **chain_counts(bytes_chain)},
    }
