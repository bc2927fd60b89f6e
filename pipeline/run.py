"""`curate run`: the plan (pipeline/plan.py) run by an executor (pipeline/executor.py).

    check config, inputs and output      before any cluster starts: a refusal costs nothing
    cut the inputs into input shards     pipeline/reader.py          a task per file; a cut file's shards go on
    prepare each shard                   download ─► score           bounded number in flight
    dataset-wide passes                  those the filters declare   pipeline/passes.py
    write each shard                     write
    stats.json, report.html

Without a pass, prepare and write run as one chain per shard. The process running this
keeps a bounded number of shards in flight and sums each finished shard's stats into
running totals: its memory does not grow with the number of shards. A shard whose task
fails (after Dask's retries) is recorded as failed and the run goes on; the run then ends
with the failed shards listed and a non-zero exit, and a rerun retries just those.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from curate.filters import build_chain, score_fields
from curate.pipeline import storage
from curate.pipeline.cluster import (
    cpu_resources, dask_client, gpu_resources, gpu_workers_warmed_up, local_gpu_count, share_storage_options,
)
from curate.pipeline.config import RunConfig, changed_settings, dump_config
from curate.pipeline.errors import UserError
from curate.pipeline.executor import DaskExecutor, InProcessExecutor, ShardOutcome, Wait
from curate.pipeline.layout import RunLayout
from curate.pipeline.models.clip import check_model_source
from curate.pipeline.passes import PASSES, PassContext
from curate.pipeline.plan import Plan, uses_gpu, warm_ups
from curate.pipeline.progress import Progress
from curate.pipeline.reader import InputShards, check_inputs, has_rows, write_input_shards
from curate.pipeline.records import CLIP_SIMILARITY
from curate.pipeline.report.page import build_report
from curate.pipeline.shards import atomic_path, is_done, read_marker, remove_shard, shard_name

logger = logging.getLogger("curate")

# Settings a rerun into the same output may change: where and how fast it runs, not what it writes.
MAY_CHANGE = {"dask", "download.threads", "storage"}


def _check_output(cfg: RunConfig, layout: RunLayout, overwrite: bool) -> str:
    """Refuse an output that cannot take this run, before anything starts; returns the resolved config."""
    try:
        return _check_output_at(cfg, layout, overwrite)
    except UserError:
        raise
    except Exception as exc:  # object storage: a bucket that does not exist, credentials refused, no endpoint
        if not storage.is_url(layout.root) and not isinstance(exc, OSError):
            raise
        raise UserError(f"output.path {layout.root}: {storage.describe_error(exc)}") from exc


def _check_output_at(cfg: RunConfig, layout: RunLayout, overwrite: bool) -> str:
    local = not storage.is_url(layout.root)
    if local and Path(layout.root).exists() and not Path(layout.root).is_dir():
        raise UserError(f"output.path {layout.root} exists and is not a folder")
    if not local:
        storage.check_reachable(layout.root)
    has_config = storage.exists(layout.config)
    if overwrite and not has_config and storage.has_files(layout.root):
        # A mistyped output.path must not cost the user an unrelated folder.
        raise UserError(f"--overwrite: {layout.root} holds files but no curate run (no config.yaml); not deleting it")
    resolved = dump_config(cfg)
    if has_config and not overwrite:
        changed = changed_settings(yaml.safe_load(storage.read_text(layout.config)) or {}, yaml.safe_load(resolved), MAY_CHANGE)
        if changed:
            raise UserError(
                f"{layout.root} holds a run made with a different config ({', '.join(changed)}); "
                "rerun with --overwrite, or choose another output.path"
            )
    return resolved


def _prepare_output(layout: RunLayout, resolved: str, overwrite: bool) -> None:
    """Create the output folder (emptied with --overwrite) and save the resolved config."""
    if overwrite:
        storage.remove_tree(layout.root)
    try:
        for folder in (layout.input, layout.download, layout.shards):
            storage.make_dirs(folder)
    except OSError as exc:  # e.g. a parent is a file, or not writable
        raise UserError(f"cannot create the output folder {layout.root}: {exc.strerror or exc}") from exc
    with full_disk_stops_the_run(layout), atomic_path(layout.config) as tmp:
        tmp.write_text(resolved)


@contextmanager
def full_disk_stops_the_run(layout: RunLayout):
    """A full disk or quota, wherever the run writes (its config, a shard, stats.json, the report),
    is one clear error: no other shard would fare better, and a rerun resumes."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on the device holding {layout.root}; free some and rerun to resume") from exc
        raise


@dataclass
class RunTotals:
    """The run's stats, summed shard by shard as shards finish (nothing per shard is kept
    but the failed shards' names)."""

    rejected: Counter = field(default_factory=Counter)
    filters: dict = field(default_factory=dict)
    stage_seconds: Counter = field(default_factory=Counter)
    written: int = 0
    shards: int = 0
    bytes_downloaded: int = 0
    failed: list = field(default_factory=list)  # {"shard", "step", "error"}
    waiting: list = field(default_factory=list)  # shards prepared but not written: the run stopped before a pass
    rows: int = 0  # rows of the written shards
    input: dict = field(default_factory=dict)  # input tars: what the read stage found (pipeline/stages/read.py)

    def add(self, shard_stats: dict) -> None:
        self.shards += 1
        self.rows += shard_stats.get("rows", 0)
        _merge_input(self.input, shard_stats.get("input") or {})
        self.written += shard_stats["written"]
        self.rejected.update(shard_stats["rejected"])
        for name, counts in shard_stats.get("filters", {}).items():
            self.filters.setdefault(name, Counter()).update(counts)
        self.stage_seconds.update(shard_stats["seconds"])
        self.bytes_downloaded += shard_stats.get("bytes_downloaded", 0)

    def add_failure(self, outcome: ShardOutcome) -> None:
        self.failed.append({"shard": shard_name(outcome.shard), "step": outcome.failed_step, "error": outcome.error})

    def stats(self, rows_in: int, rows_failed: int, rows_waiting: int, seconds: float) -> dict:
        """The merged stats; rows in must equal written + rejected (+ the rows of failed and of
        waiting shards, which are not accounted for yet), or the run fails loudly."""
        total_rejected = sum(self.rejected.values())
        if self.written + total_rejected + rows_failed + rows_waiting != rows_in:
            raise RuntimeError(f"accounting mismatch: {rows_in} rows in, {self.written} written + "
                               f"{total_rejected} rejected + {rows_failed} in failed shards + "
                               f"{rows_waiting} in shards waiting for them")
        stats = {
            "rows_in": rows_in,
            "written": self.written,
            "rejected": total_rejected,
            "rejected_by_reason": dict(sorted(self.rejected.items(), key=lambda kv: (-kv[1], kv[0]))),
            "filters": {name: dict(c) for name, c in self.filters.items()},
            "shards": self.shards,
            "bytes_downloaded": self.bytes_downloaded,
            "duration_seconds": round(seconds, 3),
            "rows_per_second": round(rows_in / seconds, 2) if seconds > 0 else None,
            "images_per_second": round(self.written / seconds, 2) if seconds > 0 else None,
            "task_seconds_by_stage": {k: round(v, 3) for k, v in self.stage_seconds.items()},
        }
        if self.failed:
            stats["failed_shards"] = sorted(self.failed, key=lambda f: f["shard"])
            stats["rows_in_failed_shards"] = rows_failed
        if self.waiting:
            stats["shards_waiting"] = len(self.waiting)
            stats["rows_in_waiting_shards"] = rows_waiting
        if self.input:
            stats["input"] = self.input
        return stats


# Entries a list in stats.json's `input` keeps (truncated tars, cross-check mismatches); the counts go on.
MAX_LISTED = 100


def _merge_input(total: dict, part: dict) -> None:
    """Sum one shard's `input` stats into the run's: counts add up, {reason: n} too, lists are
    kept to MAX_LISTED entries."""
    for key, value in part.items():
        if isinstance(value, dict):
            counts = total.setdefault(key, {})
            for name, n in value.items():
                counts[name] = counts.get(name, 0) + n
        elif isinstance(value, list):
            listed = total.setdefault(key, [])
            listed.extend(value[: max(0, MAX_LISTED - len(listed))])
            total[f"{key}_count"] = total.get(f"{key}_count", 0) + len(value)
        else:
            total[key] = total.get(key, 0) + value


class _InputTars:
    """Input tars (pipeline/input_tars.py) as a source of shards: all known up front, one tar each."""

    complete = True

    def __init__(self, summary: dict):
        self.tars = summary["tars"]

    @property
    def known_shards(self) -> int:
        return len(self.tars)

    def stream(self):
        yield from enumerate(self.tars)


EMPTY = {"rows_in": 0, "written": 0, "rejected": 0, "rejected_by_reason": {}, "shards": 0, "empty_input": True}


def run(cfg: RunConfig, overwrite: bool = False, progress: bool = True, log=print,
        progress_every: float = 30.0) -> dict:
    """Run the pipeline; returns the merged stats (also written to stats.json). Failed shards
    are listed under `failed_shards`. An input without a single row is not a run: nothing is
    written and the stats say rows_in 0 (`EMPTY`). `log` gets what a user wants to see on
    stdout (the Dask dashboard's address); stderr stays for problems and progress."""
    started = time.time()
    storage.configure(cfg.storage)
    layout = RunLayout(cfg.output.path)
    # Everything that can refuse the run does so before a cluster starts and before anything is written.
    files = check_inputs(cfg.input)
    if cfg.clip.enabled:
        check_model_source(cfg.clip.model, cfg.clip.pretrained)
    resolved_config = _check_output(cfg, layout, overwrite)
    if not has_rows(cfg.input, files):
        logger.warning(f"the input ({', '.join(files)}) has no rows: nothing to do, nothing written")
        return dict(EMPTY)
    progress_options = {"enabled": progress, "every": progress_every}
    if cfg.dask.in_process:
        _prepare_output(layout, resolved_config, overwrite)
        return _run(cfg, layout, files, InProcessExecutor(), {}, {}, progress_options, started)
    gpus = local_gpu_count() if uses_gpu(cfg) else 0
    logger.debug(f"inputs checked ({len(files)} files) in {time.time() - started:.1f} s; starting the Dask client")
    with dask_client(cfg.dask, gpus) as client:  # an unreachable scheduler fails here, before anything is written
        logger.debug(f"Dask client ready after {time.time() - started:.1f} s: "
                    f"{len(client.scheduler_info().get('workers', {}))} workers")
        share_storage_options(client, cfg.storage)
        _prepare_output(layout, resolved_config, overwrite)
        if client.dashboard_link:
            log(f"dask dashboard: {client.dashboard_link}")
        try:  # the workers' warnings and errors of the `curate` logger reach this process's log
            client.forward_logging("curate", level=logging.WARNING)
        except (AttributeError, TypeError):  # an older distributed
            pass
        gpu = gpu_resources(client) if uses_gpu(cfg) else None  # {"GPU": 1} when a worker offers one
        gpu_options = {"resources": gpu} if gpu else {}
        cpu = cpu_resources(client)  # {"CPU": 1} where CPU workers say so: other tasks keep off the GPU workers
        cpu_options = {"resources": cpu} if cpu else {}
        # The GPU workers load their models (and compile) while the first shards are read.
        with gpu_workers_warmed_up(client, warm_ups(cfg) if gpu else []):
            return _run(cfg, layout, files, DaskExecutor(client, retries=cfg.dask.retries), gpu_options,
                        cpu_options, progress_options, started)


def _run(cfg: RunConfig, layout: RunLayout, files: list[str], executor, gpu_options: dict, cpu_options: dict,
         progress: dict, started: float) -> dict:
    with full_disk_stops_the_run(layout):  # wherever it writes: the input cut, a shard, stats.json, the report
        tars = cfg.input.format == "webdataset"
        if tars:  # each tar is a shard, recorded in work/input/_done.json
            inputs = _InputTars(write_input_shards(cfg.input, files, layout.input))
        else:  # cut by tasks on the executor, file by file, while the first shards already download
            inputs = InputShards(cfg.input, files, layout.input, executor)
        plan = Plan(cfg, layout, None, gpu_options, inputs.tars if tars else None, cpu_options)
        totals, resolved, finished_passes = _execute(plan, inputs, executor, progress)

        def rows(shards) -> int:
            if tars:  # input tars: a tar's samples are counted by the read stage that reads it
                return sum(read_marker(layout.download, int(s))["rows"] for s in shards
                           if is_done(layout.download, int(s)))
            return sum(inputs.rows_of(int(s)) for s in shards)  # from the per-file counts of the cut

        failed_rows, waiting_rows = rows(f["shard"] for f in totals.failed), rows(totals.waiting)
        rows_in = totals.rows + failed_rows + waiting_rows if tars else inputs.total_rows
        stats = totals.stats(rows_in, failed_rows, waiting_rows, time.time() - started)
        # The fields the report charts as scores: the score stage's and those the filters declare.
        clip_fields = [CLIP_SIMILARITY] if cfg.clip.enabled else []
        stats["score_fields"] = list(dict.fromkeys(clip_fields + score_fields(build_chain(cfg.filter_specs()))))
        if resolved:
            stats["resolved_thresholds"] = resolved
        if not totals.failed:
            for name, finish in finished_passes:
                pass_stats = finish()
                if pass_stats:
                    stats[name] = pass_stats
        with atomic_path(layout.stats) as tmp:
            tmp.write_text(json.dumps(stats, indent=1))
        build_report(layout.root)  # report.html; `curate report` rebuilds it
        return stats


def _execute(plan: Plan, inputs, executor, progress: dict) -> tuple[RunTotals, dict, list]:
    """Run the plan's chains and passes over the input's shards as they become known; returns
    the totals, the resolved thresholds and the passes' finishing steps (run after every write)."""
    cfg, layout = plan.cfg, plan.layout
    totals = RunTotals()
    meter = Progress(plan.steps, inputs.known_shards, final=inputs.complete, **progress)

    def chains(make):
        """A chain, make(shard, source), for each shard not written yet, as the input's cut hands
        them out (`Wait` passes through to the executor); written shards are counted, not redone."""
        for item in inputs.stream():
            meter.set_total(inputs.known_shards, inputs.complete)
            if isinstance(item, Wait):
                yield item
                continue
            shard, source = item
            if is_done(layout.shards, shard):  # written by an earlier run
                stats = read_marker(layout.shards, shard)
                totals.add(stats)
                for step in plan.steps:
                    meter.shard_done(step, stats)
                if not cfg.output.keep_intermediate:
                    # left behind if a run died right after writing
                    remove_shard(layout.download, shard, layout.download_files(shard).values())
                continue
            yield shard, make(shard, source)

    def consume(outcomes) -> list[int]:
        """Count each finished chain; returns the shards whose chain succeeded."""
        succeeded = []
        for outcome in outcomes:
            for step, result in outcome.results.items():
                meter.shard_done(step, result)
            if not outcome.ok:
                totals.add_failure(outcome)
                logger.error(f"shard {shard_name(outcome.shard)} failed in {outcome.failed_step}: {outcome.error}")
            else:
                succeeded.append(outcome.shard)
                if "write" in outcome.results:
                    totals.add(outcome.results["write"])
        return succeeded

    specs, resolved, finishes = cfg.filter_specs(), {}, []
    try:
        passes = plan.passes
        if not passes:
            consume(executor.run_chains("shards", chains(
                lambda shard, source: plan.prepare_tasks(shard, source) + plan.write_tasks(shard, specs, after_prepare=True))))
            return totals, resolved, finishes
        prepared = consume(executor.run_chains("prepare", chains(plan.prepare_tasks)))
        plan.n_shards = inputs.known_shards  # every file is cut by now
        if totals.failed:
            # A pass decides over every shard: with one missing it would not be exact. Stop
            # here; the prepared shards wait, and the rerun prepares the failed ones, then the
            # passes and every write run.
            totals.waiting = prepared
            return totals, resolved, finishes
        context = PassContext(cfg, layout, plan.n_shards, executor.map)  # every shard, now known
        for index, name in passes:
            result = PASSES[name](context, specs[index])
            specs = specs[:index] + [result.spec] + specs[index + 1:]
            if result.resolved:
                resolved[specs[index]["name"]] = result.resolved
            if result.finish:
                finishes.append((name, result.finish))
        consume(executor.run_chains("write", ((shard, plan.write_tasks(shard, specs, after_prepare=False))
                                              for shard in prepared)))
        return totals, resolved, finishes
    finally:
        meter.close()
