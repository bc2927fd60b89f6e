"""CLIP's two towers at fixed shapes, replayed as CUDA graphs on a GPU.

Why: in eager PyTorch every layer of a tower is a handful of kernel launches, and for a
small model the CPU time to launch them is as long as the GPU time to run them (H200,
ViT-B-32: ~22 ms of CPU per 1,024 captions for the text tower alone, bench/probes). The
score process's CPU also decodes the next batches' JPEGs, so the GPU waited for it. A CUDA
graph records a tower's kernels once and replays all of them with one call.

A graph replays fixed shapes on fixed memory, so:
- every batch is copied into static input buffers of `batch_size` rows. Rows past the
  batch keep whatever they held: CLIP never mixes rows, so their outputs are just ignored;
- the text is zero-padded on the right to one of a few lengths (multiples of 16, and the
  full context). Padding after the end-of-text token changes nothing: the causal mask keeps
  later positions from earlier ones and the end-of-text position is what is pooled (the same
  argument that lets pipeline/clip_text.py cut the padding). Models whose text cannot be
  trimmed always come at the full context: one length;
- each replay's output is copied out before the next replay, because all graphs share one
  memory pool (they never run at once) and a later graph may reuse an earlier one's memory.

A batch less than half of `batch_size` (a shard's last batch, a batch with many broken
images) runs eagerly instead: replaying a whole batch's work would cost more.

Without CUDA the same class runs the towers eagerly on the static buffers, which lets the
tests check the padding on the CPU.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Optional

from pipeline.clip_model import LoadedClip

log = logging.getLogger(__name__)

# Text lengths are rounded up to a multiple of this (and capped at the context length):
# 5 graphs for CLIP's 77-token context, at most 15 positions of padding each.
TEXT_LENGTH_STEP = 16

# Eager passes before capturing: cuBLAS and cuDNN pick and set up their kernels on the
# first calls, which must not happen inside a capture.
WARMUP_PASSES = 2


def text_lengths(context: int, trimmed: bool) -> list[int]:
    """The token lengths the text tower is captured at."""
    if not trimmed:
        return [context]
    return [*range(TEXT_LENGTH_STEP, context, TEXT_LENGTH_STEP), context]


class _Tower:
    """`fn()` over static input buffers: captured as a CUDA graph, or called eagerly."""

    def __init__(self, fn, capture: bool, pool=None):
        self.fn = fn
        self.graph = None
        self.out = None
        if capture:
            self.graph, self.out = _capture(fn, pool)

    def __call__(self):
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.out


def _capture(fn, pool):
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_PASSES):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread of this process may use the GPU meanwhile (on its own
    # stream); only this thread's calls must be capturable.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


class GraphedClip:
    """`encode_image` / `encode_text` of a LoadedClip at `batch_size` rows, as CUDA graphs when
    `capture` (on CUDA), else eagerly on the same padded buffers. Same results as the model's
    own calls, within the last bits of bf16 (tests/test_clip_graphs.py)."""

    def __init__(self, clip: LoadedClip, batch_size: int, capture: Optional[bool] = None):
        import torch

        self.clip = clip
        self.batch_size = batch_size
        if capture is None:
            capture = clip.device.startswith("cuda")
        context = int(clip.model.context_length)
        self.lengths = text_lengths(context, clip.trim_text)
        size = clip.image_size
        device = torch.device(clip.device)
        with torch.inference_mode(), (torch.cuda.device(device) if capture else nullcontext()):
            self.pixels = torch.zeros((batch_size, 3, size, size), dtype=clip.dtype, device=device)
            self.tokens = {n: torch.zeros((batch_size, n), dtype=torch.long, device=device) for n in self.lengths}
            pool = torch.cuda.graph_pool_handle() if capture else None
            self._image = _Tower(lambda: clip.encode_image(self.pixels), capture, pool)
            self._text = {
                n: _Tower(lambda t=t: clip.encode_text(t), capture, pool) for n, t in self.tokens.items()
            }

    def fits(self, rows: int) -> bool:
        """Whether a batch of `rows` goes through the fixed shapes (else: eagerly, unpadded)."""
        return self.batch_size // 2 <= rows <= self.batch_size

    def encode_image(self, pixels):
        """L2-normalized image embeddings of preprocessed pixels on the device."""
        n = len(pixels)
        if not self.fits(n):
            return self.clip.encode_image(pixels)
        self.pixels[:n].copy_(pixels)
        return self._image()[:n].clone()

    def encode_text(self, tokens):
        """L2-normalized text embeddings of `LoadedClip.prepare_tokens` output on the device."""
        n, length = tokens.shape
        padded = next((m for m in self.lengths if m >= length), None)
        if padded is None or not self.fits(n):
            return self.clip.encode_text(tokens)
        static = self.tokens[padded]
        static[:n, :length].copy_(tokens)
        static[:n, length:].zero_()
        return self._text[padded]()[:n].clone()
