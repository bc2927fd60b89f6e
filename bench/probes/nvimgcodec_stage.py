"""Probe: nvImageCodec (nvidia-nvimgcodec) against torchvision as the score stage's GPU JPEG decoder.

torchvision's batched nvJPEG call synchronizes once per image inside nvJPEG's hardware path
(bench/probes/nvjpeg_path.py) and holds one process-wide lock; nvImageCodec drives the same hardware
engines from its own executor. This probe measures, on bench/shards_e2e.py's images:
- that both decode the same pixels (shapes equal, mean absolute difference);
- batched decode alone, 1 and 2 threads;
- the score stage (`ClipScorer.embed_all`, ViT-B-32, 1 and 2 tasks at once) with each decoder.

    python bench/probes/nvimgcodec_stage.py [--images 40000]
    python bench/probes/nvimgcodec_stage.py --variants --images 8192   # nvImageCodec's decode alone, by backend
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.probes.serial_vs_threads import scorer_and_batches, timed  # noqa: E402


def decode_rate(score, decoder: str, batches: list, threads: int, seconds: float = 3.0) -> float:
    import torch

    score.GPU_JPEG_DECODER = decoder
    for b in batches[:2]:
        score.decode_batch(b.jpgs, "cuda")
    torch.cuda.synchronize()
    stop = time.perf_counter() + seconds
    counts = [0] * threads

    def work(t: int):
        i = t
        while time.perf_counter() < stop:
            b = batches[i % len(batches)]
            score.decode_batch(b.jpgs, "cuda")
            counts[t] += len(b.jpgs)
            i += threads
        torch.cuda.synchronize()

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    return sum(counts) / (time.perf_counter() - started)


def variants(batches: list, seconds: float = 3.0) -> None:
    """nvImageCodec's batched decode alone, by backend and CPU threads, with and without making
    torch tensors of the images, on one thread."""
    import numpy as np
    import torch
    from nvidia import nvimgcodec

    params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                     sample_format=nvimgcodec.SampleFormat.P_RGB)
    arrays = [[np.frombuffer(j, np.uint8) for j in b.jpgs] for b in batches[:8]]
    stream = torch.cuda.current_stream().cuda_stream
    for name, kwargs in (("default", {}),
                         ("HW_GPU_ONLY", {"backends": [nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)]}),
                         ("HW_GPU_ONLY, 4 threads", {"backends": [nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)],
                                                     "max_num_cpu_threads": 4}),
                         ("GPU_ONLY (CUDA)", {"backends": [nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY)]})):
        decoder = nvimgcodec.Decoder(device_id=0, **kwargs)
        for to_torch in (False, True):
            def once(a):
                out = decoder.decode([nvimgcodec.CodeStream(x) for x in a], params=params, cuda_stream=stream)
                if to_torch:
                    [torch.as_tensor(im, device="cuda") for im in out if im is not None]
                return sum(im is not None for im in out)
            once(arrays[0])
            torch.cuda.synchronize()
            n, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                n += once(arrays[n // 1024 % len(arrays)])
            torch.cuda.synchronize()
            print(f"nvimgcodec {name:24s} {'with' if to_torch else 'without'} torch tensors: "
                  f"{n / (time.perf_counter() - started):9,.0f} images/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=40_000)
    parser.add_argument("--order", default="torchvision,nvimgcodec,nvimgcodec,torchvision")
    parser.add_argument("--variants", action="store_true", help="only nvImageCodec's decode alone, by backend")
    args = parser.parse_args()
    import torch

    from curate.pipeline.stages import score

    scorer, batches = scorer_and_batches(False, args.images, 1024)
    if args.variants:
        variants(batches)
        return
    first = batches[0].jpgs
    score.GPU_JPEG_DECODER = "torchvision"
    tv, tv_err = score.decode_batch(first, "cuda")
    score.GPU_JPEG_DECODER = "nvimgcodec"
    nv, nv_err = score.decode_batch(first, "cuda")
    torch.cuda.synchronize()
    same_shape = sum(a is not None and b is not None and a.shape == b.shape for a, b in zip(tv, nv))
    diff = torch.stack([(a.float() - b.float()).abs().mean() for a, b in zip(tv, nv)
                        if a is not None and b is not None and a.shape == b.shape]).mean().item()
    print(f"first batch: {len(first)} images; errors tv {sum(e is not None for e in tv_err)}, "
          f"nv {sum(e is not None for e in nv_err)}; same shape {same_shape}; nv dtype {nv[0].dtype} shape "
          f"{tuple(nv[0].shape)} strides {nv[0].stride()}; mean |tv - nv| {diff:.3f} levels", flush=True)
    for decoder in ("torchvision", "nvimgcodec"):
        for threads in (1, 2):
            print(f"decode alone, {decoder:11s} {threads} thread(s): "
                  f"{decode_rate(score, decoder, batches, threads):9,.0f} images/s", flush=True)
    for decoder in ("torchvision", "nvimgcodec"):  # warm-up of each in the stage
        score.GPU_JPEG_DECODER = decoder
        timed("stage", scorer, batches[:2], 1)
    print(f"{sum(len(b.keys) for b in batches):,} images in {len(batches)} batches, {scorer.cfg.model}", flush=True)
    for at_once in (1, 2):
        for decoder in args.order.split(","):
            score.GPU_JPEG_DECODER = decoder
            print(f"stage, {decoder:11s} {at_once} at once: {timed('stage', scorer, batches, at_once):9,.0f} images/s",
                  flush=True)
    score.GPU_JPEG_DECODER = "torchvision"
    emb_tv = [e for _, e, _, _ in scorer.embed_all(iter(batches[:3]))]
    score.GPU_JPEG_DECODER = "nvimgcodec"
    emb_nv = [e for _, e, _, _ in scorer.embed_all(iter(batches[:3]))]
    import numpy as np

    cos = np.concatenate([(a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
                          for a, b in zip(emb_tv, emb_nv)])
    print(f"image embeddings, tv vs nv: cosine min {cos.min():.5f}, mean {cos.mean():.5f}", flush=True)


if __name__ == "__main__":
    main()
