"""The read stage: one existing input tar (a WebDataset / img2dataset shard) in, the parquet of
every sample in it out; the images stay where they lie.

It stands where the download stage stands for URL lists (pipeline/plan.py chooses by
input.format), under the same done-marker protocol, and writes the same parquet (one record
per input sample, kept or rejected with its reason) into the same folder, but no tar: for a
kept sample the record says where its image lies in the input tar (`source_shard`,
`image_offset`, `image_size`), and the score and write stages read it from there
(pipeline/sources.py).

A sample is the consecutive members sharing a key (webdataset's rule: the member's path up to
the first dot of its file name): its image (the first of `input.image_exts` present), its
caption (the `txt` member, or `input.caption_field` of its json) and its json, whose fields are
carried into the output json and parquet (LAION's similarity / punsafe / pwatermark for the
`laion_columns` filter). Per sample, as the download stage does per row: the row filters on
caption and json before any image byte is looked at, then the bytes filters (hash blocklist)
on the member's bytes and its header's size (`resolution`), and the header's area against
`download.max_image_area`. Nothing is decoded here unless the dedup filter needs a perceptual
hash.

Every sample is accounted for: no image member → `no_image`; an image whose header does not
read → the download stage's reasons; a tar cut short → the samples before the cut are kept,
the one it cut is rejected `truncated_tar` (where no member name tells which that is, the last
one read, whose last members may be what was lost) and the stats say so. A sample without a caption is
kept with a null caption, as a URL row without one is (caption filters decide). Members that
belong to no sample (directories, links, names without an extension, keys with none of image,
txt or json) and a sample's members beyond those three are counted in the stats
(`input.members_ignored`). img2dataset's NNNNN.parquet / NNNNN_stats.json beside a tar are read
only to cross-check the count of samples.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from curate.filters import apply_chain, build_stage_chain, chain_counts
from curate.filters.base import Filter
from curate.filters.dedup import needs_phash
from curate.pipeline import storage
from curate.pipeline.config import RunConfig
from curate.pipeline.dedup_store import phash_hex
from curate.pipeline.image import examine_bytes, image_rejection, normalize_image
from curate.pipeline.records import (
    FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE, RECORD_COLUMNS, SUCCESS, Rejection, records_table,
)
from curate.pipeline.shards import atomic_path, index_digits, run_once, sample_key, shard_name
from curate.pipeline.sources import IMAGES_FROM, INPUT_TAR, SOURCE_SHARD, SPAN_COLUMNS
from curate.pipeline.tarshard import TarDamaged, TarEntry, scan_tar

logger = logging.getLogger("curate")

# The stage's name in the rejections it makes itself and in the stats.
READ = "read"
TRUNCATED = "truncated_tar"
NO_IMAGE = "no_image"
TOO_MANY = "too_many_samples"
# Threads hashing and reading headers (decoding too, when dedup needs a pHash).
READ_THREADS = 4
# Fields of an input json that are not carried: curate writes these columns itself (the json's
# `url` fills the url column; its caption is used only when named by input.caption_field).
OWN_COLUMNS = {*RECORD_COLUMNS, SOURCE_SHARD, *SPAN_COLUMNS, "source_key", "phash", "bucket",
               "clip_similarity", "clip_model", "duplicate_of"}
# webdataset's split of a member name: key = the path up to the first dot of the file name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def read_shard(tar_path: str, shard_id: int, stage_dir: str, cfg: RunConfig) -> dict:
    """Read one input tar into the shard's parquet. Returns its stats; a done shard is not redone."""
    return run_once(stage_dir, shard_id, lambda: _read(tar_path, shard_id, stage_dir, cfg),
                    outputs=[storage.join(stage_dir, f"{shard_name(shard_id)}.parquet")])


def _split(name: str) -> tuple[Optional[str], Optional[str]]:
    found = _KEY_EXT.match(name)
    return (found.group(1), found.group(2).lower()) if found else (None, None)


def _samples(entries: Iterator[TarEntry], ignored: Counter) -> Iterator[tuple[str, dict[str, TarEntry], Optional[str]]]:
    """(key, {ext: entry}, damage) of each group of consecutive members sharing a key; `damage`
    names what cut the tar for the group it may have lost members of, else None. Members of no
    group are counted in `ignored`."""
    key, members = None, {}
    try:
        for entry in entries:
            if entry.kind != "file":
                ignored[entry.kind] += 1
                continue
            base, ext = _split(entry.name)
            if base is None:
                ignored["no_extension"] += 1
                continue
            if base != key:
                if key is not None:
                    yield key, members, None
                key, members = base, {}
            if ext in members:  # webdataset refuses such a tar; here the first one counts
                ignored["repeated_member"] += 1
                continue
            members[ext] = entry
    except TarDamaged as damage:
        cut_key = _split(damage.cut_member)[0] if damage.cut_member else None
        if cut_key is not None and cut_key != key:
            if key is not None:
                yield key, members, None  # complete: the cut is in the next sample
            yield cut_key, {}, damage.detail
        elif key is not None:
            yield key, members, damage.detail  # its last members may be what was cut
        raise
    if key is not None:
        yield key, members, None


def _carried(fields: dict, extra_cols: list[str]) -> dict:
    """A json's fields as the record's extra columns: nested values as JSON text (one column
    type), curate's own columns left out."""
    carried = {c: None for c in extra_cols}
    for name, value in fields.items():
        if name in OWN_COLUMNS:
            continue
        carried[name] = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value
    return carried


def _text(value) -> Optional[str]:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _examine(row: dict, data: bytes, span: tuple[int, int], cfg: RunConfig, bytes_chain: list[Filter],
             phash: bool) -> dict:
    """The outcome columns of a sample with an image: bytes filters, header, area; pHash when asked.
    Never raises: a failure is a rejection with the download stage's reason."""
    outcome, header, rejection = examine_bytes(data, row, lambda s: apply_chain(bytes_chain, s), READ)
    try:
        if rejection is not None:
            return {**outcome, **rejection.columns()}
        area = header.width * header.height
        if area > cfg.download.max_image_area:  # a bomb never reaches a decoder of a later stage
            return {**outcome, **Rejection("image_area_too_large", filter=READ, status=FAILED_TO_RESIZE,
                                           detail=f"{header.width}x{header.height} > {cfg.download.max_image_area} pixels"
                                           ).columns()}
        if phash:  # the dedup filter's hash of the image as it will be stored: the one decode this stage makes
            try:
                outcome["phash"] = phash_hex(normalize_image(data, cfg.resize, cfg.download.max_image_area, header).data)
            except Exception as exc:
                return {**outcome, **image_rejection(exc, READ).columns()}
    finally:
        if header is not None:
            header.close()
    return {**outcome, "status": SUCCESS, SPAN_COLUMNS[0]: span[0], SPAN_COLUMNS[1]: span[1]}


def _table(records: list[dict], extra_cols: list[str]) -> pa.Table:
    """The records as a table; a carried json field whose values differ in kind across the tar
    (12 and "12px") becomes text in this shard rather than failing it."""
    try:
        return records_table(records, extra_cols)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass
    for column in sorted({k for r in records for k in r} - set(RECORD_COLUMNS)):
        try:
            pa.array([r.get(column) for r in records])
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            for r in records:
                if column in r:
                    r[column] = _text(r[column])
    return records_table(records, extra_cols)


def _cross_check(tar_path: str, samples: int) -> Optional[dict]:
    """img2dataset's own counts beside the tar (NNNNN.parquet, NNNNN_stats.json), when there,
    against the samples read; the disagreement, or None."""
    base = tar_path[: -len(".tar")] if tar_path.endswith(".tar") else tar_path
    found = {}
    try:
        if storage.exists(base + "_stats.json"):
            found["stats_successes"] = json.loads(storage.read_text(base + "_stats.json")).get("successes")
        if storage.exists(base + ".parquet"):
            status = storage.read_parquet(base + ".parquet", columns=["status"])["status"].to_pylist()
            found["parquet_successes"] = sum(s == "success" for s in status)
    except Exception as exc:  # a cross-check never fails the shard
        return {"tar": tar_path, "error": f"{type(exc).__name__}: {exc}"[:200]}
    if all(n == samples for n in found.values() if n is not None):
        return None
    return {"tar": tar_path, "samples": samples, **found}


def _read(tar_path: str, shard_id: int, stage_dir: str, cfg: RunConfig) -> dict:
    started = time.time()
    extra_cols = list(cfg.input.extra_cols)
    context = {"clip": cfg.clip, "root": str(stage_dir)}
    row_chain = build_stage_chain(cfg.filter_specs(), "row", context)
    bytes_chain = build_stage_chain(cfg.filter_specs(), "bytes", context)
    phash = needs_phash(cfg.filter_specs())
    image_exts = list(cfg.input.image_exts)
    # Keys are img2dataset's: the shard, then the sample's index in as many digits as
    # input.rows_per_shard needs (shards.sample_key), so a tar holds at most this many samples.
    keys_per_shard = 10 ** index_digits(cfg.input.rows_per_shard)
    ignored: Counter = Counter()
    notes: Counter = Counter()
    damage: Optional[str] = None
    records: list[dict] = []
    reasons: Counter = Counter()

    with storage.local_copy(tar_path) as local, open(local, "rb") as f, ThreadPoolExecutor(READ_THREADS) as pool:
        fd = f.fileno()

        def read(entry: TarEntry) -> bytes:
            return os.pread(fd, entry.size, entry.offset)

        def judge(index: int, key: str, members: dict[str, TarEntry], cut: Optional[str]) -> tuple[dict, Future]:
            """The sample's record so far and its outcome (a future when its image is examined)."""
            used = {"txt", "json"}
            image_ext = next((e for e in image_exts if e in members), None)
            if image_ext is not None:
                used.add(image_ext)
            extra = sum(1 for ext in members if ext not in used)
            if extra:
                ignored["extra_member"] += extra
            fields = {}
            if "json" in members:
                try:
                    fields = json.loads(read(members["json"]))
                except Exception:  # not JSON, not UTF-8, nested beyond the parser: one odd sample never fails the shard
                    fields = None
                if not isinstance(fields, dict):
                    notes["unreadable_json"] += 1
                    fields = {}
            if cfg.input.caption_field is None:
                caption = read(members["txt"]).decode("utf-8", errors="replace") if "txt" in members else None
            else:
                caption = _text(fields.get(cfg.input.caption_field))
            if caption is None and cut is None:
                notes["samples_without_caption"] += 1
            url = fields.get("url")
            beyond = index >= keys_per_shard  # no key left for it: see input.rows_per_shard
            sample = {"key": None if beyond else sample_key(shard_id, index, cfg.input.rows_per_shard),
                      "url": url if isinstance(url, str) else None, "caption": caption, "meta": _carried(fields, extra_cols)}
            if cut is not None:
                rejection = Rejection(TRUNCATED, filter=READ, detail=cut, status=FAILED_TO_DOWNLOAD)
            elif beyond:
                rejection = Rejection(TOO_MANY, filter=READ, status=FAILED_TO_DOWNLOAD,
                                      detail=f"sample {index + 1} of a tar; keys have room for {keys_per_shard} "
                                             "(raise input.rows_per_shard)")
            else:
                rejection = apply_chain(row_chain, sample) if row_chain else None
            if rejection is None and image_ext is None:
                rejection = Rejection(NO_IMAGE, filter=READ, status=FAILED_TO_DOWNLOAD,
                                      detail=f"no image member ({', '.join('.' + e for e in image_exts)}); has: "
                                             + (", ".join("." + e for e in members) or "nothing"))
            record = {"key": sample["key"], "url": sample["url"], "caption": sample["caption"],  # as the row filters left it
                      "source_key": key, SOURCE_SHARD: tar_path, **sample["meta"]}
            done: Future = Future()
            if rejection is not None:
                done.set_result(rejection.columns())
                return record, done
            entry = members[image_ext]
            row = {k: sample[k] for k in ("key", "url", "caption", "meta")}
            return record, pool.submit(lambda: _examine(row, read(entry), (entry.offset, entry.size), cfg,
                                                        bytes_chain, phash))

        groups = _samples(scan_tar(local), ignored)
        window: deque = deque()
        index = 0

        def submit_next() -> bool:
            nonlocal index, damage
            while True:
                try:
                    key, members, cut = next(groups)
                except StopIteration:
                    return False
                except TarDamaged as exc:
                    damage = exc.detail
                    return False
                if not members and cut is None:
                    continue
                if cut is None and not ({"txt", "json", *image_exts} & set(members)):
                    ignored["no_sample"] += len(members)  # e.g. a lone README.md, or __meta__.cls
                    continue
                window.append(judge(index, key, members, cut))
                index += 1
                return True

        for _ in range(READ_THREADS * 4):
            if not submit_next():
                break
        while window:
            record, outcome = window.popleft()
            submit_next()
            record.update(outcome.result())
            records.append(record)
            if record["status"] != SUCCESS:
                reasons[record["reason"]] += 1

    with atomic_path(storage.join(stage_dir, f"{shard_name(shard_id)}.parquet")) as tmp:
        pq.write_table(_table(records, extra_cols), tmp)

    found = {"tars": 1, "samples": len(records), "members_ignored": dict(ignored), **notes}
    if damage is not None:
        found["truncated_tars"] = [{"tar": tar_path, "problem": damage}]
        logger.warning(f"input {tar_path}: {damage}; its {len(records)} samples are accounted for, "
                       f"the one it cut as {TRUNCATED}")
    mismatch = _cross_check(tar_path, len(records) - reasons.get(TRUNCATED, 0))
    if mismatch is not None:
        found["crosscheck_mismatches"] = [mismatch]
        logger.warning(f"input {tar_path}: its img2dataset files count otherwise than the tar holds: {mismatch}")
    return {
        "shard": shard_id,
        "stage": READ,
        IMAGES_FROM: INPUT_TAR,
        "source": tar_path,
        "rows": len(records),
        "successes": sum(1 for r in records if r["status"] == SUCCESS),
        "start_time": started,
        "rejected": dict(reasons),
        "bytes_downloaded": 0,
        "filters": {**chain_counts(row_chain), **chain_counts(bytes_chain)},
        "input": found,
    }
