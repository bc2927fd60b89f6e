"""What `curate run` does, declared as data: the per-shard tasks and the dataset-wide passes.

    prepare (per shard)   download ─► score (if clip.enabled; on GPU workers when there are any)
                          (input tars: read ─► score; the read stage stands for the download)
    passes                 those the configured filters declare (pipeline/passes.py), in chain order
    write (per shard)      write (sample filters, final tar + parquet)

Without a pass, prepare and write run as one chain per shard, so shards pipeline through the
stages (downloading one overlaps scoring another). With a pass, every shard is prepared
first, then the passes run, then the writes. An executor (pipeline/executor.py) runs the
chains; pipeline/run.py drives them. The plan holds no per-shard state: tasks are made as
they are submitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from curate.filters import FILTERS, build_chain
from curate.pipeline.config import RunConfig
from curate.pipeline.executor import UPSTREAM, Task
from curate.pipeline.layout import RunLayout
from curate.pipeline.stages.download import download_shard
from curate.pipeline.stages.read import read_shard
from curate.pipeline.stages.score import score_shard, warm_up_scoring
from curate.pipeline.stages.write import write_shard


def gpu_filter_specs(specs: list[dict]) -> list[dict]:
    """The specs of the sample filters that need a GPU (vae_latents): their batches go to GPU workers.
    Asked of the filter classes (both are class attributes): the driver asks it for every shard,
    and building the chain would construct every filter each time."""
    return [spec for spec in specs if FILTERS[spec["name"]].needs_gpu and FILTERS[spec["name"]].stage == "sample"]


def needs_gpu_filter(specs: list[dict]) -> bool:
    return bool(gpu_filter_specs(specs))


def scores_on_gpu(cfg: RunConfig) -> bool:
    """CLIP scoring, unless put on the CPU."""
    return cfg.clip.enabled and cfg.clip.device in ("auto", "cuda")


def uses_gpu(cfg: RunConfig) -> bool:
    """Whether the run has GPU work, so that the embedded cluster gets GPU workers and GPU tasks
    ask for them: CLIP scoring on the GPU, or a sample filter that needs a GPU."""
    return scores_on_gpu(cfg) or needs_gpu_filter(cfg.filter_specs())


def warm_ups(cfg: RunConfig) -> list[tuple]:
    """(function, args) calls a GPU worker makes as soon as it joins the run (pipeline/cluster.py
    `WarmUp`): the imports, model loads and compiling its first GPU task would otherwise wait for."""
    calls = []
    if scores_on_gpu(cfg):
        calls.append((warm_up_scoring, (cfg.clip,)))
    gpu_filters = gpu_filter_specs(cfg.filter_specs())
    if gpu_filters:
        calls.append((warm_up_filters, (gpu_filters, {"buckets": cfg.resize.mode == "buckets"})))
    return calls


def warm_up_filters(specs: list[dict], context: dict) -> None:
    for f in build_chain(specs):
        f.warm_up(context)


@dataclass
class Plan:
    cfg: RunConfig
    layout: RunLayout
    n_shards: Optional[int]  # known once every input file is cut (pipeline/reader.py InputShards)
    gpu_options: dict  # Dask options of GPU tasks, e.g. {"resources": {"GPU": 1}}, or {}
    input_tars: Optional[list[str]] = None  # existing shards as input: shard N reads input_tars[N]
    # Dask options of the other tasks: {"resources": {"CPU": 1}} where CPU workers say so (the
    # embedded GPU layout), so that no download, read or write takes a GPU worker's thread
    # while score tasks wait for it; else {} (any worker).
    cpu_options: dict = field(default_factory=dict)

    @property
    def passes(self) -> list[tuple[int, str]]:
        """(index in the filter chain, pass name) of the dataset-wide passes the filters need."""
        return [(i, f.dataset_pass) for i, f in enumerate(build_chain(self.cfg.filter_specs()))
                if f.needs_dataset_pass()]

    @property
    def steps(self) -> list[str]:
        first = "download" if self.input_tars is None else "read"
        return [first] + (["score"] if self.cfg.clip.enabled else []) + ["write"]

    def prepare_tasks(self, shard: int, source: str) -> list[Task]:
        """`source`: the shard's input shard (URL lists), or its input tar."""
        layout, cfg = self.layout, self.cfg
        if self.input_tars is None:
            tasks = [Task("download", download_shard, (source, shard, str(layout.download), cfg), self.cpu_options)]
        else:  # no download: the read stage records where each image lies in the input tar
            tasks = [Task("read", read_shard, (source, shard, str(layout.download), cfg), self.cpu_options)]
        if cfg.clip.enabled:
            tasks.append(Task("score", score_shard, (shard, UPSTREAM, str(layout.download), str(layout.embeddings),
                                                     str(layout.score), cfg.clip), self.gpu_options))
        return tasks

    def write_tasks(self, shard: int, specs: list[dict], after_prepare: bool) -> list[Task]:
        """The write task; chained after the prepare tasks when they run in the same chain."""
        # A sample filter that needs a GPU (vae_latents) sends its batches to the GPU workers; the
        # write itself (normalizing images: CPU work) stays on a CPU worker (pipeline/offload.py).
        offload = self.gpu_options.get("resources") if needs_gpu_filter(specs) else None
        args = (shard, str(self.layout.root), self.cfg, specs, offload) + ((UPSTREAM,) if after_prepare else ())
        return [Task("write", write_shard, args, self.cpu_options)]
