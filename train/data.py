"""Training batches from the WebDataset shards `curate run` wrote.

    resampled shards (one random stream per rank and DataLoader worker)
      -> tar samples (local files or any fsspec URL)
      -> parse json / caption, select on json fields (clip_similarity, punsafe, size)
      -> shuffle buffer
      -> a cached latent where it matches, else decode + crop the jpg
         (SDXL: + its size conditioning, from the json and the crop box)
      -> batches of one aspect bucket each

Unreadable shards and undecodable samples are skipped with a warning
(`handler=wds.warn_and_continue`): one bad file must not end a week-long run. A config
that can select nothing, or a required field that is missing, is an error instead: a
`DataError` raised where the sample is read (in a DataLoader worker), which reaches the
training loop as that exception and the user as one `curate: error:` line.

Determinism: the stream of a (rank, worker) is a function of the seed and of the step
it starts at. The training loop starts a fresh stream at every checkpoint step, so a
run resumed from a checkpoint reads exactly the batches an uninterrupted run reads.
"""

from __future__ import annotations

import io
import json
import random
import warnings
from functools import partial
from dataclasses import dataclass
from typing import Iterator, Optional

import fsspec
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.utils import pytorch_worker_info

from curate.pipeline.errors import UserError
from curate.train.config import DataConfig
from curate.pipeline.models.latents import (
    LATENT_EXT, META_CROP, META_FINGERPRINT, META_SIZE, fit_crop, latent_from_bytes, to_pixels,
)

# After this many samples in a row fail the selection, the rules select (next to) nothing.
MAX_REJECTED_IN_A_ROW = 20_000


class DataError(UserError):
    """A data config that cannot work with these shards, found while reading them: a selection
    on a field the shards lack, a required cached latent that does not fit, a selection that
    rejects everything.

    Raised in the data pipeline, usually inside a DataLoader worker process. torch re-raises
    a worker's exception in the training process as a new exception of the same type whose
    message is the worker's whole traceback; this class keeps its own last line, so the user
    still reads one line."""

    def __init__(self, message: str):
        own = f"{DataError.__module__}.{DataError.__qualname__}: "
        if message.startswith(f"Caught {DataError.__name__} ") and own in message:
            message = message.rsplit(own, 1)[1].strip()
        super().__init__(message)


def _skip_bad_samples(exc: Exception) -> bool:
    """webdataset's handler for a stage: a bad sample or shard is skipped with a warning, a
    DataError ends the stream (it is the config, not the sample, that is wrong)."""
    if isinstance(exc, DataError):
        raise exc
    return wds.warn_and_continue(exc)


def shard_urls(specs: list[str]) -> list[str]:
    """Expand data.shards into tar URLs: folders (a curate output, or a folder of tars),
    globs and brace patterns, locally or on any fsspec file system."""
    urls: list[str] = []
    for spec in specs:
        for item in wds.shardlists.expand_urls(spec):  # {000..099} brace patterns
            fs, path = fsspec.core.url_to_fs(item)
            protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
            unstrip = (lambda p: p) if protocol in ("file", "local") else (lambda p: f"{protocol}://{p}")
            if any(c in path for c in "*?["):
                found = sorted(fs.glob(path))
            elif fs.isdir(path):
                found = sorted(fs.glob(f"{path.rstrip('/')}/shards/*.tar")) or sorted(fs.glob(f"{path.rstrip('/')}/*.tar"))
            elif fs.exists(path):
                found = [path]
            else:
                raise UserError(f"data.shards: {item} does not exist")
            if not found:
                raise UserError(f"data.shards: no .tar shards in {item}")
            urls += [unstrip(p) for p in found]
    return urls


def _open_shards(src, handler):
    """{url} -> {url, stream}, through fsspec (local paths, s3://, gs://, hf://, http...)."""
    for sample in src:
        try:
            stream = fsspec.open(sample["url"], "rb").open()
        except Exception as exc:
            if not handler(exc):
                break
            continue
        try:
            yield {**sample, "stream": stream}
        finally:  # asked for the next shard: this one has been read to its end
            stream.close()


def _tar_samples(src, handler):
    """{url, stream} -> samples: tar members grouped by key, as webdataset's own pipeline does."""
    return group_by_keys(tar_file_expander(src, handler=handler), handler=handler)


def _worker_rng(seed: int, purpose: str) -> random.Random:
    rank, _, worker, _ = pytorch_worker_info()
    return random.Random(f"{seed}/{rank}/{worker}/{purpose}")


@dataclass
class Parse:
    """Raw tar members -> {key, meta, caption, jpg, latent}."""

    def __call__(self, raw: dict) -> dict:
        meta = json.loads(raw["json"]) if "json" in raw else {}
        caption = raw["txt"].decode("utf-8") if "txt" in raw else (meta.get("caption") or "")
        return {"key": raw["__key__"], "url": raw.get("__url__"), "meta": meta, "caption": caption,
                "jpg": raw.get("jpg"), "latent": raw.get(LATENT_EXT)}


@dataclass
class Select:
    """Selection on the json fields; a DataError for a config that cannot work."""

    min_clip_similarity: Optional[float]
    max_punsafe: Optional[float]
    min_size: int

    def reason(self, meta: dict) -> Optional[str]:
        """None to keep; else the rule that drops it. A rule on a field the sample lacks is a
        DataError (see the module docstring)."""
        if self.min_clip_similarity is not None:
            if meta.get("clip_similarity") is None:
                raise DataError("data.min_clip_similarity is set but a sample has no clip_similarity "
                                "(run curate with clip.enabled)")
            if meta["clip_similarity"] < self.min_clip_similarity:
                return "clip_similarity"
        if self.max_punsafe is not None:
            if meta.get("punsafe") is None:
                raise DataError("data.max_punsafe is set but a sample has no punsafe score")
            if meta["punsafe"] > self.max_punsafe:
                return "punsafe"
        if self.min_size:
            if meta.get("width") is None or meta.get("height") is None:
                raise DataError("data.min_size is set but a sample has no width/height")
            if min(meta["width"], meta["height"]) < self.min_size:
                return "size"
        return None

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        in_a_row = 0
        for sample in src:
            try:
                reason = self.reason(sample["meta"])
            except DataError as exc:
                raise DataError(f"{exc} ({sample['url']}: {sample['key']})") from None
            if reason is None:
                in_a_row = 0
                yield sample
                continue
            in_a_row += 1
            if in_a_row >= MAX_REJECTED_IN_A_ROW:
                raise DataError(f"data: {in_a_row} samples in a row failed the selection "
                                "(min_clip_similarity / max_punsafe / min_size): it selects (next to) nothing")


@dataclass
class Shuffle:
    size: int
    seed: int

    def __call__(self, src):
        yield from wds.filters._shuffle(src, self.size, min(100, self.size), rng=_worker_rng(self.seed, "shuffle"))


def size_conditioning(meta: dict, box: tuple[float, float, float, float], size: tuple[int, int]) -> list[float]:
    """SDXL's micro-conditioning of one sample, [original height, original width, crop top, crop
    left] (the target size, the bucket, completes add_time_ids), as diffusers'
    train_text_to_image_sdxl.py computes it: the original image's size, and the top-left corner of
    the training crop in the original scaled to cover the target size.

    `box` is the crop in the stored image (fit_crop's box; the latent cache records it). The stored
    image is the original (`original_width` / `original_height` in the json, the size before
    curation) scaled and, for buckets or center_crop, centre-cropped to its own aspect; so its
    region in the original is the largest centred box of that aspect."""
    w, h = meta["width"], meta["height"]
    ow, oh = meta.get("original_width") or w, meta.get("original_height") or h
    region_w, region_h = min(ow, oh * w / h), min(oh, ow * h / w)
    per_pixel = region_w / w  # original pixels per stored pixel
    left = (ow - region_w) / 2 + box[0] * per_pixel
    top = (oh - region_h) / 2 + box[1] * per_pixel
    scale = size[0] / ((box[2] - box[0]) * per_pixel)  # original -> covering the target
    return [float(oh), float(ow), float(round(top * scale)), float(round(left * scale))]


@dataclass
class Prepare:
    """A parsed sample -> {"latents" (unscaled, fp32) or "pixels" ([-1, 1]), "caption", "bucket"},
    and "time_ids" (SDXL's add_time_ids, see size_conditioning) when `size_conditioning` is on."""

    resolution: int
    crop: str
    buckets: bool
    latents: str
    vae_fingerprint: str
    seed: int
    size_conditioning: bool = False

    def __post_init__(self):
        self._rng: Optional[random.Random] = None
        self._warned = False

    def size(self, meta: dict) -> tuple[int, int]:
        bucket = meta.get("bucket") if self.buckets else None
        return (int(bucket[0]), int(bucket[1])) if bucket else (self.resolution, self.resolution)

    def cached_latent_fits(self, meta: dict, size: tuple[int, int]) -> Optional[str]:
        """None if the cached latent is what encoding on the fly would give; else why not."""
        if meta.get(META_FINGERPRINT) != self.vae_fingerprint:
            return f"made with another VAE ({meta.get('latent_vae')})"
        if tuple(meta.get(META_SIZE) or ()) != size:
            return f"made for size {meta.get(META_SIZE)}, training at {list(size)}"
        if self.crop != "center":
            return "a cache holds the centre crop; data.crop is random"
        return None

    def __call__(self, sample: dict) -> dict:
        meta, size = sample["meta"], self.size(sample["meta"])
        out = {"caption": sample["caption"], "key": sample["key"], "bucket": size}
        if self.latents != "off":
            why_not = "it has none" if sample["latent"] is None else self.cached_latent_fits(meta, size)
            if why_not is None:
                out["latents"] = torch.from_numpy(latent_from_bytes(sample["latent"]).astype(np.float32))
                return self.with_time_ids(out, meta, meta[META_CROP], size)
            if self.latents == "required":
                raise DataError(f"data.latents is required but the cached latent of {sample['key']} "
                                f"({sample['url']}) does not fit: {why_not}")
            if sample["latent"] is not None and not self._warned:  # a cache that goes unused: say so, once
                warnings.warn(f"data.latents: encoding on the fly, a cached latent does not fit: {why_not}")
                self._warned = True
        if self._rng is None:
            self._rng = _worker_rng(self.seed, "crop")
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        image, box = fit_crop(image, size, self._rng if self.crop == "random" else None)
        out["pixels"] = torch.from_numpy(to_pixels(image))
        return self.with_time_ids(out, meta, box, size)

    def with_time_ids(self, out: dict, meta: dict, box, size: tuple[int, int]) -> dict:
        if self.size_conditioning:
            if meta.get("width") is None or meta.get("height") is None:
                raise DataError(f"an SDXL model needs each sample's width/height in its json; {out['key']} has none")
            out["time_ids"] = torch.tensor(size_conditioning(meta, box, size) + [float(size[1]), float(size[0])])
        return out


@dataclass
class BatchByBucket:
    """Group samples into batches of one bucket (and one kind: cached latents or pixels)."""

    batch_size: int

    def __call__(self, src):
        pending: dict[tuple, list] = {}
        for sample in src:
            kind = "latents" if "latents" in sample else "pixels"
            group = pending.setdefault((kind, sample["bucket"]), [])
            group.append(sample)
            if len(group) == self.batch_size:
                del pending[(kind, sample["bucket"])]
                batch = {kind: torch.stack([s[kind] for s in group]),
                         "captions": [s["caption"] for s in group], "keys": [s["key"] for s in group]}
                if "time_ids" in sample:
                    batch["time_ids"] = torch.stack([s["time_ids"] for s in group])
                yield batch


def training_stream(cfg: DataConfig, urls: list[str], batch_size: int, seed: int,
                    vae_fingerprint: str, size_conditioning: bool = False) -> wds.DataPipeline:
    """The batch stream of this rank (an IterableDataset; each DataLoader worker gets its own).
    size_conditioning: batches carry "time_ids" (SDXL)."""
    handler = _skip_bad_samples
    return wds.DataPipeline(
        # Each (rank, worker) draws shards at random with its own seed (webdataset's
        # rank * 1000 + worker, mixed with ours): an endless stream, no epochs to align.
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        partial(_open_shards, handler=handler),
        partial(_tar_samples, handler=handler),
        wds.map(Parse(), handler=handler),
        Select(cfg.min_clip_similarity, cfg.max_punsafe, cfg.min_size),
        Shuffle(cfg.shuffle_buffer, seed),
        wds.map(Prepare(cfg.resolution, cfg.crop, cfg.buckets, cfg.latents, vae_fingerprint, seed, size_conditioning),
                handler=handler),
        BatchByBucket(batch_size),
    )


def training_loader(cfg: DataConfig, urls: list[str], batch_size: int, seed: int,
                    vae_fingerprint: str, pin_memory: bool = False,
                    size_conditioning: bool = False) -> torch.utils.data.DataLoader:
    stream = training_stream(cfg, urls, batch_size, seed, vae_fingerprint, size_conditioning)
    extra = {"prefetch_factor": 4, "persistent_workers": False} if cfg.workers else {}
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                                       pin_memory=pin_memory, **extra)


def check_readable(urls: list[str]) -> None:
    """Fail early on a first shard that cannot be opened: a resampled stream would only warn forever."""
    try:
        with fsspec.open(urls[0], "rb") as f:
            f.read(512)
    except Exception as exc:
        raise UserError(f"data.shards: cannot read {urls[0]}: {exc}") from exc
