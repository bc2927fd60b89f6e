"""What `curate eval` reads: the prompts, each with its seed, and the real (reference) images.

Prompts come from a text file (one a line), a .jsonl file ({"prompt": ..., "seed": ...}), or the
captions of held-out shards (a `curate run` output folder, tar files or globs); reference images
from shards (their jpg) or a folder of image files. `count` keeps the first N in shard (or
sorted file) order, so prompts and reference images taken from the same shards are pairs.
Reference images are centre-cropped and resized to the generation resolution the way
`curate train` crops its training samples (pipeline/models/latents.py `fit_crop`), so the real
and generated sets are compared at one size.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from curate.pipeline.errors import UserError
from curate.pipeline.models.latents import fit_crop
from curate.pipeline.tarshard import iter_tar_samples
from curate.train.eval.config import PromptsSection

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass(frozen=True)
class Prompt:
    text: str
    seed: int


def shard_files(specs: list[str], key: str) -> list[Path]:
    """Local tar files of `specs`: a `curate run` output folder (its shards/), a folder of
    tars, a tar, or a glob."""
    from curate.train.data import shard_urls

    urls = shard_urls(specs)
    remote = [u for u in urls if "://" in u]
    if remote:
        raise UserError(f"{key}: only local shards are read by curate eval ({remote[0]})")
    return [Path(u) for u in urls]


def _captions(tars: list[Path]) -> Iterator[str]:
    for tar in tars:
        for _, fields in iter_tar_samples(tar):
            if "txt" in fields:
                yield fields["txt"].decode("utf-8")
            elif "json" in fields:
                yield json.loads(fields["json"]).get("caption") or ""


def load_prompts(cfg: PromptsSection) -> list[Prompt]:
    """The prompts in order; prompt i's seed is cfg.seed + i unless its .jsonl line gives one."""
    texts: list[tuple[str, Optional[int]]] = []
    if cfg.file:
        path = Path(cfg.file)
        if not path.is_file():
            raise UserError(f"prompts.file: no such file: {path}")
        lines = path.read_text(encoding="utf-8").splitlines()
        if path.suffix == ".jsonl":
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    texts.append((str(item["prompt"]), int(item["seed"]) if item.get("seed") is not None else None))
                except (ValueError, KeyError, TypeError) as exc:
                    raise UserError(f"prompts.file: {path}:{number}: expected {{\"prompt\": ..., \"seed\": ...}} ({exc})") from None
        else:
            texts = [(line.strip(), None) for line in lines if line.strip()]
    else:
        for caption in _captions(shard_files(cfg.shards, "prompts.shards")):
            texts.append((caption, None))
            if cfg.count and len(texts) >= cfg.count:
                break
    texts = texts[: cfg.count] if cfg.count else texts
    if not texts:
        raise UserError(f"prompts: no prompts in {cfg.file or ', '.join(cfg.shards)}")
    return [Prompt(text, cfg.seed + i if seed is None else seed) for i, (text, seed) in enumerate(texts)]


@dataclass
class ReferenceSet:
    """Where the real images are, and a fingerprint of exactly which files (and how they are read)."""

    files: list[Path]  # tars or image files
    from_shards: bool
    count: Optional[int]
    cache_dir: Path  # beside the reference set

    def fingerprint(self, *settings) -> str:
        digest = hashlib.sha256(json.dumps([str(s) for s in settings]).encode())
        for path in self.files:
            stat = path.stat()
            digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
        digest.update(str(self.count).encode())
        return digest.hexdigest()[:16]

    def images(self, resolution: int) -> Iterator[tuple[np.ndarray, Optional[str]]]:
        """(uint8 H × W × 3 image at resolution², caption or None), the first `count`."""
        produced = 0
        for image, caption in (self._from_shards() if self.from_shards else self._from_folder()):
            with image:
                crop, _ = fit_crop(image.convert("RGB"), (resolution, resolution))
            yield np.asarray(crop, dtype=np.uint8), caption
            produced += 1
            if self.count and produced >= self.count:
                return

    def _from_shards(self):
        for tar in self.files:
            for key, fields in iter_tar_samples(tar):
                data = fields.get("jpg") or fields.get("png") or fields.get("webp")
                if data is None:
                    continue
                caption = fields["txt"].decode("utf-8") if "txt" in fields else None
                yield Image.open(io.BytesIO(data)), caption

    def _from_folder(self):
        for path in self.files:
            yield Image.open(path), None


def reference_set(shards: list[str], folder: Optional[str], count: Optional[int], fallback_cache: Path) -> ReferenceSet:
    if folder:
        root = Path(folder)
        if not root.is_dir():
            raise UserError(f"reference.folder: no such folder: {folder}")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and ".curate-eval" not in p.parts)
        if not files:
            raise UserError(f"reference.folder: no image files in {folder}")
        cache = root / ".curate-eval"
        from_shards = False
    else:
        if not shards:
            raise UserError("reference: give reference.shards or reference.folder (the real images to compare with)")
        files = shard_files(shards, "reference.shards")
        # Beside the shards: a `curate run` output keeps it in OUTPUT/.curate-eval.
        parent = files[0].parent
        cache = (parent.parent if parent.name == "shards" else parent) / ".curate-eval"
        from_shards = True
    if not _writable(cache):
        cache = fallback_cache
    return ReferenceSet(files, from_shards, count, cache)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK)
    except OSError:
        return False
