"""Where the score stage's batches come from: a download shard's keys, JPEG bytes and
caption token ids, in batches, in file order.

Two readers that give the same batches:
- `read_batches`: in the scoring process (the CPU path, and the fallback).
- `ReaderPool`: in helper processes. On a GPU the score stage is limited by Python, not by
  the GPU: walking the tar, parsing each sample's json and tokenizing its caption cost
  ~45 µs of pure Python a sample, and in the scoring process that work holds the GIL
  against the threads feeding the GPU (py-spy on an H200 host: the model's thread waited
  mostly on it). A helper does that work and sends back, per batch, only the keys, where
  each JPEG lies in the tar file, and the token ids. The scoring process maps the tar and
  hands nvJPEG views of the mapping: image bytes never become Python objects.

Helpers are plain subprocesses exchanging frames over stdin/stdout (a json header and raw
numpy arrays: nothing is unpickled), not multiprocessing children: Dask's worker processes
are daemonic, and daemonic processes may not have multiprocessing children. A helper exits
when its stdin closes, so it never outlives the process that started it, even a SIGKILLed one.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from curate.pipeline import frames
from curate.pipeline.tarshard import iter_sample_spans, iter_tar_samples


@dataclass
class Batch:
    keys: list[str]
    jpgs: list[Any]  # bytes, or uint8 numpy views of the mapped tar (ReaderPool)
    captions: Optional[list[str]]  # None when the tokens were made in a reader process
    tokens: Any = None  # token ids [n, context] (open_clip's tokenizer is pure Python: made beside the reading)


def _in_batches(items: Iterable, batch_size: int) -> Iterator[list]:
    """Lists of `batch_size` consecutive items, the last one shorter."""
    items = iter(items)
    while chunk := list(itertools.islice(items, batch_size)):
        yield chunk


def read_batches(tar_path: Path, batch_size: int, tokenizer=None) -> Iterator[Batch]:
    """Batches read in this process; tokens made only when a tokenizer is given."""
    for samples in _in_batches(iter_tar_samples(tar_path), batch_size):
        captions = [_caption(fields["json"]) for _, fields in samples]
        yield Batch([key for key, _ in samples], [fields["jpg"] for _, fields in samples], captions,
                    tokenizer(captions) if tokenizer else None)


def _caption(json_bytes) -> str:
    return json.loads(bytes(json_bytes)).get("caption") or ""


class ReaderError(RuntimeError):
    pass


class ReaderPool:
    """`processes` helper processes reading and tokenizing for one tokenizer (named by the
    model). Batch b of a shard is made by helper b % processes; they are consumed in order.
    Started on first use; a pool whose helpers failed or were abandoned mid-shard is
    restarted on the next shard."""

    def __init__(self, model: str, processes: int):
        self.model = model
        self.processes = processes
        self._helpers: list[subprocess.Popen] = []
        self._lock = threading.Lock()  # one shard at a time per pool

    def start(self) -> None:
        """Start the helpers unless they are running (they take seconds to import open_clip)."""
        with self._lock:
            self._ensure_started()

    def _ensure_started(self) -> None:
        if self._helpers and all(h.poll() is None for h in self._helpers):
            return
        self.close()
        # The helpers import curate as this process did (an install, or PYTHONPATH).
        env = dict(os.environ)
        self._helpers = [
            subprocess.Popen(
                [sys.executable, "-m", "curate.pipeline.score_reader", self.model],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
            )
            for _ in range(self.processes)
        ]

    def close(self) -> None:
        for helper in self._helpers:
            helper.kill()
            helper.wait()
        self._helpers = []

    def batches(self, tar_path: Path, batch_size: int) -> Iterator[Batch]:
        with self._lock:
            self._ensure_started()
            finished = False
            try:
                yield from self._read(Path(tar_path), batch_size)
                finished = True
            finally:
                if not finished:  # an error, or the consumer stopped early: answers are still in the pipes
                    self.close()

    def tokenize(self, captions: list[str], batch_size: int) -> list[Any]:
        """Token ids of `captions` in batches of `batch_size`, in order, made by the helpers (batch b
        by helper b % processes): for shards whose images need no reading by them (input tars,
        pipeline/sources.py), so this process still does none of the tokenizing.

        All of a shard's batches at once (10,000 captions: a few MB of ids, a fraction of a second):
        the pool is held only that long, so the GPU worker's other score task gets its tokens
        without waiting for this shard's images to be embedded."""
        with self._lock:
            self._ensure_started()
            try:
                return list(self._tokenize(captions, batch_size))
            except BaseException:  # answers may still be in the pipes
                self.close()
                raise

    def _tokenize(self, captions: list[str], batch_size: int) -> Iterator[Any]:
        chunks = list(_in_batches(captions, batch_size))
        for part, helper in enumerate(self._helpers):
            frames.send(helper.stdin, {"captions": chunks[part::self.processes]})
        for number in range(len(chunks)):
            header, arrays = self._receive(self._helpers[number % self.processes])
            if header["kind"] != "batch":
                raise ReaderError(f"score reader process: expected tokens, got {header['kind']!r}")
            yield _as_tensor(arrays[0].copy())
        for helper in self._helpers:
            self._receive(helper)  # its "end"

    def _read(self, tar_path: Path, batch_size: int) -> Iterator[Batch]:
        # Copy-on-write mapping: writable views (torch warns on read-only ones), never written.
        tar = np.memmap(tar_path, dtype=np.uint8, mode="c") if tar_path.stat().st_size else np.zeros(0, np.uint8)
        tar = tar.view(np.ndarray)  # plain ndarray slices are several times cheaper than memmap ones
        for part, helper in enumerate(self._helpers):
            frames.send(helper.stdin, {"tar": str(tar_path), "batch_size": batch_size, "part": part, "parts": self.processes})
        number = 0
        while True:
            header, arrays = self._receive(self._helpers[number % self.processes])
            if header["kind"] == "end":
                break
            offsets, sizes, tokens = arrays
            jpgs = [tar[o:o + s] for o, s in zip(offsets.tolist(), sizes.tolist())]
            # A copy: frombuffer gives a read-only array, and the tokens are small.
            yield Batch(header["keys"], jpgs, None, _as_tensor(tokens.copy()))
            number += 1
        for i, helper in enumerate(self._helpers):  # every other helper has its "end" waiting
            if i != number % self.processes:
                self._receive(helper)

    def _receive(self, helper: subprocess.Popen) -> tuple[dict, list[np.ndarray]]:
        try:
            header, arrays = frames.receive(helper.stdout)
        except (EOFError, ValueError, struct.error) as exc:
            raise ReaderError(f"score reader process exited (code {helper.poll()})") from exc
        if header["kind"] == "error":
            raise ReaderError(f"score reader process: {header['message']}")
        return header, arrays


def _as_tensor(tokens: np.ndarray):
    import torch

    return torch.from_numpy(tokens)


def _batch_spans(tar_path: str, batch_size: int) -> Iterator[tuple[list[str], list[tuple[int, int]], list[tuple[int, int]]]]:
    """(keys, jpg spans, json spans) per batch, from the tar headers alone."""
    for samples in _in_batches(iter_sample_spans(Path(tar_path)), batch_size):
        for key, spans in samples:
            if "jpg" not in spans or "json" not in spans:
                raise ReaderError(f"{tar_path}: sample {key} has no jpg or json member")
        yield [key for key, _ in samples], [spans["jpg"] for _, spans in samples], [spans["json"] for _, spans in samples]


def serve(model: str, requests, answers) -> None:
    """A helper's loop: for each request (tar path, batch size, part, parts), send a "batch" frame
    (keys; jpg offsets, jpg sizes, token ids) for every batch number ≡ part (mod parts), then an
    "end" frame; or an "error" frame at the first failure. A request of `captions` (batches of
    them) is answered with a frame of token ids per batch, then "end". Returns when `requests` closes."""
    from curate.pipeline.models.clip import load_tokenizer

    tokenizer = load_tokenizer(model)
    while True:
        try:
            request, _ = frames.receive(requests)
        except EOFError:
            return
        if "captions" in request:  # token ids only, one frame per batch of captions
            try:
                for chunk in request["captions"]:
                    frames.send(answers, {"kind": "batch", "keys": []}, (tokenizer(chunk).numpy(),))
                frames.send(answers, {"kind": "end"})
            except Exception as exc:
                frames.send(answers, {"kind": "error", "message": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        tar_path, batch_size, part, parts = request["tar"], request["batch_size"], request["part"], request["parts"]
        try:
            with open(tar_path, "rb") as f:
                for number, (keys, jpgs, jsons) in enumerate(_batch_spans(tar_path, batch_size)):
                    if number % parts != part:
                        continue
                    captions = []
                    for offset, size in jsons:
                        f.seek(offset)
                        captions.append(_caption(f.read(size)))
                    tokens = tokenizer(captions).numpy()
                    offsets = np.array([o for o, _ in jpgs], dtype=np.int64)
                    sizes = np.array([s for _, s in jpgs], dtype=np.int64)
                    frames.send(answers, {"kind": "batch", "keys": keys}, (offsets, sizes, tokens))
            frames.send(answers, {"kind": "end"})
        except Exception as exc:  # reported to the scoring process, which raises it for the shard
            frames.send(answers, {"kind": "error", "message": f"{type(exc).__name__}: {exc}"[:500]})


def _main() -> None:
    # The answers go to a private copy of stdout; fd 1 becomes stderr, so a library that
    # prints cannot corrupt the frames.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.argv[1], sys.stdin.buffer, answers)


if __name__ == "__main__":
    _main()
