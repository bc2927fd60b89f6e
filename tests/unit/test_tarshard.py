"""pipeline/tarshard.py's header walker against Python's tarfile, on tars as other tools write them."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from curate.pipeline.tarshard import scan_tar


def _reference(path) -> list[tuple[str, int, int]]:
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def test_webdataset_tars_with_a_pax_header_per_member_are_walked_like_tarfile(tmp_path):
    # webdataset's TarWriter (img2dataset's writer) gives every member a pax header for its float mtime.
    path = tmp_path / "00000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(5):
            sink.write({"__key__": f"{i:09d}", "jpg": b"j" * (100 + i * 700), "txt": f"caption {i}", "json": {"i": i}})
    with tarfile.open(path) as tar:
        assert all(m.pax_headers for m in tar.getmembers())  # the case this test is about
    assert [(e.name, e.offset, e.size) for e in scan_tar(path)] == _reference(path)


def test_pax_records_for_long_names_and_records_it_does_not_read(tmp_path):
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, pax in (("a.jpg", {}), ("b" * 150 + ".jpg", {}), ("c.txt", {"comment": "kept"}),
                          ("d.txt", {"SCHILY.xattr.user.x": "1"}), ("e.txt", {})):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.pax_headers = 3, 1.5, pax
            tar.addfile(info, io.BytesIO(b"abc"))
    # A long name comes from the pax `path` record; at a record it does not read (d's xattr) the
    # walker hands the rest, from that pax header on, to tarfile: the same entries either way.
    assert [(e.name, e.offset, e.size) for e in scan_tar(path)] == _reference(path)


def test_the_shard_writer_writes_the_bytes_tarfile_writes(tmp_path):
    # TarShardWriter builds its ustar headers itself (for speed); any tar reader must see what
    # tarfile would have written: the same bytes, padding and end-of-archive record included.
    from curate.pipeline.tarshard import TarShardWriter

    samples = [("k0", {"jpg": b"", "txt": b"x"}),
               ("000010007", {"jpg": b"j" * 511, "txt": b"t" * 512, "json": b"{}" * 257}),
               ("a" * 89, {"latent.npy": bytes(range(256)) * 40})]  # a name of 100 bytes, the most ustar holds
    ours, theirs = tmp_path / "ours.tar", tmp_path / "theirs.tar"
    with TarShardWriter(ours) as tar:
        for key, fields in samples:
            tar.write(key, fields)
    with tarfile.open(theirs, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                info.uname = info.gname = "curate"
                tar.addfile(info, io.BytesIO(data))
    assert ours.read_bytes() == theirs.read_bytes()
    assert [(e.name, e.offset, e.size) for e in scan_tar(ours)] == _reference(ours)
    with TarShardWriter(tmp_path / "long.tar") as tar, pytest.raises(ValueError, match="longer than 100"):
        tar.write("a" * 90, {"latent.npy": b""})
