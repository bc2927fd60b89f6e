"""`curate train` on shards made by the real pipeline: the tiny model learns, resume is exact,
the result is a standard StableDiffusionPipeline, and cached latents train like on-the-fly ones.

One `curate run` (with the vae_latents filter) makes the shards for the whole module; the
training runs are in-process through the CLI's own `main` (the same code a user runs).
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image

from conftest import run_curate, write_config
from curate.pipeline.cli import main as curate_main
from curate.pipeline.errors import UserError
from curate.pipeline.tarshard import TarShardWriter
from curate.train.config import load_train_config
from curate.train.data import DataError, shard_urls, training_stream
from curate.pipeline.models.latents import encode, fit_crop, latent_from_bytes, scale_latents, to_pixels
from curate.train.model import load_components
from curate.train.objective import diffusion_loss
from curate.train.tokenizer import clip_tokenizer

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


@pytest.fixture(scope="module")
def shards(dataset, tmp_path_factory):
    """`curate run` on the served synthetic dataset, caching tiny-VAE latents in the shards."""
    _, urls, _ = dataset
    tmp = tmp_path_factory.mktemp("train-shards")
    config = write_config(
        tmp / "run.yaml", urls, tmp / "out",
        download={"timeout": 10},
        resize={"size": 64}, resolution={"min_side": 32, "max_aspect_ratio": 3.0},
        filters=[{"name": "vae_latents", "vae": "tiny", "resolution": RESOLUTION, "device": "cpu"}],
        dask={"n_workers": 1},  # one worker process loads the VAE once; the 3 shards take ~1 s each
    )
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    result = run_curate(["run", str(config), "--no-progress"], env, timeout=240)
    assert result.returncode == 0, result.stderr
    return tmp / "out"


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


def run_train(*args: str) -> None:
    assert curate_main(["train", *args, "--no-progress"]) == 0


def losses(output: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in map(json.loads, (output / "log.jsonl").read_text().splitlines())}


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


def test_offline_tokenizer_matches_open_clip():
    ours, theirs = clip_tokenizer(), open_clip.get_tokenizer("ViT-L-14")
    captions = ["two red circles on the left of a blue background", "A PHOTO of my dog's café, isn't it?!",
                "numbers 1234 and ½ symbols & émojis 🐱", "日本語のキャプション", ""]
    for caption in captions:
        expected = theirs([caption])[0].tolist()
        expected = expected[:expected.index(49407) + 1]  # open_clip pads with 0 after <|endoftext|>
        assert ours(caption).input_ids == expected, caption
    assert len(ours) == 49408 and ours.model_max_length == 77


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


def test_selection_buckets_and_bad_samples(tmp_path):
    wide, tall = [64, 32], [32, 64]
    specs = [
        {"key": "keep_square", "size": (48, 40), "meta": {"clip_similarity": 0.40, "punsafe": 0.01}},
        {"key": "keep_wide1", "size": (64, 32), "meta": {"clip_similarity": 0.35, "punsafe": 0.2, "bucket": wide}},
        {"key": "keep_wide2", "size": (70, 36), "meta": {"clip_similarity": 0.50, "punsafe": 0.0, "bucket": wide}},
        {"key": "keep_tall1", "size": (32, 64), "meta": {"clip_similarity": 0.31, "punsafe": 0.3, "bucket": tall}},
        {"key": "keep_tall2", "size": (32, 64), "meta": {"clip_similarity": 0.90, "punsafe": 0.1, "bucket": tall}},
        {"key": "drop_clip", "size": (64, 64), "meta": {"clip_similarity": 0.10, "punsafe": 0.0}},
        {"key": "drop_unsafe", "size": (64, 64), "meta": {"clip_similarity": 0.90, "punsafe": 0.9}},
        {"key": "drop_small", "size": (40, 20), "meta": {"clip_similarity": 0.90, "punsafe": 0.0}},
        {"key": "broken", "size": (64, 64), "meta": {"clip_similarity": 0.90, "punsafe": 0.0}, "corrupt": True},
    ]
    write_shard(tmp_path / "00000.tar", specs)
    cfg = load_train_config(train_config(
        tmp_path / "t.yaml", tmp_path, tmp_path / "out", data__workers=0, data__min_clip_similarity=0.3,
        data__max_punsafe=0.5, data__min_size=30, data__shuffle_buffer=4))
    stream = iter(training_stream(cfg.data, shard_urls(cfg.data.shards), 2, seed=1, vae_fingerprint="none"))
    seen, shapes = set(), {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            batch = next(stream)
            assert set(batch) == {"pixels", "captions", "keys"}, batch
            seen.update(batch["keys"])
            kinds = {k.rsplit("_", 1)[-1].rstrip("12") for k in batch["keys"]}
            assert len(kinds) == 1, batch["keys"]  # one bucket per batch
            shapes[kinds.pop()] = tuple(batch["pixels"].shape)
    assert seen == {s["key"] for s in specs if s["key"].startswith("keep")}
    assert shapes == {"square": (2, 3, 32, 32), "wide": (2, 3, 32, 64), "tall": (2, 3, 64, 32)}
    assert any("broken" in str(w.message) or "cannot identify" in str(w.message) for w in caught)

    # A rule on a field the shards lack is an error, not an empty stream.
    cfg.data.max_punsafe = None
    write_shard(tmp_path / "00000.tar", [{"key": "a", "size": (40, 40)}])
    with pytest.raises(DataError, match="no clip_similarity") as info:
        next(iter(training_stream(cfg.data, shard_urls(cfg.data.shards), 2, seed=1, vae_fingerprint="none")))
    assert isinstance(info.value, UserError) and str(info.value).endswith("00000.tar: a)")

    # So is a required cached latent that is not there.
    cfg.data.min_clip_similarity, cfg.data.latents = None, "required"
    with pytest.raises(DataError, match=r"data.latents is required but the cached latent of a \(.*\) does not fit: it has none"):
        next(iter(training_stream(cfg.data, shard_urls(cfg.data.shards), 2, seed=1, vae_fingerprint="none")))


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


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_objective_targets_follow_ddpm(prediction_type):
    """A predictor that knows x0 and answers exactly what DDPM asks for (ε, or v = √ᾱ·ε − √(1−ᾱ)·x0)
    has zero loss, noise offset and Min-SNR weighting included; one that answers zeros does not."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from curate.train.model import SD_SCHEDULE
    from curate.train.objective import snr_weights

    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    x0, embeddings = torch.randn(6, 4, 8, 8), torch.zeros(6, 77, 32)
    alpha_bar = scheduler.alphas_cumprod

    def oracle(x_t, t, _):
        a = alpha_bar[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return type("Out", (), {"sample": eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0})

    def zeros(x_t, t, _):
        return type("Out", (), {"sample": torch.zeros_like(x_t)})

    options = dict(noise_offset=0.1, snr_gamma=5.0)
    assert diffusion_loss(oracle, scheduler, x0, embeddings, torch.Generator().manual_seed(0), **options) < 1e-6
    assert diffusion_loss(zeros, scheduler, x0, embeddings, torch.Generator().manual_seed(0), **options) > 0.05
    t = torch.arange(0, 1000, 37)
    snr = compute_snr(scheduler, t)  # diffusers' own SNR, as its training scripts weight with it
    expected = torch.clamp(snr, max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    torch.testing.assert_close(snr_weights(scheduler, t, 5.0), expected.float())


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
