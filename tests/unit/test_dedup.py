"""Dedup within a run (filters/dedup.py, pipeline/dedup.py).

Unit tests run the real pass (its step functions in this process) on real download
parquets and embedding files written here, and compare it with a brute-force reading of
the rule "a sample matching an EARLIER sample is dropped". The end-to-end test
(tests/e2e/test_dedup_run.py) runs `curate run` on served images with planted duplicates
of every kind across shards.
"""

from __future__ import annotations

import io
import random

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import write_config
from curate.pipeline.config import ResizeConfig, load_config
from curate.pipeline.dedup_store import order_key, phash_hex, read_decisions, sample_order
from curate.pipeline.executor import run_serially
from curate.pipeline.stages.dedup import finish_dedup, phash_bands, run_dedup_pass
from curate.pipeline.errors import UserError
from curate.pipeline.image import normalize_image
from curate.pipeline.layout import RunLayout
from curate.pipeline.records import FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE, SUCCESS
from curate.pipeline.shards import sample_key, shard_name
from curate.pipeline.demo.synthetic import photo_like_jpeg


# --- helpers: the real files the pass reads ----------------------------------------------

PER_SHARD = 1000  # the runs' rows_per_shard: how their keys are formed (shards hold up to ~150 rows)


def write_download_parquet(root, shard_id: int, rows: list[dict]) -> None:
    """A download-stage parquet: rows of {url, sha256, phash (int or None), status}. As in the
    real one, the phash column exists only when some row has one."""
    folder = Path(RunLayout(root).download)
    folder.mkdir(parents=True, exist_ok=True)
    columns = {
        "key": [sample_key(shard_id, i, PER_SHARD) for i in range(len(rows))],
        "url": [r.get("url", f"http://example.invalid/{shard_id}/{i}.jpg") for i, r in enumerate(rows)],
        "status": [r.get("status", SUCCESS) for r in rows],
        "sha256": [r.get("sha256", f"{shard_id:08x}{i:08x}".ljust(64, "0")) for i, r in enumerate(rows)],
    }
    if any(r.get("phash") is not None for r in rows):
        columns["phash"] = [None if r.get("phash") is None else f"{r['phash']:016x}" for r in rows]
    pq.write_table(pa.table(columns), folder / f"{shard_name(shard_id)}.parquet")


def write_embeddings(root, shard_id: int, vectors: np.ndarray, failed: set = frozenset()) -> None:
    """The score stage's files for a shard: img_emb rows aligned with metadata keys."""
    out = RunLayout(root).embedding_files(shard_id)
    for path in out.values():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    vectors = vectors.copy()
    vectors[list(failed)] = 0  # what score_shard saves for an image it could not decode
    np.save(out["img_emb"], vectors.astype(np.float16))
    np.save(out["text_emb"], vectors.astype(np.float16))
    pq.write_table(pa.table({
        "key": [sample_key(shard_id, i, PER_SHARD) for i in range(len(vectors))],
        "status": [FAILED_TO_RESIZE if i in failed else SUCCESS for i in range(len(vectors))],
    }), out["metadata"])


def run_pass(root, n_shards: int, scored: bool = False, keep: bool = True, **params) -> dict:
    spec = {"name": "dedup", **params}
    return run_dedup_pass(run_serially, str(root), spec, n_shards, PER_SHARD, scored, keep)


def all_decisions(root, n_shards: int) -> dict[str, tuple[str, str]]:
    found = {}
    for i in range(n_shards):
        found.update(read_decisions(root, i))
    return found


def flip_bits(value: int, n: int, rng: random.Random) -> int:
    for bit in rng.sample(range(64), n):
        value ^= 1 << bit
    return value


def brute_force(items: list[tuple[int, object]], close) -> dict[int, int]:
    """order → order of the first earlier item close to it (the rule, read literally)."""
    items = sorted(items, key=lambda t: t[0])
    out = {}
    for j, (oj, vj) in enumerate(items):
        for oi, vi in items[:j]:
            if close(vi, vj):
                out[oj] = oi
                break
    return out


def spread(values: list, n_shards: int, rng: random.Random) -> list[list]:
    """Values dealt in a random order over n_shards shards (so copies land in any shard)."""
    values = values[:]
    rng.shuffle(values)
    return [values[s::n_shards] for s in range(n_shards)]


# --- unit: the pigeonhole bands and the near-duplicate search ----------------------------


@pytest.mark.parametrize("k", range(13))
def test_bands_cover_the_64_bits_once(k):
    bands = phash_bands(k)
    assert len(bands) == k + 1
    covered = 0
    for shift, width in bands:
        mask = ((1 << width) - 1) << shift
        assert covered & mask == 0
        covered |= mask
    assert covered == (1 << 64) - 1


@pytest.mark.parametrize("k", [2, 4, 7])
def test_phash_pass_finds_every_pair_within_k_and_none_beyond(tmp_path, k):
    rng = random.Random(k)
    values, planted = [], []  # planted: (base, copy, distance)
    for _ in range(120):
        base = rng.getrandbits(64)
        values.append(base)
        # Copies at distances from 0 to k + 3: those up to k must be found, the rest not.
        for d in rng.sample(range(k + 4), 3):
            values.append(flip_bits(base, d, rng))
            planted.append((base, values[-1], d))
    shards = spread(values, 4, rng)
    for s, part in enumerate(shards):
        write_download_parquet(tmp_path, s, [{"phash": v} for v in part])
    run_pass(tmp_path, 4, url=False, sha256=False, phash_max_distance=k, partitions=3)

    items = [(sample_order(s, i), v) for s, part in enumerate(shards) for i, v in enumerate(part)]
    expected = brute_force(items, lambda a, b: bin(a ^ b).count("1") <= k)
    got = all_decisions(tmp_path, 4)
    assert got == {order_key(o, PER_SHARD): ("phash", order_key(g, PER_SHARD)) for o, g in expected.items()}
    # The data probes both sides of the boundary: pairs at exactly k are reported, at k + 1 not.
    value = dict(items)
    reported = {frozenset((value[o], value[g])) for o, g in expected.items()}
    assert any(frozenset((b, c)) in reported for b, c, d in planted if d == k)
    assert any(frozenset((b, c)) not in reported for b, c, d in planted if d == k + 1)
    assert not any(bin(value[o] ^ value[g]).count("1") > k for o, g in expected.items())


def test_exact_kinds_keep_the_first_copy_across_shards(tmp_path):
    a_hash, far = 0x0F0F_0F0F_1234_5678, 0xFFFF_0000_FFFF_0000
    write_download_parquet(tmp_path, 0, [
        {"url": "http://x/a.jpg", "sha256": "aa" * 32, "status": FAILED_TO_DOWNLOAD},  # failed: takes no part
        {"url": "http://x/a.jpg", "sha256": "aa" * 32, "phash": a_hash},                # A
        {"url": "http://x/b.jpg", "sha256": "bb" * 32, "phash": far},                   # B
    ])
    write_download_parquet(tmp_path, 1, [
        {"url": "http://x/a.jpg", "sha256": "cc" * 32, "phash": far ^ 0xFF00},          # same URL as A
        {"url": "http://x/d.jpg", "sha256": "bb" * 32, "phash": far},                   # same bytes as B
        {"url": "http://x/a.jpg", "sha256": "bb" * 32, "phash": far},                   # both: url wins
    ])
    write_download_parquet(tmp_path, 2, [
        {"url": "http://x/f.jpg", "sha256": "aa" * 32, "phash": a_hash ^ 1},            # bytes of A, and near
        {"url": "http://x/g.jpg", "sha256": "dd" * 32, "phash": a_hash ^ 0b11},         # near A only
    ])
    write_download_parquet(tmp_path, 3, [  # nothing downloaded
        {"url": "http://x/a.jpg", "sha256": "aa" * 32, "status": FAILED_TO_DOWNLOAD},
    ])
    run_pass(tmp_path, 4, phash_max_distance=4, partitions=2)
    assert all_decisions(tmp_path, 4) == {
        sample_key(1, 0, PER_SHARD): ("url", sample_key(0, 1, PER_SHARD)),
        sample_key(1, 1, PER_SHARD): ("sha256", sample_key(0, 2, PER_SHARD)),
        sample_key(1, 2, PER_SHARD): ("url", sample_key(0, 1, PER_SHARD)),
        sample_key(2, 0, PER_SHARD): ("sha256", sample_key(0, 1, PER_SHARD)),
        sample_key(2, 1, PER_SHARD): ("phash", sample_key(0, 1, PER_SHARD)),
    }


def test_chain_rule_drops_matches_of_dropped_samples(tmp_path):
    """A ~ B ~ C with A and C farther apart than k: B and C are dropped, A kept (documented)."""
    a = 0
    b = a ^ 0b1111                      # distance 4 from A
    c = b ^ (0b1111 << 8)               # distance 4 from B, 8 from A
    write_download_parquet(tmp_path, 0, [{"phash": a}, {"phash": b}])
    write_download_parquet(tmp_path, 1, [{"phash": c}])
    run_pass(tmp_path, 2, url=False, sha256=False, phash_max_distance=4)
    assert all_decisions(tmp_path, 2) == {
        sample_key(0, 1, PER_SHARD): ("phash", sample_key(0, 0, PER_SHARD)),
        sample_key(1, 0, PER_SHARD): ("phash", sample_key(0, 1, PER_SHARD)),
    }


def test_pass_is_resumable_and_cleans_up(tmp_path):
    write_download_parquet(tmp_path, 0, [{"phash": 1}, {"phash": 3}])
    first = run_pass(tmp_path, 1)
    done = Path(RunLayout(tmp_path).dedup) / "done.json"
    before = done.stat().st_mtime_ns
    assert run_pass(tmp_path, 1) == first and done.stat().st_mtime_ns == before  # skipped
    assert finish_dedup(str(tmp_path), keep_intermediate=False) == first
    assert sorted(p.name for p in Path(RunLayout(tmp_path).dedup).iterdir()) == ["done.json", "plan.json"]


# --- unit: semantic dedup on embeddings ---------------------------------------------------


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_semantic_pass_finds_near_identical_embeddings(tmp_path):
    rng = np.random.default_rng(0)
    dim, eps = 32, 0.05
    bases = unit(rng.normal(size=(150, dim)))
    near = unit(bases[:40] + rng.normal(scale=0.03, size=(40, dim)))    # cos ~0.985: duplicates
    medium = unit(bases[40:80] + rng.normal(scale=0.4, size=(40, dim)))  # cos ~0.7: distinct
    vectors = list(np.concatenate([bases, near, medium]))
    shards = spread(vectors, 3, random.Random(0))
    failed = {0: {2}}  # a CLIP decode failure takes no part
    for s, part in enumerate(shards):
        write_download_parquet(tmp_path, s, [{} for _ in part])
        write_embeddings(tmp_path, s, np.array(part), failed.get(s, set()))
    # A shard where nothing was downloaded: score_shard saves a [0, 0] array for it.
    write_download_parquet(tmp_path, 3, [{"status": FAILED_TO_DOWNLOAD}])
    write_embeddings(tmp_path, 3, np.zeros((0, 0)))
    stats = run_pass(tmp_path, 4, scored=True, url=False, sha256=False, phash_max_distance=None,
                     semantic_eps=eps, semantic_clusters=4, partitions=2)
    assert stats["clusters"] == 4

    items = [(sample_order(s, i), np.asarray(v, np.float16).astype(np.float32))
             for s, part in enumerate(shards) for i, v in enumerate(part) if i not in failed.get(s, set())]
    expected = brute_force(items, lambda a, b: float(a @ b) >= 1 - eps)
    got = all_decisions(tmp_path, 4)
    assert {k for k, (kind, _) in got.items() if kind != "semantic"} == set()
    expected_keys = {order_key(o, PER_SHARD): order_key(g, PER_SHARD) for o, g in expected.items()}
    # Every reported pair is a true one; clustering may only lose a pair split across clusters.
    assert {k: g for k, (_, g) in got.items()}.items() <= expected_keys.items()
    assert len(got) >= 0.95 * len(expected_keys) and len(expected_keys) >= 38
    assert sample_key(0, 2, PER_SHARD) not in got


# --- meaning of the perceptual hash on images ---------------------------------------------


def test_phash_matches_reencoded_resized_copies_and_separates_distinct_images():
    rng = random.Random(7)
    resize = ResizeConfig(size=128)
    originals, copies = [], []
    for _ in range(40):
        jpg = photo_like_jpeg(rng.randint(160, 320), rng.randint(160, 320), rng)
        with Image.open(io.BytesIO(jpg)) as im:
            small = im.resize((int(im.width * 0.8), int(im.height * 0.8)), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            small.save(buf, "JPEG", quality=70)
        # Hashed as the download stage does: on the normalized image.
        originals.append(int(phash_hex(normalize_image(jpg, resize).data), 16))
        copies.append(int(phash_hex(normalize_image(buf.getvalue(), resize).data), 16))
    same = [bin(a ^ b).count("1") for a, b in zip(originals, copies)]
    assert np.mean(np.array(same) <= 4) >= 0.95, same
    distinct = [bin(a ^ b).count("1") for i, a in enumerate(originals) for b in originals[i + 1:]]
    assert min(distinct) > 4


# --- config ------------------------------------------------------------------------------


def test_config_errors_name_the_parameter(tmp_path):
    path = write_config(tmp_path / "c.yaml", tmp_path / "urls.parquet", tmp_path / "out",
                        filters=[{"name": "dedup", "phash_max_distanse": 3}])
    with pytest.raises(UserError, match=r"filters\.0\.phash_max_distanse: unknown parameter"):
        load_config(path)
    path.write_text(path.read_text().replace("phash_max_distanse: 3", "semantic_eps: 0.05"))
    with pytest.raises(UserError, match=r"filters\.0: dedup: semantic_eps needs clip\.enabled: true"):
        load_config(path)
