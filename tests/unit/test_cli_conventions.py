"""The command line's conventions: `--version`, a description and help for every command and
argument, `inspect -n 0`, the shipped configs (`curate init`, and in the wheel), and a missing
optional extra named in one `curate: error:` line. The CLI runs as a user's process where it
matters (a temp folder as the working directory, a module made unimportable)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, curate_command
from curate.pipeline.cli import build_parser, main
from curate.pipeline.tarshard import TarShardWriter


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    from importlib.metadata import version

    assert capsys.readouterr().out.strip() == f"curate {version('curate')}"


def test_every_command_has_a_description_and_help_for_its_arguments():
    commands = _commands(build_parser())
    assert {"run", "stats", "report", "inspect", "init", "train"} <= set(commands)
    for name, sub in commands.items():
        assert sub.description and len(sub.description) > 40, name
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"curate {name}: {action.dest} has no help"


def _shard(path: Path, n: int) -> Path:
    with TarShardWriter(path) as tar:
        for i in range(n):
            tar.write(f"{i:010d}", {"txt": b"a caption", "json": json.dumps({"i": i}).encode()})
    return path


def test_inspect_zero_samples_is_not_no_samples(tmp_path, capsys):
    shard = _shard(tmp_path / "00000.tar", 3)
    assert main(["inspect", str(shard), "-n", "0"]) == 0
    assert capsys.readouterr().out.strip() == f"{shard}: 3 samples (0 requested: none printed)"
    assert main(["inspect", str(shard), "-n", "2"]) == 0
    assert capsys.readouterr().out.count("caption: a caption") == 2
    for bad in ("-1", "two"):
        with pytest.raises(SystemExit) as exit_:
            main(["inspect", str(shard), "-n", bad])
        assert exit_.value.code == 2
        assert "argument -n" in capsys.readouterr().err


def _run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(curate_command(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("curate: error: "), done.stderr
    return lines[0]


def test_init_writes_a_shipped_config_from_any_folder(tmp_path):
    shipped = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    listed = _run(["init"], tmp_path)
    assert listed.returncode == 0 and listed.stdout.split() == shipped

    done = _run(["init", "laion-subset"], tmp_path)
    assert done.returncode == 0, done.stderr
    written = tmp_path / "laion-subset.yaml"
    assert done.stdout.strip() == "laion-subset.yaml"
    assert written.read_text() == (REPO / "configs" / "laion-subset.yaml").read_text()
    # It is a valid run config as written.
    from curate.pipeline.config import load_config

    assert load_config(str(written), []).output.path == "laion-subset-output"

    # An existing file is kept unless --force; a folder gets NAME.yaml; an unknown name lists the known.
    written.write_text("# my edits\n")
    assert "exists; --force replaces it" in _one_error_line(_run(["init", "laion-subset"], tmp_path))
    assert written.read_text() == "# my edits\n"
    assert _run(["init", "laion-subset", "--force"], tmp_path).returncode == 0
    assert written.read_text() == (REPO / "configs" / "laion-subset.yaml").read_text()
    (tmp_path / "jobs").mkdir()
    assert _run(["init", "demo", "jobs"], tmp_path).stdout.strip() == str(Path("jobs") / "demo.yaml")
    assert (tmp_path / "jobs" / "demo.yaml").read_text() == (REPO / "configs" / "demo.yaml").read_text()
    error = _one_error_line(_run(["init", "laoin-subset"], tmp_path))
    assert "no shipped config named 'laoin-subset'" in error and "laion-subset" in error
    assert "no such folder" in _one_error_line(_run(["init", "demo", "nowhere/demo.yaml"], tmp_path))


def test_the_configs_are_in_the_wheel(tmp_path):
    """`pip install curate` gets them: the wheel built from this tree carries configs/*.yaml."""
    pytest.importorskip("setuptools", reason="the dev extra installs setuptools, the build backend")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("pipeline", "filters", "train", "configs"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", str(src), "-w", str(tmp_path / "wheel")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("curate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert {Path(n).name for n in names if n.startswith("curate/configs/") and n.endswith(".yaml")} == shipped
    assert "curate/configs/__init__.py" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    # Training's libraries are an extra; filtering's are not.
    assert 'Requires-Dist: diffusers>=0.35; extra == "train"' in metadata
    assert not [line for line in metadata.splitlines() if line.startswith("Requires-Dist: transformers")
                and "extra ==" not in line]


@pytest.fixture()
def without_diffusers(tmp_path):
    """An environment in which diffusers is not found, as where the train extra is not installed: a
    folder first on PYTHONPATH whose sitecustomize puts a finder first that finds no diffusers (so
    both `import diffusers` and a mere look for it, importlib.util.find_spec, fail)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoDiffusers:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'diffusers' or name.startswith('diffusers.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _NoDiffusers())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]))
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    return env


def test_a_missing_extra_is_one_line_naming_it(tmp_path, without_diffusers):
    env = without_diffusers
    # Downloading and filtering need none of it: the pipeline imports, `curate run --help` works.
    check = subprocess.run([sys.executable, "-c", "import sys, curate.pipeline.run, curate.filters, "
                            "curate.pipeline.report.compare; print('diffusers' in sys.modules)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.strip() == "False", check.stderr
    assert _run(["run", "--help"], tmp_path, env).returncode == 0

    for command in (["train", "whatever.yaml"], ["eval", "--model", "tiny"]):
        line = _one_error_line(_run(command, tmp_path, env))
        assert f"curate {command[0]} needs curate's 'train' extra" in line, line
        assert "diffusers" in line and line.endswith("pip install 'curate[train]'")

    # A filter that needs it says so when the config is read, before any work.
    urls = tmp_path / "urls.parquet"
    pd.DataFrame({"URL": ["http://127.0.0.1:9/a.jpg"], "TEXT": ["a red circle"]}).to_parquet(urls)
    config = tmp_path / "run.yaml"
    config.write_text(f"input: {{paths: [{urls}]}}\noutput: {{path: {tmp_path / 'out'}}}\n"
                      "filters:\n  - {name: vae_latents, vae: tiny}\n")
    line = _one_error_line(_run(["run", str(config)], tmp_path, env))
    assert "the vae_latents filter needs curate's 'train' extra" in line and "pip install 'curate[train]'" in line
    assert not (tmp_path / "out").exists()
