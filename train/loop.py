"""`curate train`: fine-tune a latent diffusion model on the shards `curate run` wrote.

Read top to bottom:

    load config, output folder, shard list          (refuse to mix two runs in one folder)
    load parts (train/model.py)                     (UNet fp32 master weights; VAE, text encoder frozen)
    optimizer, LR schedule, EMA; resume from the newest checkpoint if there is one
    per optimizer step, per micro-batch:
        latents: cached in the shard, or VAE-encoded now
        caption -> (dropout) -> tokens -> text embeddings
        DDPM loss (train/objective.py) under bf16 autocast, backward (DDP: sync on the last micro-batch)
    clip, step, LR, EMA; log; checkpoint every N steps; validation grid every M steps
    at the end: a StableDiffusionPipeline folder (output/pipeline), EMA weights if on

Multi-GPU: start with `torchrun --nproc-per-node N -m curate.pipeline.cli train CONFIG` (or
`accelerate launch`, which sets the same variables). Each rank reads its own resampled
stream; rank 0 writes checkpoints, samples and the result.

Exact resume: rerun the same command. The checkpoint holds the weights, optimizer, LR
schedule, EMA and every RNG, and the data stream restarts at every checkpoint step from
a seed derived from that step (train/data.py), so the resumed run computes the same
batches and losses as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from curate.pipeline.errors import UserError
from curate.train.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from curate.pipeline.config import changed_settings
from curate.train.config import RESUMABLE_CHANGES, TrainConfig, dump_train_config
from curate.train.data import check_readable, shard_urls, training_loader
from curate.train.ema import EMA
from curate.pipeline.models.device import resolve_device
from curate.pipeline.models.latents import encode, scale_latents
from curate.train.model import Components, load_components, save_pipeline
from curate.train.objective import diffusion_loss
from curate.train.samples import sample_grid, save_grid


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_ranks(device_setting: str) -> tuple[Ranks, torch.device]:
    """One process per GPU under torchrun/accelerate (RANK, WORLD_SIZE, LOCAL_RANK), else one."""
    ranks = Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                  int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device(resolve_device(device_setting))
    if device.type == "cuda" and device.index is None:  # "auto" or "cuda": this rank's GPU
        device = torch.device("cuda", ranks.local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ranks.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ranks, device


def data_seed(seed: int, step: int) -> int:
    """The data stream's seed for the segment starting at `step` (see train/data.py)."""
    return (seed * 1_000_003 + step) % (2**31)


def check_output(cfg: TrainConfig, out: Path, overwrite: bool) -> None:
    """Refuse to continue a run in `out` that had other settings (nothing is written here)."""
    saved = out / "train-config.yaml"
    if not overwrite and saved.is_file():
        changed = changed_settings(yaml.safe_load(saved.read_text()) or {}, cfg.model_dump(), RESUMABLE_CHANGES)
        if changed:
            raise UserError(f"{out} holds a training run with other settings ({', '.join(changed)}); "
                            "use --overwrite to start over or another output.path")


def prepare_output(cfg: TrainConfig, out: Path, overwrite: bool) -> None:
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train-config.yaml").write_text(dump_train_config(cfg))


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path: Path, step: int) -> None:
    """A resumed run redoes the steps after its checkpoint: drop their old log lines."""
    kept = [e for e in read_log(path) if e["step"] <= step]
    path.write_text("".join(json.dumps(e) + "\n" for e in kept))


class Trainer:
    """The state of one training run on one rank."""

    def __init__(self, cfg: TrainConfig, ranks: Ranks, device: torch.device):
        self.cfg, self.ranks, self.device = cfg, ranks, device
        t = cfg.training
        cuda = device.type == "cuda"
        if cuda:  # fixed shapes per bucket: let cuDNN pick its fastest kernels; TF32 for what stays fp32
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        precision = ("bf16" if cuda else "fp32") if t.precision == "auto" else t.precision
        self.amp_dtype = torch.bfloat16 if precision == "bf16" else None
        # The frozen parts run in the compute dtype, as in diffusers' training scripts.
        self.frozen_dtype = self.amp_dtype or torch.float32

        m = cfg.model
        self.parts: Components = load_components(
            m.pretrained, tiny_seed=m.tiny_seed, revision=m.revision, variant=m.variant,
            tokenizer=m.tokenizer, prediction_type=m.prediction_type)
        parts = self.parts
        for frozen in (parts.vae, parts.text_encoder):
            frozen.to(device).requires_grad_(False).eval()
            if self.frozen_dtype != torch.float32:
                frozen.to(dtype=self.frozen_dtype)
        self.unet = parts.unet.to(device).train()  # fp32 master weights (load_components gives fp32)
        # SDPA (torch's fused flash / memory-efficient attention); diffusers' "default" is the unfused one.
        from diffusers.models.attention_processor import AttnProcessor2_0
        self.unet.set_attn_processor(AttnProcessor2_0())
        if t.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if t.channels_last:
            self.unet.to(memory_format=torch.channels_last)

        fused = t.fused_adam == "on" or (t.fused_adam == "auto" and cuda)
        self.optimizer = torch.optim.AdamW(
            self.unet.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
            weight_decay=t.weight_decay, **({"fused": True} if fused else {}))
        from diffusers.optimization import get_scheduler
        self.lr_schedule = get_scheduler(t.lr_scheduler, self.optimizer, num_warmup_steps=t.lr_warmup_steps,
                                         num_training_steps=t.steps)
        self.ema = EMA(self.unet.parameters(), t.ema_decay) if t.ema else None
        # Per rank: each rank draws different noise for its different samples.
        self.generator = torch.Generator(device).manual_seed(t.seed * 1000 + ranks.rank)
        torch.manual_seed(t.seed)
        self.step = 0

        # What runs the forward pass: DDP around the UNet for several GPUs, compiled if asked.
        model = self.unet
        if ranks.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        self.ddp = model if ranks.world > 1 else None
        self.model = torch.compile(model) if t.compile else model
        self.empty_ids = self.tokenize([""])

    # -- state ------------------------------------------------------------------
    def rng_states(self) -> list[dict]:
        """Every rank's RNG state (each rank draws its own noise); call on all ranks."""
        mine = rng_state(self.generator)
        if self.ranks.world == 1:
            return [mine]
        states: list = [None] * self.ranks.world
        dist.all_gather_object(states, mine)
        return states

    def state(self, rng_states: list[dict]) -> dict:
        return {"step": self.step, "unet": self.unet.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_schedule": self.lr_schedule.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "rng": rng_states}

    def load(self, state: dict) -> None:
        self.unet.load_state_dict(state["unet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.ema is not None:
            if state["ema"] is None:
                raise UserError("the checkpoint has no EMA weights but training.ema is on")
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        if self.ranks.rank < len(state["rng"]):
            set_rng_state(state["rng"][self.ranks.rank], self.generator)
        else:  # more ranks than when saved: a fresh stream for this one (training goes on, not bit-identical)
            self.generator.manual_seed(self.cfg.training.seed * 1000 + self.ranks.rank + 7919 * self.step)

    def shipped_unet(self):
        """The UNet to sample from and to save: a copy holding the EMA weights when EMA is on."""
        if self.ema is None:
            return self.unet
        unet = copy.deepcopy(self.unet)
        self.ema.copy_to(unet.parameters())
        return unet

    # -- one step ---------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        tok = self.parts.tokenizer
        return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.device, non_blocking=True)

    @torch.no_grad()
    def conditioning(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled latents, text embeddings) of a batch."""
        if "latents" in batch:
            latents = batch["latents"].to(self.device, non_blocking=True)
        else:
            pixels = batch["pixels"].to(self.device, self.frozen_dtype, non_blocking=True)
            latents = encode(self.parts.vae, pixels).float()
        latents = scale_latents(self.parts.vae.config, latents)
        if self.cfg.training.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        ids = self.tokenize(batch["captions"])
        p = self.cfg.training.caption_dropout
        if p:  # an empty caption teaches the unconditional prediction classifier-free guidance needs
            drop = torch.rand(ids.shape[0], generator=self.generator, device=self.device) < p
            ids = torch.where(drop[:, None], self.empty_ids, ids)
        embeddings = self.parts.text_encoder(ids)[0]
        return latents, embeddings

    def loss(self, batch: dict) -> torch.Tensor:
        latents, embeddings = self.conditioning(batch)
        t = self.cfg.training
        return diffusion_loss(self.model, self.parts.noise_scheduler, latents, embeddings, self.generator,
                              noise_offset=t.noise_offset, snr_gamma=t.snr_gamma, autocast=self.autocast)

    def optimizer_step(self, batches) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; returns the mean loss (on device)."""
        accum = self.cfg.training.grad_accum
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            batch = next(batches)  # a data config that cannot work raises DataError (a UserError) here
            last = micro == accum - 1
            sync = contextlib.nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                loss = self.loss(batch) / accum
                loss.backward()
            total += loss.detach()
        if self.cfg.training.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.cfg.training.max_grad_norm)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.unet.parameters())
        self.step += 1
        return total


def train(cfg: TrainConfig, *, overwrite: bool = False, until_step: Optional[int] = None,
          progress: bool = True, save: bool = True) -> dict:
    """Train to cfg.training.steps (or stop after `until_step`, with a checkpoint); returns a summary.

    save=False writes no checkpoint, sample grid or pipeline (for benchmarks: steps only)."""
    ranks, device = setup_ranks(cfg.training.device)
    out = Path(cfg.output.path)
    # Everything that can fail on the user's input fails before anything is written.
    urls = shard_urls(cfg.data.shards)
    check_readable(urls)
    check_output(cfg, out, overwrite)
    trainer = Trainer(cfg, ranks, device)
    if ranks.main:
        prepare_output(cfg, out, overwrite)
    ranks.barrier()
    t, every = cfg.training, cfg.checkpoints.every
    pipeline_dir = out / "pipeline"
    log_path = out / "log.jsonl"
    resume = latest_checkpoint(out / "checkpoints")
    if resume is not None:
        trainer.load(load_checkpoint(resume, device))
        if ranks.main:
            truncate_log(log_path, trainer.step)
            print(f"resuming from {resume} (step {trainer.step})", flush=True)
    start_step = trainer.step
    target = min(t.steps, until_step) if until_step else t.steps
    images_per_step = t.batch_size * t.grad_accum * ranks.world
    resolution = cfg.validation.resolution or cfg.data.resolution

    def validate() -> None:
        if ranks.main and cfg.validation.prompts:
            grid = sample_grid(trainer.parts, trainer.shipped_unet(), cfg.validation, resolution, device,
                               trainer.autocast)
            save_grid(grid, out / "samples", trainer.step)

    bar = tqdm(total=t.steps, initial=trainer.step, disable=not (progress and ranks.main),
               desc="train", unit="step", dynamic_ncols=True)
    batches, started, window_loss, window_start, window_steps = None, time.time(), None, time.time(), 0
    last_loss, rates = None, []
    try:
        while trainer.step < target:
            if batches is None or trainer.step % every == 0:
                batches = None  # stop the old workers before starting new ones
                batches = iter(training_loader(cfg.data, urls, t.batch_size, data_seed(t.seed, trainer.step),
                                               trainer.parts.vae_fingerprint, pin_memory=device.type == "cuda"))
            loss = trainer.optimizer_step(batches)
            window_loss = loss if window_loss is None else window_loss + loss
            window_steps += 1
            if trainer.step % t.log_every == 0 or trainer.step == target:
                if ranks.world > 1:
                    dist.all_reduce(window_loss)
                    window_loss /= ranks.world
                last_loss = window_loss.item() / window_steps  # the one sync with the GPU per window
                rate = images_per_step * window_steps / (time.time() - window_start)
                rates.append(rate)
                if ranks.main:
                    entry = {"step": trainer.step, "loss": last_loss, "lr": trainer.lr_schedule.get_last_lr()[0],
                             "images_per_second": round(rate, 2)}
                    with open(log_path, "a") as f:
                        f.write(json.dumps(entry) + "\n")
                    bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{rate:.1f}")
                window_loss, window_start, window_steps = None, time.time(), 0
            bar.update(1)
            if save and (trainer.step % every == 0 or trainer.step == target):
                rng_states = trainer.rng_states()
                if ranks.main:
                    save_checkpoint(out / "checkpoints", trainer.step, trainer.state(rng_states), cfg.checkpoints.keep)
                ranks.barrier()
            if save and cfg.validation.every and trainer.step % cfg.validation.every == 0 and trainer.step < t.steps:
                validate()
    finally:
        bar.close()
        batches = None
    finished = trainer.step >= t.steps
    if save and finished and ranks.main and (trainer.step > start_step or not (pipeline_dir / "model_index.json").is_file()):
        validate()
        save_pipeline(trainer.parts, trainer.shipped_unet(), pipeline_dir)
    ranks.barrier()
    if ranks.world > 1:
        dist.destroy_process_group()
    return {"step": trainer.step, "finished": finished, "loss": last_loss,
            "images_per_second": (sum(rates[1:]) / len(rates[1:])) if len(rates) > 1 else (rates[0] if rates else None),
            "seconds": round(time.time() - started, 1), "output": str(out)}
