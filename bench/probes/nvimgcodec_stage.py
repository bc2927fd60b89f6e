"""Probe: nvImageCodec (nvidia-nvimgcodec, not a curate dependency) against torchvision as a GPU JPEG
decoder for the score stage, on bench/shards_e2e.py's images in batches of 1,024: each one's batched
decode alone, one thread; nvImageCodec by backend and CPU threads, with and without making torch
tensors of its images (`torch.as_tensor` over `__cuda_array_interface__`).

torchvision's batched nvJPEG call synchronizes once per image inside nvJPEG's hardware path
(bench/probes/nvjpeg_path.py) and holds one process-wide lock; nvImageCodec drives the same hardware
engines from its own executor. The stage with nvImageCodec in place of torchvision was measured by the
commit that added this probe (score.GPU_JPEG_DECODER, reverted after: it was slower; BENCHMARKS.md).

    pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg   # (-cu12 for a CUDA 12 torch)
    python bench/probes/nvimgcodec_stage.py [--images 8192]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.probes.serial_vs_threads import scorer_and_batches  # noqa: E402


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
        try:
            decoder = nvimgcodec.Decoder(device_id=0, **kwargs)
        except RuntimeError as exc:  # e.g. a backend this build or GPU does not offer
            print(f"nvimgcodec {name:24s} not created: {exc}", flush=True)
            continue
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


def torchvision_rate(batches: list, seconds: float = 3.0) -> None:
    """The score stage's own decode (torchvision's batched nvJPEG call) alone, one thread, for comparison."""
    import torch

    from curate.pipeline.stages.score import decode_batch

    decode_batch(batches[0].jpgs, "cuda")
    torch.cuda.synchronize()
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        n += len(decode_batch(batches[n // 1024 % len(batches)].jpgs, "cuda")[0])
    torch.cuda.synchronize()
    print(f"torchvision (score.decode_batch)   with torch tensors: {n / (time.perf_counter() - started):9,.0f} images/s",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8192)
    args = parser.parse_args()
    _, batches = scorer_and_batches(False, args.images, 1024)
    torchvision_rate(batches)
    variants(batches)


if __name__ == "__main__":
    main()
