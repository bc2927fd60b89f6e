"""The dedup pass's store: how its files under work/dedup/ are laid out, written and read.

The pass itself (pipeline/stages/dedup.py) writes per-shard hash records and per-partition
decisions as Arrow IPC files with one record batch per shard or partition; the `dedup`
filter (filters/dedup.py) reads one shard's decisions back in the write stage. Both use
this module, so neither needs the other.

    plan.json                  partitions, shards, rows_per_shard (for the keys), parameters of the pass
    decisions/PPPPP.arrow      per partition, one batch per shard: (order, original, kind)
    done.json                  the pass's stats, written last
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa

from curate.pipeline import storage
from curate.pipeline.layout import RunLayout
from curate.pipeline.shards import atomic_path, sample_key, shard_name

KINDS = ("url", "sha256", "phash", "semantic")  # most exact first: the reason a sample gets
URL, SHA256, PHASH, SEMANTIC = range(4)

DECISION_SCHEMA = pa.schema([("order", pa.int64()), ("original", pa.int64()), ("kind", pa.int8())])


def dedup_dir(root: str) -> str:
    return RunLayout(root).dedup


def phash_hex(jpg: bytes) -> str:
    """imagehash.phash of a JPEG as 16 hex digits: the near-duplicate hash the download stage
    records for the pass. pHash looks at a 32x32 grey image, so the JPEG is decoded at reduced
    size (libjpeg DCT scaling): 0.6-1.9 ms at 256-512 px instead of 1.3-5 ms, about a tenth
    of what normalizing the image costs."""
    import imagehash
    from PIL import Image

    with Image.open(io.BytesIO(jpg)) as im:
        im.draft("L", (64, 64))
        return str(imagehash.phash(im))


def sample_order(shard_id: int, index: int) -> int:
    """(shard, row) as one sortable integer: the order that decides which copy is kept."""
    return (shard_id << 32) | index


def order_key(order: int, per_shard: int) -> str:
    return sample_key(order >> 32, order & 0xFFFFFFFF, per_shard)


def write_batches(path: str, schema: pa.Schema, columns: dict, group: np.ndarray, n_groups: int) -> None:
    """Write `columns` (arrays of equal length) as one record batch per group 0..n_groups-1."""
    by_group = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[by_group], np.arange(n_groups + 1))
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for g in range(n_groups):
                rows = by_group[bounds[g]:bounds[g + 1]]
                writer.write_batch(pa.record_batch(
                    [pa.array(columns[f.name][rows], f.type) if not pa.types.is_fixed_size_list(f.type)
                     else _fixed_list(columns[f.name][rows], f.type) for f in schema], schema=schema))


def _fixed_list(matrix: np.ndarray, typ: pa.DataType) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), typ.value_type), typ.list_size)


def read_batch(path: str, index: int) -> pa.RecordBatch:
    if not storage.is_url(path):
        with pa.OSFile(str(path), "rb") as source:
            return pa.ipc.open_file(source).get_batch(index)
    # In object storage: ranged reads of the one batch (and the file's footer), not the whole file.
    with storage.open_file(path) as f:
        return pa.ipc.open_file(pa.PythonFile(f, mode="r")).get_batch(index)


def most_exact(order: np.ndarray, original: np.ndarray, kind: np.ndarray):
    """One decision per sample: its most exact kind, then its earliest original."""
    idx = np.lexsort((original, kind, order))
    order, original, kind = order[idx], original[idx], kind[idx]
    first = np.ones(len(order), bool)
    first[1:] = order[1:] != order[:-1]
    return order[first], original[first], kind[first]


def read_decisions(root: str, shard_id: int) -> dict[str, tuple[str, str]]:
    """key → (kind, key of the earlier sample it duplicates) for the duplicates of one shard."""
    folder = dedup_dir(root)
    if not storage.exists(storage.join(folder, "done.json")):
        raise RuntimeError("dedup: the dedup pass has not run for this output (work/dedup/done.json missing)")
    plan = json.loads(storage.read_text(storage.join(folder, "plan.json")))
    batches = [read_batch(storage.join(folder, "decisions", f"{shard_name(p)}.arrow"), shard_id)
               for p in range(plan["partitions"])]
    table = pa.Table.from_batches(batches, schema=DECISION_SCHEMA)
    order, original, kind = most_exact(*(table.column(c).to_numpy() for c in DECISION_SCHEMA.names))
    per_shard = plan["rows_per_shard"]
    return {order_key(int(o), per_shard): (KINDS[int(k)], order_key(int(g), per_shard))
            for o, g, k in zip(order, original, kind)}
