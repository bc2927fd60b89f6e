"""Loading the head networks of filters/heads.py (LAION's NSFW detector, the aesthetic
predictor) from a user's weights file, once per process. The networks themselves are in
head_nets.py, imported only when a head is loaded: importing torch takes seconds, and a
config check pays for it only when the config names a head."""

from __future__ import annotations

import os
from pathlib import Path

from curate.pipeline.models.cache import cached


def read_state_dict(path: str | os.PathLike) -> dict:
    """A state_dict from a torch file (weights only: no code runs) or a .safetensors file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read {path} as a state_dict: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return {k: v.float() for k, v in state.items()}


def load_head(kind: str, path: str | os.PathLike):
    """The head network in `path` (kind "nsfw" or "aesthetic"), loaded once per process and
    file version. Raises ValueError naming what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    stat = path.stat()
    key = (kind, str(path.resolve()), stat.st_mtime_ns, stat.st_size)  # a rewritten file is reloaded

    def build():
        from curate.pipeline.models.head_nets import AestheticMlp, LaionNsfwMlp

        cls = {"nsfw": LaionNsfwMlp, "aesthetic": AestheticMlp}[kind]
        try:
            return cls.from_state_dict(read_state_dict(path))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    return cached(("head", *key), build)
