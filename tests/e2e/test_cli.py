"""The CLI's contract with users: a problem they can fix is ONE line on stderr starting
with `curate: error:`, a non-zero exit, and nothing written; `--debug` shows the traceback.

Every case is a fresh `curate` process. They run side by side (the slow one, waiting for an
unreachable scheduler, first, so that its wait overlaps the rest) and are checked afterwards.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from conftest import curate_command, kill_group, write_config

INSTALLED = Path(sys.executable).parent / "curate"


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def good_input(path: Path, columns=("URL", "TEXT", "truth")) -> Path:
    # Port 9 (discard) on loopback: never contacted, the errors come first.
    frame = pd.DataFrame({"URL": ["http://127.0.0.1:9/a.jpg", "http://127.0.0.1:9/b.jpg"],
                          "TEXT": ["a red circle", "a blue square"], "truth": ["ok", "ok"]})
    frame[list(columns)].to_parquet(path, index=False)
    return path


def build_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (CLI arguments, text the error line must contain). Each case has its own folder."""
    cases: dict[str, tuple[list[str], str]] = {}

    def folder(name: str) -> Path:
        d = tmp / name
        d.mkdir()
        return d

    def config(name: str, urls: Path | None = None, **sections) -> Path:
        d = folder(name)
        return write_config(d / "config.yaml", urls or good_input(d / "urls.parquet"), d / "out", **sections)

    d = folder("malformed_yaml")
    (d / "config.yaml").write_text(f"input:\n  paths: [{d / 'urls.parquet'}\noutput: {{path: {d / 'out'}}}\n")
    cases["malformed_yaml"] = (["run", str(d / "config.yaml")], "not valid YAML")

    cases["unknown_key"] = (["run", str(config("unknown_key", download={"timout": 3}))], "download.timout: unknown key")
    cases["unknown_key_via_set"] = (
        ["run", str(config("unknown_key_via_set")), "--set", "resize.imagesize=64"], "resize.imagesize: unknown key")
    cases["wrong_type"] = (["run", str(config("wrong_type", download={"timeout": "fast"}))],
                           "download.timeout: expected a number")
    cases["wrong_type_via_set"] = (
        ["run", str(config("wrong_type_via_set")), "--set", "input.rows_per_shard=many"],
        "input.rows_per_shard: expected a number")

    d = folder("missing_config")
    cases["missing_config"] = (["run", str(d / "nope.yaml")], "config file not found")

    cases["missing_input"] = (["run", str(config("missing_input", urls=tmp / "nope.parquet"))], "input file not found")

    d = folder("no_url_column")
    urls = good_input(d / "urls.parquet", columns=("TEXT", "truth"))
    cases["no_url_column"] = (["run", str(write_config(d / "config.yaml", urls, d / "out"))], "missing column(s) URL")

    d = folder("corrupt_parquet")
    (d / "urls.parquet").write_bytes(b"PAR1 this is not really parquet at all PAR1")
    cases["corrupt_parquet"] = (["run", str(write_config(d / "config.yaml", d / "urls.parquet", d / "out"))],
                                "not a readable parquet file")

    cases["unknown_filter"] = (["run", str(config("unknown_filter", filters=[{"name": "no_such_filter"}]))],
                               "unknown filter 'no_such_filter'")
    cases["unknown_filter_parameter"] = (
        ["run", str(config("unknown_filter_parameter", filters=[{"name": "caption_length", "min_wrds": 2}]))],
        "filters.0.min_wrds: unknown parameter")

    cases["bad_set_syntax"] = (["run", str(config("bad_set_syntax")), "--set", "resize.size"], "expected KEY=VALUE")

    cases["set_into_a_value"] = (["run", str(config("set_into_a_value")), "--set", "input.paths.0.x=1"],
                                 "--set input.paths.0.x: 0 is not a section")
    cases["set_bad_list_index"] = (["run", str(config("set_bad_list_index")), "--set", "input.paths.3=x"],
                                   "--set input.paths.3: 3 is not an index")
    cases["set_value_not_yaml"] = (["run", str(config("set_value_not_yaml")), "--set", "input.paths=[a"],
                                   "--set input.paths: value '[a' is not valid YAML")

    d = folder("config_not_utf8")
    (d / "config.yaml").write_bytes(b"input: {paths: [\xff\xfe]}\n")
    cases["config_not_utf8"] = (["run", str(d / "config.yaml")], "not UTF-8")

    path = config("output_is_a_file")
    (path.parent / "out").write_text("a file where the output folder should go")
    cases["output_is_a_file"] = (["run", str(path)], "exists and is not a folder")

    path = config("overwrite_unrelated_folder")
    (path.parent / "out").mkdir()
    (path.parent / "out" / "thesis.tex").write_text("years of work")
    cases["overwrite_unrelated_folder"] = (["run", str(path), "--overwrite"], "no curate run")

    cases["malformed_scheduler_address"] = (
        ["run", str(config("malformed_scheduler_address")), "--set", "dask.scheduler=not-an-address"],
        "not a valid Dask scheduler address: not-an-address")

    port = closed_port()
    cases["unreachable_scheduler"] = (
        ["run", str(config("unreachable_scheduler")), "--set", f"dask.scheduler=tcp://127.0.0.1:{port}"],
        f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}")
    return cases


def start(args: list[str], env: dict, command=curate_command) -> subprocess.Popen:
    return subprocess.Popen(command(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 90) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


ERROR_CASES = [
    "malformed_yaml", "unknown_key", "unknown_key_via_set", "wrong_type", "wrong_type_via_set",
    "missing_config", "missing_input", "no_url_column", "corrupt_parquet", "unknown_filter",
    "unknown_filter_parameter", "bad_set_syntax", "set_into_a_value", "set_bad_list_index",
    "set_value_not_yaml", "config_not_utf8", "output_is_a_file", "overwrite_unrelated_folder",
    "malformed_scheduler_address", "unreachable_scheduler",
]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cases = build_cases(tmp)
    assert sorted(cases) == sorted(ERROR_CASES)
    before = tree(tmp)
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    extra = {
        "debug": ["--debug", *cases["malformed_yaml"][0]],
        "help": ["--help"],
        "run_help": ["run", "--help"],
    }
    runs = {name: (args, curate_command) for name, (args, _) in cases.items()}
    runs.update((name, (args, curate_command)) for name, args in extra.items())
    if INSTALLED.exists():
        runs["installed_help"] = (["--help"], lambda *a: [str(INSTALLED), *a])
    # The slow case (it waits out the client's connect timeout, idle) starts first and alone
    # holds one slot; the others take turns on the remaining slots, one per core: all of
    # them started at once would fight over the cores for their imports, and the slow case's
    # wait would only begin once they were through.
    slow = "unreachable_scheduler"
    order = [slow, *(name for name in runs if name != slow)]
    procs: dict[str, subprocess.Popen] = {}
    lock = threading.Lock()

    def one(name: str) -> subprocess.CompletedProcess:
        args, command = runs[name]
        with lock:
            procs[name] = proc = start(args, env, command=command)
        return finish(proc)

    try:
        with ThreadPoolExecutor(max_workers=(os.cpu_count() or 1) + 1) as pool:
            futures = {name: pool.submit(one, name) for name in order}
            results = {name: future.result() for name, future in futures.items()}
    finally:
        with lock:
            for proc in procs.values():
                if proc.poll() is None:
                    finish(proc, timeout=0.1)
    return {"tmp": tmp, "cases": cases, "results": results, "before": before}


@pytest.mark.parametrize("name", ERROR_CASES)
def test_user_error_is_one_line_and_writes_nothing(outcomes, name):
    result = outcomes["results"][name]
    _, expected = outcomes["cases"][name]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("curate: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    # Nothing written, nothing deleted: the case's folder is exactly as the test left it.
    folder = outcomes["tmp"] / name
    assert tree(folder) == {k.split("/", 1)[1]: v for k, v in outcomes["before"].items() if k.startswith(f"{name}/")}
    if name not in ("output_is_a_file", "overwrite_unrelated_folder"):
        assert not (folder / "out").exists()


def test_debug_shows_the_traceback(outcomes):
    result = outcomes["results"]["debug"]
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "UserError" in result.stderr and "not valid YAML" in result.stderr
    assert not (outcomes["tmp"] / "malformed_yaml" / "out").exists()


@pytest.mark.parametrize("name", ["help", "run_help", "installed_help"])
def test_help_exits_zero(outcomes, name):
    if name not in outcomes["results"]:
        pytest.skip(f"no installed console script at {INSTALLED}")
    result = outcomes["results"][name]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: curate")
    if name == "run_help":
        assert "--set" in result.stdout and "--overwrite" in result.stdout
    else:
        assert "run" in result.stdout and "--debug" in result.stdout
