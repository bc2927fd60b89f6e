"""pipeline/storage.py on the local file system (object storage itself: tests/e2e/test_object_storage.py,
against a real S3 API server)."""

from __future__ import annotations

import pytest

from curate.pipeline import storage
from curate.pipeline.errors import UserError


def test_urls_are_joined_with_slashes_and_local_paths_as_paths():
    assert storage.is_url("s3://bucket/run") and storage.is_url("gs://b/x")
    assert not storage.is_url("/data/run") and not storage.is_url("file:///data/run") and not storage.is_url("run")
    assert storage.join("s3://bucket/run/", "shards", "00000.tar") == "s3://bucket/run/shards/00000.tar"
    assert storage.parent("s3://bucket/run/shards/00000.tar") == "s3://bucket/run/shards"
    assert storage.name("s3://bucket/run/shards/00000.tar") == "00000.tar"
    assert storage.join("/data/run", "shards") == "/data/run/shards"


def test_publish_puts_the_file_in_place_only_on_success(tmp_path):
    final = tmp_path / "out.json"
    with storage.publish(final) as tmp:
        tmp.write_text("one")
        assert not final.exists()  # nothing at the final name while it is written
    assert final.read_text() == "one"
    with pytest.raises(RuntimeError):
        with storage.publish(final) as tmp:
            tmp.write_text("two")
            raise RuntimeError("killed mid-write")
    assert final.read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left


def test_read_ahead_gives_every_item_in_order_whatever_the_items_are():
    # 0 and None are items too (file indexes, a source's values): none may end the read early.
    items = [0, 1, None, 3, 0, None, *range(6, 20)]
    got = list(storage.read_ahead(items, lambda item: ("read", item), depth=3, threads=2))
    assert got == [(item, ("read", item)) for item in items]


def test_publish_writes_in_a_temporary_folder_that_concurrent_writers_share(tmp_path):
    # Temporaries live in .tmp/ beside the final files (same file system: the rename is atomic),
    # so cleaning a shard lists only what is being written; the folder goes once empty, and a
    # writer never fails because another removed it.
    import threading

    with storage.publish(tmp_path / "a.tar") as tmp:
        assert tmp.parent == tmp_path / storage.TEMPORARY_FOLDER and tmp.name.startswith("a.tar.tmp-")
        tmp.write_bytes(b"a")
    errors = []

    def writer(i: int) -> None:
        try:
            for j in range(40):
                with storage.publish(tmp_path / f"{i:05d}_{j}.bin") as tmp:
                    tmp.write_bytes(b"x" * j)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(list(tmp_path.iterdir())) == 1 + 8 * 40 and not (tmp_path / storage.TEMPORARY_FOLDER).exists()


def test_listing_removal_and_reading_of_local_folders(tmp_path):
    assert storage.listing(tmp_path / "missing") == [] and not storage.has_files(tmp_path / "missing")
    for name in ("00001.tar", "00000.tar", "00000.done.json"):
        (tmp_path / name).write_bytes(name.encode())
    assert [storage.name(p) for p in storage.listing(tmp_path, "00000")] == ["00000.done.json", "00000.tar"]
    assert [storage.name(p) for p in storage.listing(tmp_path, suffix=".tar")] == ["00000.tar", "00001.tar"]
    assert [storage.name(p) for p in storage.listing(tmp_path, "00000", ".json")] == ["00000.done.json"]
    assert storage.read_text(tmp_path / "00001.tar") == "00001.tar" and storage.exists(tmp_path / "00001.tar")
    storage.remove(tmp_path / "00001.tar")
    storage.remove(tmp_path / "00001.tar")  # a missing file is not an error
    assert not storage.exists(tmp_path / "00001.tar")
    with storage.local_copy(tmp_path / "00000.tar") as local:
        assert local == tmp_path / "00000.tar"  # a local file is read where it lies


def test_options_that_look_like_credentials_are_named():
    assert storage.secret_options({"s3": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "x"}}) == []
    found = storage.secret_options({"s3": {"key": "a", "secret": "b", "client_kwargs": {"aws_session_token": "c"}},
                                    "gcs": {"token": "d"}})
    assert sorted(found) == ["gcs.token", "s3.client_kwargs.aws_session_token", "s3.key", "s3.secret"]


def test_an_unknown_protocol_is_a_user_error():
    with pytest.raises(UserError, match="nosuchstore:// paths"):
        storage.configure({"nosuchstore": {"endpoint_url": "x"}})
