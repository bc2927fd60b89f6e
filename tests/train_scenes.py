"""Training shards of synthetic scenes (tests/e2e/test_train_lora.py, test_train_sdxl.py,
tests/unit/test_train_logging.py): made directly with TarShardWriter, no `curate run`, in well
under a second. The json carries what `curate run` writes that training reads: the stored size,
the size before curation (original_width / original_height) and, optionally, the aspect bucket."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch
from PIL import Image

from curate.pipeline.demo.synthetic import caption, random_scene, render
from curate.pipeline.models.latents import fit_crop, to_pixels
from curate.pipeline.tarshard import TarShardWriter


def scene_shard(path: Path, n: int = 48, size: tuple[int, int] = (40, 40), buckets: list | None = None,
                seed: int = 0) -> Path:
    """One shard of n rendered scenes with their captions; sample i gets buckets[i % len(buckets)]."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with TarShardWriter(path) as tar:
        for i in range(n):
            scene = random_scene(rng)
            data = io.BytesIO()
            render(scene, *size, rng).save(data, format="JPEG", quality=90)
            meta = {"width": size[0], "height": size[1], "original_width": 4 * size[0], "original_height": 4 * size[1]}
            if buckets:
                meta["bucket"] = list(buckets[i % len(buckets)])
            tar.write(f"{i:06d}", {"jpg": data.getvalue(), "txt": caption(scene).encode(),
                                   "json": json.dumps(meta).encode()})
    return path


def fixed_batch(path: Path, n: int, size: tuple[int, int]) -> dict:
    """The first n samples of a scene shard, centre-cropped to `size`: pixels, captions, and SDXL's
    time ids (what train/data.py gives a batch)."""
    from curate.pipeline.tarshard import iter_tar_samples
    from curate.train.data import size_conditioning

    pixels, captions, time_ids = [], [], []
    for _, fields in iter_tar_samples(path):
        meta = json.loads(fields["json"])
        image, box = fit_crop(Image.open(io.BytesIO(fields["jpg"])).convert("RGB"), size)
        pixels.append(torch.from_numpy(to_pixels(image)))
        captions.append(fields["txt"].decode())
        time_ids.append(torch.tensor(size_conditioning(meta, box, size) + [float(size[1]), float(size[0])]))
        if len(pixels) == n:
            break
    return {"pixels": torch.stack(pixels), "captions": captions, "time_ids": torch.stack(time_ids)}


def fixed_loss(trainer, batch: dict, unet=None, draws: int = 4) -> float:
    """A trainer's loss on one batch, averaged over `draws` fixed draws of noise and timesteps."""
    from curate.train.objective import diffusion_loss

    inputs = trainer.inputs(batch)
    values = []
    with torch.no_grad():
        for seed in range(draws):
            values.append(diffusion_loss(unet or trainer.unet, trainer.parts.noise_scheduler, inputs.latents,
                                         inputs.embeddings.detach(), torch.Generator().manual_seed(seed),
                                         added_cond_kwargs=inputs.added_cond_kwargs).item())
    return sum(values) / len(values)
