"""`curate run`: the stages wired together, one Dask task per shard and stage.

    download_shard ─► score_shard (if clip.enabled; GPU workers when there are any) ─► write_shard

Without a dataset-wide filter the stages pipeline per shard (downloading shard i+1
overlaps scoring shard i). A CLIP `top_fraction` needs every shard scored first: the
writes then wait for the merged similarity histogram. See pipeline/layout.py for the
output folder.
"""

from __future__ import annotations

import errno
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import yaml
from tqdm import tqdm

from curate.filters import build_chain, score_fields
from curate.filters.dedup import dedup_spec
from curate.pipeline.cluster import dask_client, gpu_resources, local_gpu_count
from curate.pipeline.config import RunConfig, changed_settings, dump_config
from curate.pipeline.embeddings import merge_histograms, threshold_for_top_fraction
from curate.pipeline.errors import UserError
from curate.pipeline.executor import DaskExecutor
from curate.pipeline.layout import RunLayout
from curate.pipeline.models.clip import check_model_source
from curate.pipeline.reader import check_inputs, write_input_shards
from curate.pipeline.records import CLIP_SIMILARITY
from curate.pipeline.report.page import build_report
from curate.pipeline.shards import atomic_path, is_done, read_marker, remove_shard
from curate.pipeline.stages.dedup import finish_dedup, run_dedup_pass
from curate.pipeline.stages.download import download_shard
from curate.pipeline.stages.score import score_shard
from curate.pipeline.stages.write import write_shard

# Settings a rerun into the same output may change: where and how fast it runs, not what it writes.
MAY_CHANGE = {"dask", "download.threads"}


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
    if layout.config.exists():
        changed = changed_settings(yaml.safe_load(layout.config.read_text()) or {}, yaml.safe_load(resolved), MAY_CHANGE)
        if changed:
            raise UserError(
                f"{layout.root} holds a run made with a different config ({', '.join(changed)}); "
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
    if cfg.clip.enabled:
        check_model_source(cfg.clip.model, cfg.clip.pretrained)  # a missing model fails before any work
    gpus = local_gpu_count() if cfg.clip.enabled and cfg.clip.device in ("auto", "cuda") else 0
    with dask_client(cfg.dask, gpus) as client:  # an unreachable scheduler fails here, too
        _prepare_output(cfg, layout, overwrite)
        if client.dashboard_link:
            log(f"dask dashboard: {client.dashboard_link}")
        try:
            inputs = write_input_shards(cfg.input, files, layout.input)
            shard_stats, resolved = _run_shards(client, cfg, layout, inputs["shards"], progress)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk, or a full quota
                raise UserError(f"no space left on the device holding {layout.root}; free some and rerun to resume") from exc
            raise
        stats = merge_stats(shard_stats, inputs["rows"], time.time() - started)
        # The fields the report charts as scores: the score stage's and those the filters declare.
        clip_fields = [CLIP_SIMILARITY] if cfg.clip.enabled else []
        stats["score_fields"] = list(dict.fromkeys(clip_fields + score_fields(build_chain(cfg.filter_specs()))))
        if resolved:
            stats["resolved_thresholds"] = resolved
        dedup_stats = finish_dedup(str(layout.root), cfg.output.keep_intermediate)
        if dedup_stats:
            stats["dedup"] = dedup_stats
    with atomic_path(layout.stats) as tmp:
        tmp.write_text(json.dumps(stats, indent=1))
    build_report(layout.root)  # report.html; `curate report` rebuilds it
    return stats


def resolve_filter_specs(cfg: RunConfig, score_stats: list[dict]) -> tuple[list[dict], dict]:
    """The filter chain with each CLIP top_fraction turned into a threshold for this dataset."""
    specs, resolved = [], {}
    for spec in cfg.filter_specs():
        if spec["name"] == "clip_similarity" and spec.get("top_fraction") is not None:
            hist = merge_histograms([s["histogram"] for s in score_stats])
            threshold = threshold_for_top_fraction(hist, spec["top_fraction"])
            resolved["clip_similarity"] = {"top_fraction": spec["top_fraction"], "min_similarity": threshold}
            spec = {**spec, "top_fraction": None, "min_similarity": threshold}
        specs.append(spec)
    return specs, resolved


def needs_all_scores(cfg: RunConfig) -> bool:
    return any(f["name"] == "clip_similarity" and f.get("top_fraction") is not None for f in cfg.filter_specs())


def _run_shards(client, cfg: RunConfig, layout: RunLayout, n_shards: int, progress: bool) -> tuple[list[dict], dict]:
    executor = DaskExecutor(client)
    stages = ["download"] + (["score"] if cfg.clip.enabled else []) + ["write"]
    bars = {
        stage: tqdm(total=n_shards, desc=f"{stage:8s}", unit="shard", disable=not progress)
        for stage in stages
    }
    written: dict[int, dict] = {}
    upstream: dict[int, dict] = {}  # shard → {"download": future or stats, "score": ...}
    counted: set = set()  # keys of finished tasks already counted
    score_options = {"resources": gpu_resources(client)} if cfg.clip.enabled else {}

    def finish_submitted():
        """Wait for the tasks submitted so far and not yet counted; yields (stage, shard, result)."""
        pending = [f for f in executor.submitted if f.key not in counted]
        counted.update(f.key for f in pending)
        for stage, i, result in executor.finished(pending):
            bars[stage].update(1)
            yield stage, i, result

    try:
        for i in range(n_shards):
            if is_done(layout.shards, i):
                written[i] = read_marker(layout.shards, i)
                for bar in bars.values():
                    bar.update(1)
                if not cfg.output.keep_intermediate:
                    remove_shard(layout.download, i)  # left behind if a run died right after writing
                if cfg.clip.enabled:
                    upstream[i] = {"score": read_marker(layout.score, i)}
                continue
            downloaded = executor.submit("download", i, download_shard, str(layout.input_shard(i)), i,
                                         str(layout.download), cfg)
            upstream[i] = {"download": downloaded, "score": None}
            if cfg.clip.enabled:
                upstream[i]["score"] = executor.submit(
                    "score", i, score_shard, i, downloaded, str(layout.download), str(layout.embeddings),
                    str(layout.score), cfg.clip, **score_options,
                )

        resolved: dict = {}
        specs = cfg.filter_specs()
        if needs_all_scores(cfg):
            # The barrier: every shard's score before the threshold, the threshold before any write.
            for _ in finish_submitted():
                pass
            score_stats = [u["score"] if isinstance(u["score"], dict) else u["score"].result() for u in upstream.values()]
            specs, resolved = resolve_filter_specs(cfg, score_stats)
        if dedup_spec(specs) is not None and len(written) < n_shards:
            # Dedup's barrier: every shard downloaded (and scored) before its global pass, the
            # pass before any write. A rerun skips a finished pass (pipeline/stages/dedup.py).
            for _ in finish_submitted():
                pass
            run_dedup_pass(executor.map, str(layout.root), dedup_spec(specs), n_shards,
                           cfg.input.rows_per_shard, cfg.clip.enabled, cfg.output.keep_intermediate)
        for i, up in sorted(upstream.items()):
            if i not in written:
                executor.submit("write", i, write_shard, i, up, str(layout.root), cfg, specs)
        for stage, i, result in finish_submitted():
            if stage == "write":
                written[i] = result
    finally:
        for bar in bars.values():
            bar.close()
        executor.cancel()
    return [written[i] for i in range(n_shards)], resolved
