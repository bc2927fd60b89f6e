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

Helpers are plain subprocesses exchanging pickles over stdin/stdout, not multiprocessing
children: Dask's worker processes are daemonic, and daemonic processes may not have
multiprocessing children. A helper exits when its stdin closes, so it never outlives the
process that started it, even one that was SIGKILLed.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from pipeline.tarshard import iter_sample_spans, iter_tar_samples

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Batch:
    keys: list[str]
    jpgs: list[Any]  # bytes, or uint8 numpy views of the mapped tar (ReaderPool)
    captions: Optional[list[str]]  # None when the tokens were made in a reader process
    tokens: Any = None  # token ids [n, context] (open_clip's tokenizer is pure Python: made beside the reading)


def read_batches(tar_path: Path, batch_size: int, tokenizer=None) -> Iterator[Batch]:
    """Batches read in this process; tokens made only when a tokenizer is given."""
    keys, jpgs, captions = [], [], []

    def batch() -> Batch:
        return Batch(keys, jpgs, captions, tokenizer(captions) if tokenizer else None)

    for key, fields in iter_tar_samples(tar_path):
        keys.append(key)
        jpgs.append(fields["jpg"])
        captions.append(_caption(fields["json"]))
        if len(keys) == batch_size:
            yield batch()
            keys, jpgs, captions = [], [], []
    if keys:
        yield batch()


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
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self._helpers = [
            subprocess.Popen(
                [sys.executable, "-m", "pipeline.score_reader", self.model],
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

    def _read(self, tar_path: Path, batch_size: int) -> Iterator[Batch]:
        # Copy-on-write mapping: writable views (torch warns on read-only ones), never written.
        tar = np.memmap(tar_path, dtype=np.uint8, mode="c") if tar_path.stat().st_size else np.zeros(0, np.uint8)
        tar = tar.view(np.ndarray)  # plain ndarray slices are several times cheaper than memmap ones
        for part, helper in enumerate(self._helpers):
            pickle.dump((str(tar_path), batch_size, part, self.processes), helper.stdin)
            helper.stdin.flush()
        number = 0
        while True:
            message = self._receive(self._helpers[number % self.processes])
            if message[0] == "end":
                break
            _, keys, offsets, sizes, tokens = message
            jpgs = [tar[o:o + s] for o, s in zip(offsets.tolist(), sizes.tolist())]
            yield Batch(keys, jpgs, None, _as_tensor(tokens))
            number += 1
        for i, helper in enumerate(self._helpers):  # every other helper has its "end" waiting
            if i != number % self.processes:
                self._receive(helper)

    def _receive(self, helper: subprocess.Popen) -> tuple:
        try:
            message = pickle.load(helper.stdout)
        except (EOFError, pickle.UnpicklingError) as exc:
            raise ReaderError(f"score reader process exited (code {helper.poll()})") from exc
        if message[0] == "error":
            raise ReaderError(f"score reader process: {message[1]}")
        return message


def _as_tensor(tokens: np.ndarray):
    import torch

    return torch.from_numpy(tokens)


def _batch_spans(tar_path: str, batch_size: int) -> Iterator[tuple[list[str], list[tuple[int, int]], list[tuple[int, int]]]]:
    """(keys, jpg spans, json spans) per batch, from the tar headers alone."""
    keys, jpgs, jsons = [], [], []
    for key, spans in iter_sample_spans(Path(tar_path)):
        if "jpg" not in spans or "json" not in spans:
            raise ReaderError(f"{tar_path}: sample {key} has no jpg or json member")
        keys.append(key)
        jpgs.append(spans["jpg"])
        jsons.append(spans["json"])
        if len(keys) == batch_size:
            yield keys, jpgs, jsons
            keys, jpgs, jsons = [], [], []
    if keys:
        yield keys, jpgs, jsons


def serve(model: str, requests, answers) -> None:
    """A helper's loop: for each request (tar path, batch size, part, parts), send
    ("batch", keys, jpg offsets, jpg sizes, token ids) for every batch number ≡ part (mod parts),
    then ("end",); or ("error", message) at the first failure. Returns when `requests` closes."""
    from pipeline.clip_model import load_tokenizer

    tokenizer = load_tokenizer(model)
    while True:
        try:
            tar_path, batch_size, part, parts = pickle.load(requests)
        except EOFError:
            return
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
                    pickle.dump(("batch", keys, offsets, sizes, tokens), answers, protocol=pickle.HIGHEST_PROTOCOL)
                    answers.flush()
            pickle.dump(("end",), answers)
        except Exception as exc:  # reported to the scoring process, which raises it for the shard
            pickle.dump(("error", f"{type(exc).__name__}: {exc}"[:500]), answers)
        answers.flush()


def _main() -> None:
    # The answers go to a private copy of stdout; fd 1 becomes stderr, so a library that
    # prints cannot corrupt the pickle stream.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.argv[1], sys.stdin.buffer, answers)


if __name__ == "__main__":
    _main()
