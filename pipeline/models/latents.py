"""Image -> training crop -> VAE latents: the one definition the latent cache and training share.

The latent cache (filters/latents.py, in `curate run`) and the training data pipeline
(train/data.py, encoding on the fly) must give the same latents for the same sample, so
both crop with `fit_crop` and encode with `encode`. A cached latent records the crop box
it was made from and the VAE's fingerprint; training uses it only when those match what
it would have computed itself.
"""

from __future__ import annotations

import io
import random
from typing import Optional

import numpy as np
from PIL import Image

# Tar member and json fields the cache writes (json fields are flat: they also become
# columns of the shard parquet).
LATENT_EXT = "latent.npy"
META_VAE = "latent_vae"  # the VAE as configured (a path, hub id, or tiny:SEED)
META_FINGERPRINT = "latent_vae_fingerprint"  # train/model.py vae_fingerprint
META_SCALING = "latent_scaling_factor"  # for information: latents are stored unscaled
META_SIZE = "latent_size"  # [w, h] of the crop in pixels
META_CROP = "latent_crop"  # [left, top, right, bottom] in the stored image's pixels
# For information, not matched by training: "bf16" or "fp32", what the VAE ran in. curate train
# encodes in bf16 under its default precision, so a bf16 latent is what it would compute itself.
META_PRECISION = "latent_precision"


def fit_crop(image: Image.Image, size: tuple[int, int], rng: Optional[random.Random] = None
             ) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Crop `image` to the aspect of `size` (centred, or at a random place with `rng`) and
    resize the crop to exactly `size`. Returns the result and the crop box in `image`'s pixels."""
    tw, th = size
    w, h = image.size
    scale = max(tw / w, th / h)
    cw, ch = tw / scale, th / scale  # the crop, in source pixels (float: no rounding drift)
    if rng is None:
        left, top = (w - cw) / 2, (h - ch) / 2
    else:
        left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    box = (round(left, 3), round(top, 3), round(left + cw, 3), round(top + ch, 3))
    if (w, h) == (tw, th) and box == (0, 0, w, h):
        return image, box  # already the crop (resize would return an equal copy): spares a copy
    # Shrinking by a large factor: PIL's resize filters over the whole source footprint
    # (antialiased), unlike a GPU-style point-sampled bicubic.
    return image.resize((tw, th), Image.BICUBIC, box=box), box


def to_pixels(image: Image.Image) -> np.ndarray:
    """RGB image -> float32 CHW array in [-1, 1], the VAE's input range."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return (array / 127.5 - 1.0).transpose(2, 0, 1)


def decode_crop(data: bytes, size: tuple[int, int]) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A stored image (its encoded bytes) decoded and centre-cropped to `size` as training crops
    it: the crop as a uint8 (H, W, 3) array, and the crop box in the stored image's pixels."""
    image = Image.open(io.BytesIO(data))
    image = image.convert("RGB") if image.mode != "RGB" else image  # convert copies even an RGB image
    crop, box = fit_crop(image, tuple(size))
    return np.asarray(crop), box


def pixels_batch(crops: np.ndarray, device, dtype):
    """Same-size uint8 RGB crops (B, H, W, 3) -> a (B, 3, H, W) tensor in [-1, 1] on `device`, of
    `dtype`: the batched `to_pixels`. They travel as uint8 (a quarter of the bytes) and are scaled
    on the device with the same float32 arithmetic as `to_pixels`, so the values are identical.
    Laid out channels_last (a permute of the NHWC batch), the layout the VAE runs in on a GPU;
    contiguous NCHW elsewhere."""
    import torch

    stacked = torch.from_numpy(np.ascontiguousarray(crops))
    if device.type == "cuda":
        stacked = stacked.pin_memory()
    pixels = stacked.to(device, non_blocking=True).float().div_(127.5).sub_(1.0).permute(0, 3, 1, 2)
    return pixels.to(dtype) if device.type == "cuda" else pixels.to(dtype).contiguous()


def encode(vae, pixels):
    """Pixels (B, 3, H, W) in [-1, 1] -> unscaled latents: the posterior mean.

    The mean rather than a draw from the posterior, in both the cache and on-the-fly
    training, so that the two agree; SD's VAE posterior std is small next to its latents.
    """
    return vae.encode(pixels).latent_dist.mean


def scale_latents(vae_config, latents):
    """Unscaled latents -> the UNet's input scale (SD: x 0.18215)."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents - shift) * vae_config.scaling_factor


def latent_to_bytes(latent: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, latent.astype(np.float16), allow_pickle=False)
    return buffer.getvalue()


def latent_from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
