"""Probe: one GPU worker process with two score tasks, or several processes on the one GPU?

A CUDA trace of the score stage (stage_profile.py, H200, session 13) showed the GPU ~50% busy while
two tasks score ViT-B-32 on bench/shards_e2e.py's images, and per image, inside torchvision's nvJPEG
decoder (one per process, behind a lock): a pageable host-to-device copy, an event synchronize and
a conversion kernel, with the Huffman stage on the CPU. Several processes each have their own
decoder and their own GIL. This probe runs the stage (`ClipScorer.embed_all`, as serial_vs_threads.py
times it) in P processes x K tasks at once, all on the same GPU, over the same images in total,
each process started at the same moment, and prints the images/s of them all together.

    python bench/probes/score_processes.py [--images 40000] [--configs 1x2,2x1,2x2,3x1,1x2]
    python bench/probes/score_processes.py --quick   # CPU dry run: tiny CLIP
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _process(conn, quick: bool, images: int, batch: int) -> None:
    """One scoring process: loads the model and the batches, then runs each round it is sent."""
    sys.path.insert(0, str(REPO))
    from bench.probes.serial_vs_threads import scorer_and_batches, timed

    scorer, batches = scorer_and_batches(quick, images, batch)
    timed("stage", scorer, batches[:2], 1)  # warm-up: kernels, nvJPEG, allocator
    conn.send("ready")
    while True:
        message = conn.recv()
        if message is None:
            return
        start_at, index, processes, tasks = message
        part = batches[index::processes]
        time.sleep(max(0.0, start_at - time.time()))
        timed("stage", scorer, part, tasks)
        conn.send((sum(len(b.keys) for b in part), time.time()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="default 40000 (quick 600)")
    parser.add_argument("--batch", type=int, default=None, help="default 1024 (quick 64)")
    parser.add_argument("--configs", default="1x2,2x1,2x2,3x1,1x2", help="PROCESSESxTASKS, comma-separated")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    images = args.images or (600 if args.quick else 40_000)
    batch = args.batch or (64 if args.quick else 1024)
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    from bench.probes.serial_vs_threads import scorer_and_batches

    scorer_and_batches(args.quick, 0, batch)  # the data, made once before the processes read it
    context = multiprocessing.get_context("spawn")
    pipes = []
    for _ in range(max(p for p, _ in configs)):
        ours, theirs = context.Pipe()
        context.Process(target=_process, args=(theirs, args.quick, images, batch), daemon=True).start()
        pipes.append(ours)
    for pipe in pipes:
        assert pipe.recv() == "ready"
    print(f"{images:,} images in batches of {batch}, {'tiny CLIP on the CPU' if args.quick else 'ViT-B-32 on cuda'}",
          flush=True)
    for processes, tasks in configs:
        start_at = time.time() + 0.5
        for index in range(processes):
            pipes[index].send((start_at, index, processes, tasks))
        done = [pipes[index].recv() for index in range(processes)]
        total, last = sum(n for n, _ in done), max(t for _, t in done)
        print(f"{processes} process(es) x {tasks} task(s): {total / (last - start_at):9,.0f} images/s", flush=True)
    for pipe in pipes:
        pipe.send(None)


if __name__ == "__main__":
    main()
