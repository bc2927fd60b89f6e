"""Probe: where a write task with the `vae_latents` filter spends its time on a GPU.

bench/vae_filter.py measured the filter inside `curate run` far below the VAE encoder alone
(107 against 560 images/s, bf16 eager, H200). This probe takes the write task apart in one
process, on the same data (bench/shards_e2e.py's tars) and VAE (bench/vae_filter.py's folder):

- normalize: the input tar's images normalized as the write stage does (sources._normalize),
  one thread and NORMALIZE_THREADS threads;
- prepare: VaeLatents.prepare (run here: no offload) over the normalized samples in chunks of
  the write stage's FILTER_BATCH, one thread, then two threads at once (a GPU worker runs two
  tasks), then two threads while other threads normalize (what the GPU worker's process did
  when the whole write ran there);
- parts of prepare for one chunk: decode + crop, pixels to the device, encode.

    python bench/probes/vae_write.py [--images 5000] [--compile]

Prints a table; writes nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.shards_e2e import log, make_shards  # noqa: E402


def timed(label: str, fn, images: int) -> float:
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    log(f"{label}: {images:,} images in {seconds:.2f} s = {images / seconds:,.0f} images/s")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--shard-size", type=int, default=5000, help="the first tar's images are the probe's")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--vae", default=None)
    parser.add_argument("--device", default="auto", help="cpu for a dry run")
    args = parser.parse_args()
    tars, _ = make_shards(args.images, args.shard_size, min(2000, args.images), os.cpu_count() or 1)

    import torch

    from bench.train import SD15_VAE
    from bench.vae_filter import make_vae_folder
    from curate.filters.latents import VaeLatents, _crop
    from curate.pipeline.config import RunConfig
    from curate.pipeline.models.latents import encode, pixels_batch
    from curate.pipeline.models.vae import cached_vae
    from curate.pipeline.sources import NORMALIZE_THREADS, _normalize
    from curate.pipeline.stages.write import FILTER_BATCH

    vae = args.vae or str(make_vae_folder("sd15-vae", SD15_VAE))
    cfg = RunConfig.model_validate({"input": {"paths": ["x.tar"], "format": "webdataset"},
                                    "output": {"path": "/tmp/unused"}, "clip": {"enabled": False},
                                    "resize": {"size": 256, "mode": "center_crop"}})
    with tarfile.open(sorted(tars.glob("*.tar"))[0]) as tar:
        data = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    n = len(data)
    log(f"{n:,} input JPEGs; torch {torch.__version__}, {torch.get_num_threads()} torch threads")

    normalized: list = []
    few = data[:500]
    timed("normalize, 1 thread", lambda: normalized.extend(_normalize(d, cfg, False) for d in few), len(few))
    with ThreadPoolExecutor(NORMALIZE_THREADS) as pool:
        normalized = []
        timed(f"normalize, {NORMALIZE_THREADS} threads", lambda: normalized.extend(
            pool.map(lambda d: _normalize(d, cfg, False), data)), n)
    jpgs = [image.data for image, _ in normalized]

    def samples():
        return [{"key": str(i), "jpg": jpg, "caption": "x", "meta": {}, "extra": {}} for i, jpg in enumerate(jpgs)]

    latents = VaeLatents(vae=vae, resolution=256, compile=args.compile, device=args.device)
    started = time.perf_counter()
    latents.prepare(samples()[:FILTER_BATCH])  # ends with a copy to the host: synchronized
    log(f"first chunk (load, cuDNN benchmark{', compile' if args.compile else ''}): {time.perf_counter() - started:.1f} s")

    def run_prepare(chunks):
        for chunk in chunks:
            latents.prepare(chunk)

    def chunks_of(items):
        return [items[i:i + FILTER_BATCH] for i in range(0, len(items), FILTER_BATCH)]

    timed("prepare, 1 thread", lambda: run_prepare(chunks_of(samples())), n)

    def two_threads():
        items = samples()
        half = len(items) // 2
        threads = [threading.Thread(target=run_prepare, args=(chunks_of(part),)) for part in (items[:half], items[half:])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    timed("prepare, 2 threads at once", two_threads, n)

    stop = threading.Event()

    def busy_normalizing():
        i = 0
        while not stop.is_set():
            _normalize(data[i % n], cfg, False)
            i += 1

    others = [threading.Thread(target=busy_normalizing) for _ in range(2 * NORMALIZE_THREADS)]
    for t in others:
        t.start()
    timed(f"prepare, 2 threads at once, {len(others)} threads normalizing beside", two_threads, n)
    stop.set()
    for t in others:
        t.join()

    # One chunk's parts.
    loaded = cached_vae(latents.vae, latents.tiny_seed, latents.device, latents.precision, latents.compile)
    vae_model, device = loaded.compiled or loaded.vae, loaded.device
    chunk = samples()[:32]
    reps = 20
    timed("  decode + crop (4 threads)", lambda: [list(ThreadPoolExecutor(4).map(
        lambda s: _crop(s["jpg"], (256, 256)), chunk)) for _ in range(reps)], 32 * reps)
    crops = [c for c, _ in (_crop(s["jpg"], (256, 256)) for s in chunk)]

    def to_device():
        for _ in range(reps):
            pixels_batch(crops, device, loaded.dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()

    timed("  pixels to the device", to_device, 32 * reps)
    pixels = pixels_batch(crops, device, loaded.dtype)

    def encode_only():
        with torch.no_grad():
            for _ in range(reps):
                encode(vae_model, pixels)
        if device.type == "cuda":
            torch.cuda.synchronize()

    timed("  encode", encode_only, 32 * reps)
    log("done")


if __name__ == "__main__":
    main()
