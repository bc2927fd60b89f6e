"""Sample keys as img2dataset forms them (its downloader's `compute_key`, `oom_shard_count` 5), and
the done-marker protocol's cleaning of an interrupted attempt."""

from __future__ import annotations

import math

import pytest

from curate.pipeline import storage
from curate.pipeline.shards import index_digits, is_done, run_once, sample_key


def img2dataset_key(index: int, shard_id: int, per_shard: int, oom_shard_count: int = 5) -> str:
    """img2dataset.downloader.compute_key, as its Downloader calls it."""
    oom_sample_per_shard = math.ceil(math.log10(per_shard))
    true_key = (10 ** oom_sample_per_shard) * shard_id + index
    return f"{true_key:0{oom_sample_per_shard + oom_shard_count}d}"


@pytest.mark.parametrize("per_shard", [1, 2, 9, 10, 11, 99, 100, 101, 160, 1000, 10_000, 10_001, 100_000])
@pytest.mark.parametrize("shard_id", [0, 3, 99_999, 123_456])
def test_keys_are_img2dataset_s(per_shard, shard_id):
    for index in {0, per_shard // 2, per_shard - 1}:
        assert sample_key(shard_id, index, per_shard) == img2dataset_key(index, shard_id, per_shard)


def test_keys_match_img2dataset_s_own_code():
    downloader = pytest.importorskip("img2dataset.downloader")  # the bench extra
    for per_shard in (1, 10, 160, 10_000):
        digits = index_digits(per_shard)
        for shard_id, index in ((0, 0), (7, per_shard - 1), (100_000, per_shard // 3)):
            assert sample_key(shard_id, index, per_shard) == downloader.compute_key(index, shard_id, digits, 5)


def test_the_default_shard_size_gives_nine_digit_keys():
    assert sample_key(3, 42, 10_000) == "000030042"
    assert sample_key(0, 0, 1) == "00000"  # one row a shard: the shard id alone, as in img2dataset


def test_a_row_beyond_the_shard_size_has_no_key():
    """It would take the next shard's first key."""
    with pytest.raises(ValueError, match="collide"):
        sample_key(0, 100, 100)


def test_an_interrupted_attempt_is_cleaned_by_name_without_listing_the_stage_folder(tmp_path, monkeypatch):
    # What a killed attempt of shard 7 left: outputs without a marker, temporaries of an output,
    # of the marker and of a file elsewhere. Other shards' files and temporaries stay. The stage
    # folder itself is never listed: with a whole dataset's shards in it, a listing per shard
    # made the per-shard cost grow with the run.
    stage, elsewhere = tmp_path / "shards", tmp_path / "embeddings"
    for folder in (stage / ".tmp", elsewhere / ".tmp"):
        folder.mkdir(parents=True)
    left = [stage / "00007.tar", stage / "00007_stats.json", stage / ".tmp" / "00007.parquet.tmp-1",
            stage / ".tmp" / "00007.done.json.tmp-2", elsewhere / ".tmp" / "img_emb_00007.npy.tmp-3"]
    kept = [stage / "00070.tar", stage / "00008.tar", stage / "00008.done.json", stage / ".tmp" / "00070.tar.tmp-4",
            elsewhere / "img_emb_00008.npy"]
    for path in left + kept:
        path.write_bytes(b"old")
    listed = []
    real_listing = storage.listing
    monkeypatch.setattr(storage, "listing", lambda folder, prefix="": listed.append(str(folder)) or real_listing(folder, prefix))

    outputs = [stage / "00007.tar", stage / "00007.parquet", stage / "00007_stats.json", elsewhere / "img_emb_00007.npy"]

    def work():
        assert not any(p.exists() for p in left)  # cleaned before the work starts
        (stage / "00007.tar").write_bytes(b"new")
        return {"rows": 1}

    assert run_once(str(stage), 7, work, outputs=[str(p) for p in outputs])["rows"] == 1
    assert is_done(str(stage), 7) and (stage / "00007.tar").read_bytes() == b"new"
    assert all(p.read_bytes() == b"old" for p in kept)
    assert str(stage) not in listed and str(elsewhere) not in listed
    assert set(listed) <= {str(stage / ".tmp"), str(elsewhere / ".tmp")}
