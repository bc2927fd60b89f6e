"""`device: auto` resolved in one place: the first CUDA device when there is one, else the CPU."""

from __future__ import annotations

from curate.pipeline.errors import UserError


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device is {device!r} but no CUDA device is available")
    return device
