"""Loading an open_clip model, once per worker process.

The model is named the way open_clip names it, so the same config works offline
and on a machine with internet:

    model: ViT-B-32, pretrained: laion2b_s34b_b79k   an architecture + a pretrained tag
    model: ViT-B-32, pretrained: /ckpt/epoch_32.pt   an architecture + a local checkpoint
    model: hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K
    model: local-dir:/models/my-clip                 open_clip_config.json + weights

curate ships a tiny CLIP trained on its own synthetic data (see train/tiny_clip.py)
at `local-dir:` + TINY_CLIP_DIR, used by the demo and the tests.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.clip_text import can_trim_text, fast_tokenizer
from pipeline.errors import UserError

TINY_CLIP_DIR = Path(__file__).resolve().parent / "assets" / "tiny-clip"
TINY_CLIP = f"local-dir:{TINY_CLIP_DIR}"

_cache: dict[tuple, "LoadedClip"] = {}
_lock = threading.Lock()


@dataclass
class LoadedClip:
    model: Any  # open_clip.CLIP, in eval mode on `device`
    preprocess: Any  # the model's own eval transform (PIL image → tensor)
    tokenizer: Any  # open_clip's tokenizer, or a faster one giving the same ids (pipeline/clip_text.py)
    device: str
    dtype: Any  # torch dtype of the forward pass
    name: str  # recorded beside each score
    trim_text: bool = False  # padding can be cut from the text tower's input (same result)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    def encode_text(self, tokens):
        """L2-normalized text embeddings of token ids already on `device`."""
        from pipeline.clip_text import encode_text_trimmed, trim_tokens

        if self.trim_text:
            return encode_text_trimmed(self.model, trim_tokens(tokens))
        return self.model.encode_text(tokens, normalize=True)

    def encode_image(self, pixels):
        """L2-normalized image embeddings of preprocessed pixels on `device`."""
        return self.model.encode_image(pixels.to(self.dtype), normalize=True)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"clip.device is {device!r} but no CUDA device is available")
    return device


def resolve_dtype(precision: str, device: str):
    import torch

    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_model_source(model: str, pretrained: Optional[str]) -> None:
    """Fail before any work when a local model or checkpoint named in the config is missing."""
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise UserError(f"clip.model: {folder} has no open_clip_config.json")
        return
    if model.startswith("hf-hub:"):
        return
    import open_clip

    if model not in open_clip.list_models():
        raise UserError(f"clip.model: unknown open_clip architecture {model!r}")
    if pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        if not Path(pretrained).is_file():
            raise UserError(f"clip.pretrained: checkpoint not found: {pretrained}")
    elif pretrained and pretrained not in open_clip.list_pretrained_tags_by_model(model):
        raise UserError(f"clip.pretrained: {model} has no pretrained tag {pretrained!r}")


def embedding_dim(model: str) -> Optional[int]:
    """The model's embedding size, read from its config without loading it; None where that
    needs a download (hf-hub:) or the model is unknown."""
    import json

    if model.startswith("local-dir:"):
        config = Path(model[len("local-dir:"):]) / "open_clip_config.json"
        try:
            return int(json.loads(config.read_text())["model_cfg"]["embed_dim"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    if model.startswith("hf-hub:"):
        return None
    import open_clip

    config = open_clip.get_model_config(model)
    return int(config["embed_dim"]) if config else None


def load_tokenizer(model: str):
    """The model's tokenizer as the score stage uses it (also built alone, without the model,
    by the reader processes of pipeline/score_reader.py)."""
    import open_clip

    return fast_tokenizer(open_clip.get_tokenizer(model))


def load_clip(model: str, pretrained: Optional[str] = None, device: str = "auto", precision: str = "auto") -> LoadedClip:
    """The model for these settings, loaded at most once per process (thread-safe)."""
    device = resolve_device(device)
    key = (model, pretrained, device, precision)
    with _lock:
        if key not in _cache:
            _cache[key] = _load(model, pretrained, device, precision)
        return _cache[key]


def _load(model: str, pretrained: Optional[str], device: str, precision: str) -> LoadedClip:
    import open_clip
    import torch

    check_model_source(model, pretrained)
    has_schema = model.startswith(("hf-hub:", "local-dir:"))
    clip, _, preprocess = open_clip.create_model_and_transforms(
        model, pretrained=None if has_schema else pretrained, device=device, weights_only=True
    )
    clip.eval()
    dtype = resolve_dtype(precision, device)
    if dtype != torch.float32:
        clip = clip.to(dtype)
    tokenizer = load_tokenizer(model)
    name = model if has_schema or not pretrained else f"{model}/{Path(pretrained).name}"
    return LoadedClip(clip, preprocess, tokenizer, device, dtype, name, trim_text=can_trim_text(clip))
