"""`curate train`: fine-tune a latent diffusion model on the shards `curate run` wrote.

Read top to bottom:

    load config, output folder, shard list          (refuse to mix two runs in one folder)
    load parts (train/model.py)                     (SD 1.x or SDXL; VAE, text encoders frozen)
    what is trained: the UNet (fp32 master weights), or LoRA adapters (train/lora.py) on a
        frozen UNet (and text encoders) kept in the compute dtype
    optimizer, LR schedule, EMA; resume from the newest checkpoint if there is one
    per optimizer step, per micro-batch:
        latents: cached in the shard, or VAE-encoded now
        caption -> (dropout) -> tokens -> text embeddings (SDXL: + pooled embedding, size conditioning)
        DDPM loss (train/objective.py) under bf16 autocast, backward (DDP: sync on the last micro-batch)
    clip, step, LR, EMA; log (train/logs.py); checkpoint every N steps (+ a diffusers folder
        beside it); validation grid every M steps
    at the end: output/pipeline (a StableDiffusion(XL)Pipeline folder) or, for LoRA, output/lora
        (pytorch_lora_weights.safetensors); EMA weights if on

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
from curate.train.checkpoint import (
    checkpoint_path, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
)
from curate.pipeline.config import changed_settings, dump_config
from curate.train.config import RESUMABLE_CHANGES, TrainConfig
from curate.train.data import check_readable, shard_urls, training_loader
from curate.train.ema import EMA
from curate.train.logs import TrainingLog, check_logging
from curate.train.lora import LORA_WEIGHTS, add_lora, adapter_state, load_adapter_state, save_lora
from curate.pipeline.models.device import resolve_device
from curate.pipeline.models.latents import encode, scale_latents
from curate.train.model import Components, encode_prompts, load_components, save_pipeline, tokenize
from curate.train.objective import diffusion_loss
from curate.train.samples import labelled_grid, sample_images, save_grid


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
    (out / "train-config.yaml").write_text(dump_config(cfg))


@dataclass
class ModelInputs:
    """What the UNet gets for a batch besides the noise: latents, text embeddings, and SDXL's
    added conditioning ({"text_embeds": pooled embedding, "time_ids": add_time_ids}; None for SD 1.x)."""

    latents: torch.Tensor
    embeddings: torch.Tensor
    added_cond_kwargs: Optional[dict] = None


class Trainer:
    """The state of one training run on one rank."""

    def __init__(self, cfg: TrainConfig, ranks: Ranks, device: torch.device):
        self.cfg, self.ranks, self.device = cfg, ranks, device
        t, lora = cfg.training, cfg.model.lora
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
        self.train_text = bool(lora and lora.text_encoder)
        frozen = [parts.vae] + ([] if self.train_text else parts.text_encoders)
        for part in frozen:
            part.to(device).requires_grad_(False).eval()
            if self.frozen_dtype != torch.float32:
                part.to(dtype=self.frozen_dtype)
        if lora:  # adapters (fp32) on the frozen UNet (and text encoders) in the compute dtype
            add_lora(parts, lora, t.seed, device, self.frozen_dtype)
        self.unet = parts.unet.to(device).train()  # full: fp32 master weights (load_components gives fp32)
        # The models that have trainable parameters, by the name a checkpoint stores them under.
        self.trained = {"unet": self.unet}
        if self.train_text:
            self.trained.update(zip(("text_encoder", "text_encoder_2"), parts.text_encoders))
            for encoder in parts.text_encoders:
                encoder.train()
        self.params = [p for model in self.trained.values() for p in model.parameters() if p.requires_grad]
        # SDPA (torch's fused flash / memory-efficient attention); diffusers' "default" is the unfused one.
        from diffusers.models.attention_processor import AttnProcessor2_0
        self.unet.set_attn_processor(AttnProcessor2_0())
        if t.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if t.channels_last:
            self.unet.to(memory_format=torch.channels_last)

        fused = t.fused_adam == "on" or (t.fused_adam == "auto" and cuda)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
            weight_decay=t.weight_decay, **({"fused": True} if fused else {}))
        from diffusers.optimization import get_scheduler
        self.lr_schedule = get_scheduler(t.lr_scheduler, self.optimizer, num_warmup_steps=t.lr_warmup_steps,
                                         num_training_steps=t.steps)
        self.ema = EMA(self.params, t.ema_decay) if t.ema else None
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

    def weights(self) -> dict:
        """What a checkpoint holds of the models: the UNet's whole state, or (LoRA) the adapters."""
        if self.cfg.model.lora is None:
            return {"unet": self.unet.state_dict()}
        return {name: adapter_state(model) for name, model in self.trained.items()}

    def state(self, rng_states: list[dict]) -> dict:
        return {"step": self.step, **self.weights(), "optimizer": self.optimizer.state_dict(),
                "lr_schedule": self.lr_schedule.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "rng": rng_states}

    def load(self, state: dict) -> None:
        if self.cfg.model.lora is None:
            self.unet.load_state_dict(state["unet"])
        else:
            for name, model in self.trained.items():
                load_adapter_state(model, state[name], name)
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

    def shipped(self) -> dict:
        """The trained models to sample from and to save ({"unet": ..., [text encoders]}): copies
        holding the EMA weights when EMA is on."""
        if self.ema is None:
            return dict(self.trained)
        models = {name: copy.deepcopy(model) for name, model in self.trained.items()}
        self.ema.copy_to([p for model in models.values() for p in model.parameters() if p.requires_grad])
        return models

    def save_result(self, folder: Path) -> None:
        """The diffusers form of the model now: a pipeline folder, or (LoRA) the adapter file."""
        models = self.shipped()
        if self.cfg.model.lora is None:
            save_pipeline(self.parts, models["unet"], folder)
        else:
            save_lora(self.parts, models["unet"], [m for name, m in models.items() if name != "unet"], folder)

    # -- one step ---------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return tokenize(self.parts.tokenizer, captions).to(self.device, non_blocking=True)

    def inputs(self, batch: dict) -> ModelInputs:
        parts, p = self.parts, self.cfg.training.caption_dropout
        with torch.no_grad():
            if "latents" in batch:
                latents = batch["latents"].to(self.device, non_blocking=True)
            else:
                pixels = batch["pixels"].to(self.device, self.frozen_dtype, non_blocking=True)
                latents = encode(parts.vae, pixels).float()
            latents = scale_latents(parts.vae.config, latents)
        if self.cfg.training.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        ids = [self.tokenize(batch["captions"])]
        if parts.sdxl:
            ids.append(tokenize(parts.tokenizer_2, batch["captions"]).to(self.device, non_blocking=True))
        drop = None
        if p:  # learn the unconditional prediction classifier-free guidance needs
            drop = torch.rand(ids[0].shape[0], generator=self.generator, device=self.device) < p
            if not parts.sdxl:  # SD 1.x: the empty caption's embedding
                ids[0] = torch.where(drop[:, None], self.empty_ids, ids[0])
        with torch.set_grad_enabled(self.train_text), self.autocast():
            embeddings, pooled = encode_prompts(parts, ids)
        if not parts.sdxl:
            return ModelInputs(latents, embeddings)
        if drop is not None:  # SDXL: zeros, as it was trained (and force_zeros_for_empty_prompt samples)
            keep = (~drop).to(embeddings.dtype)
            embeddings, pooled = embeddings * keep[:, None, None], pooled * keep[:, None]
        time_ids = batch["time_ids"].to(self.device, non_blocking=True)
        return ModelInputs(latents, embeddings, {"text_embeds": pooled, "time_ids": time_ids})

    def conditioning(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled latents, text embeddings) of a batch."""
        inputs = self.inputs(batch)
        return inputs.latents, inputs.embeddings

    def loss(self, batch: dict) -> torch.Tensor:
        inputs = self.inputs(batch)
        t = self.cfg.training
        return diffusion_loss(self.model, self.parts.noise_scheduler, inputs.latents, inputs.embeddings,
                              self.generator, noise_offset=t.noise_offset, snr_gamma=t.snr_gamma,
                              autocast=self.autocast, added_cond_kwargs=inputs.added_cond_kwargs)

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
        if self.ddp is not None and self.train_text:  # DDP averages the UNet's gradients; these, here
            for encoder in self.parts.text_encoders:
                for p in encoder.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= self.ranks.world
        if self.cfg.training.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.training.max_grad_norm)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.params)
        self.step += 1
        return total


def result_folder(cfg: TrainConfig, out: Path) -> tuple[Path, str]:
    """Where the finished model goes, and the file whose presence says it is there."""
    if cfg.model.lora is None:
        return out / "pipeline", "model_index.json"
    return out / "lora", LORA_WEIGHTS


def gpu_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"gpu_memory_gib": round(torch.cuda.memory_allocated(device) / 2**30, 3),
            "gpu_peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}


def train(cfg: TrainConfig, *, overwrite: bool = False, until_step: Optional[int] = None,
          progress: bool = True, save: bool = True) -> dict:
    """Train to cfg.training.steps (or stop after `until_step`, with a checkpoint); returns a summary.

    save=False writes no checkpoint, sample grid or model (for benchmarks: steps and log.jsonl only)."""
    ranks, device = setup_ranks(cfg.training.device)
    out = Path(cfg.output.path)
    # Everything that can fail on the user's input fails before anything is written.
    urls = shard_urls(cfg.data.shards)
    check_readable(urls)
    check_output(cfg, out, overwrite)
    if ranks.main:
        check_logging(cfg)
    trainer = Trainer(cfg, ranks, device)
    if ranks.main:
        prepare_output(cfg, out, overwrite)
    ranks.barrier()
    t, every = cfg.training, cfg.checkpoints.every
    result_dir, result_marker = result_folder(cfg, out)
    checkpoints = out / "checkpoints"
    resume = latest_checkpoint(checkpoints)
    if resume is not None:
        trainer.load(load_checkpoint(resume, device))
        if ranks.main:
            print(f"resuming from {resume} (step {trainer.step})", flush=True)
    start_step = trainer.step
    log = TrainingLog(cfg, out, start_step if resume else None, loggers=save) if ranks.main else None
    target = min(t.steps, until_step) if until_step else t.steps
    images_per_step = t.batch_size * t.grad_accum * ranks.world
    resolution = cfg.validation.resolution or cfg.data.resolution

    def validate() -> None:
        if ranks.main and cfg.validation.prompts:
            prompts = list(cfg.validation.prompts)
            images = sample_images(trainer.parts, trainer.shipped(), cfg.validation, resolution, device,
                                   trainer.autocast)
            save_grid(images, prompts, out / "samples", trainer.step)
            log.grid(trainer.step, labelled_grid(images, prompts))

    bar = tqdm(total=t.steps, initial=trainer.step, disable=not (progress and ranks.main),
               desc="train", unit="step", dynamic_ncols=True)
    batches, started, window_loss, window_start, window_steps = None, time.time(), None, time.time(), 0
    last_loss, rates = None, []
    try:
        while trainer.step < target:
            if batches is None or trainer.step % every == 0:
                batches = None  # stop the old workers before starting new ones
                batches = iter(training_loader(cfg.data, urls, t.batch_size, data_seed(t.seed, trainer.step),
                                               trainer.parts.vae_fingerprint, pin_memory=device.type == "cuda",
                                               size_conditioning=trainer.parts.sdxl))
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
                    log.scalars({"step": trainer.step, "loss": last_loss, "lr": trainer.lr_schedule.get_last_lr()[0],
                                 "images_per_second": round(rate, 2), **gpu_memory(device)})
                    bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{rate:.1f}")
                window_loss, window_start, window_steps = None, time.time(), 0
            bar.update(1)
            if save and (trainer.step % every == 0 or trainer.step == target):
                rng_states = trainer.rng_states()
                if ranks.main:
                    if cfg.checkpoints.export:  # first, so that a complete step-N.pt has its folder
                        trainer.save_result(checkpoint_path(checkpoints, trainer.step).with_suffix(""))
                    save_checkpoint(checkpoints, trainer.step, trainer.state(rng_states), cfg.checkpoints.keep)
                ranks.barrier()
            if save and cfg.validation.every and trainer.step % cfg.validation.every == 0 and trainer.step < t.steps:
                validate()
    finally:
        bar.close()
        batches = None
    finished = trainer.step >= t.steps
    if save and finished and ranks.main and (trainer.step > start_step or not (result_dir / result_marker).is_file()):
        validate()
        trainer.save_result(result_dir)
    if log is not None:
        log.close()
    ranks.barrier()
    if ranks.world > 1:
        dist.destroy_process_group()
    return {"step": trainer.step, "finished": finished, "loss": last_loss,
            "images_per_second": (sum(rates[1:]) / len(rates[1:])) if len(rates) > 1 else (rates[0] if rates else None),
            "seconds": round(time.time() - started, 1), "output": str(out), "result": str(result_dir)}
