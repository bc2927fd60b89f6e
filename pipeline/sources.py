"""Where a stage's images come from, so that the score and write stages need not know which
stage prepared their shard:

- URL lists: the download stage's raw tar (work/download/NNNNN.tar), normalized JPEGs with
  their json, in the parquet's order of kept rows;
- existing shards as input: the input tar itself, at the offsets the read stage recorded in
  its parquet (`source_shard`, `image_offset`, `image_size`); nothing was copied. The score
  stage maps the tar and embeds the stored images as they are; the write stage normalizes
  each one there, with the run's resize policy (the one decode of the image).

Which of the two a shard is, its prepare stage's done-marker says (`images_from`).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator, Optional

import numpy as np
import pyarrow.compute as pc

from curate.pipeline import storage
from curate.pipeline.config import RunConfig
from curate.pipeline.image import image_rejection, normalize_image, read_header
from curate.pipeline.layout import RunLayout
from curate.pipeline.records import Rejection, sample_meta
from curate.pipeline.score_reader import Batch, ReaderError, ReaderPool, read_batches
from curate.pipeline.shards import is_done, read_marker, shard_name
from curate.pipeline.tarshard import iter_tar_samples

# The prepare stage's marker says where its shard's images are: INPUT_TAR, or (absent) its own tar.
IMAGES_FROM = "images_from"
INPUT_TAR = "input_tar"
# Columns of the read stage's parquet: the input tar, and where a kept sample's image lies in it.
SOURCE_SHARD = "source_shard"
SPAN_COLUMNS = ("image_offset", "image_size")
# Threads normalizing a shard's images in the write stage (Pillow decodes without the GIL).
NORMALIZE_THREADS = 4
# The stage name in the rejections made here (an image that does not normalize).
WRITE = "write"

# (key, image bytes, the json stored beside it, or the rejection when it would not normalize)
SourceImage = tuple[str, Optional[bytes], Optional[dict], Optional[Rejection]]


def in_input_tar(stage_dir: str, shard_id: int) -> bool:
    """Whether the shard's images lie in an input tar (existing shards as input)."""
    return is_done(stage_dir, shard_id) and read_marker(stage_dir, shard_id).get(IMAGES_FROM) == INPUT_TAR


@contextlib.contextmanager
def mapped(path: str) -> Iterator[np.ndarray]:
    """A tar's bytes as a uint8 array: a memory map of the local file (of a temporary copy for a
    URL). Copy-on-write, so views are writable (torch warns on read-only ones); never written."""
    with storage.local_copy(path) as local:
        if os.path.getsize(local) == 0:
            yield np.zeros(0, np.uint8)
            return
        tar = np.memmap(local, dtype=np.uint8, mode="c")
        try:
            yield tar.view(np.ndarray)  # plain ndarray slices are several times cheaper than memmap ones
        finally:
            del tar


def _input_spans(stage_dir: str, shard_id: int) -> tuple[Optional[str], list[str], np.ndarray, np.ndarray, list[str]]:
    """(input tar, keys, image offsets, image sizes, captions) of the shard's kept samples."""
    parquet = storage.join(stage_dir, f"{shard_name(shard_id)}.parquet")
    table = storage.read_parquet(parquet, columns=["key", "caption", SOURCE_SHARD, *SPAN_COLUMNS])
    table = table.filter(pc.is_valid(table[SPAN_COLUMNS[0]]))
    sources = table[SOURCE_SHARD].unique().to_pylist()
    offsets = table[SPAN_COLUMNS[0]].to_numpy(zero_copy_only=False).astype(np.int64)
    sizes = table[SPAN_COLUMNS[1]].to_numpy(zero_copy_only=False).astype(np.int64)
    captions = pc.fill_null(table["caption"], "").to_pylist()
    return (sources[0] if sources else None), table["key"].to_pylist(), offsets, sizes, captions


@contextlib.contextmanager
def score_batches(stage_dir: str, shard_id: int, batch_size: int, tokenizer=None,
                  pool: Optional[ReaderPool] = None) -> Iterator[Iterator[Batch]]:
    """The score stage's batches of a prepared shard (keys, images, captions or token ids), in
    order: read by the reader processes of `pool`, or here with `tokenizer`."""
    if not in_input_tar(stage_dir, shard_id):
        with storage.local_copy(storage.join(stage_dir, f"{shard_name(shard_id)}.tar")) as tar_path:
            yield read_batches(tar_path, batch_size, tokenizer) if pool is None else pool.batches(tar_path, batch_size)
        return
    source, keys, offsets, sizes, captions = _input_spans(stage_dir, shard_id)
    if source is None:
        yield iter(())
        return
    with mapped(source) as tar:
        yield _input_batches(tar, keys, offsets, sizes, captions, batch_size, tokenizer, pool)


def _input_batches(tar: np.ndarray, keys: list[str], offsets: np.ndarray, sizes: np.ndarray, captions: list[str],
                   batch_size: int, tokenizer, pool: Optional[ReaderPool]) -> Iterator[Batch]:
    """Batches of views of the mapped input tar; the captions are tokenized by the reader
    processes (which hold the GIL, not this process) or here."""
    tokens = pool.tokenize(captions, batch_size) if pool is not None else None
    if tokens is not None and len(tokens) != -(-len(keys) // batch_size):
        raise ReaderError(f"the reader processes sent {len(tokens)} token batches for {len(keys)} captions")
    for number, start in enumerate(range(0, len(keys), batch_size)):
        end = start + batch_size
        images = [tar[o:o + s] for o, s in zip(offsets[start:end].tolist(), sizes[start:end].tolist())]
        if tokens is not None:
            yield Batch(keys[start:end], images, None, tokens[number])
        else:
            text = captions[start:end]
            yield Batch(keys[start:end], images, text, tokenizer(text) if tokenizer else None)


def write_images(cfg: RunConfig, layout: RunLayout, shard_id: int, records: list[dict],
                 decoded: frozenset = frozenset(), ahead: int = NORMALIZE_THREADS * 2) -> Iterator[SourceImage]:
    """The write stage's images of a prepared shard, one for each kept record, in order.

    From an input tar each image is normalized here (resize policy, EXIF orientation, JPEG),
    and its record gets the sizes; an image that does not normalize comes as its rejection.
    `decoded`: keys whose images the score stage decoded whole (not decoded again to check
    them when they pass unchanged). The span columns are taken out of `records` now: they
    are no output's business. `ahead`: images normalized ahead of the one taken (bounded memory;
    the write stage asks for a GPU filter's whole batch, normalized while the GPU encodes the last)."""
    if not in_input_tar(layout.download, shard_id):
        return ((key, fields["jpg"], json.loads(fields["json"]), None)
                for key, fields in iter_tar_samples(layout.download_files(shard_id)["tar"]))
    kept = [r for r in records if r.get(SPAN_COLUMNS[0]) is not None]
    spans = [(int(r[SPAN_COLUMNS[0]]), int(r[SPAN_COLUMNS[1]])) for r in kept]
    for record in records:
        for column in SPAN_COLUMNS:
            record.pop(column, None)
    return _normalized(cfg, kept, spans, decoded, ahead)


def _normalize(data: bytes, cfg: RunConfig, decoded: bool):
    """(the normalized image, None) or (None, the rejection), as the download stage would judge it."""
    try:
        return normalize_image(data, cfg.resize, cfg.download.max_image_area, read_header(data), decoded), None
    except Exception as exc:  # ImageRejected, or whatever a strange file raises
        return None, image_rejection(exc, WRITE)


def _normalized(cfg: RunConfig, kept: list[dict], spans: list[tuple[int, int]], decoded: frozenset,
                ahead: int) -> Iterator[SourceImage]:
    if not kept:
        return
    with storage.local_copy(kept[0][SOURCE_SHARD]) as local, open(local, "rb") as f:
        fd = f.fileno()

        def read(item: tuple[dict, tuple[int, int]]):
            record, (offset, size) = item
            return _normalize(os.pread(fd, size, offset), cfg, record["key"] in decoded)

        for (record, _), (image, rejection) in storage.read_ahead(list(zip(kept, spans)), read,
                                                                 depth=ahead, threads=NORMALIZE_THREADS):
            if rejection is not None:
                yield record["key"], None, None, rejection
                continue
            record.update(width=image.width, height=image.height,
                          original_width=image.original_width, original_height=image.original_height)
            if image.bucket is not None:
                record["bucket"] = list(image.bucket)
            # The json as the download stage stores it: the record's values as JSON makes them.
            yield record["key"], image.data, json.loads(json.dumps(sample_meta(record), default=str)), None
