"""The VAE alone: what the latent cache (filters/latents.py) needs in every `curate run` worker,
without importing the text encoder's library (transformers) there."""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import AutoencoderKL

from curate.pipeline.errors import UserError
from curate.pipeline.models.cache import cached
from curate.pipeline.models.device import resolve_device

TINY = "tiny"

# Shaped like SD's KL VAE (4 latent channels), scaled down to two blocks: it downsamples
# by 2 (SD's by 8), so 32 px images give 16 x 16 latents.
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=32,
)


def seeded(seed: int, build):
    """Build a module with weights drawn from `seed`, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    return seeded(seed + 1, lambda: AutoencoderKL(**TINY_VAE))


def check_source(source: str) -> None:
    """A local-looking path that does not exist is a user error (not a failed hub download)."""
    if source == TINY:
        return
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(source)):
        raise UserError(f"model.pretrained: no such folder: {source}")


def from_pretrained(cls, source: str, subfolder: Optional[str], **kw):
    """Load one part; a missing folder or an unreachable hub is one clear line."""
    try:
        return cls.from_pretrained(source, **({"subfolder": subfolder} if subfolder else {}), **kw)
    except (OSError, ValueError) as exc:
        where = f"{source}/{subfolder}" if subfolder else source
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if os.path.isdir(source) else " (a hub id needs internet; or give a local diffusers folder)"
        raise UserError(f"model.pretrained: cannot load {cls.__name__} from {where}: {first}{hint}") from exc


def load_vae(source: str, tiny_seed: int = 0, revision: Optional[str] = None,
             variant: Optional[str] = None) -> AutoencoderKL:
    """The VAE of a Stable Diffusion folder or hub id (its vae/), a bare AutoencoderKL folder, or "tiny"."""
    check_source(source)
    if source == TINY:
        return tiny_vae(tiny_seed)
    bare = os.path.isfile(os.path.join(source, "config.json")) and not os.path.isdir(os.path.join(source, "vae"))
    kw = {k: v for k, v in {"revision": revision, "variant": variant}.items() if v}
    return from_pretrained(AutoencoderKL, source, None if bare else "vae", **kw).float()


def vae_fingerprint(vae: AutoencoderKL) -> str:
    """16 hex digits of a sha256 over the VAE's weights (as fp32), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def vae_name(source: str, tiny_seed: int = 0) -> str:
    return f"{TINY}:{tiny_seed}" if source == TINY else source


def resolve_precision(precision: str, device: "torch.device") -> torch.dtype:
    """`precision: auto` is bf16 on CUDA (what `curate train` encodes with under its default bf16)
    and fp32 elsewhere (the CPU has no fast bf16 convolutions). fp16 is not offered: SD's VAE
    overflows in it."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


@dataclass(frozen=True)
class LoadedVae:
    """A VAE ready to encode, as `cached_vae` keeps it. Its dtype is kept here: diffusers' `vae.dtype`
    walks every parameter, a cost per call."""

    vae: AutoencoderKL  # eager
    name: str
    fingerprint: str  # vae_fingerprint of the fp32 weights
    device: torch.device
    dtype: torch.dtype
    # With `compile`: the same VAE (the same weights, nothing copied) with its encoder torch.compile'd.
    # The eager `vae` stays usable beside it, so a caller can keep encoding while the compiled one
    # builds (SD's encoder: about a minute on an H200 with cold caches).
    compiled: Optional[AutoencoderKL] = None

    @property
    def precision(self) -> str:
        """"bf16" or "fp32", as the latent cache records it."""
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"


def with_compiled_encoder(vae: AutoencoderKL) -> AutoencoderKL:
    """A second handle on `vae` whose `encode` runs a torch.compile'd encoder; its parameters and
    submodules are `vae`'s own, and `vae` itself stays eager."""
    twin = copy.copy(vae)  # shares every attribute, the dict of submodules included
    twin._modules = dict(vae._modules)  # its own dict, so that replacing the encoder leaves `vae` eager
    twin._modules["encoder"] = torch.compile(vae.encoder, dynamic=False)  # shapes repeat: fixed batches per crop size
    return twin


def cached_vae(source: str, tiny_seed: int = 0, device: str = "auto", precision: str = "fp32",
               compile: bool = False) -> LoadedVae:
    """The VAE in eval mode on its device (`LoadedVae`), loaded once per process.

    The weights are cast to `precision` (resolve_precision) after the fingerprint is taken, so a
    latent made in bf16 names the same VAE as one made in fp32. On CUDA the VAE is channels_last
    (its convolutions' fast layout there) and with `compile` its encoder is torch.compile'd (the
    encoder is the cost; its first batch of each size then takes a while)."""

    def build() -> LoadedVae:
        vae = load_vae(source, tiny_seed).float()
        fingerprint = vae_fingerprint(vae)  # of the fp32 weights, before any cast or move
        where = torch.device(resolve_device(device))
        vae = vae.to(where).eval().requires_grad_(False)
        dtype = resolve_precision(precision, where)
        if dtype == torch.bfloat16:
            # Not .to(dtype): diffusers warns on that about fp32 modules even when a VAE has none.
            vae = vae.bfloat16()
        if where.type == "cuda":
            # cuDNN picks its fastest convolution per shape: batches of one bucket size repeat.
            torch.backends.cudnn.benchmark = True
            vae = vae.to(memory_format=torch.channels_last)
        compiled = with_compiled_encoder(vae) if compile else None
        return LoadedVae(vae, vae_name(source, tiny_seed), fingerprint, where, dtype, compiled)

    return cached(("vae", source, tiny_seed, device, precision, compile), build)
