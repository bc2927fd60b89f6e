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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from curate.pipeline.errors import UserError
from curate.pipeline.models.cache import cached
from curate.pipeline.models.clip_text import can_trim_text, fast_tokenizer
from curate.pipeline.models.device import resolve_device

TINY_CLIP_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-clip"
TINY_CLIP = f"local-dir:{TINY_CLIP_DIR}"


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

    @property
    def embed_dim(self) -> int:
        """The length of an embedding (what a shard with no image still saves its empty arrays with)."""
        visual = self.model.visual
        if getattr(visual, "output_dim", None):
            return int(visual.output_dim)
        return int(self.model.text_projection.shape[-1])

    def prepare_tokens(self, tokens):
        """Token ids as `encode_text` takes them, made on the CPU before the copy to the device:
        padding columns cut where `trim_text` (same result, pipeline/clip_text.py). Cutting on
        the CPU matters: finding the length on the GPU would wait for the GPU once per batch,
        so the CPU could never queue a batch's kernels while the previous batch computes."""
        from curate.pipeline.models.clip_text import trim_tokens

        return trim_tokens(tokens) if self.trim_text else tokens

    def encode_text(self, tokens):
        """L2-normalized text embeddings of `prepare_tokens` output already on `device`."""
        from curate.pipeline.models.clip_text import encode_text_trimmed

        if self.trim_text:
            return encode_text_trimmed(self.model, tokens)
        return self.model.encode_text(tokens, normalize=True)

    def encode_image(self, pixels):
        """L2-normalized image embeddings of preprocessed pixels on `device`."""
        return self.model.encode_image(pixels.to(self.dtype), normalize=True)


class PatchEmbedMatmul:
    """A ViT's patch embedding (a convolution whose stride is its kernel size, no padding, no
    bias) computed as one matrix product over the image cut into patches: the same sum of
    products. On an H200, cuDNN's kernel for ViT-B/32's 32x32 stride-32 convolution took 28%
    of the image tower's GPU time (torch.profiler); the same product as a GEMM is a few %.
    Used on CUDA only; the CPU path keeps the model as open_clip builds it."""

    @staticmethod
    def applies_to(conv) -> bool:
        import torch

        return (
            isinstance(conv, torch.nn.Conv2d) and conv.bias is None and conv.groups == 1
            and conv.kernel_size == conv.stride and conv.padding in ((0, 0), 0) and conv.dilation == (1, 1)
        )

    @staticmethod
    def module(conv):
        import torch
        import torch.nn.functional as F

        class _PatchEmbed(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = conv.weight  # [dim, channels, ph, pw], shared with the conv it replaces
                self.kernel_size = conv.kernel_size

            def forward(self, x):
                b, c, h, w = x.shape
                ph, pw = self.kernel_size
                gh, gw = h // ph, w // pw
                x = x[:, :, : gh * ph, : gw * pw]  # a strided conv drops the remainder too
                patches = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c * ph * pw)
                out = F.linear(patches, self.weight.reshape(self.weight.shape[0], -1))
                # The conv's [b, dim, gh, gw] layout, as a view: open_clip flattens it back to
                # [b, gh*gw, dim] without a copy.
                return out.reshape(b, gh, gw, -1).permute(0, 3, 1, 2)

        return _PatchEmbed()


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
    if architecture_config(model) is None:
        raise UserError(f"clip.model: unknown open_clip architecture {model!r}")
    if pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        if not Path(pretrained).is_file():
            raise UserError(f"clip.pretrained: checkpoint not found: {pretrained}")
    elif pretrained:
        import open_clip  # its tags are Python, not files: only a tag to check costs the import

        if pretrained not in open_clip.list_pretrained_tags_by_model(model):
            raise UserError(f"clip.pretrained: {model} has no pretrained tag {pretrained!r}")


def architecture_config(model: str) -> Optional[dict]:
    """open_clip's config of a built-in architecture (`open_clip.get_model_config(model)`), or None
    for a name it does not know, read from the JSON file open_clip ships for it without importing
    open_clip: the driver checks the name before a run, and that import (torch, torchvision, timm,
    transformers) took 8.8 s on a busy 2-core machine; on an H200 host the driver spent 12-15 s
    before starting its Dask client, most of it there."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations or not model or any(c in model for c in "/\\"):
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model_configs" / f"{model}.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    # open_clip lists only the configs that have all three parts (factory._rescan_model_configs).
    return config if all(part in config for part in ("embed_dim", "vision_cfg", "text_cfg")) else None


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
    config = architecture_config(model)
    return int(config["embed_dim"]) if config else None


def load_tokenizer(model: str):
    """The model's tokenizer as the score stage uses it (also built alone, without the model,
    by the reader processes of pipeline/score_reader.py)."""
    import open_clip

    return fast_tokenizer(open_clip.get_tokenizer(model))


def load_clip(model: str, pretrained: Optional[str] = None, device: str = "auto", precision: str = "auto") -> LoadedClip:
    """The model for these settings, loaded at most once per process (thread-safe)."""
    device = resolve_device(device)
    return cached(("clip", model, pretrained, device, precision), lambda: _load(model, pretrained, device, precision))


def _load(model: str, pretrained: Optional[str], device: str, precision: str) -> LoadedClip:
    import open_clip
    import torch

    check_model_source(model, pretrained)
    has_schema = model.startswith(("hf-hub:", "local-dir:"))
    # Built on the device it will run on: open_clip initializes every weight at random before
    # loading a checkpoint, which on a host's CPU cores takes seconds and on the GPU milliseconds
    # (H200 host: ViT-L-14 4.5-5.0 s against 0.04-0.08 s, BENCHMARKS.md).
    with torch.device(device):
        clip, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=None if has_schema else pretrained, device=device, weights_only=True
        )
    clip.eval()
    dtype = resolve_dtype(precision, device)
    if dtype != torch.float32:
        clip = clip.to(dtype)
    visual_conv = getattr(clip.visual, "conv1", None)
    if device.startswith("cuda") and PatchEmbedMatmul.applies_to(visual_conv):
        clip.visual.conv1 = PatchEmbedMatmul.module(visual_conv)
    tokenizer = load_tokenizer(model)
    name = model if has_schema or not pretrained else f"{model}/{Path(pretrained).name}"
    return LoadedClip(clip, preprocess, tokenizer, device, dtype, name, trim_text=can_trim_text(clip))
