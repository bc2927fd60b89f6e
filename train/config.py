"""`curate train` configuration: YAML validated into typed models.

Same rules as `curate run`'s config (pipeline/config.py): every section forbids unknown
keys, so a typo is an error naming its path, and `--set a.b=value` overrides any value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from curate.pipeline.config import read_config_mapping, validated


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """What to read from the shards `curate run` wrote, and how to select and shape it."""

    # Tar shards: paths, globs, brace patterns ({00000..00099}.tar), fsspec URLs (s3://...),
    # or a `curate run` output folder (its shards/*.tar).
    shards: list[str]
    # Square training size for samples without an aspect bucket.
    resolution: int = Field(512, ge=8)
    # center: the same crop every epoch (and the crop a latent cache stores); random: augmentation.
    crop: Literal["center", "random"] = "center"
    # Batch samples by their json `bucket: [w, h]` (written when `curate run` assigns aspect
    # buckets); without it every sample is cropped to resolution x resolution.
    buckets: bool = True
    shuffle_buffer: int = Field(1000, ge=1)
    # DataLoader worker processes per GPU; 0 reads in the training process.
    workers: int = Field(4, ge=0)
    # Selection on the json fields at load time; a sample lacking a field that a rule
    # needs is an error (so a threshold never silently selects nothing).
    min_clip_similarity: Optional[float] = None
    max_punsafe: Optional[float] = None
    min_size: int = Field(0, ge=0)  # the shorter side, in pixels
    # VAE latents cached by the vae_latents filter: auto = use them where their VAE, size
    # and crop match (else encode on the fly); required = a sample without them is an error.
    latents: Literal["auto", "required", "off"] = "auto"

    @field_validator("shards", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value


class LoraConfig(Section):
    """Train low-rank adapters (peft LoRA, as diffusers' train_text_to_image_lora.py) instead of
    the whole UNet; the base weights stay frozen and only the adapter is saved."""

    rank: int = Field(4, ge=1)
    alpha: Optional[float] = Field(None, gt=0)  # None: = rank (scale 1, as diffusers' examples)
    # The UNet's attention projections (diffusers' examples); add e.g. proj_in, proj_out, ff.net.0.proj, ff.net.2.
    target_modules: list[str] = Field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    dropout: float = Field(0.0, ge=0, lt=1)
    # Adapters on the text encoder(s) too (both of SDXL's), on their attention projections.
    text_encoder: bool = False
    text_encoder_target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])


class ModelConfig(Section):
    # A diffusers Stable Diffusion 1.x/2.x or SDXL folder (model_index.json, unet/, vae/,
    # text_encoder/, [text_encoder_2/,] ...), a hub id (needs internet, e.g.
    # stable-diffusion-v1-5/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0), or
    # "tiny" / "tiny-sdxl": small random-weight models of the same shapes, for tests and the demo.
    pretrained: str = "tiny"
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. fp16: which weight files to read
    # auto: the checkpoint's tokenizer/ folder when it has one, else CLIP's BPE built offline.
    tokenizer: Literal["auto", "clip-bpe"] = "auto"
    # None: the checkpoint scheduler's (epsilon for SD 1.5).
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None
    tiny_seed: int = 0  # the random weights of the tiny model
    lora: Optional[LoraConfig] = None  # None: full fine-tuning of the UNet

    @field_validator("pretrained")
    @classmethod
    def _absolute_local_dir(cls, value: str) -> str:
        return os.path.abspath(value) if os.path.isdir(value) else value


class TrainingConfig(Section):
    steps: int = Field(ge=1)  # optimizer steps
    batch_size: int = Field(ge=1)  # per GPU and micro-batch
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    seed: int = 0
    device: str = "auto"  # auto: cuda when available (LOCAL_RANK's GPU under torchrun), else cpu
    # auto: bf16 autocast over fp32 master weights on a GPU, fp32 on a CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the UNet
    channels_last: bool = False
    fused_adam: Literal["auto", "on", "off"] = "auto"  # auto: fused AdamW on a GPU
    # Objective options (DDPM: predict the noise, MSE).
    snr_gamma: Optional[float] = Field(None, gt=0)  # Min-SNR-γ loss weighting (5.0 is usual)
    noise_offset: float = Field(0.0, ge=0)  # e.g. 0.05: lets the model learn very dark/bright images
    caption_dropout: float = Field(0.0, ge=0, lt=1)  # empty caption with this probability (for CFG)
    ema: bool = False
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    log_every: int = Field(10, ge=1)


class CheckpointConfig(Section):
    every: int = Field(500, ge=1)  # steps; also where the data stream is reseeded (see train/data.py)
    keep: int = Field(2, ge=1)  # the newest checkpoints kept
    # Beside each step-N.pt, a folder step-N/ that plain diffusers opens: the pipeline
    # (from_pretrained) or, with model.lora, the adapter (load_lora_weights).
    export: bool = True


class LoggingConfig(Section):
    """Where the loss, learning rate, images/s, GPU memory and validation grids go (log.jsonl always)."""

    tensorboard: bool = True  # OUTPUT/logs: tensorboard --logdir OUTPUT/logs
    wandb: bool = False  # Weights & Biases, when the wandb package is installed (else an error)
    wandb_project: str = "curate"
    wandb_run_name: Optional[str] = None


class ValidationConfig(Section):
    every: int = Field(0, ge=0)  # steps; 0: only at the end (when prompts are given)
    prompts: list[str] = Field(default_factory=list)
    steps: int = Field(25, ge=1)  # DDIM steps
    guidance_scale: float = Field(7.5, ge=0)
    resolution: Optional[int] = Field(None, ge=8)  # default: data.resolution
    seed: int = 0


class OutputConfig(Section):
    # Holds checkpoints/, samples/, log.jsonl, train-config.yaml, and pipeline/ (the result).
    path: str


class TrainConfig(Section):
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig
    checkpoints: CheckpointConfig = Field(default_factory=CheckpointConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    output: OutputConfig

    @model_validator(mode="after")
    def _prompts_for_validation(self):
        if self.validation.every and not self.validation.prompts:
            raise ValueError("validation.every is set but validation.prompts is empty")
        return self


# Settings a resumed run may change: how long to train, how often to save and sample,
# how much to log, how many reader processes. Anything else would silently mix two runs.
RESUMABLE_CHANGES = {"training.steps", "training.log_every", "data.workers",
                     "checkpoints.keep", "checkpoints.export", "validation.every", "validation.prompts", "logging"}


def load_train_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML train config, apply `--set` overrides, validate. Errors are UserError."""
    path = Path(path)
    return validated(TrainConfig, read_config_mapping(path, overrides), path)
