"""LoRA: low-rank adapters (peft) on the UNet, and optionally the text encoders, as diffusers'
train_text_to_image_lora.py and train_text_to_image_lora_sdxl.py add them.

The base weights are frozen and stay in the compute dtype (bf16 on a GPU); the adapters are
the only trainable parameters, in fp32 (master weights, like the full UNet's). Gaussian
init (A random, B zero): training starts from exactly the base model.

Saved as diffusers saves a LoRA (`pytorch_lora_weights.safetensors`: peft state dict ->
diffusers key names -> `save_lora_weights`, with the adapter config as metadata so that an
alpha other than the rank loads with its scale):

    pipe = StableDiffusionPipeline.from_pretrained(BASE)    # or StableDiffusionXLPipeline
    pipe.load_lora_weights("OUTPUT/lora")
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from curate.pipeline.errors import UserError
from curate.pipeline.models.vae import seeded
from curate.train.config import LoraConfig
from curate.train.model import Components, pipeline_class, write_folder

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name, what load_lora_weights looks for
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")  # save_lora_weights' argument prefixes


def peft_config(cfg: LoraConfig, target_modules: list[str]) -> PeftLoraConfig:
    return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, lora_dropout=cfg.dropout,
                          init_lora_weights="gaussian", target_modules=list(target_modules))


def add_lora(parts: Components, cfg: LoraConfig, seed: int, device: torch.device, dtype: torch.dtype) -> None:
    """Freeze the UNet (and text encoders), add adapters with weights drawn from `seed`, move the
    models to `device` with the frozen weights in `dtype` and the adapters in fp32."""
    models = [(parts.unet, cfg.target_modules, "model.lora.target_modules")]
    if cfg.text_encoder:
        models += [(e, cfg.text_encoder_target_modules, "model.lora.text_encoder_target_modules")
                   for e in parts.text_encoders]
    for i, (model, targets, setting) in enumerate(models):
        model.requires_grad_(False)
        config = peft_config(cfg, targets)
        try:
            if model is parts.unet:
                seeded(seed + i, lambda: model.add_adapter(config))  # diffusers' PeftAdapterMixin
            else:
                # peft itself rather than transformers' add_adapter, whose peft version floor
                # (>= 0.22 for transformers 5) is above what some registries serve; the same adapter.
                seeded(seed + i, lambda: inject_adapter_in_model(config, model, adapter_name="default"))
                model.peft_config = {"default": config}
        except ValueError as exc:  # peft: target modules not found in the base model
            raise UserError(f"{setting}: {str(exc).strip().splitlines()[0]}") from exc
        model.to(device)
        if dtype != torch.float32:
            model.to(dtype=dtype)
        cast_training_params(model, torch.float32)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (adapter) parameters by name: what a checkpoint holds of a LoRA model."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    expected = set(adapter_state(model))
    if set(state) != expected:
        raise UserError(f"the checkpoint's {what} adapter does not match model.lora "
                        f"({len(state)} tensors saved, {len(expected)} expected)")
    model.load_state_dict(state, strict=False)


def save_lora(parts: Components, unet: torch.nn.Module, text_encoders: list, folder: Path) -> None:
    """Write `folder`/pytorch_lora_weights.safetensors (atomically) in diffusers' LoRA format.
    `text_encoders`: the text encoders that carry adapters (none, or all of them)."""
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
              "unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
    for name, encoder in zip(TEXT_ENCODER_NAMES, text_encoders):
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
        layers[f"{name}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
    write_folder(folder, lambda tmp: pipeline_class(parts).save_lora_weights(tmp, safe_serialization=True, **layers))
