"""Probe: which of nvJPEG's two paths torchvision's batched `decode_jpeg(device="cuda")` takes for
bench/shards_e2e.py's images on this GPU, and what the encoded bytes' memory costs it.

torchvision sorts a batch in two: JPEGs that `nvjpegDecodeBatchedSupported` accepts go to the GPU's
hardware JPEG engines in one batched call (A100, H100, H200 have them); the rest are decoded one by
one in software, each with a host-side Huffman pass, a host-to-device copy and a stream
synchronization. Session 13's CUDA trace of the score stage showed a copy and a synchronization per
image, which is what the software path does. This probe tells which path the images take and why:

- whether the hardware backend can be created here (`nvjpegCreateEx(NVJPEG_BACKEND_HARDWARE)`), and
  how many of the images, and of the same images saved other ways, the hardware path accepts;
- batched decode rates from pageable bytes (what the reader's mapped tar gives) and from one pinned
  buffer, one thread and two; the CUDA runtime calls of one batch in each case;
- `nvidia-smi dmon`'s utilization of the JPEG engines (the `jpg` column) while the decoder runs.

    python bench/probes/nvjpeg_path.py [--images 4096] [--batch 1024]
    python bench/probes/nvjpeg_path.py --quick   # CPU dry run: the data and the encodings only
"""

from __future__ import annotations

import argparse
import ctypes
import io
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.shards_e2e import _unique_image  # noqa: E402

NVJPEG_BACKEND_DEFAULT, NVJPEG_BACKEND_HARDWARE = 0, 3
NVJPEG_STATUS_SUCCESS = 0


def jpegs(n: int) -> list[bytes]:
    """shards_e2e's unique images (256-512 px, quality 92/93, Pillow's defaults: baseline 4:2:0)."""
    with Pool(os.cpu_count() or 1) as pool:
        return [jpg for jpg, *_ in pool.map(_unique_image, range(n), chunksize=16)]


def reencoded(jpgs: list[bytes], **save) -> list[bytes]:
    from PIL import Image

    out = []
    for jpg in jpgs:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(jpg)).save(buffer, "JPEG", **save)
        out.append(buffer.getvalue())
    return out


def loaded_nvjpeg() -> str | None:
    """The libnvjpeg this process has loaded (torchvision's copy, after its first GPU decode)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libnvjpeg" in line:
                return line.split()[-1]
    return None


class Nvjpeg:
    """The few nvJPEG calls torchvision makes to choose a path, through ctypes."""

    def __init__(self, path: str, backend: int):
        self.lib = ctypes.CDLL(path)
        self.handle = ctypes.c_void_p()
        self.status = self.lib.nvjpegCreateEx(backend, None, None, 0, ctypes.byref(self.handle))
        self.stream = ctypes.c_void_p()
        if self.status == NVJPEG_STATUS_SUCCESS:
            self.lib.nvjpegJpegStreamCreate(self.handle, ctypes.byref(self.stream))

    def batched_supported(self, jpg: bytes) -> int:
        """0 where the hardware path takes the image (nvjpegDecodeBatchedSupported's convention)."""
        buf = ctypes.create_string_buffer(jpg, len(jpg))
        status = self.lib.nvjpegJpegStreamParseHeader(self.handle, buf, ctypes.c_size_t(len(jpg)), self.stream)
        if status != NVJPEG_STATUS_SUCCESS:
            return -100 - status
        flag = ctypes.c_int(-1)
        status = self.lib.nvjpegDecodeBatchedSupported(self.handle, self.stream, ctypes.byref(flag))
        return flag.value if status == NVJPEG_STATUS_SUCCESS else -200 - status

    def subsampling(self, jpg: bytes) -> int:
        comps, css = ctypes.c_int(), ctypes.c_int()
        widths, heights = (ctypes.c_int * 4)(), (ctypes.c_int * 4)()
        self.lib.nvjpegGetImageInfo(self.handle, jpg, ctypes.c_size_t(len(jpg)), ctypes.byref(comps),
                                    ctypes.byref(css), widths, heights)
        return css.value


class Dmon:
    """`nvidia-smi dmon -s u` in the background: the engines' utilization once a second."""

    def __init__(self):
        self.lines: list[str] = []
        self.proc = None

    def __enter__(self):
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1"], stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return self
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def rate(decode, batches: list, threads: int, seconds: float) -> float:
    import torch

    for b in batches[:2]:
        decode(b)
    torch.cuda.synchronize()
    stop = time.perf_counter() + seconds
    counts = [0] * threads

    def work(t: int):
        i = t
        while time.perf_counter() < stop:
            decode(batches[i % len(batches)])
            counts[t] += len(batches[i % len(batches)])
            i += threads

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    torch.cuda.synchronize()
    return sum(counts) / (time.perf_counter() - started)


def runtime_calls(decode, batch) -> str:
    """The CUDA runtime calls and memory copies of one batched decode, counted (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    decode(batch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decode(batch)
        torch.cuda.synchronize()
    rows = [(e.key, e.count) for e in prof.key_averages()
            if e.key.startswith(("cuda", "Memcpy", "Memset")) and e.count]
    return ", ".join(f"{k} {c}" for k, c in sorted(rows, key=lambda r: -r[1])[:10])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="CPU dry run: data and encodings only")
    args = parser.parse_args()
    n = 64 if args.quick else args.images
    started = time.perf_counter()
    data = jpegs(n)
    print(f"{n:,} JPEGs, mean {sum(map(len, data)) / n / 1024:.1f} KB, made in {time.perf_counter() - started:.1f} s",
          flush=True)
    kinds = {"as made (q92/93, 4:2:0 baseline)": data[:256],
             "4:4:4": reencoded(data[:256], quality=92, subsampling=0),
             "optimize": reencoded(data[:256], quality=92, optimize=True),
             "progressive": reencoded(data[:256], quality=92, progressive=True)}
    if args.quick:
        print({k: sum(map(len, v)) // len(v) for k, v in kinds.items()})
        return

    import numpy as np
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
    decode_jpeg([torch.frombuffer(bytearray(data[0]), dtype=torch.uint8)], mode=ImageReadMode.RGB, device="cuda")
    path = loaded_nvjpeg()
    print("libnvjpeg loaded:", path, flush=True)
    if path:
        for name, backend in (("hardware", NVJPEG_BACKEND_HARDWARE), ("default", NVJPEG_BACKEND_DEFAULT)):
            lib = Nvjpeg(path, backend)
            version = (ctypes.c_int(), ctypes.c_int(), ctypes.c_int())
            for i, v in enumerate(version):
                lib.lib.nvjpegGetProperty(i, ctypes.byref(v))
            print(f"nvjpegCreateEx({name}) status {lib.status} (0 success, 7 arch mismatch); "
                  f"nvJPEG {'.'.join(str(v.value) for v in version)}", flush=True)
            if lib.status == NVJPEG_STATUS_SUCCESS and backend == NVJPEG_BACKEND_HARDWARE:
                for kind, jpgs in kinds.items():
                    flags = [lib.batched_supported(j) for j in jpgs]
                    subs = sorted({lib.subsampling(j) for j in jpgs})
                    print(f"  {kind:34s} hardware path takes {flags.count(0)}/{len(flags)} "
                          f"(flags seen {sorted(set(flags))}; chroma subsampling enum {subs})", flush=True)

    batches = [data[i:i + args.batch] for i in range(0, n - args.batch + 1, args.batch)]
    pageable = [[torch.from_numpy(np.frombuffer(j, np.uint8).copy()) for j in b] for b in batches]

    def pinned_views(b: list[bytes]):
        flat = torch.empty(sum(map(len, b)), dtype=torch.uint8, pin_memory=True)
        views, at = [], 0
        for j in b:
            flat[at:at + len(j)] = torch.frombuffer(bytearray(j), dtype=torch.uint8)
            views.append(flat[at:at + len(j)])
            at += len(j)
        return views

    pinned = [pinned_views(b) for b in batches]
    staging = torch.empty(sum(map(len, data)), dtype=torch.uint8, pin_memory=True)

    def staged(b):  # the copy into a pinned buffer counted in the time, as the score stage would do it
        views, at = [], 0
        for t in b:
            staging[at:at + len(t)].copy_(t)
            views.append(staging[at:at + len(t)])
            at += len(t)
        return decode_jpeg(views, mode=ImageReadMode.RGB, device="cuda")

    def staged_numpy(b):  # one numpy copy into a pinned buffer, torch.split views of it
        total = sum(len(t) for t in b)
        np.concatenate([t.numpy() for t in b], out=staging.numpy()[:total])
        return decode_jpeg(list(torch.split(staging[:total], [len(t) for t in b])), mode=ImageReadMode.RGB,
                           device="cuda")

    def plain(b):
        return decode_jpeg(b, mode=ImageReadMode.RGB, device="cuda")

    with Dmon() as dmon:
        for label, fn, source in (("pageable", plain, pageable), ("pinned", plain, pinned),
                                  ("pageable, staged into pinned", staged, pageable),
                                  ("pageable, staged by one numpy copy", staged_numpy, pageable)):
            for threads in (1, 2):
                if label.startswith("pageable, staged") and threads == 2:
                    continue  # one staging buffer
                r = rate(fn, source, threads, args.seconds)
                print(f"batched decode, {label:34s} {threads} thread(s): {r:9,.0f} images/s", flush=True)
        one = {kind: [torch.from_numpy(np.frombuffer(j, np.uint8).copy()) for j in jpgs]
               for kind, jpgs in kinds.items()}
        for kind, b in one.items():
            r = rate(plain, [b], 1, args.seconds / 2)
            print(f"batched decode of 256, {kind:34s}: {r:9,.0f} images/s", flush=True)
    print("calls, pageable batch:", runtime_calls(plain, pageable[0]), flush=True)
    print("calls, pinned batch:  ", runtime_calls(plain, pinned[0]), flush=True)
    print("nvidia-smi dmon -s u over the rates above:")
    for line in dmon.lines[:2] + dmon.lines[2:][-60:]:
        print("  " + line.rstrip())


if __name__ == "__main__":
    main()
