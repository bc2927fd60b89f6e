"""Dataset-wide passes: the decisions that depend on every shard, taken after every shard is
downloaded (and scored) and before any is written.

A filter that needs one names it in its `dataset_pass` (filters/base.py); `curate run` runs
the passes of the configured chain in chain order, each with a `PassContext`, and hands the
write stage the filter specs the passes returned. Adding a dataset-wide filter is a filter
and an entry in PASSES: nothing in the orchestration (pipeline/run.py) changes.

A pass reads what the per-shard stages left on disk (done-markers, hashes), one shard at a
time, so the process running `curate run` holds no per-shard results in memory; it may run
its own tasks on the cluster through `ctx.map`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from curate.pipeline.config import RunConfig
from curate.pipeline.embeddings import HIST_BINS, threshold_for_top_fraction
from curate.pipeline.layout import RunLayout
from curate.pipeline.shards import is_done, read_marker
from curate.pipeline.stages.dedup import finish_dedup, run_dedup_pass


@dataclass
class PassContext:
    cfg: RunConfig
    layout: RunLayout
    n_shards: int
    map: Callable  # executor.map(step, fn, arg_tuples): tasks on the cluster, results in order


@dataclass
class PassResult:
    spec: dict                                   # the filter's spec for the write stage
    resolved: Optional[dict] = None              # recorded in stats.json under resolved_thresholds
    finish: Optional[Callable[[], Optional[dict]]] = None  # after every write; its stats go under the pass's name


def clip_top_fraction(ctx: PassContext, spec: dict) -> PassResult:
    """A top_fraction of the CLIP similarity becomes the threshold that keeps that fraction of
    the whole dataset: the score stage's per-shard histograms (in its done-markers) merged."""
    total = np.zeros(HIST_BINS, dtype=np.int64)
    for shard in range(ctx.n_shards):
        if not is_done(ctx.layout.score, shard):
            raise RuntimeError(f"clip top_fraction: shard {shard:05d} has not been scored")
        for index, count in read_marker(ctx.layout.score, shard)["histogram"].items():
            total[int(index)] += count
    threshold = threshold_for_top_fraction(total, spec["top_fraction"])
    return PassResult(
        spec={**spec, "top_fraction": None, "min_similarity": threshold},
        resolved={"top_fraction": spec["top_fraction"], "min_similarity": threshold},
    )


def dedup(ctx: PassContext, spec: dict) -> PassResult:
    """The dedup filter's global pass (pipeline/stages/dedup.py); skipped when already done."""
    root = str(ctx.layout.root)
    run_dedup_pass(ctx.map, root, spec, ctx.n_shards, ctx.cfg.input.rows_per_shard, ctx.cfg.clip.enabled,
                   ctx.cfg.output.keep_intermediate)
    return PassResult(spec=spec, finish=lambda: finish_dedup(root, ctx.cfg.output.keep_intermediate))


# A filter's `dataset_pass` name → the pass.
PASSES: dict[str, Callable[[PassContext, dict], PassResult]] = {
    "clip_top_fraction": clip_top_fraction,
    "dedup": dedup,
}
