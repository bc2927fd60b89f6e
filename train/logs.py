"""Where a training run reports: log.jsonl (always), TensorBoard, Weights & Biases.

    OUTPUT/log.jsonl       one json line per logging step: step, loss, lr, images_per_second
                           (+ gpu_memory_gib, gpu_peak_memory_gib on CUDA)
    OUTPUT/logs/           TensorBoard events: the same as train/<name> scalars, and each
                           validation grid (prompts written under the images) as `validation`
    Weights & Biases       the same, when logging.wandb is on (the wandb package must be installed)

A resumed run redoes the steps after its checkpoint, so it first drops what was logged for
them: log.jsonl lines, and TensorBoard events (SummaryWriter's purge_step). Only rank 0 logs.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from curate.pipeline.errors import UserError
from curate.train.config import TrainConfig


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path: Path, step: int) -> None:
    """A resumed run redoes the steps after its checkpoint: drop their old log lines."""
    kept = [e for e in read_log(path) if e["step"] <= step]
    path.write_text("".join(json.dumps(e) + "\n" for e in kept))


def check_logging(cfg: TrainConfig) -> None:
    """Fail before training starts on a logger that cannot be loaded."""
    if cfg.logging.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("logging.wandb is on but the wandb package is not installed (pip install wandb)") from None
    if cfg.logging.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise UserError("logging.tensorboard is on but the tensorboard package is not installed "
                            "(curate's 'train' extra: pip install 'curate[train]')") from None


class TrainingLog:
    """The run's loggers on rank 0; `resumed_at`: the checkpoint step a resumed run starts from;
    loggers=False: log.jsonl only (benchmarks)."""

    def __init__(self, cfg: TrainConfig, out: Path, resumed_at: Optional[int], loggers: bool = True):
        self.jsonl = out / "log.jsonl"
        if resumed_at is not None:
            truncate_log(self.jsonl, resumed_at)
        self.tensorboard = self.wandb = None
        if loggers and cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out / "logs"),
                                             purge_step=None if resumed_at is None else resumed_at + 1)
        if loggers and cfg.logging.wandb:
            import wandb

            # One W&B run per output folder: a resumed run continues it.
            id_file = out / "logs" / "wandb-run-id"
            id_file.parent.mkdir(parents=True, exist_ok=True)
            if not id_file.is_file():
                id_file.write_text(uuid.uuid4().hex[:16])
            self.wandb = wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.wandb_run_name,
                                    id=id_file.read_text().strip(), resume="allow", dir=str(out / "logs"),
                                    config=cfg.model_dump())

    def scalars(self, entry: dict) -> None:
        """One logging step: {"step": N, name: value, ...}."""
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(entry) + "\n")
        step = entry["step"]
        values = {k: v for k, v in entry.items() if k != "step"}
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(f"train/{name}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{name}": value for name, value in values.items()}, step=step)

    def grid(self, step: int, image: Image.Image) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_image("validation", np.asarray(image.convert("RGB")), step, dataformats="HWC")
            self.tensorboard.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({"validation": wandb.Image(image)}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
