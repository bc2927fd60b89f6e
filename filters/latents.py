"""Cache VAE latents in the shards (sample stage), so training skips VAE encoding.

Put it last in `filters:`; it crops to the sample's aspect bucket (`resize.mode: buckets`):

    - name: vae_latents
      vae: stable-diffusion-v1-5/stable-diffusion-v1-5   # or a local diffusers folder, or "tiny"
      resolution: 512                                     # crop size of samples without a bucket

Each written sample gets `{key}.latent.npy` (fp16, 4 x h/8 x w/8 for SD, unscaled: the VAE
posterior mean) and json fields naming the VAE (`latent_vae`, `latent_vae_fingerprint`, a
hash of its weights), `latent_scaling_factor`, `latent_size` and `latent_crop` (the centre
crop box, in the stored image's pixels). `curate train` uses a cached latent only when
its VAE fingerprint, size and crop match what it would compute itself (train/latents.py
holds the shared crop and encode code). The filter never drops a sample.

The VAE is loaded once per worker process (module cache), on the GPU when there is one.
"""

from __future__ import annotations

import io
from typing import Any

from pydantic import Field

from curate.filters.base import Decision, Filter
from curate.pipeline.errors import require_extra

class VaeLatents(Filter):
    """Adds the VAE latent of the training crop to every sample; always keeps."""

    name = "vae_latents"
    stage = "sample"
    # A diffusers Stable Diffusion folder or hub id (its vae/), an AutoencoderKL folder, or
    # "tiny" (curate train's tiny model, weights from tiny_seed).
    vae: str = "tiny"
    tiny_seed: int = 0
    resolution: int = Field(512, ge=8)  # square crop for samples without a `bucket`
    device: str = "auto"

    def check(self, context: dict[str, Any]) -> None:
        # diffusers (the VAE) comes with the train extra: say so when the config is read, not on a worker.
        require_extra("train", "the vae_latents filter", ("diffusers",))

    def setup(self, context: dict[str, Any]) -> None:
        from curate.pipeline.models.vae import cached_vae  # torch and diffusers: only when configured

        cached_vae(self.vae, self.tiny_seed, self.device)

    def keep(self, sample) -> Decision:
        import torch
        from PIL import Image

        from curate.pipeline.models.vae import cached_vae
        from curate.pipeline.models.latents import (
            LATENT_EXT, META_CROP, META_FINGERPRINT, META_SCALING, META_SIZE, META_VAE, encode, fit_crop,
            latent_to_bytes, to_pixels,
        )

        vae, name, fingerprint, device = cached_vae(self.vae, self.tiny_seed, self.device)
        meta = sample["meta"]
        size = tuple(meta["bucket"]) if meta.get("bucket") else (self.resolution, self.resolution)
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        crop, box = fit_crop(image, size)
        with torch.no_grad():
            pixels = torch.from_numpy(to_pixels(crop))[None].to(device)
            latent = encode(vae, pixels)[0].float().cpu().numpy()
        sample.setdefault("extra", {})[LATENT_EXT] = latent_to_bytes(latent)
        meta.update({META_VAE: name, META_FINGERPRINT: fingerprint, META_SCALING: vae.config.scaling_factor,
                     META_SIZE: list(size), META_CROP: list(box)})
        return True
