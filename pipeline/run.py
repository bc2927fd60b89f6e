"""`curate run`: the stages wired together, one Dask task per shard and stage.

Layout of an output folder:

    config.yaml            the resolved config of the run
    work/input/            input shards (NNNNN.parquet) cut from the URL lists
    work/download/         raw shards (removed once written, unless output.keep_intermediate)
    shards/NNNNN.tar       final WebDataset shards
    shards/NNNNN.parquet   every row of the shard, kept or rejected, with its reason
    shards/NNNNN.done.json the shard's stats, written last
    stats.json             the run's totals: rows in = written + rejected, per reason
"""

from __future__ import annotations

import errno
import json
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path

import yaml
from distributed import as_completed
from tqdm import tqdm

from pipeline.cluster import dask_client
from pipeline.config import RunConfig, dump_config
from pipeline.download import download_shard
from pipeline.errors import UserError
from pipeline.reader import check_inputs, write_input_shards
from pipeline.shards import atomic_path, is_done, read_marker, remove_shard, shard_name
from pipeline.write import write_shard



class RunLayout:
    def __init__(self, root: Path):
        self.root = root
        self.config = root / "config.yaml"
        self.input = root / "work" / "input"
        self.download = root / "work" / "download"
        self.shards = root / "shards"
        self.stats = root / "stats.json"


def _comparable(config_dump: str) -> dict:
    data = yaml.safe_load(config_dump)
    data.pop("dask", None)
    data.get("download", {}).pop("threads", None)
    return data


def _prepare_output(cfg: RunConfig, layout: RunLayout, overwrite: bool) -> None:
    """Create the output folder; refuse to resume a run made with different settings."""
    if layout.root.exists() and not layout.root.is_dir():
        raise UserError(f"output.path {layout.root} exists and is not a folder")
    if overwrite and layout.root.exists():
        # A mistyped output.path must not cost the user an unrelated folder.
        if not layout.config.exists() and any(layout.root.iterdir()):
            raise UserError(f"--overwrite: {layout.root} holds files but no curate run (no config.yaml); not deleting it")
        shutil.rmtree(layout.root)
    resolved = dump_config(cfg)
    if layout.config.exists() and _comparable(layout.config.read_text()) != _comparable(resolved):
        raise UserError(
            f"{layout.root} holds a run made with a different config; "
            "rerun with --overwrite, or choose another output.path"
        )
    try:
        for folder in (layout.input, layout.download, layout.shards):
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a parent is a file, or not writable
        raise UserError(f"cannot create the output folder {layout.root}: {exc.strerror or exc}") from exc
    with atomic_path(layout.config) as tmp:
        tmp.write_text(resolved)


def merge_stats(shard_stats: list[dict], rows_in: int, seconds: float) -> dict:
    """Sum per-shard stats; rows in must equal written + rejected, or the run fails loudly."""
    rejected: Counter = Counter()
    filters: dict[str, Counter] = {}
    for s in shard_stats:
        rejected.update(s["rejected"])
        for name, counts in s.get("filters", {}).items():
            filters.setdefault(name, Counter()).update(counts)
    written = sum(s["written"] for s in shard_stats)
    total_rejected = sum(rejected.values())
    if written + total_rejected != rows_in:
        raise RuntimeError(
            f"accounting mismatch: {rows_in} rows in, {written} written + {total_rejected} rejected"
        )
    stage_seconds: Counter = Counter()
    for s in shard_stats:
        stage_seconds.update(s["seconds"])
    return {
        "rows_in": rows_in,
        "written": written,
        "rejected": total_rejected,
        "rejected_by_reason": dict(sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0]))),
        "filters": {name: dict(c) for name, c in filters.items()},
        "shards": len(shard_stats),
        "bytes_downloaded": sum(s.get("bytes_downloaded", 0) for s in shard_stats),
        "duration_seconds": round(seconds, 3),
        "rows_per_second": round(rows_in / seconds, 2) if seconds > 0 else None,
        "images_per_second": round(written / seconds, 2) if seconds > 0 else None,
        "task_seconds_by_stage": {k: round(v, 3) for k, v in stage_seconds.items()},
    }


def run(cfg: RunConfig, overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Run the pipeline; returns the merged stats (also written to stats.json)."""
    started = time.time()
    files = check_inputs(cfg.input)  # bad input fails here, before anything is written
    layout = RunLayout(Path(cfg.output.path))
    with dask_client(cfg.dask) as client:  # an unreachable scheduler fails here, too
        _prepare_output(cfg, layout, overwrite)
        if client.dashboard_link:
            log(f"dask dashboard: {client.dashboard_link}")
        try:
            inputs = write_input_shards(cfg.input, files, layout.input)
            shard_stats = _run_shards(client, cfg, layout, inputs["shards"], progress)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise UserError(f"no space left on the device holding {layout.root}; free some and rerun to resume") from exc
            raise
        stats = merge_stats(shard_stats, inputs["rows"], time.time() - started)
    with atomic_path(layout.stats) as tmp:
        tmp.write_text(json.dumps(stats, indent=1))
    return stats


def _run_shards(client, cfg: RunConfig, layout: RunLayout, n_shards: int, progress: bool) -> list[dict]:
    token = uuid.uuid4().hex[:8]  # task keys unique per run, so runs can share a cluster
    done: dict[int, dict] = {}
    futures = []
    for i in range(n_shards):
        if is_done(layout.shards, i):
            done[i] = read_marker(layout.shards, i)
            if not cfg.output.keep_intermediate:
                remove_shard(layout.download, i)  # left behind if a run died right after writing
            continue
        input_path = str(layout.input / f"{shard_name(i)}.parquet")
        downloaded = client.submit(
            download_shard, input_path, i, str(layout.download), cfg, key=f"download-{token}-{i}"
        )
        written = client.submit(
            write_shard, i, downloaded, str(layout.download), str(layout.shards), cfg, key=f"write-{token}-{i}"
        )
        futures += [downloaded, written]

    bars = {
        stage: tqdm(total=n_shards, initial=len(done), desc=f"{stage:8s}", unit="shard", disable=not progress)
        for stage in ("download", "write")
    }
    try:
        for future in as_completed(futures):
            stage, _, shard = future.key.partition(f"-{token}-")
            try:
                result = future.result()
            except UserError:
                raise
            except OSError:
                raise
            except Exception as exc:
                raise RuntimeError(f"{stage} of shard {shard_name(int(shard))} failed: {type(exc).__name__}: {exc}") from exc
            bars[stage].update(1)
            if stage == "write":
                done[int(shard)] = result
    finally:
        for bar in bars.values():
            bar.close()
        client.cancel(futures)
    return [done[i] for i in range(n_shards)]
