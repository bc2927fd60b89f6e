"""The write stage: raw download shard in (or the read stage's parquet and the input tar it
points into: existing shards as input, pipeline/sources.py), final WebDataset shard out.

Applies the filter chain to each downloaded sample, then writes the final shard:
`{key}.jpg`, `{key}.txt` (caption), `{key}.json` (url, caption, sizes, hash, scores, status),
a parquet of EVERY input row, kept or rejected, with its status and reason, and img2dataset's
`NNNNN_stats.json`; with CLIP scoring, it marks which embedded samples were written in the
embeddings' metadata. The shard's stats (rows, written, rejected per reason, per-filter
counts) go into its done-marker.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Optional

import pyarrow.parquet as pq

from curate.filters import apply_chain_batched, build_chain, build_stage_chain, chain_counts, score_fields
from curate.pipeline import storage
from curate.pipeline.config import RunConfig
from curate.pipeline.embeddings import mark_written, read_embeddings, read_scores
from curate.pipeline.layout import RunLayout
from curate.pipeline.offload import offload_runner
from curate.pipeline.records import (
    CLIP_SIMILARITY, FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE, FILTERED, SUCCESS, Rejection, records_table, sample_meta,
)
from curate.pipeline.report.samples import ReportSamples
from curate.pipeline.shards import atomic_path, read_marker, remove_shard, run_once, shard_name
from curate.pipeline.sources import NORMALIZE_THREADS, write_images
from curate.pipeline.tarshard import TarShardWriter


# Samples judged together by the sample filters (`apply_chain_batched`): a GPU filter's batch,
# sent to a GPU worker as one task (pipeline/offload.py): large enough that a task's round trip
# is small beside its GPU time, and that a LAION-sized run makes few tasks.
FILTER_BATCH = 256


def write_shard(shard_id: int, root: str, cfg: RunConfig, filter_specs: list[dict], offload: Optional[dict],
                *after) -> dict:
    """Filter and write one final shard. Returns its stats; a done shard is not redone.

    The download (and score) stage's stats are read from their done-markers. `after` are the
    results (Dask futures) of this shard's earlier tasks: passing them is what makes Dask run
    this task after those; their values are not used. `filter_specs` is the config's filter
    chain with any dataset-wide value (a CLIP top_fraction) already resolved. `offload`: the
    Dask resources of the GPU workers, where a filter that needs a GPU sends its batches
    (pipeline/offload.py); None to run them in this process.
    """
    layout = RunLayout(root)
    outputs = [*layout.shard_files(shard_id).values(), layout.report_samples_file(shard_id)]
    stats = run_once(layout.shards, shard_id, lambda: _write(shard_id, layout, cfg, filter_specs, offload),
                     outputs=outputs)
    if not cfg.output.keep_intermediate:
        remove_shard(layout.download, shard_id, layout.download_files(shard_id).values())
    return stats


def _write(shard_id: int, layout: RunLayout, cfg: RunConfig, filter_specs: list[dict], offload: Optional[dict]) -> dict:
    started = time.time()
    download_dir = layout.download
    downloaded = read_marker(download_dir, shard_id)
    scored = read_marker(layout.score, shard_id) if cfg.clip.enabled else None
    name = shard_name(shard_id)

    records = storage.read_parquet(layout.download_files(shard_id)["parquet"]).to_pylist()
    chain = build_stage_chain(filter_specs, "sample", {"clip": cfg.clip, "root": str(layout.root), "shard": shard_id,
                                                       "offload": offload_runner(offload)})
    scores = read_scores(layout.embeddings, shard_id) if scored is not None else {}
    # Row-aligned CLIP embeddings, for the filters that read them (NSFW and aesthetic heads, concepts).
    wanted = scored is not None and any(f.needs_embeddings for f in chain)
    embeddings = read_embeddings(layout.embeddings, shard_id) if wanted else {}
    # The raw download tar's images, or an input tar's, normalized as they come (pipeline/sources.py).
    # Images CLIP's decoder read whole need no second decode to be known readable.
    decoded = frozenset(key for key, (_, _, failure) in scores.items() if not failure)
    # A GPU filter waits for its batch's encoding: meanwhile the next batch is normalized.
    ahead = FILTER_BATCH if any(f.needs_gpu for f in chain) else NORMALIZE_THREADS * 2
    raw_samples = write_images(cfg, layout, shard_id, records, decoded, ahead)
    reasons: Counter = Counter()
    # report.html's thumbnails: chosen now, while the images of dropped samples still exist.
    # Every filter of the run: the kept samples nearest each threshold rule are chosen here too.
    run_filters = build_chain(filter_specs)
    report_samples = ReportSamples(shard_id, score_fields=[CLIP_SIMILARITY, *score_fields(run_filters)],
                                   filters=run_filters)

    # Samples wait here until FILTER_BATCH of them are judged at once (a GPU filter's `prepare`
    # gets its batch); the kept ones are written in order, so batching changes no output byte.
    pending: list[tuple[dict, dict, dict]] = []

    def judge_pending(tar: TarShardWriter) -> None:
        decisions = apply_chain_batched(chain, [sample for _, sample, _ in pending])
        for (record, sample, stored), rejection in zip(pending, decisions):
            # Scores land in the parquet for dropped rows too: they are what a user
            # looks at to tune a threshold. Filters may have changed sizes or the caption.
            # Only what the score stage and filters added or changed is copied: the rest
            # came from the record through JSON, which turns e.g. timestamps into text, and
            # one column must keep one type across a shard's rows.
            record.update({k: v for k, v in sample["meta"].items() if k not in stored or stored[k] != v})
            record["caption"] = sample["caption"]
            if rejection is not None:
                record.update(rejection.columns())
                reasons[rejection.reason] += 1
                if not rejection.is_safety:  # an unsafe image is never kept for the report
                    report_samples.add_dropped(sample, rejection)
                continue
            report_samples.add_kept(sample)
            tar.write(sample["key"], {
                "jpg": sample["jpg"],
                "txt": (record["caption"] or "").encode(),
                "json": json.dumps(sample_meta(record), default=str, sort_keys=True).encode(),
                **sample["extra"],
            })
        pending.clear()

    with atomic_path(layout.shard_files(shard_id)["tar"]) as tar_tmp:
        with TarShardWriter(tar_tmp) as tar:
            for record in records:
                if record["status"] != SUCCESS:
                    reasons[record["reason"]] += 1
                    continue
                key, jpg, meta, unusable = next(raw_samples)
                if key != record["key"]:
                    raise RuntimeError(f"shard {name}: tar and parquet out of step at {key} / {record['key']}")
                if unusable is not None:  # an input tar's image that does not normalize
                    record.update(unusable.columns())
                    reasons[unusable.reason] += 1
                    continue
                stored = dict(meta)  # as written by the download stage (extra values as JSON made them)
                if scored is not None:
                    similarity, model, failure = scores[key]
                    if failure:  # the image did not decode for CLIP either: never write it
                        record.update(Rejection(failure, filter="score", detail="CLIP's image decoder could not read it",
                                                status=FAILED_TO_RESIZE).columns())
                        reasons[failure] += 1
                        continue
                    meta.update({CLIP_SIMILARITY: round(similarity, 5), "clip_model": model})
                sample = {"key": key, "jpg": jpg, "caption": record["caption"], "meta": meta, "extra": {}}
                if key in embeddings:
                    sample["img_emb"], sample["text_emb"] = embeddings[key]
                pending.append((record, sample, stored))
                if len(pending) == FILTER_BATCH:
                    judge_pending(tar)
            judge_pending(tar)

    with atomic_path(layout.shard_files(shard_id)["parquet"]) as pq_tmp:
        pq.write_table(records_table(records, list(cfg.input.extra_cols)), pq_tmp)

    if scored is not None:
        mark_written(layout.embeddings, shard_id, records)
    ended = time.time()
    with atomic_path(layout.shard_files(shard_id)["stats"]) as tmp:
        tmp.write_text(json.dumps(img2dataset_stats(records, reasons, downloaded.get("start_time", started), ended),
                                  indent=4, sort_keys=True))

    written = sum(1 for r in records if r["status"] == SUCCESS)
    stats = {
        "shard": shard_id,
        "rows": len(records),
        "written": written,
        "rejected": dict(reasons),
        # Download-stage filters (row, bytes) first, then this stage's: the chain's order.
        "filters": {**downloaded.get("filters", {}), **chain_counts(chain)},
        "bytes_downloaded": downloaded.get("bytes_downloaded", 0),
        **({"input": downloaded["input"]} if "input" in downloaded else {}),  # what the read stage found
        "seconds": {
            downloaded.get("stage", "download"): downloaded.get("seconds", 0.0),
            **({"score": scored.get("seconds", 0.0)} if scored else {}),
            "write": round(time.time() - started, 3),
        },
    }
    report_samples.save(layout.report_samples_file(shard_id))  # before the marker, like every output
    return stats


def img2dataset_stats(records: list[dict], reasons: Counter, start_time: float, end_time: float) -> dict:
    """The shard's `NNNNN_stats.json` as img2dataset writes it (its `logger.write_stats`), so its
    readers read curate's: rows per status, times (from the download's start to the end of this
    write), `status_dict` (img2dataset's counter of "success" and each failure's message: here
    each rejection reason), and curate's own `filtered` and `rejected_by_reason`."""
    statuses = Counter(r["status"] for r in records)
    return {
        "count": len(records),
        "successes": statuses[SUCCESS],
        "failed_to_download": statuses[FAILED_TO_DOWNLOAD],
        "failed_to_resize": statuses[FAILED_TO_RESIZE],
        "filtered": statuses[FILTERED],
        "duration": end_time - start_time,
        "start_time": start_time,
        "end_time": end_time,
        "status_dict": {**({SUCCESS: statuses[SUCCESS]} if statuses[SUCCESS] else {}), **reasons},
        "rejected_by_reason": dict(reasons),
    }
