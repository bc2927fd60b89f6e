"""Cache VAE latents in the shards (sample stage), so training skips VAE encoding.

Put it last in `filters:`; it crops to the sample's aspect bucket (`resize.mode: buckets`):

    - name: vae_latents
      vae: stable-diffusion-v1-5/stable-diffusion-v1-5   # or a local diffusers folder, or "tiny"
      resolution: 512                                     # crop size of samples without a bucket
      precision: auto                                     # bf16 on a GPU, fp32 on the CPU
      compile: false                                      # torch.compile the encoder (long runs)

Each written sample gets `{key}.latent.npy` (fp16, 4 x h/8 x w/8 for SD, unscaled: the VAE
posterior mean) and json fields naming the VAE (`latent_vae`, `latent_vae_fingerprint`, a
hash of its weights), `latent_scaling_factor`, `latent_size`, `latent_crop` (the centre
crop box, in the stored image's pixels) and `latent_precision` (what the VAE ran in). `curate train` uses a cached latent only when
its VAE fingerprint, size and crop match what it would compute itself (train/latents.py
holds the shared crop and encode code). The filter never drops a sample.

The VAE is loaded once per worker process (module cache), on the GPU when there is one
(a run with this filter writes its shards on the GPU workers: pipeline/plan.py). There it runs
in bf16 and channels_last, and with `compile: true` its encoder is compiled: about 2.5x faster
once warm, worth it for runs of many shards (each new crop size compiles once per worker).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import Field

from curate.filters.base import Decision, Filter
from curate.pipeline.errors import require_extra

# Where `prepare` leaves a sample's (latent, crop box) for `keep`.
_PREPARED = "_vae_latent"
# Threads that decode and crop a batch's images while the GPU encodes (PIL releases the GIL).
_DECODERS = ThreadPoolExecutor(4, thread_name_prefix="vae-latents-decode")


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
    # Crops of one size encoded together (`prepare`): the VAE is the cost, and on a GPU it needs batches.
    batch_size: int = Field(32, ge=1)
    # What the VAE runs in: auto = bf16 on CUDA, fp32 on the CPU (pipeline/models/vae.py).
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = False

    needs_gpu = True

    def check(self, context: dict[str, Any]) -> None:
        # diffusers (the VAE) comes with the train extra: say so when the config is read, not on a worker.
        require_extra("train", "the vae_latents filter", ("diffusers",))

    def setup(self, context: dict[str, Any]) -> None:
        self._vae()

    def _vae(self) -> tuple:
        from curate.pipeline.models.vae import cached_vae  # torch and diffusers: only when configured

        return cached_vae(self.vae, self.tiny_seed, self.device, self.precision, self.compile)

    def _target(self, sample) -> tuple[int, int]:
        meta = sample["meta"]
        return tuple(meta["bucket"]) if meta.get("bucket") else (self.resolution, self.resolution)

    def prepare(self, samples: list[dict]) -> None:
        """Encode the samples' crops in batches of one crop size, `batch_size` at a time; `keep`
        then only stores each result."""
        import torch

        from curate.pipeline.models.latents import encode, pixels_batch

        vae, _, _, device = self._vae()
        by_size: dict[tuple[int, int], list[dict]] = {}
        for sample in samples:
            by_size.setdefault(self._target(sample), []).append(sample)
        for size, group in by_size.items():
            for start in range(0, len(group), self.batch_size):
                chunk = group[start:start + self.batch_size]
                crops = list(_DECODERS.map(lambda s: _crop(s["jpg"], size), chunk))
                with torch.no_grad():
                    latents = encode(vae, pixels_batch([crop for crop, _ in crops], device, vae.dtype))
                    # Stored as fp16 (latent_to_bytes): rounded on the device, copied back at half the bytes.
                    latents = latents.float().to(torch.float16).cpu().numpy()
                for sample, (_, box), latent in zip(chunk, crops, latents):
                    sample[_PREPARED] = (latent, box)

    def keep(self, sample) -> Decision:
        from curate.pipeline.models.latents import (
            LATENT_EXT, META_CROP, META_FINGERPRINT, META_PRECISION, META_SCALING, META_SIZE, META_VAE,
            latent_to_bytes,
        )
        from curate.pipeline.models.vae import precision_of

        if _PREPARED not in sample:  # judged alone (apply_chain): a batch of one
            self.prepare([sample])
        latent, box = sample.pop(_PREPARED)
        vae, name, fingerprint, _ = self._vae()
        sample.setdefault("extra", {})[LATENT_EXT] = latent_to_bytes(latent)
        sample["meta"].update({META_VAE: name, META_FINGERPRINT: fingerprint, META_SCALING: vae.config.scaling_factor,
                               META_SIZE: list(self._target(sample)), META_CROP: list(box),
                               META_PRECISION: precision_of(vae)})
        return True


def _crop(jpg: bytes, size: tuple[int, int]):
    """The stored JPEG decoded and cropped to `size` as training crops it: (image, crop box)."""
    from PIL import Image

    from curate.pipeline.models.latents import fit_crop

    return fit_crop(Image.open(io.BytesIO(jpg)).convert("RGB"), size)
