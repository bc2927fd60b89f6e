"""Sample keys as img2dataset forms them (its downloader's `compute_key`, `oom_shard_count` 5)."""

from __future__ import annotations

import math

import pytest

from curate.pipeline.shards import index_digits, sample_key


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
