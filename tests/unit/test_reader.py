"""Tests for pipeline.reader: every input format gives the same input shards, streamed in bounded memory."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.pipeline.config import InputConfig
from curate.pipeline.errors import UserError
from curate.pipeline.reader import (InputShards, check_inputs, file_format, input_shard_path, read_input_shard,
                                     write_input_shards)

EXTRA = ["WIDTH", "HEIGHT", "similarity", "hash"]


def laion_frame(n: int, start: int = 0) -> pd.DataFrame:
    """LAION column names; captions with commas, quotes, non-ASCII text, a literal 'NA' and nulls."""
    captions = []
    for i in range(start, start + n):
        if i % 17 == 5:
            captions.append(None)
        elif i % 17 == 6:
            captions.append("NA")  # a real caption, not a missing value
        else:
            captions.append(f'photo {i}, "quoted" café – ünïcode')
    return pd.DataFrame(
        {
            "URL": [f"http://img.example/{i:06d}.jpg?w=1&h=2" for i in range(start, start + n)],
            "TEXT": captions,
            "WIDTH": [100 + i for i in range(start, start + n)],
            "HEIGHT": [200 + i for i in range(start, start + n)],
            "similarity": [(i % 8) / 16 for i in range(start, start + n)],  # exact in binary and decimal
            "hash": [f"h{i:x}z" for i in range(start, start + n)],
            "punsafe": [0.5] * n,  # present but not asked for: must not be carried
        }
    )


def write_as(frame: pd.DataFrame, path) -> None:
    name = str(path)
    compression = "gzip" if name.endswith(".gz") else None
    if ".parquet" in name:
        frame.to_parquet(path, index=False)
    elif ".tsv" in name:
        frame.to_csv(path, sep="\t", index=False, compression=compression)
    elif ".csv" in name:
        frame.to_csv(path, index=False, compression=compression)
    elif ".jsonl" in name:
        frame.to_json(path, orient="records", lines=True, force_ascii=False, compression=compression)
    else:
        raise ValueError(name)


def config(paths, **kw) -> InputConfig:
    kw.setdefault("extra_cols", EXTRA)
    return InputConfig(paths=[str(p) for p in paths], **kw)


def shard_paths(summary: dict, out_dir) -> list[str]:
    """Every input shard's path, in global shard order."""
    paths = []
    for index, entry in enumerate(summary["per_file"]):
        assert entry["first"] == len(paths)  # a file's shards are numbered after all earlier files'
        paths += [input_shard_path(out_dir, index, local) for local in range(entry["shards"])]
    assert len(paths) == summary["shards"]
    return paths


def shard_and_read(cfg: InputConfig, out_dir) -> tuple[dict, list[pd.DataFrame]]:
    files = check_inputs(cfg)
    summary = write_input_shards(cfg, files, out_dir)
    frames = [read_input_shard(p).to_pandas() for p in shard_paths(summary, out_dir)]
    return summary, frames


# --- formats -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("a.parquet", "parquet"),
        ("a.CSV", "csv"),
        ("a.tsv.gz", "tsv"),
        ("a.jsonl.zst", "jsonl"),
        ("a.json", "jsonl"),
    ],
)
def test_file_format_from_suffix(name, fmt):
    assert file_format(name, "auto") == fmt


def test_file_format_unknown_suffix_is_a_user_error():
    with pytest.raises(UserError, match="cannot tell the format"):
        file_format("urls.txt", "auto")
    assert file_format("urls.txt", "csv") == "csv"


def test_all_formats_give_identical_shards(tmp_path):
    frame = laion_frame(60)
    names = ["u.parquet", "u.csv", "u.tsv", "u.jsonl", "u.csv.gz", "u.tsv.gz", "u.jsonl.gz"]
    results = {}
    for name in names:
        path = tmp_path / name
        write_as(frame, path)
        summary, shards = shard_and_read(config([path], rows_per_shard=25, read_batch_rows=10), tmp_path / f"out-{name}")
        assert summary["rows"] == 60 and summary["shards"] == 3, name
        results[name] = pd.concat(shards, ignore_index=True)

    reference = results["u.parquet"]
    assert list(reference.columns) == ["url", "caption", *EXTRA]
    assert reference["url"].tolist() == frame["URL"].tolist()
    assert reference["caption"].isna().tolist() == frame["TEXT"].isna().tolist()
    assert reference["caption"].dropna().tolist() == frame["TEXT"].dropna().tolist()
    assert "NA" in reference["caption"].dropna().tolist()
    assert reference["WIDTH"].tolist() == frame["WIDTH"].tolist()
    for name, got in results.items():
        pd.testing.assert_frame_equal(got, reference, obj=name)


def test_gz_is_really_compressed_input(tmp_path):
    path = tmp_path / "u.csv.gz"
    write_as(laion_frame(5), path)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    _, shards = shard_and_read(config([path]), tmp_path / "out")
    assert shards[0]["url"].tolist() == laion_frame(5)["URL"].tolist()


def test_custom_column_names_and_no_caption(tmp_path):
    frame = pd.DataFrame({"link": ["http://a/1", "http://a/2"], "alt": ["one", "two"]})
    path = tmp_path / "x.csv"
    write_as(frame, path)
    _, shards = shard_and_read(config([path], url_col="link", caption_col=None, extra_cols=[]), tmp_path / "out")
    assert list(shards[0].columns) == ["url", "caption"]
    assert shards[0]["url"].tolist() == ["http://a/1", "http://a/2"]
    assert shards[0]["caption"].isna().all()


def test_explicit_format_overrides_suffix(tmp_path):
    path = tmp_path / "list.txt"
    write_as(laion_frame(4), tmp_path / "tmp.tsv")
    path.write_bytes((tmp_path / "tmp.tsv").read_bytes())
    _, shards = shard_and_read(config([path], format="tsv"), tmp_path / "out")
    assert shards[0]["url"].tolist() == laion_frame(4)["URL"].tolist()


# --- sharding ------------------------------------------------------------------


def test_shards_never_span_files(tmp_path):
    # 120 + 80 + 50 rows in three formats; 100 per shard -> 100, 20 | 80 | 50: each file's last shard may be short.
    paths = [tmp_path / "p0.parquet", tmp_path / "p1.csv", tmp_path / "p2.jsonl"]
    write_as(laion_frame(120, 0), paths[0])
    write_as(laion_frame(80, 120), paths[1])
    write_as(laion_frame(50, 200), paths[2])
    summary, shards = shard_and_read(config(paths, rows_per_shard=100, read_batch_rows=33), tmp_path / "out")
    assert summary["rows"] == 250
    assert summary["shards"] == 4
    assert [len(s) for s in shards] == [100, 20, 80, 50]
    urls = pd.concat(shards)["url"].tolist()
    assert urls == laion_frame(250)["URL"].tolist()
    assert summary["files"] == [str(p) for p in paths]
    assert [(f["first"], f["shards"], f["rows"]) for f in summary["per_file"]] == [(0, 2, 120), (2, 1, 80), (3, 1, 50)]
    assert json.loads((tmp_path / "out" / "_done.json").read_text()) == summary


def test_rows_of_each_shard_from_the_per_file_counts(tmp_path):
    """Rows of a (failed, waiting) shard come from its file's counts, not from equal shards."""
    paths = [tmp_path / "a.csv", tmp_path / "b.parquet", tmp_path / "c.csv", tmp_path / "d.jsonl"]
    for path, (n, start) in zip(paths, [(45, 0), (0, 45), (20, 45), (61, 65)]):
        write_as(laion_frame(n, start), path)
    cfg = config(paths, rows_per_shard=20)
    write_input_shards(cfg, check_inputs(cfg), tmp_path / "out")
    inputs = InputShards(cfg, [str(p) for p in paths], tmp_path / "out", None)  # from _done.json: nothing cut
    assert inputs.complete and inputs.known_shards == 3 + 0 + 1 + 4
    assert [inputs.rows_of(s) for s in range(8)] == [20, 20, 5, 20, 20, 20, 20, 1]
    assert inputs.total_rows == 126


def test_exact_multiple_makes_no_empty_shard(tmp_path):
    path = tmp_path / "u.parquet"
    write_as(laion_frame(200), path)
    summary, shards = shard_and_read(config([path], rows_per_shard=100, read_batch_rows=64), tmp_path / "out")
    assert summary["shards"] == 2
    assert [len(s) for s in shards] == [100, 100]
    assert not (tmp_path / "out" / "00000_00002.parquet").exists()


def test_glob_expands_sorted(tmp_path):
    for i, start in enumerate([0, 30, 60]):
        write_as(laion_frame(30, start), tmp_path / f"part-{i:02d}.parquet")
    write_as(laion_frame(30, 1000), tmp_path / "other.parquet")  # not matched
    cfg = config([tmp_path / "part-*.parquet"], rows_per_shard=50)
    files = check_inputs(cfg)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["part-00.parquet", "part-01.parquet", "part-02.parquet"]
    summary, shards = shard_and_read(cfg, tmp_path / "out")
    assert summary["rows"] == 90
    assert pd.concat(shards)["url"].tolist() == laion_frame(90)["URL"].tolist()


def test_glob_matching_nothing_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"input file not found: .*part-\*\.parquet"):
        check_inputs(config([tmp_path / "part-*.parquet"]))


# --- errors --------------------------------------------------------------------


def _one_line_error(cfg) -> str:
    with pytest.raises(UserError) as exc:
        check_inputs(cfg)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    write_as(laion_frame(3), tmp_path / "here.csv")
    message = _one_line_error(config([tmp_path / "here.csv", tmp_path / "gone.csv"]))
    assert message.startswith("input file not found: ")
    assert "gone.csv" in message


def test_missing_url_column(tmp_path):
    path = tmp_path / "u.parquet"
    write_as(laion_frame(3).rename(columns={"URL": "url_typo"}), path)
    message = _one_line_error(config([path]))
    assert "missing column(s) URL" in message
    assert "url_typo" in message  # the columns it does have are listed


def test_missing_extra_column(tmp_path):
    path = tmp_path / "u.jsonl"
    write_as(laion_frame(3).drop(columns=["hash"]), path)
    assert "missing column(s) hash" in _one_line_error(config([path]))


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1" + b"\x00garbage" * 50)
    message = _one_line_error(config([path]))
    assert message.startswith(f"input {path}: not a readable parquet file")


def test_truncated_parquet(tmp_path):
    good = tmp_path / "good.parquet"
    write_as(laion_frame(50), good)
    bad = tmp_path / "cut.parquet"
    bad.write_bytes(good.read_bytes()[:-100])
    assert "not a readable parquet file" in _one_line_error(config([bad]))


def test_corrupt_row_group_fails_at_read_with_user_error(tmp_path):
    # Footer intact, data pages damaged: check_inputs passes, reading fails with one clear line.
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pandas(laion_frame(500)), good, compression="snappy")
    raw = bytearray(good.read_bytes())
    for i in range(200, min(len(raw) - 2000, 4000)):
        raw[i] = 0xFF
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(raw))
    cfg = config([bad])
    files = check_inputs(cfg)
    with pytest.raises(UserError) as exc:
        write_input_shards(cfg, files, tmp_path / "out")
    assert str(exc.value).startswith(f"input {bad}: read failed")
    assert not (tmp_path / "out" / "_done.json").exists()


@pytest.mark.parametrize("name", ["e.csv", "e.tsv", "e.jsonl", "e.csv.gz", "e.jsonl.gz"])
def test_zero_byte_file_contributes_nothing(tmp_path, name):
    empty = tmp_path / name
    if name.endswith(".gz"):
        empty.write_bytes(gzip.compress(b""))
    else:
        empty.write_bytes(b"")
    full = tmp_path / "full.parquet"
    write_as(laion_frame(7), full)
    summary, shards = shard_and_read(config([empty, full], rows_per_shard=5), tmp_path / "out")
    assert summary["rows"] == 7
    assert [len(s) for s in shards] == [5, 2]
    assert [(f["first"], f["shards"]) for f in summary["per_file"]] == [(0, 0), (0, 2)]


@pytest.mark.parametrize("name", ["h.csv", "h.parquet"])
def test_header_only_file_has_no_rows(tmp_path, name):
    path = tmp_path / name
    write_as(laion_frame(0), path)
    summary, shards = shard_and_read(config([path]), tmp_path / "out")
    assert summary == {"shards": 0, "rows": 0, "files": [str(path)],
                       "per_file": [{"file": str(path), "first": 0, "shards": 0, "rows": 0}]}
    assert shards == []
    assert (tmp_path / "out" / "_done.json").exists()


# --- resume --------------------------------------------------------------------


def test_done_marker_skips_rereading(tmp_path):
    path = tmp_path / "u.parquet"
    write_as(laion_frame(30), path)
    cfg = config([path], rows_per_shard=20)
    out = tmp_path / "out"
    first = write_input_shards(cfg, check_inputs(cfg), out)
    assert json.loads((out / "_done.json").read_text()) == first
    before = (out / "00000_00000.parquet").stat().st_mtime_ns

    path.write_bytes(b"this is no longer a parquet file")  # reading it again would fail
    again = write_input_shards(cfg, [str(path)], out)
    assert again == first
    assert (out / "00000_00000.parquet").stat().st_mtime_ns == before


def test_half_finished_pass_is_redone_from_scratch(tmp_path):
    path = tmp_path / "u.parquet"
    write_as(laion_frame(30), path)
    cfg = config([path], rows_per_shard=20)
    out = tmp_path / "out"
    out.mkdir()
    # Leftovers of an interrupted cut of this file with another shard size: no marker.
    pq.write_table(pa.table({"url": ["stale"]}), out / "00000_00000.parquet")
    pq.write_table(pa.table({"url": ["stale"]}), out / "00000_00007.parquet")
    (out / ".tmp").mkdir()
    (out / ".tmp" / "00000_00001.parquet.tmp-deadbeef").write_bytes(b"half")
    summary = write_input_shards(cfg, check_inputs(cfg), out)
    assert summary["shards"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["00000.done.json", "00000_00000.parquet", "00000_00001.parquet",
                                                     "_done.json", "_files.json"]
    assert read_input_shard(out / "00000_00000.parquet").column("url").to_pylist() == laion_frame(20)["URL"].tolist()


def test_a_finished_files_cut_is_not_redone_and_an_interrupted_one_is_redone_whole(tmp_path):
    paths = [tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.parquet"]
    for path, start in zip(paths, [0, 30, 60]):
        write_as(laion_frame(30, start), path)
    cfg = config(paths, rows_per_shard=20)
    out = tmp_path / "out"
    first = write_input_shards(cfg, check_inputs(cfg), out)
    # As if the run died while cutting b: no _done.json, b's cut unfinished (a stale shard, no marker).
    (out / "_done.json").unlink()
    (out / "00001.done.json").unlink()
    pq.write_table(pa.table({"url": ["stale"]}), out / "00001_00000.parquet")
    (out / "00001_00005.parquet").write_bytes(b"stale")
    before = (out / "00000_00000.parquet").stat().st_mtime_ns
    paths[0].write_bytes(b"no longer a csv \x00\xff")  # reading a again would give other rows or fail
    again = write_input_shards(cfg, [str(p) for p in paths], out)
    assert again == first
    assert (out / "00000_00000.parquet").stat().st_mtime_ns == before
    assert not (out / "00001_00005.parquet").exists()
    assert read_input_shard(out / "00001_00000.parquet").column("url").to_pylist() == laion_frame(20, 30)["URL"].tolist()


def test_the_file_list_is_fixed_when_the_run_starts(tmp_path):
    """A rerun numbers shards as the first run did, even when a glob now matches another file."""
    for name, start in [("p-1.csv", 0), ("p-3.csv", 30)]:
        write_as(laion_frame(30, start), tmp_path / name)
    cfg = config([tmp_path / "p-*.csv"], rows_per_shard=20)
    out = tmp_path / "out"
    files = check_inputs(cfg)
    InputShards(cfg, files, out, None)  # records _files.json; cuts nothing
    write_as(laion_frame(30, 1000), tmp_path / "p-2.csv")  # sorts between the two
    summary = write_input_shards(cfg, check_inputs(cfg), out)
    assert summary["files"] == files and summary["rows"] == 60


# --- memory ----------------------------------------------------------------------

_MEASURE = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from curate.pipeline.config import InputConfig
    from curate.pipeline.reader import check_inputs, write_input_shards
    cfg = InputConfig(paths=[sys.argv[1]], extra_cols=["WIDTH"], rows_per_shard=2000, read_batch_rows=1000)
    summary = write_input_shards(cfg, check_inputs(cfg), Path(sys.argv[2]))
    print(summary["rows"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def _write_big_parquet(path, rows: int) -> None:
    """~1 KB unique captions, written in small row groups without ever holding the whole table."""
    filler = ("lorem ipsum dolor sit amet consectetur " * 30)[:1000]
    schema = pa.schema([("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.int64())])
    with pq.ParquetWriter(path, schema, compression="snappy") as writer:
        for start in range(0, rows, 5000):
            ids = range(start, min(rows, start + 5000))
            table = pa.table(
                {
                    "URL": [f"http://img.example/{i}.jpg" for i in ids],
                    "TEXT": [f"{i} {filler}" for i in ids],
                    "WIDTH": list(ids),
                },
                schema=schema,
            )
            writer.write_table(table, row_group_size=1000)


def _peak_rss_kb(path, out) -> tuple[int, int]:
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), str(out)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    rows, peak = map(int, done.stdout.split())
    return rows, peak


def test_ten_times_more_rows_does_not_raise_peak_memory(tmp_path):
    small, large = tmp_path / "small.parquet", tmp_path / "large.parquet"
    _write_big_parquet(small, 20_000)
    _write_big_parquet(large, 200_000)  # ~200 MB of caption text once decoded
    rows_small, peak_small = _peak_rss_kb(small, tmp_path / "out-small")
    rows_large, peak_large = _peak_rss_kb(large, tmp_path / "out-large")
    assert (rows_small, rows_large) == (20_000, 200_000)
    assert len(list((tmp_path / "out-large").glob("*.parquet"))) == 100
    growth_mb = (peak_large - peak_small) / 1024  # ru_maxrss is in KiB on Linux
    assert growth_mb < 60, f"peak RSS grew by {growth_mb:.0f} MB ({peak_small} -> {peak_large} KiB)"


# --- streaming -------------------------------------------------------------------


def test_stream_hands_out_a_files_shards_as_soon_as_it_is_cut(tmp_path):
    """One cut task per file; file i's shards come once it is cut and files 0..i-1 are counted
    (parquet from its footer up front), before later files are cut."""
    from curate.pipeline.executor import InProcessExecutor, Wait

    paths = [tmp_path / "a.csv", tmp_path / "b.parquet", tmp_path / "c.jsonl"]
    for path, (n, start) in zip(paths, [(45, 0), (30, 45), (10, 75)]):
        write_as(laion_frame(n, start), path)
    cfg = config(paths, rows_per_shard=20)
    out = tmp_path / "out"
    inputs = InputShards(cfg, check_inputs(cfg), out, InProcessExecutor())
    assert inputs.known_shards == 2 and not inputs.complete  # b's count from its footer; a and c not cut yet
    seen = []
    for item in inputs.stream():
        if isinstance(item, Wait):
            continue
        shard, path = item
        seen.append((shard, Path(path).name, sorted(p.name for p in out.glob("*.done.json")), inputs.known_shards))
    assert seen == [
        (0, "00000_00000.parquet", ["00000.done.json"], 5),  # a cut, b and c not yet
        (1, "00000_00001.parquet", ["00000.done.json"], 5),
        (2, "00000_00002.parquet", ["00000.done.json"], 5),
        (3, "00001_00000.parquet", ["00000.done.json", "00001.done.json"], 5),
        (4, "00001_00001.parquet", ["00000.done.json", "00001.done.json"], 5),
        (5, "00002_00000.parquet", ["00000.done.json", "00001.done.json", "00002.done.json"], 6),
    ]
    assert inputs.complete and (out / "_done.json").exists()
    assert [inputs.rows_of(s) for s in range(6)] == [20, 20, 5, 20, 10, 10]


def test_a_file_failing_mid_way_is_one_user_error_line(tmp_path):
    from curate.pipeline.executor import InProcessExecutor

    good, bad = tmp_path / "a.csv", tmp_path / "b.jsonl"
    write_as(laion_frame(30), good)
    write_as(laion_frame(30, 30), bad)
    cfg = config([good, bad], rows_per_shard=20, read_batch_rows=10)
    files = check_inputs(cfg)
    bad.write_bytes(bad.read_bytes() + b'{"URL": "http://x/1", "TEXT": broken\n')  # past the first lines
    inputs = InputShards(cfg, files, tmp_path / "out", InProcessExecutor())
    with pytest.raises(UserError) as exc:
        list(inputs.stream())
    assert str(exc.value).startswith(f"input {bad}: read failed") and "\n" not in str(exc.value)
    assert (tmp_path / "out" / "00000.done.json").exists()  # the good file's cut stands
    assert not (tmp_path / "out" / "00001.done.json").exists() and not (tmp_path / "out" / "_done.json").exists()


def test_progress_total_grows_until_final():
    from curate.pipeline.progress import Progress

    meter = Progress(["download", "write"], 3, enabled=False, terminal=False, final=False)
    meter.shard_done("download", {"rows": 10})
    meter.shard_done("write", {"written": 4})
    assert "download 1/3+, write 1/3+ shards" in meter.line() and "ETA" not in meter.line()
    meter.set_total(8, final=True)
    assert "download 1/8, write 1/8 shards" in meter.line() and "ETA" in meter.line()


def test_a_run_cut_before_shards_stopped_spanning_files_resumes_on_its_shards(tmp_path):
    """An older run's _done.json (shards across files, NNNNN.parquet) is taken as it is."""
    from curate.pipeline.executor import InProcessExecutor

    out = tmp_path / "out"
    out.mkdir()
    (out / "_done.json").write_text(json.dumps({"shards": 3, "rows": 50, "files": ["a.csv", "b.csv"]}))
    inputs = InputShards(config([tmp_path / "a.csv"], rows_per_shard=20), ["a.csv", "b.csv"], out, InProcessExecutor())
    assert [(s, Path(p).name) for s, p in inputs.stream()] == [(0, "00000.parquet"), (1, "00001.parquet"),
                                                              (2, "00002.parquet")]
    assert [inputs.rows_of(s) for s in range(3)] == [20, 20, 10] and inputs.total_rows == 50
