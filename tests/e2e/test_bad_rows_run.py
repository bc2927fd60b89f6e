"""Bad rows, bad files and hostile input, through `curate run`.

One real run reads a csv, a jsonl and two parquet files (plus an empty file) full of bad rows:
missing / NaN / empty captions and URLs, non-UTF-8 bytes, a 100,000-character caption, URLs
with spaces or Unicode, file:// ftp:// data: javascript: URLs, malformed hosts, duplicated rows,
an extra column whose values change type. Every row must end written or rejected with its
reason, and nothing derived from input may name a file. Bad files and hostile configs end as
one `curate: error:` line; YAML is loaded without running code (checkpoints, the source scan
and tar member names: tests/unit/test_bad_rows.py).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from conftest import curate_command, kill_group, run_curate, write_config
from curate.pipeline.demo.devserver import DevServer
from curate.pipeline.records import FAILED_TO_DOWNLOAD, SUCCESS
from curate.pipeline.tarshard import iter_tar_samples

ENV = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
LONG_CAPTION = ("a very long caption " * 5000)[:100_000]
HOSTILE_CAPTION = "../../../../tmp/evil /etc/passwd ..\\..\\windows C:\\x"
MISSING = "invalid_url: missing"
SCHEME = "invalid_url: unsupported scheme"
BAD_HOST = "invalid_url: bad host"

# truth label -> expected (status, reason); SUCCESS rows are written, the others failed to download
# (a URL the fetch refuses is a failed download, as in img2dataset).
EXPECTED = {
    # csv
    "good": (SUCCESS, None),
    "url_empty": (FAILED_TO_DOWNLOAD, MISSING),
    "caption_empty": (SUCCESS, None),
    "caption_non_utf8": (SUCCESS, None),
    "url_non_utf8": (FAILED_TO_DOWNLOAD, "failed_to_download: HTTP 404"),  # the replaced character names no file
    "url_with_spaces": (SUCCESS, None),
    "url_unicode": (SUCCESS, None),
    "url_padded": (SUCCESS, None),
    "file_scheme": (FAILED_TO_DOWNLOAD, SCHEME),
    "ftp_scheme": (FAILED_TO_DOWNLOAD, SCHEME),
    "data_scheme": (FAILED_TO_DOWNLOAD, SCHEME),
    "javascript_scheme": (FAILED_TO_DOWNLOAD, SCHEME),
    "no_scheme": (FAILED_TO_DOWNLOAD, SCHEME),
    "unclosed_ipv6_host": (FAILED_TO_DOWNLOAD, BAD_HOST),
    "host_with_space": (FAILED_TO_DOWNLOAD, BAD_HOST),  # refused before any DNS query
    "host_percent_encoded": (FAILED_TO_DOWNLOAD, BAD_HOST),
    "bad_port": (FAILED_TO_DOWNLOAD, "invalid_url: bad port"),
    "duplicate_1": (SUCCESS, None),
    "duplicate_2": (SUCCESS, None),
    "path_traversal_url": (FAILED_TO_DOWNLOAD, "failed_to_download: HTTP 404"),
    "hostile_caption": (SUCCESS, None),
    "long_caption": (SUCCESS, None),
    # parquet
    "url_none": (FAILED_TO_DOWNLOAD, MISSING),
    "url_nan": (FAILED_TO_DOWNLOAD, MISSING),
    "caption_nan": (SUCCESS, None),
    # parquet with binary columns
    "binary_non_utf8": (SUCCESS, None),
    # jsonl
    "jsonl_non_utf8": (SUCCESS, None),
    "jsonl_null_url": (FAILED_TO_DOWNLOAD, MISSING),
    "jsonl_numeric_caption": (SUCCESS, None),
}


def small_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_inputs(folder: Path, base: str) -> list[Path]:
    """The bad rows, spread over every input format; returns the input files."""
    img = f"{base}/images"
    csv_rows = [
        # (truth, URL, TEXT, note) as raw bytes: non-UTF-8 and quoting are the point
        (b"good", f"{img}/a.jpg".encode(), b"a good caption", b"1"),
        (b"url_empty", b"", b"a caption without url", b"2"),
        (b"caption_empty", f"{img}/a.jpg".encode(), b"", b"3"),
        (b"caption_non_utf8", f"{img}/a.jpg".encode(), b"caf\xe9 cr\xe8me \xff", b"4"),
        (b"url_non_utf8", f"{img}/a\xff.jpg".encode(), b"x", b"5"),
        (b"url_with_spaces", f"{img}/with space.jpg".encode(), b"spaces", b"6"),
        (b"url_unicode", f"{img}/\u00e9t\u00e9 \u2600.jpg".encode(), "\u00e9t\u00e9 \u2600".encode(), b"7"),
        (b"url_padded", f"   {img}/a.jpg  ".encode(), b"padded", b"8"),
        (b"file_scheme", b"file:///etc/passwd", b"x", b"9"),
        (b"ftp_scheme", base.replace("http://", "ftp://").encode() + b"/images/a.jpg", b"x", b"10"),
        (b"data_scheme", b"data:image/png;base64,iVBORw0KGgo=", b"x", b"11"),
        (b"javascript_scheme", b"javascript:alert(1)", b"x", b"12"),
        (b"no_scheme", base.replace("http://", "").encode() + b"/images/a.jpg", b"x", b"13"),
        (b"unclosed_ipv6_host", b"http://[::1/images/a.jpg", b"x", b"14"),
        (b"host_with_space", b"http://local host/images/a.jpg", b"x", b"15"),
        (b"host_percent_encoded", b"http://%31%32%37.0.0.1/images/a.jpg", b"x", b"16"),
        (b"bad_port", b"http://127.0.0.1:99999/images/a.jpg", b"x", b"17"),
        (b"duplicate_1", f"{img}/b.jpg".encode(), b"the same row twice", b"18"),
        (b"duplicate_2", f"{img}/b.jpg".encode(), b"the same row twice", b"18"),
        (b"path_traversal_url", f"{img}/..%2F..%2F..%2Fetc%2Fpasswd".encode(), b"x", b"n/a"),
        (b"hostile_caption", f"{img}/a.jpg".encode(), HOSTILE_CAPTION.encode(), b"19"),
        (b"long_caption", f"{img}/b.jpg".encode(), LONG_CAPTION.encode(), b"20"),
    ]
    csv = b"truth,URL,TEXT,note\n" + b"".join(
        b",".join(b'"' + field.replace(b'"', b'""') + b'"' for field in row) + b"\n" for row in csv_rows)
    (folder / "rows.csv").write_bytes(csv)

    pd.DataFrame({
        "truth": ["url_none", "url_nan", "caption_nan"],
        "URL": [None, float("nan"), f"{img}/b.jpg"],
        "TEXT": ["x", "x", float("nan")],
        "note": [1.5, 2.5, 3.5],
    }).to_parquet(folder / "rows.parquet", index=False)

    pq.write_table(pa.table({
        "truth": ["binary_non_utf8"],
        "URL": pa.array([f"{img}/a.jpg".encode()], pa.binary()),
        "TEXT": pa.array([b"caf\xe9 binary"], pa.binary()),
        "note": ["text note"],
    }), folder / "binary.parquet")

    (folder / "rows.jsonl").write_bytes(
        b'{"truth": "jsonl_non_utf8", "URL": "' + f"{img}/a.jpg".encode() + b'", "TEXT": "caf\xe9", "note": [1, 2]}\n'
        b'{"truth": "jsonl_null_url", "URL": null, "TEXT": "x", "note": "words"}\n'
        b'{"truth": "jsonl_numeric_caption", "URL": "' + f"{img}/a.jpg".encode() + b'", "TEXT": 12345, "note": 3}\n'
    )
    (folder / "empty.csv").write_bytes(b"")
    return [folder / n for n in ("rows.csv", "rows.parquet", "binary.parquet", "rows.jsonl", "empty.csv")]


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-rows")
    www = tmp / "www" / "images"
    www.mkdir(parents=True)
    (www / "a.jpg").write_bytes(small_jpeg(1))
    (www / "b.jpg").write_bytes(small_jpeg(2))
    (www / "with space.jpg").write_bytes(small_jpeg(3))
    (www / "\u00e9t\u00e9 \u2600.jpg").write_bytes(small_jpeg(4))
    with DevServer(tmp / "www") as server:
        inputs = write_inputs(tmp, server.base_url)
        config = write_config(tmp / "config.yaml", inputs[0], tmp / "out",
                              input={"paths": [str(p) for p in inputs], "extra_cols": ["truth", "note"],
                                     "rows_per_shard": 12},
                              resize={"size": 64}, resolution={"max_aspect_ratio": 3.0}, dask={"n_workers": 1})
        before = sorted(p.name for p in tmp.iterdir())
        result = run_curate(["run", str(config), "--no-progress"], ENV)
        after = sorted(p.name for p in tmp.iterdir())
    out = tmp / "out"
    rows = [r for p in sorted((out / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    tars = sorted((out / "shards").glob("*.tar"))
    return {"result": result, "out": out, "rows": rows, "tars": tars, "new_entries": sorted(set(after) - set(before)),
            "samples": {k: f for tar in tars for k, f in iter_tar_samples(tar)}}


def row(bad_run, truth: str) -> dict:
    (found,) = [r for r in bad_run["rows"] if r["truth"] == truth]
    return found


def test_run_succeeds_and_accounts_for_every_row(bad_run):
    assert bad_run["result"].returncode == 0, bad_run["result"].stderr
    stats = json.loads((bad_run["out"] / "stats.json").read_text())
    assert stats["rows_in"] == len(EXPECTED) == stats["written"] + stats["rejected"]
    assert sorted(r["truth"] for r in bad_run["rows"]) == sorted(EXPECTED)  # each once; the empty file adds none
    assert len({r["key"] for r in bad_run["rows"]}) == len(EXPECTED)


@pytest.mark.parametrize("truth", sorted(EXPECTED))
def test_each_bad_row_is_written_or_rejected_with_its_reason(bad_run, truth):
    r = row(bad_run, truth)
    assert (r["status"], r["reason"]) == EXPECTED[truth], r["error_message"]
    if r["status"] == SUCCESS:
        assert r["key"] in bad_run["samples"]
    else:
        assert r["error_message"] and r["key"] not in bad_run["samples"]


def test_captions_survive_as_text(bad_run):
    def txt(truth):
        return bad_run["samples"][row(bad_run, truth)["key"]]["txt"].decode()

    assert txt("long_caption") == LONG_CAPTION
    assert txt("caption_non_utf8") == "caf\ufffd cr\ufffdme \ufffd"  # replaced, not lost, not fatal
    assert txt("binary_non_utf8") == "caf\ufffd binary"
    assert txt("jsonl_non_utf8") == "caf\ufffd"
    assert txt("jsonl_numeric_caption") == "12345"
    assert txt("caption_empty") == txt("caption_nan") == ""
    assert txt("hostile_caption") == HOSTILE_CAPTION


def test_duplicated_rows_are_both_kept_under_their_own_keys(bad_run):
    one, two = row(bad_run, "duplicate_1"), row(bad_run, "duplicate_2")
    assert one["key"] != two["key"]
    assert one["sha256"] == two["sha256"]


def test_extra_column_of_mixed_types_is_carried(bad_run):
    """csv and jsonl are typed batch by batch: where a shard's batches disagree (numbers in one
    batch, words in another) the column is text in that shard, every value kept. A shard holds
    one file's rows: a shard whose values are all numbers keeps them as numbers."""
    notes = {r["truth"]: r["note"] for r in bad_run["rows"]}
    assert notes["good"] == "1" and notes["path_traversal_url"] == "n/a"
    assert notes["url_nan"] == 2.5 and notes["binary_non_utf8"] == "text note"
    assert [notes[t] for t in ("jsonl_non_utf8", "jsonl_null_url", "jsonl_numeric_caption")] == ["[1, 2]", "words", "3"]


def test_nothing_derived_from_input_names_a_file(bad_run):
    # Tar members are {key}.{ext}, keys made from shard and row numbers only (img2dataset's form:
    # 5 digits of shard, then the row in the 2 digits that 12 rows a shard need).
    for tar in bad_run["tars"]:
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                assert re.fullmatch(r"\d{7}\.(jpg|txt|json)", member.name), member.name
                assert member.isfile()
    # Nothing appeared beside the output folder, and no file inside it is named after input text.
    assert bad_run["new_entries"] == ["out"]
    for path in bad_run["out"].rglob("*"):
        relative = str(path.relative_to(bad_run["out"]))
        assert ".." not in relative and not any(w in relative for w in ("evil", "passwd", "windows", "space"))


# --- bad files and hostile configs: one line, exit 2, and no code run -------------------------


def _cli_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    cases = {}
    urls = pd.DataFrame({"URL": ["http://127.0.0.1:9/a.jpg"], "TEXT": ["a caption"], "truth": ["ok"],
                         "key": ["../../../evil"]})

    def case(name: str, make_input, expect: str, **sections) -> None:
        d = tmp / name
        d.mkdir()
        path = make_input(d)
        cases[name] = (["run", str(write_config(d / "config.yaml", path, d / "out", **sections)), "--no-progress"], expect)

    def parquet(columns):
        def make(d):
            urls[columns].to_parquet(d / "urls.parquet", index=False)
            return d / "urls.parquet"
        return make

    def truncated(d):
        urls.to_parquet(d / "urls.parquet", index=False)
        data = (d / "urls.parquet").read_bytes()
        (d / "urls.parquet").write_bytes(data[: len(data) // 2])
        return d / "urls.parquet"

    def broken_jsonl(d):
        (d / "urls.jsonl").write_text('{"URL": "http://127.0.0.1:9/a.jpg", "TEXT": "a", "truth": "ok"}\n{broken\n')
        return d / "urls.jsonl"

    case("missing_caption_column", parquet(["URL", "truth"]), "missing column(s) TEXT")
    case("missing_extra_column", parquet(["URL", "TEXT"]), "missing column(s) truth")
    case("truncated_parquet", truncated, "not a readable parquet file")
    case("broken_jsonl_line", broken_jsonl, "read failed")
    case("extra_column_named_key", parquet(["URL", "TEXT", "truth", "key"]),
         "input.extra_cols: key clash(es) with columns curate writes", input={"extra_cols": ["truth", "key"]})

    d = tmp / "yaml_python_tag"
    d.mkdir()
    (d / "config.yaml").write_text(f"input: !!python/object/apply:os.mkdir [{json.dumps(str(d / 'pwned'))}]\n"
                                   f"output: {{path: {json.dumps(str(d / 'out'))}}}\n")
    cases["yaml_python_tag"] = (["run", str(d / "config.yaml")], "not valid YAML")
    return cases


@pytest.fixture(scope="module")
def cli_errors(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-files")
    cases = _cli_cases(tmp)
    procs = {name: subprocess.Popen(curate_command(*args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True) for name, (args, _) in cases.items()}
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            results[name] = (proc.returncode, err)
    finally:
        for proc in procs.values():
            kill_group(proc)
    return {"tmp": tmp, "cases": cases, "results": results}


@pytest.mark.parametrize("name", ["missing_caption_column", "missing_extra_column", "truncated_parquet",
                                  "broken_jsonl_line", "extra_column_named_key", "yaml_python_tag"])
def test_bad_file_or_config_is_one_error_line(cli_errors, name):
    rc, err = cli_errors["results"][name]
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("curate: error:") and cli_errors["cases"][name][1] in lines[0], lines[0]
    if name != "broken_jsonl_line":  # found only while streaming the file, after the output folder exists
        assert not (cli_errors["tmp"] / name / "out").exists()


def test_yaml_python_tag_runs_no_code(cli_errors):
    folder = cli_errors["tmp"] / "yaml_python_tag"
    assert not (folder / "pwned").exists()
    # The payload is real: an unsafe loader would have run it.
    yaml.unsafe_load((folder / "config.yaml").read_text())
    assert (folder / "pwned").is_dir()


def test_an_empty_input_file_alone_warns_and_writes_nothing(tmp_path):
    (tmp_path / "empty.parquet").write_bytes(b"")
    pq.write_table(pa.table({"URL": pa.array([], pa.string()), "TEXT": pa.array([], pa.string()),
                             "truth": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    config = write_config(tmp_path / "config.yaml", tmp_path / "empty.parquet", tmp_path / "out", dask={"n_workers": 1})
    result = run_curate(["run", str(config), "--no-progress"], ENV)
    # Not an error, but nothing to do: one warning, and nothing written (issue 17).
    assert result.returncode == 0, result.stderr
    assert "has no rows: nothing to do, nothing written" in result.stderr
    assert not (tmp_path / "out").exists()
