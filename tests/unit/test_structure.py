"""The shape of the code: stages side by side, filters below them, one namespace users cannot shadow.

These read the source (ast) and run the installed CLI; nothing here is mocked.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

FOLDERS = {"pipeline": "curate.pipeline", "filters": "curate.filters", "train": "curate.train"}
# What a filter may import from curate: other filters, the models layer and the shared records.
FILTER_MAY_IMPORT = ("curate.filters", "curate.pipeline.models", "curate.pipeline.records",
                     "curate.pipeline.urls", "curate.pipeline.dedup_store", "curate.pipeline.errors")


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; curate imports by full name"
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def _resolve(name: str, known: dict) -> str | None:
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: {r for n in _imports(p) if (r := _resolve(n, known)) and r != m} for m, p in known.items()}


def _is_stage(module: str) -> bool:
    return module.startswith("curate.pipeline.stages.")


def test_code_imports_curate_by_its_namespace_only():
    bare = []
    for folder in (*FOLDERS, "bench", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            for name in _imports(path):
                if name.split(".")[0] in FOLDERS:
                    bare.append(f"{path.relative_to(REPO)}: {name}")
    assert not bare, "imports that a user's own pipeline.py / train.py would shadow:\n" + "\n".join(bare)


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                circles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_stages_stand_side_by_side():
    graph = _graph()
    stages = [m for m in graph if _is_stage(m)]
    assert {"curate.pipeline.stages.download", "curate.pipeline.stages.score", "curate.pipeline.stages.dedup",
            "curate.pipeline.stages.write"} <= set(stages)
    wrong = [f"{m} -> {d}" for m in stages for d in graph[m] if _is_stage(d)]
    assert not wrong, "a stage imports another stage:\n" + "\n".join(wrong)


def test_filters_import_only_models_and_shared_records():
    graph = _graph()
    wrong = [f"{m} -> {d}" for m, deps in graph.items() if m.startswith("curate.filters")
             for d in deps if not d.startswith(FILTER_MAY_IMPORT)]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_stage_import(tmp_path):
    """The walk above is what these tests rely on: it must see an import written in any form."""
    path = tmp_path / "m.py"
    path.write_text("import os\nfrom curate.pipeline.stages import score\n"
                    "def f():\n    from curate.pipeline.stages.write import write_shard\n")
    known = _modules()
    found = {_resolve(n, known) for n in _imports(path)}
    assert {"curate.pipeline.stages.score", "curate.pipeline.stages.write"} <= found


def test_cli_works_in_a_folder_with_its_own_train_and_pipeline_modules(tmp_path):
    """Most ML projects have a train.py; a notebook there imports from its folder first."""
    for name in ("train", "pipeline", "filters"):
        (tmp_path / f"{name}.py").write_text(f"raise SystemExit('the user\\'s own {name}.py was imported')\n")
    curate = Path(sys.executable).parent / "curate"
    for command in ([str(curate), "--help"], [sys.executable, "-m", "curate.pipeline.cli", "--help"],
                    [sys.executable, "-c", "import curate.train.loop, curate.pipeline.run, curate.filters; print('ok')"]):
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert "was imported" not in done.stdout + done.stderr
    assert "curate run" in subprocess.run([str(curate), "--help"], cwd=tmp_path, capture_output=True,
                                          text=True, timeout=60).stdout
