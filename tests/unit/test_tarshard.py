"""pipeline/tarshard.py's header walker against Python's tarfile, on tars as other tools write them."""

from __future__ import annotations

import io
import tarfile

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
