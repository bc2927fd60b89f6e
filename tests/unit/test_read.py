"""The read stage (pipeline/stages/read.py): every sample of an input tar accounted for, with
real tar files made here: images, captions, json fields, odd members, cuts and img2dataset's
files beside the tar."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.pipeline.config import RunConfig
from curate.pipeline.records import FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE, SUCCESS
from curate.pipeline.stages.read import read_shard
from curate.pipeline.tarshard import scan_tar


def image(width=96, height=80, fmt="JPEG", color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format=fmt)
    return out.getvalue()


def write_tar(path, members) -> None:
    """members: (name, bytes) for files, (name, "dir") / (name, "symlink") for the other kinds."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif data == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "elsewhere"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def sample(key, caption="a red square", fields=None, img=None, ext="jpg"):
    members = [(f"{key}.{ext}", img if img is not None else image())]
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    members.append((f"{key}.json", json.dumps({"url": f"http://example.com/{key}.jpg", **(fields or {})}).encode()))
    return members


def config(tmp_path, filters=(), **inputs) -> RunConfig:
    return RunConfig.model_validate({"input": {"paths": [str(tmp_path / "in.tar")], **inputs},
                                     "output": {"path": str(tmp_path / "out")}, "filters": list(filters)})


def read(tmp_path, members, filters=(), **inputs) -> tuple[dict, list[dict]]:
    tar = tmp_path / "in.tar"
    if members is not None:
        write_tar(tar, members)
    stats = read_shard(str(tar), 7, str(tmp_path / "stage"), config(tmp_path, filters, **inputs))
    rows = pq.read_table(tmp_path / "stage" / "00007.parquet").to_pylist()
    assert stats["rows"] == len(rows) == stats["successes"] + sum(stats["rejected"].values())
    return stats, rows


def test_every_sample_and_member_is_accounted_for(tmp_path):
    members = [
        *sample("a"),
        ("b.txt", b"a caption without its image"), ("b.json", b'{"url": "http://example.com/b.jpg"}'),
        *sample("c", caption=None),                                  # an image without a caption
        *sample("d", img=b"not an image at all"),
        *sample("e", img=image(fmt="PNG"), ext="png"),
        ("e.cls", b"3"),                                              # beside a sample: not carried
        ("notes/README", b"no extension"),
        ("f.md", b"a key of odd members only"),
        ("somedir", "dir"), ("g.jpg", "symlink"),
        *sample("h", fields={"punsafe": 0.9}),
    ]
    stats, rows = read(tmp_path, members)
    by_source = {r["source_key"]: r for r in rows}
    assert list(by_source) == ["a", "b", "c", "d", "e", "h"]
    assert [r["key"] for r in rows] == [f"00007{i:04d}" for i in range(6)]  # positions, never input text
    assert by_source["a"]["status"] == SUCCESS and by_source["a"]["caption"] == "a red square"
    assert (by_source["b"]["status"], by_source["b"]["reason"]) == (FAILED_TO_DOWNLOAD, "no_image")
    assert by_source["b"]["caption"] == "a caption without its image"
    # A sample without a caption is kept with none, as a URL row without one is.
    assert by_source["c"]["status"] == SUCCESS and by_source["c"]["caption"] is None
    assert (by_source["d"]["status"], by_source["d"]["reason"]) == (FAILED_TO_RESIZE, "decode_error")
    assert by_source["e"]["status"] == SUCCESS and by_source["e"]["original_width"] == 96
    assert by_source["a"]["sha256"] == hashlib.sha256(image()).hexdigest()
    assert stats["input"]["members_ignored"] == {"extra_member": 1, "no_extension": 1, "no_sample": 1,
                                                 "directory": 1, "link": 1}
    assert stats["input"]["samples_without_caption"] == 1
    assert all(r["source_shard"] == str(tmp_path / "in.tar") for r in rows)
    # Kept samples point at their image in the input tar; nothing else was written.
    spans = {e.name: (e.offset, e.size) for e in scan_tar(tmp_path / "in.tar")}
    assert (by_source["e"]["image_offset"], by_source["e"]["image_size"]) == spans["e.png"]
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == ["00007.done.json", "00007.parquet"]


def test_json_fields_are_carried_and_laion_columns_judge_them(tmp_path):
    members = [*sample("a", fields={"punsafe": 0.1, "pwatermark": 0.2, "similarity": 0.31, "exif": {"Make": "x"},
                                    "key": "a", "status": "success", "width": 5}),
               *sample("b", fields={"punsafe": 0.7, "similarity": 0.29}),
               *sample("c")]
    stats, rows = read(tmp_path, members, filters=[{"name": "laion_columns", "punsafe_threshold": 0.5}])
    a, b, c = rows
    assert (a["punsafe"], a["pwatermark"], a["similarity"]) == (0.1, 0.2, 0.31)
    assert json.loads(a["exif"]) == {"Make": "x"}                    # nested values as JSON text
    assert a["url"] == "http://example.com/a.jpg" and a["width"] is None  # curate's own columns are its own
    assert (b["reason"], b["reject_metric"], b["reject_value"]) == ("unsafe: laion_punsafe>=0.5", "punsafe", 0.7)
    assert b["sha256"] is None                                        # dropped before its image was looked at
    assert c["status"] == SUCCESS
    assert stats["filters"]["laion_columns"] == {"kept": 2, "dropped: unsafe: laion_punsafe>=0.5": 1,
                                                 "unchecked: no punsafe": 1}


def test_the_caption_can_be_a_json_field(tmp_path):
    members = [*sample("a", caption="the txt", fields={"text": "the json caption"}),
               *sample("b", caption=None, fields={"text": 12}), *sample("c", caption=None)]
    stats, rows = read(tmp_path, members, caption_field="text")
    assert [r["caption"] for r in rows] == ["the json caption", "12", None]
    assert stats["input"]["samples_without_caption"] == 1


def test_bytes_filters_see_the_member_bytes(tmp_path):
    listed = image(color=(1, 2, 3))
    (tmp_path / "sha256.txt").write_text(hashlib.sha256(listed).hexdigest() + "\n")
    members = [*sample("a", img=listed), *sample("b"), *sample("c", img=image(40, 40))]
    stats, rows = read(tmp_path, members, filters=[{"name": "hash_blocklist", "paths": [str(tmp_path / "sha256.txt")]},
                                                   {"name": "resolution", "min_side": 64}])
    assert [r["reason"] for r in rows] == ["unsafe: hash_blocklist", None, "resolution: side<64"]
    assert rows[2]["original_width"] == 40


def _cut_points(path):
    entries = list(scan_tar(path))
    image_b = next(e for e in entries if e.name == "b.jpg")
    return {
        "inside an image": image_b.offset + 10,
        "inside a header": image_b.offset - 512 + 60,
        "without end blocks": image_b.offset - 512,
    }


@pytest.mark.parametrize("where", ["inside an image", "inside a header", "without end blocks", "garbage"])
def test_a_cut_tar_keeps_what_was_read(tmp_path, where, caplog):
    write_tar(tmp_path / "whole.tar", [*sample("a"), *sample("b"), *sample("c")])
    data = (tmp_path / "whole.tar").read_bytes()
    cuts = _cut_points(tmp_path / "whole.tar")
    if where == "garbage":
        data = data[:cuts["without end blocks"]] + b"\x07" * 4096
    else:
        data = data[:cuts[where]]
    (tmp_path / "in.tar").write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="curate"):
        stats, rows = read(tmp_path, None)
    outcome = [(r["source_key"], r["reason"]) for r in rows]
    if where in ("inside an image", "inside a header"):  # the cut member names its sample
        assert outcome == [("a", None), ("b", "truncated_tar")]
    else:  # no name: the last sample read may have lost members
        assert outcome == [("a", "truncated_tar")]
    assert stats["input"]["truncated_tars"][0]["tar"] == str(tmp_path / "in.tar")
    assert "truncated_tar" in caplog.text


def test_a_tar_holds_as_many_samples_as_keys_have_room_for(tmp_path):
    members = [m for i in range(12) for m in sample(f"s{i:02d}")]
    stats, rows = read(tmp_path, members, rows_per_shard=10)  # one index digit: ten keys
    assert [r["key"] for r in rows[:10]] == [f"00007{i}" for i in range(10)]
    assert [r["reason"] for r in rows[10:]] == ["too_many_samples"] * 2 and rows[10]["key"] is None


def test_img2dataset_files_beside_the_tar_are_a_cross_check(tmp_path, caplog):
    write_tar(tmp_path / "00003.tar", [*sample("a"), *sample("b")])
    (tmp_path / "00003_stats.json").write_text(json.dumps({"successes": 3, "count": 4}))
    cfg = config(tmp_path)
    with caplog.at_level(logging.WARNING, logger="curate"):
        stats = read_shard(str(tmp_path / "00003.tar"), 0, str(tmp_path / "stage"), cfg)
    assert stats["input"]["crosscheck_mismatches"] == [{"tar": str(tmp_path / "00003.tar"), "samples": 2,
                                                        "stats_successes": 3}]
    assert "img2dataset files count otherwise" in caplog.text
    (tmp_path / "00003_stats.json").write_text(json.dumps({"successes": 2, "count": 4}))
    stats = read_shard(str(tmp_path / "00003.tar"), 1, str(tmp_path / "stage"), cfg)
    assert "crosscheck_mismatches" not in stats["input"]
