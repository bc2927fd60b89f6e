"""Existing shards as input (pipeline/input_tars.py): which tars a config names, in which order,
and one clear error, before anything is written, for a path that names no tar."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import pytest
import yaml

from curate.pipeline.config import load_config
from curate.pipeline.errors import UserError
from curate.pipeline.input_tars import record_tars, resolve_tars
from curate.pipeline.run import run


def tar(path, n=1) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as t:
        for i in range(n):
            info = tarfile.TarInfo(f"{i:04d}.txt")
            info.size = 1
            t.addfile(info, io.BytesIO(b"x"))
    return str(path)


def cfg(tmp_path, paths, **inputs):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"input": {"paths": paths, **inputs}, "output": {"path": str(tmp_path / "out")},
                                    "dask": {"in_process": True}}))
    return load_config(path)


def test_tar_paths_choose_the_format(tmp_path):
    assert cfg(tmp_path, ["a/{000..009}.tar", "s3://bucket/b/*.tar"]).input.format == "webdataset"
    assert cfg(tmp_path, ["a.parquet"]).input.format == "auto"
    # laion_columns reads the json fields of each sample: nothing to list in extra_cols.
    path = tmp_path / "laion.yaml"
    path.write_text(yaml.safe_dump({"input": {"paths": ["x.tar"]}, "output": {"path": "out"},
                                    "filters": [{"name": "laion_columns"}]}))
    assert load_config(path).filters[0].name == "laion_columns"


def test_braces_and_globs_expand_to_one_sorted_list(tmp_path):
    for name in ("00002.tar", "00000.tar", "00001.tar", "extra/00010.tar", "other.txt"):
        tar(tmp_path / name) if name.endswith(".tar") else (tmp_path / name).write_text("x")
    files = resolve_tars(cfg(tmp_path, [f"{tmp_path}/{{00001..00002}}.tar", f"{tmp_path}/*.tar",
                                        f"{tmp_path}/extra/0001?.tar"]).input)
    assert files == [str(tmp_path / n) for n in ("00000.tar", "00001.tar", "00002.tar", "extra/00010.tar")]


def test_the_shard_mapping_is_recorded_and_kept(tmp_path, caplog):
    first = [tar(tmp_path / "b.tar"), tar(tmp_path / "c.tar")]
    summary = record_tars(first, str(tmp_path / "input"))
    assert summary["shards"] == 2 and summary["tars"] == first
    assert json.loads((tmp_path / "input" / "_done.json").read_text())["tars"] == first
    with caplog.at_level(logging.WARNING, logger="curate"):  # a rerun whose glob now matches one more
        again = record_tars([tar(tmp_path / "a.tar"), *first], str(tmp_path / "input"))
    assert again["tars"] == first and "goes on with the 2 tars it started with" in caplog.text


@pytest.mark.parametrize("case, message", [
    ("no_match", "matches no file"),
    ("brace_missing", "input file not found: {tmp}/00002.tar"),
    ("missing", "input file not found: {tmp}/nowhere.tar"),
    ("not_a_tar", "input {tmp}/text.tar: not a tar file"),
    ("empty", "input {tmp}/empty.tar: not a tar file (empty)"),
    ("folder", "input {tmp}/folder.tar: a folder, not a tar file"),
    ("mixed", "a tar shard among URL lists"),
])
def test_a_path_that_names_no_tar_is_one_error_and_nothing_is_written(tmp_path, case, message):
    tar(tmp_path / "00000.tar")
    tar(tmp_path / "00001.tar")
    (tmp_path / "text.tar").write_text("hello, not a tar")
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "folder.tar").mkdir()
    (tmp_path / "urls.parquet").write_bytes(b"")
    paths = {
        "no_match": [f"{tmp_path}/shard-*.tar"],
        "brace_missing": [f"{tmp_path}/{{00000..00002}}.tar"],
        "missing": [f"{tmp_path}/00000.tar", f"{tmp_path}/nowhere.tar"],
        "not_a_tar": [f"{tmp_path}/0000*.tar", f"{tmp_path}/text.tar"],
        "empty": [f"{tmp_path}/empty.tar"],
        "folder": [f"{tmp_path}/folder.tar"],
        "mixed": [f"{tmp_path}/00000.tar", f"{tmp_path}/urls.parquet"],
    }[case]
    with pytest.raises(UserError) as exc:
        run(cfg(tmp_path, paths), progress=False)
    assert message.format(tmp=tmp_path) in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_tars_without_a_member_are_an_empty_input(tmp_path):
    empty = tmp_path / "00000.tar"
    tarfile.open(empty, "w").close()
    stats = run(cfg(tmp_path, [str(empty)]), progress=False)
    assert stats["empty_input"] and not (tmp_path / "out").exists()
