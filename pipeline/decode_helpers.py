"""Decoding helpers: processes that decode part of each score batch on the host's cores, beside the GPU.

Why: over existing shards (256-512 px JPEGs), nvJPEG decoding plus the GPU preprocessing cost a
GPU about as much time per image as ViT-B-32 itself, and the two do not overlap (the decoder waits
on small kernels behind the model's: BENCHMARKS.md). The cores that would sit idle decode part of
every batch to the model's input size, so the GPU decodes less.

How a batch is split, with nothing to tune per host: the score stage offers each batch to the
helpers a few batches before a GPU thread prepares it (`BatchShare.offer`). Helpers take it from its
end, CHUNK images at a time, newest batch first. When the preparing thread comes to the batch it
takes what is left, a prefix (`take`), decodes that itself, and waits only for the chunks that are in
a helper at that moment (`helped`). A fast host's helpers take much of each batch, a slow one's
little. A chunk a helper could not do (the helper died) comes back as None and the preparing thread
decodes it; an image that does not decode comes back as its error, as from the in-process decoder.

The pixels are what `gpu_preprocess` (pipeline/stages/score.py) computes, rounded to uint8: the
image decoded to RGB, the center square (the whole image for "squash"), torch's antialiased bicubic
resize on uint8 in channels-last order (vectorized: ~4x Pillow's resize on one core).

Helpers are plain subprocesses speaking pipeline/frames.py over stdin/stdout, as the score readers
(pipeline/score_reader.py) do, and for the same reason: Dask's worker processes are daemonic.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from curate.pipeline import frames

# Images per helper request: small enough that the preparing thread rarely waits on one in flight,
# big enough that a request's overhead (a frame each way) stays a small part of its ~50 ms.
CHUNK = 32
# Batches offered to the helpers ahead of those being prepared: how far ahead they may work.
OFFER_AHEAD = 4
# Helpers run a little below the scoring process (nice 0), above the CPU workers beside a GPU
# (pipeline/background_worker.py, 10): the thread that feeds the GPU comes first, then these.
HELPER_NICENESS = 5
# Cores left to the scoring process and its reader processes when the count is "auto".
CORES_KEPT = 3
MAX_HELPERS = 16
# Seconds a preparing thread waits for a helper's chunk before it kills the helper and decodes the chunk
# itself (a chunk takes ~50 ms; a new helper's first one waits for its imports, seconds).
CHUNK_TIMEOUT = 60.0
# Linux's fcntl for a pipe's buffer size: a chunk's pixels (~5 MB) in 1 MB reads instead of 64 KB ones.
F_SETPIPE_SZ = 1031


def decode_for_clip(data, size: int, squash: bool) -> np.ndarray:
    """One image as the model's input: uint8 [size, size, 3]. JPEGs are decoded by torchvision's
    libjpeg-turbo decoder (~1.4x faster than Pillow's here, the same pixels), other formats and the
    JPEGs it refuses by Pillow."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    # Pillow reads the header first, for every format: its decompression-bomb limit applies as on the
    # in-process CPU path (torchvision's decoder has none).
    with Image.open(io.BytesIO(data)) as im:
        x = None
        if im.format == "JPEG":
            with contextlib.suppress(Exception):
                x = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        if x is None:
            x = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)  # writable: torch warns on read-only
    # Both are (3, H, W) over H, W, 3 memory: channels-last, the layout of torch's vectorized uint8 resize.
    _, h, w = x.shape
    if not squash:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[:, top:top + side, left:left + side]
    # Contiguous channels-last: then the resize's output is channels-last too, and [size, size, 3] as it lies.
    x = x[None].contiguous(memory_format=torch.channels_last)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return np.ascontiguousarray(x[0].permute(1, 2, 0).numpy())


def default_count() -> int:
    """Helpers for one scoring process when the config says "auto": this host's cores, shared between its
    GPUs (one scoring process each), less CORES_KEPT."""
    cores = len(os.sched_getaffinity(0))
    return max(0, min(MAX_HELPERS, cores // _host_gpus() - CORES_KEPT))


def _host_gpus() -> int:
    # Every GPU of the host, whatever CUDA_VISIBLE_DEVICES this process was given (one, in a GPU worker).
    try:
        return max(1, len(os.listdir("/proc/driver/nvidia/gpus")))
    except OSError:
        return 1


# (start, end, pixels or None, per-image errors): images [start, end) of a batch, done by a helper;
# pixels [k, size, size, 3] uint8 (a torch tensor) for the k images without an error, in order.
# None: the helper could not do the chunk, and the caller decodes it.
Helped = tuple[int, int, Any, Optional[list]]


@dataclass
class _Offer:
    jpgs: list
    helpers_from: int  # images [helpers_from, n) are the helpers'
    taken: bool = False  # the preparing thread has come: nothing more is given to helpers
    in_flight: dict = field(default_factory=dict)  # start -> the helper decoding that chunk
    done: dict = field(default_factory=dict)  # start -> Helped


class BatchShare:
    """One run of batches (a shard's) offered to a DecodePool. Batches are named by their number."""

    def __init__(self, pool: "DecodePool", size: int, squash: bool):
        self.size, self.squash = size, squash
        self._cond = pool.cond
        self._offers: dict[int, _Offer] = {}
        self.helped_images = 0  # decoded by helpers so far

    def offer(self, number: int, jpgs: list) -> None:
        with self._cond:
            self._offers[number] = _Offer(list(jpgs), len(jpgs))
            self._cond.notify_all()

    def take(self, number: int) -> int:
        """The preparing thread's part of batch `number`: its first images, this many."""
        with self._cond:
            offer = self._offers[number]
            offer.taken = True
            return offer.helpers_from

    def helped(self, number: int) -> list[Helped]:
        """The helpers' part of batch `number` (after `take`), in order: waits for chunks in flight. A helper
        that has not answered a chunk within CHUNK_TIMEOUT is killed; its chunk comes back as None."""
        with self._cond:
            offer = self._offers[number]
            deadline: Optional[float] = time.monotonic() + CHUNK_TIMEOUT
            while offer.in_flight:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._cond.wait(timeout=remaining):
                    for helper in offer.in_flight.values():
                        helper.kill()  # its thread then finds the pipe closed and gives the chunk back
                    deadline = None
            del self._offers[number]
        return [offer.done[start] for start in sorted(offer.done)]

    def _claim(self, helper: subprocess.Popen) -> Optional[tuple[int, int, int, list]]:
        """(number, start, end, jpgs) of the next chunk for `helper`: the end of the newest batch that
        still has images no one took. Called with the pool's lock held."""
        for number in sorted(self._offers, reverse=True):
            offer = self._offers[number]
            if not offer.taken and offer.helpers_from > 0:
                end = offer.helpers_from
                start = max(0, end - CHUNK)
                offer.helpers_from = start
                offer.in_flight[start] = helper
                return number, start, end, offer.jpgs[start:end]
        return None

    def _finish(self, number: int, result: Helped) -> None:
        """Called with the pool's lock held."""
        offer = self._offers.get(number)
        if offer is None:  # the shard stopped early (an error): nobody waits for it
            return
        offer.done[result[0]] = result
        del offer.in_flight[result[0]]
        if result[2] is not None:
            self.helped_images += result[1] - result[0]
        self._cond.notify_all()


class DecodePool:
    """`processes` helper processes, each with a thread here that gives it chunks of the batches of every
    open BatchShare (the score tasks a GPU worker runs at once share one pool). Started on first use; a
    pool that lost a helper is restarted at the next `start`."""

    def __init__(self, processes: int):
        self.processes = processes
        self.cond = threading.Condition()
        self._helpers: list[subprocess.Popen] = []
        self._shares: list[BatchShare] = []
        self._turn = 0

    def start(self) -> None:
        with self.cond:
            if len(self._helpers) == self.processes and all(h.poll() is None for h in self._helpers):
                return
            self._close_locked()
            env = dict(os.environ)  # the helpers import curate as this process did
            for _ in range(self.processes):
                helper = subprocess.Popen([sys.executable, "-m", "curate.pipeline.decode_helpers"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
                with contextlib.suppress(OSError):
                    fcntl.fcntl(helper.stdout.fileno(), F_SETPIPE_SZ, 1 << 20)
                self._helpers.append(helper)
                threading.Thread(target=self._serve, args=(helper,), daemon=True,
                                 name="curate-decode-helper").start()

    def close(self) -> None:
        with self.cond:
            self._close_locked()

    def _close_locked(self) -> None:
        for helper in self._helpers:
            _stop(helper)
        self._helpers = []
        self.cond.notify_all()

    @contextlib.contextmanager
    def share(self, size: int, squash: bool) -> Iterator[BatchShare]:
        """A BatchShare open to the helpers for the `with` block."""
        share = BatchShare(self, size, squash)
        with self.cond:
            self._shares.append(share)
        try:
            yield share
        finally:
            with self.cond:
                self._shares.remove(share)

    def _next(self, helper: subprocess.Popen) -> Optional[tuple]:
        """The next chunk for `helper` (the shares in turn), waiting for one; None once the helper is gone."""
        with self.cond:
            while helper in self._helpers:
                for i in range(len(self._shares)):
                    share = self._shares[(self._turn + i) % len(self._shares)]
                    claim = share._claim(helper)
                    if claim is not None:
                        self._turn += 1
                        return (share, *claim)
                self.cond.wait()
        return None

    def _serve(self, helper: subprocess.Popen) -> None:
        while (job := self._next(helper)) is not None:
            share, number, start, end, jpgs = job
            try:
                pixels, errors = self._ask(helper, jpgs, share)
            except Exception:  # the helper died or answered nonsense: this chunk is decoded by the caller
                with self.cond:
                    share._finish(number, (start, end, None, None))
                    if helper in self._helpers:
                        self._helpers.remove(helper)
                _stop(helper)
                return
            with self.cond:
                share._finish(number, (start, end, pixels, errors))

    @staticmethod
    def _ask(helper: subprocess.Popen, jpgs: list, share: BatchShare):
        import torch

        sizes = np.array([len(j) for j in jpgs], dtype=np.int64)
        data = np.concatenate([np.frombuffer(j, np.uint8) if not isinstance(j, np.ndarray) else j for j in jpgs])
        frames.send(helper.stdin, {"size": share.size, "squash": share.squash}, (sizes, data))
        made = []

        # Pageable memory: pinned blocks, one per chunk decoded ahead, would stay with PyTorch's host
        # allocator for good (~1-2 GiB per GPU process); the copy to the GPU is in a preparing thread anyway.
        def into(dtype, shape):  # straight into the tensor the GPU copy reads from
            tensor = torch.empty(shape, dtype=torch.uint8)
            made.append(tensor)
            return tensor.numpy()

        header, _ = frames.receive(helper.stdout, into=into)
        errors = header["errors"]
        if len(made) != 1 or len(errors) != len(jpgs) or made[0].shape[0] != errors.count(None):
            raise RuntimeError("decode helper: an answer that does not match its request")
        return made[0], errors


def _stop(helper: subprocess.Popen) -> None:
    helper.kill()
    helper.wait()
    for pipe in (helper.stdin, helper.stdout):
        with contextlib.suppress(OSError):  # a write still buffered for a dead helper
            pipe.close()


def serve(requests, answers) -> None:
    """A helper's loop: for each request (sizes, the JPEGs' bytes back to back; size, squash), answer the
    pixels of the images that decoded and every image's error or None. Returns when `requests` closes."""
    import torch

    torch.set_num_threads(1)  # one core per helper: the pool is the parallelism
    while True:
        try:
            request, (sizes, data) = frames.receive(requests)
        except EOFError:
            return
        size, squash = request["size"], request["squash"]
        out = np.empty((len(sizes), size, size, 3), np.uint8)
        errors: list[Optional[str]] = []
        k, offset = 0, 0
        for n in sizes.tolist():
            try:
                out[k] = decode_for_clip(data[offset:offset + n], size, squash)
                k += 1
                errors.append(None)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
            offset += n
        frames.send(answers, {"kind": "pixels", "errors": errors}, (out[:k],))


def _main() -> None:
    os.nice(HELPER_NICENESS)
    # The answers go to a private copy of stdout; fd 1 becomes stderr, so a library that prints
    # cannot corrupt the frames.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, answers)


if __name__ == "__main__":
    _main()
