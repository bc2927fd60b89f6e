"""Training checkpoints: everything a resumed run needs to continue exactly.

One file per checkpoint, `checkpoints/step-NNNNNNNN.pt`: the step, the UNet's weights (with
LoRA: the adapters' only), the optimizer's and LR schedule's state, the EMA weights, and every random number
generator (python, numpy, torch CPU and CUDA, the loop's noise generator). Written to a
temporary name, fsynced and renamed (pipeline/shards.py atomic_path), so a crash mid-save leaves the previous checkpoint intact.
Everything is tensors and plain containers, so it loads with `weights_only=True` (no
pickled code runs when a checkpoint is read). Beside it, `step-NNNNNNNN/` holds the same
weights as plain diffusers opens them (a pipeline folder, or a LoRA file; train/loop.py).
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from curate.pipeline.shards import atomic_path

NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in `folder`, oldest first."""
    if not Path(folder).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(folder).iterdir() if (m := NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(folder: Path) -> Optional[Path]:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def save_checkpoint(folder: Path, step: int, state: dict, keep: int) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(folder, step)
    with atomic_path(final) as tmp:  # fsynced, then renamed: a crash leaves the previous checkpoint
        torch.save(state, tmp)
    for _, old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
        shutil.rmtree(old.with_suffix(""), ignore_errors=True)  # its diffusers export (checkpoints.export)
    return final


def load_checkpoint(path: Path, device: torch.device) -> dict:
    return torch.load(path, map_location=device, weights_only=True)


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG the run draws from, as tensors (weights_only-loadable)."""
    version, keys, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python_version": version,
        "python_keys": torch.tensor(keys, dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos), "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    # A checkpoint loaded onto a GPU (map_location) brings these tensors there too.
    random.setstate((state["python_version"], tuple(state["python_keys"].cpu().tolist()), None))
    np.random.set_state(("MT19937", state["numpy_keys"].cpu().numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    generator.set_state(state["generator"].cpu())
