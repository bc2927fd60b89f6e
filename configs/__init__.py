"""The configs the README names, shipped with the package: `curate init NAME [PATH]` writes one.

This folder is their source in the repository and, installed, the package `curate.configs`
(pyproject.toml maps it like the code folders and ships its *.yaml as package data), so a
`pip install curate` has them without a checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional

from curate.pipeline.errors import UserError


def names() -> list[str]:
    """The shipped configs' names (`laion-subset` for laion-subset.yaml)."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def text(name: str) -> str:
    """A shipped config's YAML, as written in this folder."""
    name = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if name not in names():
        raise UserError(f"no shipped config named {name!r} (there are: {', '.join(names())})")
    return resources.files(__name__).joinpath(f"{name}.yaml").read_text(encoding="utf-8")


def write(name: str, path: Optional[str | Path] = None, overwrite: bool = False) -> Path:
    """Write the shipped config `name` to `path` (a file, or a folder to put NAME.yaml in; default
    ./NAME.yaml) and return where; an existing file is replaced only with `overwrite`."""
    content = text(name)
    name = name[: -len(".yaml")] if name.endswith(".yaml") else name
    target = Path(path) if path is not None else Path(f"{name}.yaml")
    if target.is_dir():
        target = target / f"{name}.yaml"
    if target.exists() and not overwrite:
        raise UserError(f"{target} exists; --force replaces it")
    if not target.parent.is_dir():
        raise UserError(f"{target.parent}: no such folder")
    target.write_text(content, encoding="utf-8")
    return target
