"""`curate train` on shards made by the real pipeline: the tiny model learns, resume is exact,
the result is a standard StableDiffusionPipeline, and cached latents train like on-the-fly ones.

One `curate run` (with the vae_latents filter) makes the shards for the whole module; the
training runs are in-process through the CLI's own `main` (the same code a user runs).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import run_curate, write_config
from dask_processes import dask_processes
from curate.pipeline.cli import main as curate_main
from curate.pipeline.errors import UserError
from curate.train.config import load_train_config
from curate.pipeline.models.latents import encode, fit_crop, latent_from_bytes, scale_latents, to_pixels
from curate.train.model import load_components
from curate.train.objective import diffusion_loss
from train_helpers import EVERY, RESOLUTION, STEPS, losses, run_train, train_config, write_shard
from train_helpers import one_torch_thread  # noqa: F401 (an autouse fixture)


# Which worker processes loaded the VAE in the `shards` run: {worker name: [cached model kinds]}.
LOADED_ON: dict = {}


@pytest.fixture(scope="module")
def shards(dataset, tmp_path_factory):
    """`curate run` on the served synthetic dataset, caching tiny-VAE latents in the shards, on a
    cluster laid out as the README says for GPUs: a worker offering GPU slots (no GPU here: the
    filter's device is cpu) and one offering CPU slots. The filter's batches go to the first."""
    _, urls, _ = dataset
    tmp = tmp_path_factory.mktemp("train-shards")
    config = write_config(
        tmp / "run.yaml", urls, tmp / "out",
        download={"timeout": 10},
        resize={"size": 64}, resolution={"min_side": 32, "max_aspect_ratio": 3.0},
        filters=[{"name": "vae_latents", "vae": "tiny", "resolution": RESOLUTION, "device": "cpu"}],
    )
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}

    def cached_kinds() -> list:  # nested: sent to the workers by value, this module is not importable there
        from curate.pipeline.models.cache import _built

        return sorted({key[0] for key in _built if isinstance(key, tuple)})

    with dask_processes(tmp, n_workers=2, resources=["GPU=1", "CPU=1"]) as (address, client):
        result = run_curate(["run", str(config), "--no-progress", "--set", f"dask.scheduler={address}"], env,
                            timeout=240)
        assert result.returncode == 0, result.stderr
        names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
        LOADED_ON.update({names[a]: kinds for a, kinds in client.run(cached_kinds).items()})
    return tmp / "out"


def test_the_latents_were_encoded_on_the_gpu_worker(shards):
    # The write ran on the CPU worker and sent the filter's batches to the GPU worker
    # (pipeline/offload.py): only that one loaded the VAE.
    assert "vae" in LOADED_ON["worker0"], LOADED_ON
    assert "vae" not in LOADED_ON["worker1"], LOADED_ON


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """An uninterrupted run of STEPS steps (cached latents, two reader processes)."""
    tmp = tmp_path_factory.mktemp("train")
    config = train_config(tmp / "train.yaml", shards, tmp / "out")
    run_train(str(config))
    return {"config": config, "out": tmp / "out", "tmp": tmp}


def fixed_batch(shards: Path, n: int = 16) -> dict:
    """The first n samples of shard 0, centre-cropped, as pixels and captions."""
    pixels, captions = [], []
    for sample in wds.WebDataset(str(shards / "shards" / "00000.tar"), shardshuffle=False):
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        pixels.append(torch.from_numpy(to_pixels(fit_crop(image, (RESOLUTION, RESOLUTION))[0])))
        captions.append(sample["txt"].decode())
        if len(pixels) == n:
            return {"pixels": torch.stack(pixels), "captions": captions}
    raise AssertionError("shard 0 has too few samples")


@torch.no_grad()
def mean_loss(unet, parts, batch: dict) -> float:
    """The loss of one batch, averaged over 4 fixed draws of noise and timesteps."""
    latents = scale_latents(parts.vae.config, encode(parts.vae, batch["pixels"]))
    ids = parts.tokenizer(batch["captions"], padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids
    embeddings = parts.text_encoder(ids)[0]
    values = [diffusion_loss(unet, parts.noise_scheduler, latents, embeddings, torch.Generator().manual_seed(s)).item()
              for s in range(4)]
    return sum(values) / len(values)


def test_shards_carry_latents_of_the_centre_crop(shards):
    vae = load_components("tiny").vae
    seen = 0
    for sample in wds.WebDataset(str(shards / "shards" / "00001.tar"), shardshuffle=False):
        meta = json.loads(sample["json"])
        latent = latent_from_bytes(sample["latent.npy"])
        assert latent.dtype == np.float16 and latent.shape == (4, RESOLUTION // 2, RESOLUTION // 2)
        assert meta["latent_vae"] == "tiny:0" and meta["latent_size"] == [RESOLUTION, RESOLUTION]
        left, top, right, bottom = meta["latent_crop"]
        assert right - left == pytest.approx(bottom - top, abs=0.01)  # a square crop ...
        assert min(meta["width"], meta["height"]) == pytest.approx(right - left, abs=0.01)  # ... of the full short side
        if seen < 5:  # the stored latent is what encoding the crop now gives
            image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            pixels = torch.from_numpy(to_pixels(fit_crop(image, (RESOLUTION, RESOLUTION))[0]))[None]
            with torch.no_grad():
                fresh = encode(vae, pixels)[0].numpy()
            np.testing.assert_allclose(latent.astype(np.float32), fresh, atol=2e-3, rtol=2e-3)
        seen += 1
    assert seen > 50


def test_training_lowers_the_loss_on_a_fixed_batch(trained, shards):
    from diffusers import UNet2DConditionModel

    parts = load_components("tiny")
    batch = fixed_batch(shards)
    before = mean_loss(parts.unet, parts, batch)
    after = mean_loss(UNet2DConditionModel.from_pretrained(trained["out"] / "pipeline", subfolder="unet"), parts, batch)
    assert after < 0.6 * before, (before, after)
    logged = losses(trained["out"])
    assert sorted(logged) == list(range(1, STEPS + 1))
    assert np.mean([logged[s] for s in range(STEPS - 4, STEPS + 1)]) < 0.6 * np.mean([logged[s] for s in range(1, 6)])


def test_saved_pipeline_loads_and_samples(trained):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(trained["out"] / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    image = pipe("three green triangles", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (RESOLUTION, RESOLUTION) and np.asarray(image).std() > 0
    # It is the trained UNet, not the initial one: its weights are those of the last checkpoint.
    final = torch.load(trained["out"] / "checkpoints" / f"step-{STEPS:08d}.pt", weights_only=True)
    saved = pipe.unet.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in final["unet"].items())
    initial = load_components("tiny").unet.state_dict()
    assert not all(torch.equal(saved[k], v) for k, v in initial.items())
    # Validation grids: two prompts side by side, at the checkpoint step and at the end.
    grids = sorted(p.name for p in (trained["out"] / "samples").iterdir())
    assert grids == [f"step-{EVERY:08d}.png", f"step-{STEPS:08d}.png"]
    assert Image.open(trained["out"] / "samples" / grids[0]).size == (2 * RESOLUTION, RESOLUTION)


def test_resume_continues_at_the_same_step_with_the_same_loss(trained, shards):
    out = trained["tmp"] / "resumed"
    config = train_config(trained["tmp"] / "resumed.yaml", shards, out)
    run_train(str(config), "--until-step", str(EVERY))  # a job that ran out of time
    assert sorted(losses(out)) == list(range(1, EVERY + 1))
    assert not (out / "pipeline").exists()
    run_train(str(config))  # rerun the same command: resumes from the checkpoint
    uninterrupted, resumed = losses(trained["out"]), losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7), step
    a = torch.load(trained["out"] / "checkpoints" / f"step-{STEPS:08d}.pt", weights_only=True)["unet"]
    b = torch.load(out / "checkpoints" / f"step-{STEPS:08d}.pt", weights_only=True)["unet"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_cached_latents_train_like_encoding_on_the_fly(shards, tmp_path):
    runs = {}
    for mode in ("required", "off"):
        config = train_config(tmp_path / f"{mode}.yaml", shards, tmp_path / mode, data__latents=mode,
                              data__workers=0, training__steps=4, training__ema=True,
                              validation__every=0, validation__prompts=[])
        run_train(str(config))
        runs[mode] = losses(tmp_path / mode)
    assert sorted(runs["required"]) == [1, 2, 3, 4]
    for step, loss in runs["required"].items():
        assert loss == pytest.approx(runs["off"][step], rel=2e-3), step


def test_a_data_error_in_a_loader_worker_is_one_line(tmp_path, capsys):
    """The selection's error is raised inside a DataLoader worker process and reaches the user as
    the one line it was raised with (torch re-raises it with the worker's whole traceback)."""
    write_shard(tmp_path / "00000.tar", [{"key": f"s{i}", "size": (40, 40)} for i in range(4)])
    config = train_config(tmp_path / "t.yaml", tmp_path, tmp_path / "out", data__workers=1,
                          data__min_clip_similarity=0.3, training__steps=1, validation__every=0,
                          validation__prompts=[])
    assert curate_main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("curate: error: data.min_clip_similarity is set but a sample has no clip_similarity"), err
    assert "\n" not in err and "Traceback" not in err and err.endswith("00000.tar: s0)")


def test_user_errors_are_one_line(tmp_path, capsys, shards):
    bad = train_config(tmp_path / "bad.yaml", shards, tmp_path / "out", training__lr_sheduler="cosine")
    assert curate_main(["train", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"curate: error: {bad}: training.lr_sheduler: unknown key"
    missing = train_config(tmp_path / "missing.yaml", tmp_path / "nowhere", tmp_path / "out")
    assert curate_main(["train", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("curate: error: data.shards:") and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing written
    with pytest.raises(UserError, match="model.pretrained: no such folder"):
        load_components(str(tmp_path / "no-model"))
    # A finished run's folder refuses a rerun with other settings instead of mixing two runs.
    clash = train_config(tmp_path / "clash.yaml", shards, tmp_path / "clash", training__steps=1,
                         validation__every=0, validation__prompts=[], data__workers=0)
    run_train(str(clash))
    assert curate_main(["train", str(clash), "--set", "training.lr=0.5"]) == 2
    assert "training.lr" in capsys.readouterr().err


def test_two_ranks_with_torchrun(shards, tmp_path):
    """DDP as users start it (torchrun, here two CPU processes over gloo): each rank draws its
    own noise and data, rank 0 writes the log, checkpoints and the pipeline."""
    config = train_config(tmp_path / "ddp.yaml", shards, tmp_path / "out", training__steps=4,
                          checkpoints__every=2, data__workers=0, validation__every=0, validation__prompts=[])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "curate.pipeline.cli", "train", str(config), "--no-progress"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("steps ") == 1  # one summary, from rank 0
    assert sorted(losses(tmp_path / "out")) == [1, 2, 3, 4]
    state = torch.load(tmp_path / "out" / "checkpoints" / f"step-{4:08d}.pt", weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["generator"], state["rng"][1]["generator"])
    assert (tmp_path / "out" / "pipeline" / "model_index.json").is_file()


def test_caption_dropout_gives_the_empty_caption(shards, tmp_path):
    from curate.train.loop import Ranks, Trainer

    cfg = load_train_config(train_config(tmp_path / "t.yaml", shards, tmp_path / "out", training__caption_dropout=0.5))
    trainer = Trainer(cfg, Ranks(), torch.device("cpu"))
    captions = [f"{i} red circles on a blue background" for i in range(64)]
    _, embeddings = trainer.conditioning({"latents": torch.zeros(64, 4, 16, 16), "captions": captions})
    with torch.no_grad():
        empty = trainer.parts.text_encoder(trainer.empty_ids)[0][0]
    dropped = sum(bool(torch.equal(e, empty)) for e in embeddings)
    assert 16 <= dropped <= 48


def test_training_options_run_together(shards, tmp_path):
    """v-prediction, Min-SNR, noise offset, caption dropout, EMA, gradient accumulation and
    checkpointing, bf16 autocast, random crops and a cosine schedule with warm-up, in one run."""
    out = tmp_path / "out"
    config = train_config(
        tmp_path / "t.yaml", shards, out, model__prediction_type="v_prediction", training__steps=6,
        training__batch_size=4, training__grad_accum=2, training__gradient_checkpointing=True,
        training__precision="bf16", training__snr_gamma=5.0, training__noise_offset=0.05,
        training__caption_dropout=0.2, training__ema=True, training__lr_scheduler="cosine",
        training__lr_warmup_steps=2, data__workers=0, data__crop="random", validation__every=0,
        validation__prompts=["a red circle"])
    run_train(str(config))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 7)) and all(np.isfinite(e["loss"]) for e in log)
    assert log[0]["lr"] == pytest.approx(0.5e-3) and log[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    scheduler = json.loads((out / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["_class_name"] == "DDIMScheduler"
    assert (out / "samples" / f"step-{6:08d}.png").is_file()
