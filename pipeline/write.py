"""The write stage: raw download shard in, final WebDataset shard out.

Applies the filter chain to each downloaded sample, then writes the final shard:
`{key}.jpg`, `{key}.txt` (caption), `{key}.json` (url, caption, sizes, hash, scores),
and a parquet of EVERY input row, kept or rejected, with its reason. The shard's
stats (rows, written, rejected per reason, per-filter counts) go into its done-marker.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from filters import build_chain
from filters.base import apply_chain
from pipeline.config import RunConfig
from pipeline.download import records_table, sample_meta
from pipeline.shards import atomic_path, clean_shard, is_done, mark_done, read_marker, remove_shard, shard_name
from pipeline.tarshard import TarShardWriter, iter_tar_samples


def write_shard(shard_id: int, downloaded: dict, download_dir: str, out_dir: str, cfg: RunConfig) -> dict:
    """Filter and write one final shard. Returns its stats; a done shard is not redone.

    `downloaded` is the download stage's stats for this shard; taking it as an argument
    is also what makes Dask run this task after that one.
    """
    download_dir, out_dir = Path(download_dir), Path(out_dir)
    if is_done(out_dir, shard_id):
        return read_marker(out_dir, shard_id)
    clean_shard(out_dir, shard_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    name = shard_name(shard_id)

    records = pq.read_table(download_dir / f"{name}.parquet").to_pylist()
    chain = build_chain(cfg.filter_specs())
    raw_samples = iter_tar_samples(download_dir / f"{name}.tar")
    reasons: Counter = Counter()

    with atomic_path(out_dir / f"{name}.tar") as tar_tmp:
        with TarShardWriter(tar_tmp) as tar:
            for record in records:
                if record["status"] != "ok":
                    reasons[record["reason"]] += 1
                    continue
                key, fields = next(raw_samples)
                if key != record["key"]:
                    raise RuntimeError(f"shard {name}: tar and parquet out of step at {key} / {record['key']}")
                meta = json.loads(fields["json"])
                sample = {"key": key, "jpg": fields["jpg"], "caption": record["caption"], "meta": meta}
                reason = apply_chain(chain, sample)
                if reason is not None:
                    record.update(status="rejected", reason=reason, error_message=None)
                    reasons[reason] += 1
                    continue
                record.update({k: v for k, v in meta.items() if k not in record})
                tar.write(key, {
                    "jpg": sample["jpg"],
                    "txt": (record["caption"] or "").encode(),
                    "json": json.dumps(sample_meta(record), default=str, sort_keys=True).encode(),
                })

    with atomic_path(out_dir / f"{name}.parquet") as pq_tmp:
        pq.write_table(records_table(records, list(cfg.input.extra_cols)), pq_tmp)

    written = sum(1 for r in records if r["status"] == "ok")
    stats = {
        "shard": shard_id,
        "rows": len(records),
        "written": written,
        "rejected": dict(reasons),
        "filters": {f.name: f.counts for f in chain},
        "bytes_downloaded": downloaded.get("bytes_downloaded", 0),
        "seconds": {"download": downloaded.get("seconds", 0.0), "write": round(time.time() - started, 3)},
    }
    mark_done(out_dir, shard_id, stats)
    if not cfg.output.keep_intermediate:
        remove_shard(download_dir, shard_id)
    return stats
