"""Probe: the score stage alone over existing shards, to tell the stage's own limit from the run's.

bench/shards_e2e.py measures `curate run` over input tars (256-512 px images, ~32 KB): ViT-B-32 scored
~7,100 images/s once started (H200, session 11), while bench/clip_score.py measured the score stage
alone at 11,355 images/s, but over download shards of 256-px images (~18 KB): smaller JPEGs, fewer
pixels to decode. This probe runs the stage alone on shards_e2e's data, in one process, as a Dask
GPU worker runs it, with nothing else on the machine:

- the read stage (`read_shard`, the run's header-only `resolution` filter) over every tar, in a
  process pool, untimed: it leaves what the score stage reads (the parquet of offsets);
- one shard scored untimed (model load, nvJPEG handles, kernels);
- then every shard scored with `score_shard`, K at a time in threads (K = --at-once, e.g. 1,2,3;
  the run uses SCORE_TASKS_PER_GPU = 2): images/s over the whole pass, and per task its seconds, its
  embedding seconds, and what came after the embedding (writing the four fsync'd files).

If the stage alone does about what the run's scoring span does, the run is not what holds it back;
the decoding of these images is.

    python bench/probes/score_input_tars.py [--images 100000] [--model ViT-B-32] [--at-once 1,2,3]
    python bench/probes/score_input_tars.py --quick     # CPU dry run: tiny CLIP, 2,000 images

Prints a table; writes nothing else (bench-work/ only).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.shards_e2e import MIN_SIDE, curate_config, log, make_shards  # noqa: E402

WORK = REPO / "bench-work" / "score-input-tars"


def _read(job: tuple) -> int:
    from curate.pipeline.config import RunConfig
    from curate.pipeline.stages.read import read_shard

    tar, shard, stage_dir, config = job
    read_shard(tar, shard, stage_dir, RunConfig.model_validate(config))
    return shard


def score_pass(stage_dir: Path, shards: list[int], out: Path, clip_cfg, at_once: int) -> dict:
    from curate.pipeline.stages.score import score_shard

    shutil.rmtree(out, ignore_errors=True)

    def one(shard: int) -> dict:
        return score_shard(shard, {}, str(stage_dir), str(out / "emb"), str(out / "markers"), clip_cfg)

    started = time.perf_counter()
    with ThreadPoolExecutor(at_once) as pool:
        results = list(pool.map(one, shards))
    seconds = time.perf_counter() - started
    images = sum(r["scored"] + r["decode_errors"] for r in results)
    tasks = [r["seconds"] for r in results]
    after = [r["seconds"] - r["embed_seconds"] for r in results]
    return {"at_once": at_once, "images": images, "seconds": seconds, "rate": images / seconds,
            "task_mean": sum(tasks) / len(tasks), "task_max": max(tasks),
            "after_mean": sum(after) / len(after), "after_max": max(after),
            "reserved": max(r.get("gpu_peak_reserved_gib", 0) for r in results),
            "helped": sum(r.get("helper_decoded", 0) for r in results),
            "retries": max(r.get("gpu_alloc_retries", 0) for r in results)}  # the process's count so far


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="images in the tars (default 100000; quick 2000)")
    parser.add_argument("--shard-size", type=int, default=None, help="samples per tar (default 10000; quick 500)")
    parser.add_argument("--unique", type=int, default=None, help="distinct JPEGs, repeated (default 4000; quick 200)")
    parser.add_argument("--model", default=None, help="open_clip name (default ViT-B-32)")
    parser.add_argument("--batch", type=int, default=None, help="clip.batch_size (default 1024; quick 64)")
    parser.add_argument("--at-once", default="1,2,3", help="score tasks at a time, one pass each (default 1,2,3)")
    parser.add_argument("--decode-processes", default="auto",
                        help="clip.decode_processes, one pass per value and per --at-once (e.g. 0,auto)")
    parser.add_argument("--quick", action="store_true", help="CPU dry run: curate's tiny CLIP, 2,000 images")
    args = parser.parse_args()
    from curate.pipeline.models.clip import TINY_CLIP

    cores = os.cpu_count() or 1
    images = args.images or (2_000 if args.quick else 100_000)
    shard_size = args.shard_size or (500 if args.quick else 10_000)
    unique = min(args.unique or (200 if args.quick else 4_000), images)
    model = args.model or (TINY_CLIP if args.quick else "ViT-B-32")
    batch = args.batch or (64 if args.quick else 1024)
    tars_dir, info = make_shards(images, shard_size, unique, cores)
    tars = sorted(str(p) for p in tars_dir.glob("*.tar"))

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    config = curate_config(model, tars_dir, WORK / "run", device, batch)
    stage_dir = WORK / "run" / "work" / "download"
    shutil.rmtree(WORK / "run", ignore_errors=True)
    stage_dir.mkdir(parents=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(min(cores, len(tars))) as pool:
        list(pool.map(_read, [(tar, i, str(stage_dir), config) for i, tar in enumerate(tars)]))
    log(f"read stage: {len(tars)} tars in {time.perf_counter() - started:.1f} s (untimed below); "
        f"resolution filter min_side {MIN_SIDE}")

    from curate.pipeline.config import RunConfig

    clip_cfg = RunConfig.model_validate(config).clip
    shards = list(range(len(tars)))
    warm = score_pass(stage_dir, shards[:1], WORK / "warm-up", clip_cfg, 1)
    log(f"warm-up: one shard in {warm['seconds']:.1f} s (model load included)")
    rows = []
    for helpers in [x.strip() for x in args.decode_processes.split(",") if x.strip()]:
        cfg = clip_cfg.model_copy(update={"decode_processes": helpers if helpers == "auto" else int(helpers)})
        for k in [int(x) for x in args.at_once.split(",") if x.strip()]:
            result = dict(score_pass(stage_dir, shards, WORK / f"pass-{k}", cfg, k), helpers=helpers)
            rows.append(result)
            log(f"{k} at a time, decode_processes {helpers}: {result['images']:,} images in {result['seconds']:.1f} s "
                f"= {result['rate']:,.0f} images/s, {result['helped']:,} decoded by helpers")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\nscore stage alone over {len(tars)} input tars of {shard_size:,} ({info['images']:,} images, "
          f"mean {info.get('mean_kb', 0):.1f} KB), {model}, batch {batch}, {device} ({name})\n")
    print("| decode_processes | images decoded by helpers | score tasks at once | images/s | task s (mean / max) | after embedding s (mean / max) "
          "| peak reserved GiB | allocator retries (process, so far) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['helpers']} | {r['helped']:,} | {r['at_once']} | {r['rate']:,.0f} | {r['task_mean']:.2f} / {r['task_max']:.2f} | "
              f"{r['after_mean']:.2f} / {r['after_max']:.2f} | {r['reserved']} | {r['retries']} |")


if __name__ == "__main__":
    main()
