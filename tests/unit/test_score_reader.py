"""The score stage's reader processes (pipeline/score_reader.py): the same batches as the
in-process reader, errors that name the problem, and no helper left behind."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.pipeline.models.clip import TINY_CLIP, TINY_CLIP_DIR, load_tokenizer
from curate.pipeline.config import ClipConfig
from curate.pipeline.layout import embedding_files
from curate.pipeline.stages.score import _prefetched, score_shard
from curate.pipeline.score_reader import ReaderError, ReaderPool, read_batches
from curate.pipeline.shards import sample_key
from curate.pipeline.tarshard import TarShardWriter
from conftest import alive, raw_shard

pytestmark = pytest.mark.skipif(not (TINY_CLIP_DIR / "open_clip_config.json").exists(), reason="tiny CLIP not built")

CAPTIONS = ["a red circle", "", "Ünïcode &amp; entities", "two   blue squares on green", "x " * 100]


def _shard(path, n):
    with TarShardWriter(path) as tar:
        for i in range(n):
            meta = {"caption": CAPTIONS[i % len(CAPTIONS)] + f" {i}", "url": f"http://127.0.0.1/{i}"}
            tar.write(sample_key(3, i, n), {"jpg": os.urandom(100 + 37 * (i % 50)), "txt": b"t", "json": json.dumps(meta).encode()})
    return path


def _same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys == b.keys
        assert [bytes(j) for j in a.jpgs] == [bytes(j) for j in b.jpgs]
        assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_CLIP)


@pytest.fixture(scope="module")
def pools():
    """Pools shared by the tests (a helper takes seconds to start). A test that breaks one leaves
    it to be restarted by its next use, as the score stage's own pool is."""
    made: dict[int, ReaderPool] = {}
    yield lambda n: made.setdefault(n, ReaderPool(TINY_CLIP, n))
    for pool in made.values():
        pool.close()


@pytest.mark.parametrize("processes, n, batch_size", [(1, 10, 4), (2, 10, 4), (2, 8, 4), (2, 3, 4), (2, 0, 4), (2, 7, 100)])
def test_reader_processes_give_the_in_process_batches(tmp_path, tokenizer, pools, processes, n, batch_size):
    tar = _shard(tmp_path / "00000.tar", n)
    pool = pools(processes)
    expected = list(read_batches(tar, batch_size, tokenizer))
    _same(list(pool.batches(tar, batch_size)), expected)
    # The helpers serve the next shard too (started once per pool).
    pids = [h.pid for h in pool._helpers]
    _same(list(pool.batches(tar, batch_size)), expected)
    assert [h.pid for h in pool._helpers] == pids


@pytest.mark.parametrize("cut", [512 + 40, 2 * 512 + 100 + 300])  # inside a member's data; inside a header
def test_a_broken_shard_is_one_error_and_the_pool_recovers(tmp_path, tokenizer, pools, cut):
    good = _shard(tmp_path / "00000.tar", 9)
    broken = tmp_path / "00001.tar"
    broken.write_bytes(good.read_bytes()[:cut])
    with pytest.raises(Exception, match="ends inside"):  # the in-process reader says the same
        list(read_batches(broken, 2, tokenizer))
    pool = pools(2)
    with pytest.raises(ReaderError, match="ends inside"):
        list(pool.batches(broken, 2))
    _same(list(pool.batches(good, 2)), list(read_batches(good, 2, tokenizer)))


@pytest.mark.parametrize("processes, n", [(1, 9), (2, 9), (2, 0)])
def test_reader_processes_tokenize_captions_they_are_given(tmp_path, tokenizer, pools, processes, n):
    """Input tars: the images come from the parquet's offsets, the captions go to the helpers."""
    captions = [CAPTIONS[i % len(CAPTIONS)] + f" {i}" for i in range(n)]
    pool = pools(processes)
    got = pool.tokenize(captions, 4)
    expected = [tokenizer(captions[i:i + 4]) for i in range(0, n, 4)]
    assert len(got) == len(expected) and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, expected))
    tar = _shard(tmp_path / "00000.tar", 5)  # and the pool still reads tars after it
    _same(list(pool.batches(tar, 4)), list(read_batches(tar, 4, tokenizer)))


def test_an_input_tar_gives_the_same_batches_with_reader_processes(tmp_path, tokenizer, pools):
    """Existing shards as input: images straight from the input tar at the read stage's offsets."""
    from PIL import Image

    from curate.pipeline.config import RunConfig
    from curate.pipeline.sources import score_batches
    from curate.pipeline.stages.read import read_shard

    jpgs = []
    with TarShardWriter(tmp_path / "in.tar") as tar:
        for i in range(10):
            out = io.BytesIO()
            Image.new("RGB", (40 + i, 30), (i * 20, 0, 0)).save(out, "JPEG")
            jpgs.append(out.getvalue())
            tar.write(f"k{i}", {"jpg": jpgs[-1], "txt": CAPTIONS[i % len(CAPTIONS)].encode()} if i != 4 else {"txt": b"x"})
    cfg = RunConfig.model_validate({"input": {"paths": [str(tmp_path / "in.tar")]}, "output": {"path": str(tmp_path)}})
    read_shard(str(tmp_path / "in.tar"), 0, str(tmp_path / "stage"), cfg)
    with score_batches(str(tmp_path / "stage"), 0, 4, tokenizer) as batches:
        expected = list(batches)
    pool = pools(2)
    with score_batches(str(tmp_path / "stage"), 0, 4, None, pool) as batches:
        _same(list(batches), expected)
    assert [bytes(j) for b in expected for j in b.jpgs] == jpgs[:4] + jpgs[5:]  # the sample without an image left out
    # A shard read to its end leaves the helpers running for the next one (no start-up per shard).
    pids = [h.pid for h in pool._helpers]
    assert len(pids) == 2
    with score_batches(str(tmp_path / "stage"), 0, 4, None, pool) as batches:
        _same(list(batches), expected)
    assert [h.pid for h in pool._helpers] == pids


def test_two_input_shards_scored_at_once_share_the_pool_without_waiting(tmp_path, tokenizer, pools):
    """A GPU worker scores two shards at once through one pool: the second shard's tokens must not
    wait until the first shard's batches are all consumed (the pool is held only while tokenizing)."""
    import threading

    from curate.pipeline.sources import _input_batches

    tar = np.zeros(64, np.uint8)
    keys = [f"k{i}" for i in range(9)]
    offsets, sizes = np.zeros(9, np.int64), np.ones(9, np.int64)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(9)]
    pool = pools(2)
    first = _input_batches(tar, keys, offsets, sizes, captions, 4, None, pool)
    next(first)  # the first shard is being embedded: two of its batches are still to come
    got = []
    other = threading.Thread(target=lambda: got.extend(_input_batches(tar, keys, offsets, sizes, captions, 4, None, pool)))
    other.start()
    other.join(timeout=30)
    assert not other.is_alive(), "the second shard waited for the first one's batches"
    assert [b.keys for b in got] == [keys[0:4], keys[4:8], keys[8:9]]
    expected = [tokenizer(captions[i:i + 4]) for i in range(0, 9, 4)]
    assert all(np.array_equal(np.asarray(b.tokens), np.asarray(e)) for b, e in zip(got, expected))
    assert len(list(first)) == 2


# The next three tests each leave the shared one-process pool to be restarted (a helper starts in
# seconds: it imports open_clip), so they run after the tests that need it healthy, and use the
# pool those left running rather than starting one of their own only to restart it.


def test_a_killed_helper_fails_the_shard_and_is_replaced(tmp_path, tokenizer, pools):
    # Enough batches that the victim's answers cannot all be waiting in the pipe already.
    tar = _shard(tmp_path / "00000.tar", 1200)
    pool = pools(1)  # its helper has served shards before: it is killed mid-shard here
    batches = pool.batches(tar, 20)
    try:
        next(batches)
        victim = pool._helpers[0]
        victim.kill()
        victim.wait()
        with pytest.raises(ReaderError, match="exited"):
            list(batches)
        assert pool._helpers == []  # given back when the shard failed
        _same(list(pool.batches(tar, 20)), list(read_batches(tar, 20, tokenizer)))
        assert victim.pid not in [h.pid for h in pool._helpers]
    finally:
        batches.close()  # the pool's lock is free for the next test even if this one failed


def test_a_consumer_that_stops_early_releases_the_pool(tmp_path, tokenizer, pools):
    """An error in the model mid-shard: the prefetch thread stops, the reader is closed and
    its helpers given back, and the next shard reads normally (no lock left held)."""
    tar = _shard(tmp_path / "00000.tar", 40)
    pool = pools(1)
    batches = _prefetched(pool.batches(tar, 2))
    try:
        next(batches)
        helpers = list(pool._helpers)
        assert helpers and all(h.poll() is None for h in helpers)
        batches.close()
        deadline = time.monotonic() + 10
        while any(h.poll() is None for h in helpers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(h.poll() is not None for h in helpers)
        _same(list(pool.batches(tar, 2)), list(read_batches(tar, 2, tokenizer)))
    finally:
        batches.close()


def test_a_sample_without_its_image_is_named(tmp_path, pools):
    tar = tmp_path / "00000.tar"
    with TarShardWriter(tar) as w:
        w.write("k0", {"jpg": b"1", "json": b"{}"})
        w.write("k1", {"json": b"{}"})
    with pytest.raises(ReaderError, match="k1 has no jpg"):
        list(pools(1).batches(tar, 8))


def test_helpers_exit_with_a_killed_parent(tmp_path):
    """A SIGKILLed scoring process (a Dask worker killed mid-shard) leaves no helper running:
    their stdin closes and they exit."""
    tar = _shard(tmp_path / "00000.tar", 30)
    script = (
        "import sys, time\n"
        "from pipeline.score_reader import ReaderPool\n"
        f"pool = ReaderPool({TINY_CLIP!r}, 1)\n"
        f"batches = pool.batches({str(tar)!r}, 2)\n"
        "next(batches)\n"
        "print(*[h.pid for h in pool._helpers], flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=str(TINY_CLIP_DIR.parent.parent.parent))
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 1
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def _scored(download, shard_id, processes, out):
    """score_shard on the CPU with `processes` reader processes: (scored, decode errors,
    metadata rows, image embeddings, text embeddings)."""
    cfg = ClipConfig(enabled=True, model=TINY_CLIP, pretrained=None, device="cpu", batch_size=8,
                     reader_processes=processes)
    stats = score_shard(shard_id, {}, str(download), str(out / "emb"), str(out / "markers"), cfg)
    files = embedding_files(out / "emb", shard_id)
    return (stats["scored"], stats["decode_errors"], pq.read_table(files["metadata"]).to_pylist(),
            np.load(files["img_emb"]), np.load(files["text_emb"]))


def test_score_shard_gives_the_same_scores_with_reader_processes(tmp_path):
    download = tmp_path / "download"
    download.mkdir()
    raw_shard(download / "00000.tar", 37, seed=7, corrupt={4})
    results = {processes: _scored(download, 0, processes, tmp_path / f"out{processes}") for processes in (0, 2)}
    (s0, e0, m0, i0, t0), (s2, e2, m2, i2, t2) = results[0], results[2]
    assert (s0, e0) == (s2, e2) == (36, 1)
    assert m0 == m2
    assert np.array_equal(i0, i2) and np.array_equal(t0, t2)


def test_two_shards_at_once_share_the_reader_processes(tmp_path):
    """A GPU worker scores SCORE_TASKS_PER_GPU shards at once in threads of one process, sharing
    the model and the reader processes (pipeline/cluster.py): each shard gets its own results."""
    from concurrent.futures import ThreadPoolExecutor

    from curate.pipeline.cluster import SCORE_TASKS_PER_GPU

    download = tmp_path / "download"
    download.mkdir()
    raw_shard(download / "00000.tar", 37, seed=7, corrupt={4})
    raw_shard(download / "00001.tar", 29, seed=8)

    alone = [_scored(download, i, 0, tmp_path / "alone") for i in (0, 1)]
    with ThreadPoolExecutor(SCORE_TASKS_PER_GPU) as pool:
        together = list(pool.map(lambda i: _scored(download, i, 2, tmp_path / "together"), (0, 1)))
    for (s0, e0, m0, i0, t0), (s1, e1, m1, i1, t1) in zip(alone, together):
        assert (s0, e0) == (s1, e1) and m0 == m1
        assert np.allclose(i0, i1, atol=1e-3) and np.allclose(t0, t1, atol=1e-3)
    assert [a[:2] for a in alone] == [(36, 1), (29, 0)]


def test_reader_processes_must_not_be_negative():
    with pytest.raises(ValueError, match="reader_processes"):
        ClipConfig(reader_processes=-1)


def test_span_reader_falls_back_to_tarfile_for_other_headers(tmp_path, tokenizer, pools):
    """Shards written by other tools (pax headers for long names) read the same."""
    import io

    tar = tmp_path / "00000.tar"
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as t:
        for i, key in enumerate(["a", "b", "c" * 120, "d"]):
            if len(key) > 100:
                t.format = tarfile.PAX_FORMAT
            for ext, data in (("jpg", os.urandom(50 + i)), ("json", json.dumps({"caption": f"cap {i}"}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    got = list(pools(2).batches(tar, 3))
    _same(got, list(read_batches(tar, 3, tokenizer)))
    assert [k for b in got for k in b.keys] == ["a", "b", "c" * 120, "d"]
