"""What tests/unit/test_train.py and tests/e2e/test_train_run.py share: the training config
they write, hand-made shards, and one torch thread per test module (an autouse fixture: a module
imports it)."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from curate.pipeline.tarshard import TarShardWriter

RESOLUTION = 32  # the tiny VAE halves it: 16 x 16 latents
STEPS = 20
EVERY = 10


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model gains little from a second thread, and on a busy 2-core machine two
    spinning OpenMP threads per process make a step ~15x slower (measured: 0.16 s vs 2.6 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_config(path: Path, shards: Path, output: Path, **overrides) -> Path:
    cfg = {
        "data": {"shards": [str(shards)], "resolution": RESOLUTION, "workers": 2, "shuffle_buffer": 64},
        "model": {"pretrained": "tiny"},
        "training": {"steps": STEPS, "batch_size": 8, "lr": 1e-3, "log_every": 1, "seed": 3},
        "checkpoints": {"every": EVERY, "keep": 3},
        "validation": {"every": EVERY, "prompts": ["two red circles", "a blue square"], "steps": 2},
        "output": {"path": str(output)},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_shard(path: Path, samples: list[dict]) -> None:
    rng = random.Random(0)
    with TarShardWriter(path) as tar:
        for s in samples:
            w, h = s["size"]
            image = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
            data = io.BytesIO()
            image.save(data, format="JPEG")
            meta = {"width": w, "height": h, **s.get("meta", {})}
            tar.write(s["key"], {"jpg": b"not a jpeg" if s.get("corrupt") else data.getvalue(),
                                 "txt": f"caption {s['key']}".encode(), "json": json.dumps(meta).encode()})


def run_train(*args: str) -> None:
    """`curate train ARGS` in this process, as the CLI runs it."""
    from curate.pipeline.cli import main as curate_main

    assert curate_main(["train", *args, "--no-progress"]) == 0


def losses(output: Path) -> dict[int, float]:
    """step → loss of a training run's log.jsonl."""
    return {e["step"]: e["loss"] for e in map(json.loads, (output / "log.jsonl").read_text().splitlines())}
