"""Dedup within a run: a global pass over hashes saved per shard (the `dedup` filter).

Whether a sample is a duplicate depends on every other shard, so `curate run` waits for
every shard's download (and score) and runs this pass before any shard is written; the
write stage's `dedup` filter then only looks its samples up (filters/dedup.py).

Kinds, from the most exact: `url`, `sha256` (of the downloaded bytes), `phash` (64-bit
perceptual hash of the normalized image, imagehash.phash, within Hamming distance k) and
`semantic` (cosine >= 1 - eps of the saved CLIP image embeddings, SemDeDup-style). A
sample that is a duplicate of several kinds gets the most exact one as its reason.

Which copy is kept: the first in (shard, row) order; every later sample that matches an
EARLIER sample is dropped, whether or not that earlier sample is itself kept. So a chain
A ~ B ~ C (B near both, A and C farther apart than k) drops B and C and keeps A. This rule
looks at pairs only, which is what lets every partition be decided independently and
makes the result independent of how the data is partitioned: reruns give identical output.

The pass is a hash-partitioned shuffle of P partitions, all of it Dask tasks whose memory
is bounded by a shard or a partition, never by the dataset:

    1. hash (one task per shard): read the shard's ok rows (url, sha256, phash; and the
       image embeddings for semantic dedup) and write them as records into
       work/dedup/hashes/NNNNN.arrow, one Arrow record batch per partition:
         url     → 128-bit blake2b of the URL
         sha256  → its first 128 bits
         phash   → pigeonhole bands: split the 64 bits into k+1 bands; two hashes within
                   distance k agree exactly on at least one band, so the record is written
                   once per band, keyed by (band index, band value)
         semantic→ (NNNNN.sem.arrow) the nearest k-means centroid of the embedding; the
                   centroids are fitted first, in one task, on a bounded random sample
       and a record goes to the partition chosen by a hash of its key.
    2. find (one task per partition): read that partition's batch of every shard; within
       each group of equal keys the first sample is the original of the others (exact
       kinds), or each sample is compared with the earlier ones of its group by true
       Hamming distance (phash) or cosine (semantic, a group is a cluster). Decisions
       (row, original row, kind) go to work/dedup/decisions/PPPPP.arrow, one record batch
       per shard.
    3. write (the dedup filter of each shard's write task): read its batch of every
       partition's decisions and keep, per sample, the most exact kind, then the
       earliest original.

Costs and limits. Each input row makes 2 + (k+1) records of ~33 bytes (+ 2 bytes per
embedding dimension for semantic); a partition holds ~1M rows' records by default, so a
find task holds ~0.5 GB (+1 GB of 512-d embeddings for semantic) whatever the dataset. pHash band groups are compared
pairwise, identical hashes once (so placeholder images cost nothing): for N rows of evenly
spread hashes about (k+1) · N² / 2^(64/(k+1)+1) comparisons. k=4: 1.2e7 at 2e5 rows
(measured: 3.6 s of find tasks on this 2-core machine), 3e10 at 1e7, 3e12 at 1e8 rows (CPU
hours, spread over the find tasks); real hashes are less evenly spread, so more. Beyond
~1e7 rows use k=2 or 3 (k=2: 7e9 at 1e8 rows). A semantic cluster is compared pairwise in
blocks: memory ~ cluster size × dim × 4 bytes, time ~ size² · dim, so choose
`semantic_clusters` near N / 5,000 (the default); k-means itself runs in one task on at
most 100,000 sampled embeddings (100 clusters of 512-d: ~10 s here; thousands of clusters:
minutes). As in SemDeDup, two near duplicates assigned to different clusters are not
compared (rare: near duplicates are close to each other, so mostly to the same centroid).
Samples the write stage drops before the filter chain (CLIP decode errors) take no part;
other sample filters do not change which copy is kept, so a duplicate whose original is
dropped by another filter is dropped too.

Layout (work/dedup/; after the run only plan.json and done.json stay, unless output.keep_intermediate):
    plan.json                  partitions, shards, parameters of the pass
    centroids.npy              k-means centroids (semantic)
    hashes/NNNNN.arrow         per shard, one batch per partition (.sem.arrow: embeddings)
    decisions/PPPPP.arrow      per partition, one batch per shard
    done.json                  the pass's stats, written last: a rerun skips a finished pass
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Callable, Optional

import numpy as np
import pyarrow as pa

from curate.filters.dedup import dedup_params
from curate.pipeline import storage
from curate.pipeline.dedup_store import (
    DECISION_SCHEMA, PHASH, SEMANTIC, SHA256, URL, dedup_dir, most_exact, read_batch, sample_order, write_batches,
)
from curate.pipeline.layout import RunLayout
from curate.pipeline.records import SUCCESS
from curate.pipeline.shards import atomic_path, run_once, shard_name

ROWS_PER_PARTITION = 1_000_000  # input rows whose records one find task holds
ROWS_PER_CLUSTER = 5_000  # default semantic cluster size
KMEANS_MAX_SAMPLE = 100_000  # embeddings the centroids are fitted on, at most
KMEANS_SAMPLE_PER_CLUSTER = 40
KMEANS_ITERATIONS = 10
SEED = 0
BLOCK_CELLS = 4_000_000  # pairwise comparisons held in memory at once

HASH_SCHEMA = pa.schema([
    ("kind", pa.int8()), ("key_hi", pa.uint64()), ("key_lo", pa.uint64()),
    ("order", pa.int64()), ("phash", pa.uint64()),
])


# --- settings -----------------------------------------------------------------------------

def _mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A well-spread 64-bit hash of two uint64 arrays (splitmix64's finalizer); it picks a
    record's partition. Wrapping on overflow is intended."""
    with np.errstate(over="ignore"):
        x = a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + b.astype(np.uint64)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def phash_bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of the k+1 bands covering the 64 bits."""
    n = max_distance + 1
    widths = [64 // n + (1 if b < 64 % n else 0) for b in range(n)]
    shifts = np.cumsum([0] + widths[:-1])
    return [(int(s), w) for s, w in zip(shifts, widths)]


def _digest128(values: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    words = np.frombuffer(b"".join(values), dtype="<u8").reshape(-1, 2) if values else np.zeros((0, 2), np.uint64)
    return words[:, 0].astype(np.uint64), words[:, 1].astype(np.uint64)


# --- the pass -----------------------------------------------------------------------------

def run_dedup_pass(run_tasks: Callable, root: str, spec: dict, n_shards: int, rows_per_shard: int,
                   scored: bool, keep_intermediate: bool) -> dict:
    """Run the whole pass (skipped when done). `run_tasks(step, fn, arg_tuples)` runs fn on
    each argument tuple and returns the results in order: an executor's `map` (pipeline/executor.py)."""
    folder = dedup_dir(root)
    done = storage.join(folder, "done.json")
    if storage.exists(done):
        return json.loads(storage.read_text(done))
    started = time.time()
    storage.make_dirs(folder)
    params = dedup_params(spec)
    semantic = params.semantic_eps is not None
    if semantic and not scored:
        raise RuntimeError("dedup: semantic_eps needs clip.enabled: true")
    plan_path = storage.join(folder, "plan.json")
    if storage.exists(plan_path):  # a rerun after a kill continues with the same partitioning
        plan = json.loads(storage.read_text(plan_path))
    else:
        partitions = params.partitions or max(1, math.ceil(n_shards * rows_per_shard / ROWS_PER_PARTITION))
        # rows_per_shard: how keys are formed (shards.sample_key), to name the samples decided on
        plan = {"partitions": partitions, "shards": n_shards, "rows_per_shard": rows_per_shard,
                "params": params.model_dump()}
        with atomic_path(plan_path) as tmp:
            tmp.write_text(json.dumps(plan, indent=1))
    P = plan["partitions"]
    clusters = None
    if semantic:
        clusters = run_tasks("dedup-centroids", fit_centroids, [(root, spec, n_shards)])[0]
    hashed = run_tasks("dedup-hash", hash_shard, [(root, i, spec, P, scored) for i in range(n_shards)])
    found = run_tasks("dedup-find", find_duplicates, [(root, p, spec, n_shards) for p in range(P)])
    stats = {
        "partitions": P,
        "samples": sum(h["samples"] for h in hashed),
        "records": sum(h["records"] for h in hashed),
        "comparisons": sum(f["comparisons"] for f in found),
        **({"clusters": clusters} if clusters else {}),
        "seconds": round(time.time() - started, 3),
    }
    with atomic_path(done) as tmp:
        tmp.write_text(json.dumps(stats, indent=1, sort_keys=True))
    if not keep_intermediate:  # only the find tasks read them
        storage.remove_tree(storage.join(folder, "hashes"))
    return stats


def finish_dedup(root: str, keep_intermediate: bool) -> Optional[dict]:
    """After every shard is written: the pass's stats for stats.json; its bulky files are
    removed unless kept (done.json stays, so a rerun of a finished run does not redo it)."""
    folder = dedup_dir(root)
    done = storage.join(folder, "done.json")
    if not storage.exists(done):
        return None
    if not keep_intermediate:
        for name in ("hashes", "decisions"):
            storage.remove_tree(storage.join(folder, name))
        storage.remove(storage.join(folder, "centroids.npy"))
    return json.loads(storage.read_text(done))


# --- step 0: k-means centroids (semantic) -------------------------------------------------

def _scored_ok(layout: RunLayout, shard_id: int) -> tuple[list[str], np.ndarray]:
    """Keys of the shard's score metadata (row-aligned with its embeddings) and the mask of
    those that were embedded (a CLIP decode error leaves a zero row)."""

    meta = storage.read_parquet(layout.embedding_files(shard_id)["metadata"], columns=["key", "status"])
    return meta.column("key").to_pylist(), np.array([s == SUCCESS for s in meta.column("status").to_pylist()], bool)


def kmeans(x: np.ndarray, k: int, iterations: int = KMEANS_ITERATIONS, seed: int = SEED) -> np.ndarray:
    """Spherical k-means (cosine) of L2-normalized rows; returns normalized centroids."""
    rng = np.random.default_rng(seed)
    k = max(1, min(k, len(x)))
    centroids = x[rng.choice(len(x), k, replace=False)].copy()
    for _ in range(iterations):
        assign = nearest_centroid(x, centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        filled = norms[:, 0] > 0  # an empty cluster keeps its centroid
        centroids[filled] = sums[filled] / norms[filled]
    return centroids


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    out = np.empty(len(x), np.int64)
    step = max(1, BLOCK_CELLS // max(1, len(centroids)))
    for a in range(0, len(x), step):
        out[a:a + step] = np.argmax(x[a:a + step] @ centroids.T, axis=1)
    return out


def fit_centroids(root: str, spec: dict, n_shards: int) -> int:
    """Fit the semantic clusters on a bounded random sample of the saved image embeddings;
    writes work/dedup/centroids.npy (skipped when present). Returns the number of clusters."""

    layout = RunLayout(root)
    path = storage.join(dedup_dir(root), "centroids.npy")
    if storage.exists(path):
        return int(storage.load_npy(path).shape[0])
    params = dedup_params(spec)
    masks = [_scored_ok(layout, i)[1] for i in range(n_shards)]
    total = int(sum(m.sum() for m in masks))
    k = params.semantic_clusters or math.ceil(total / ROWS_PER_CLUSTER)
    want = min(total, KMEANS_MAX_SAMPLE, max(k * KMEANS_SAMPLE_PER_CLUSTER, 10_000))
    parts = []
    for i, mask in enumerate(masks):
        ok = np.flatnonzero(mask)
        take = min(len(ok), math.ceil(want * len(ok) / total)) if total else 0
        if take:
            rows = np.sort(np.random.default_rng([SEED, i]).choice(ok, take, replace=False))
            emb = storage.load_npy(layout.embedding_files(i)["img_emb"], mmap=True)
            parts.append(np.asarray(emb[rows], dtype=np.float32))
    sample = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    centroids = kmeans(sample, k) if len(sample) else sample
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, centroids.astype(np.float32))
    return int(len(centroids))


# --- step 1: hash records per shard ------------------------------------------------------

def hash_shard(root: str, shard_id: int, spec: dict, partitions: int, scored: bool) -> dict:
    """Step 1 for one shard: its records, split by partition. Done shards are not redone."""
    out = storage.join(dedup_dir(root), "hashes")
    name = shard_name(shard_id)
    return run_once(out, shard_id, lambda: _hash_shard(root, shard_id, spec, partitions, scored, out),
                    outputs=[storage.join(out, f"{name}.arrow"), storage.join(out, f"{name}.sem.arrow")])


def _hash_shard(root: str, shard_id: int, spec: dict, partitions: int, scored: bool, out: str) -> dict:
    layout = RunLayout(root)
    params = dedup_params(spec)
    name = shard_name(shard_id)

    # A shard without a single image has no phash column at all (columns come from the records).
    table = storage.read_parquet(layout.download_files(shard_id)["parquet"])
    table = table.select([c for c in ("key", "status", "url", "sha256", "phash") if c in table.column_names]).to_pydict()
    candidate = [s == SUCCESS for s in table["status"]]
    if scored:  # rows the score stage could not embed are rejected before any filter
        keys, embedded = _scored_ok(layout, shard_id)
        embedded_keys = {k for k, ok in zip(keys, embedded) if ok}
        candidate = [c and k in embedded_keys for c, k in zip(candidate, table["key"])]
    rows = [i for i, c in enumerate(candidate) if c]
    orders = np.array([sample_order(shard_id, i) for i in rows], np.int64)

    parts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # kind, hi, lo, order, phash
    zeros = np.zeros(len(rows), np.uint64)
    if params.url:
        # Input tars may have samples without a url (no json, or none in it): no url, no duplicate by it.
        with_url = [j for j, i in enumerate(rows) if table["url"][i] is not None]
        hi, lo = _digest128([hashlib.blake2b(table["url"][rows[j]].encode(), digest_size=16).digest() for j in with_url])
        parts.append((URL, hi, lo, orders[with_url], zeros[with_url]))
    if params.sha256:
        hi, lo = _digest128([bytes.fromhex(table["sha256"][i])[:16] for i in rows])
        parts.append((SHA256, hi, lo, orders, zeros))
    if params.phash_max_distance is not None:
        full = np.array([int(table["phash"][i], 16) for i in rows], np.uint64)
        for band, (shift, width) in enumerate(phash_bands(params.phash_max_distance)):
            value = (full >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            parts.append((PHASH, np.full(len(rows), band, np.uint64), value, orders, full))
    kind = np.concatenate([np.full(len(p[1]), p[0], np.int8) for p in parts]) if parts else np.zeros(0, np.int8)
    cols = {
        "kind": kind,
        "key_hi": np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.uint64),
        "key_lo": np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.uint64),
        "order": np.concatenate([p[3] for p in parts]) if parts else np.zeros(0, np.int64),
        "phash": np.concatenate([p[4] for p in parts]) if parts else np.zeros(0, np.uint64),
    }
    partition = (_mix(_mix(cols["kind"], cols["key_hi"]), cols["key_lo"]) % np.uint64(partitions)).astype(np.int64)
    write_batches(storage.join(out, f"{name}.arrow"), HASH_SCHEMA, cols, partition, partitions)

    if params.semantic_eps is not None:
        _hash_embeddings(layout, shard_id, storage.join(out, f"{name}.sem.arrow"), rows, table["key"], orders, partitions)

    return {"shard": shard_id, "samples": len(rows), "records": int(len(kind))}


def _hash_embeddings(layout: RunLayout, shard_id: int, path: str, rows: list[int], all_keys: list[str],
                     orders: np.ndarray, partitions: int) -> None:
    """The shard's image embeddings with their nearest centroid, split by partition (of the cluster)."""

    centroids = storage.load_npy(storage.join(dedup_dir(layout.root), "centroids.npy"))
    keys, _ = _scored_ok(layout, shard_id)
    position = {k: j for j, k in enumerate(keys)}
    emb = storage.load_npy(layout.embedding_files(shard_id)["img_emb"], mmap=True)
    picked = np.array([position[all_keys[i]] for i in rows], np.int64)
    # Every shard's batches need one list size, also a shard with nothing embedded (saved as [0, dim]; [0, 0] by older runs).
    dim = centroids.shape[1] if len(centroids) else emb.shape[1]
    vectors = np.asarray(emb[picked] if len(picked) else np.zeros((0, dim)), np.float16)
    cluster = nearest_centroid(vectors.astype(np.float32), centroids) if len(centroids) else np.zeros(len(rows), np.int64)
    schema = pa.schema([("cluster", pa.int64()), ("order", pa.int64()),
                        ("emb", pa.list_(pa.float16(), vectors.shape[1]))])
    partition = (_mix(np.full(len(cluster), SEMANTIC, np.uint64), cluster.astype(np.uint64))
                 % np.uint64(partitions)).astype(np.int64)
    write_batches(path, schema, {"cluster": cluster, "order": orders, "emb": vectors}, partition, partitions)


# --- step 2: find duplicates per partition -----------------------------------------------

def earliest_close(n: int, close: Callable[[int, int], np.ndarray]) -> np.ndarray:
    """For items 0..n-1 (in keep order), the index of the first earlier item close to each,
    or -1. close(a, b) gives the [b-a, b] boolean matrix of items a..b-1 against 0..b-1."""
    first = np.full(n, -1, np.int64)
    step = max(1, BLOCK_CELLS // max(1, n))
    for a in range(0, n, step):
        b = min(n, a + step)
        hit = close(a, b) & (np.arange(b)[None, :] < np.arange(a, b)[:, None])  # strictly earlier
        found = hit.any(axis=1)
        first[a:b][found] = hit.argmax(axis=1)[found]
    return first


def _groups(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort order (by keys, then `order` as the last key) and the start of each equal-key group."""
    idx = np.lexsort(keys[::-1])
    new = np.ones(len(idx), bool)
    if len(idx):
        new[1:] = np.any([k[idx][1:] != k[idx][:-1] for k in keys[:-1]], axis=0)
    return idx, new


def _exact(hi: np.ndarray, lo: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every later sample of a group of equal keys is a duplicate of the group's first."""
    idx, new = _groups(hi, lo, order)
    first = np.maximum.accumulate(np.where(new, np.arange(len(idx)), 0))
    o = order[idx]
    return o[~new], o[first][~new]


def _near(group_keys: tuple, order: np.ndarray, close_fn: Callable, labels_fn: Callable) -> tuple[np.ndarray, np.ndarray, int]:
    """Within each group of equal keys, each sample against the earlier ones of its group.

    Identical values (labels_fn gives equal labels; common: placeholder images, copies) are
    compared once: a later copy of a value is a duplicate of whatever the value's first
    occurrence duplicates, else of that first occurrence, which is exactly the pairwise
    rule. So a group's cost grows with its distinct values, not its size."""
    idx, new = _groups(*group_keys, order)
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(idx))
    dups, originals, comparisons = [], [], 0
    for s, e in zip(starts, ends):
        if e - s < 2:
            continue
        members = idx[s:e]  # in keep order
        labels = labels_fn(members)
        _, first_of_label, label = np.unique(labels, return_index=True, return_inverse=True)
        reps = np.sort(first_of_label)  # first occurrences, in keep order
        first = earliest_close(len(reps), close_fn(members[reps]))
        comparisons += len(reps) * (len(reps) - 1) // 2
        original = np.full(e - s, -1, np.int64)  # position in members, or -1
        original[reps] = np.where(first >= 0, reps[np.maximum(first, 0)], -1)
        rep = first_of_label[label.reshape(-1)]
        copies = rep != np.arange(e - s)
        original[copies] = np.where(original[rep[copies]] >= 0, original[rep[copies]], rep[copies])
        hit = original >= 0
        dups.append(order[members][hit])
        originals.append(order[members][original[hit]])
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
    return cat(dups), cat(originals), comparisons


def find_duplicates(root: str, partition: int, spec: dict, n_shards: int) -> dict:
    """Step 2 for one partition: (sample, original, kind) decisions, one record batch per shard.
    A partition's files are named like a shard's, so the same done-marker protocol applies."""
    out = storage.join(dedup_dir(root), "decisions")
    return run_once(out, partition, lambda: _find_duplicates(root, partition, spec, n_shards, out),
                    outputs=[storage.join(out, f"{shard_name(partition)}.arrow")])


def _find_duplicates(root: str, partition: int, spec: dict, n_shards: int, out: str) -> dict:
    params = dedup_params(spec)
    folder = dedup_dir(root)

    table = pa.Table.from_batches(
        [read_batch(storage.join(folder, "hashes", f"{shard_name(i)}.arrow"), partition) for i in range(n_shards)],
        schema=HASH_SCHEMA)
    cols = {name: table.column(name).to_numpy() for name in HASH_SCHEMA.names}
    found: list[tuple[np.ndarray, np.ndarray, int]] = []
    comparisons = 0
    for kind in (URL, SHA256):
        m = cols["kind"] == kind
        dup, orig = _exact(cols["key_hi"][m], cols["key_lo"][m], cols["order"][m])
        found.append((dup, orig, kind))
    if params.phash_max_distance is not None:
        m = cols["kind"] == PHASH
        full, k = cols["phash"][m], params.phash_max_distance

        def hamming_close(members):
            h = full[members]
            return lambda a, b: np.bitwise_count(h[a:b, None] ^ h[None, :b]) <= k

        dup, orig, n = _near((cols["key_hi"][m], cols["key_lo"][m]), cols["order"][m], hamming_close,
                             lambda members: full[members])
        found.append((dup, orig, PHASH))
        comparisons += n
    if params.semantic_eps is not None:
        sem = pa.Table.from_batches([read_batch(storage.join(folder, "hashes", f"{shard_name(i)}.sem.arrow"), partition)
                                     for i in range(n_shards)])
        cluster, order = sem.column("cluster").to_numpy(), sem.column("order").to_numpy()
        emb = sem.column("emb").combine_chunks()
        vectors = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(order), emb.type.list_size)
        threshold = 1.0 - params.semantic_eps

        def cosine_close(members):
            x = vectors[members].astype(np.float32)
            return lambda a, b: (x[a:b] @ x[:b].T) >= threshold

        dup, orig, n = _near((cluster,), order, cosine_close,
                             lambda members: np.unique(vectors[members], axis=0, return_inverse=True)[1])
        found.append((dup, orig, SEMANTIC))
        comparisons += n

    order, original, kind = most_exact(
        np.concatenate([f[0] for f in found]) if found else np.zeros(0, np.int64),
        np.concatenate([f[1] for f in found]) if found else np.zeros(0, np.int64),
        np.concatenate([np.full(len(f[0]), f[2], np.int8) for f in found]) if found else np.zeros(0, np.int8),
    )
    write_batches(storage.join(out, f"{shard_name(partition)}.arrow"), DECISION_SCHEMA,
                   {"order": order, "original": original, "kind": kind}, order >> 32, n_shards)
    return {"partition": partition, "decisions": int(len(order)), "comparisons": int(comparisons)}


