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
crop box, in the stored image's pixels) and `latent_precision` (what the VAE ran in).
`curate train` uses a cached latent only when its VAE fingerprint, size and crop match what it
would compute itself (pipeline/models/latents.py holds the shared crop and encode code). The
filter never drops a sample.

The encoding (`encode_crops`) runs on a GPU worker when the run has one: the write task sends
each batch there (pipeline/offload.py) and stays on its CPU worker. The VAE is loaded once per
process that encodes (module cache). On a GPU it runs in bf16 and channels_last, and with
`compile: true` its encoder is compiled: about 2.5x faster once warm, worth it for runs of many
shards (each new crop size compiles once per GPU worker).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import Field, PrivateAttr

from curate.filters.base import Decision, Filter
from curate.pipeline.errors import require_extra

# Where `prepare` leaves a sample's (latent, crop box, what the json says of the VAE) for `keep`.
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
    _offload: Any = PrivateAttr(default=None)

    def check(self, context: dict[str, Any]) -> None:
        # diffusers (the VAE) comes with the train extra: say so when the config is read, not on a worker.
        require_extra("train", "the vae_latents filter", ("diffusers",))

    def setup(self, context: dict[str, Any]) -> None:
        # Where `prepare`'s encoding runs: a GPU worker's task in a Dask run with GPU workers;
        # without a runner (the filter used alone), here.
        self._offload = context.get("offload")

    def _target(self, sample) -> tuple[int, int]:
        meta = sample["meta"]
        return tuple(meta["bucket"]) if meta.get("bucket") else (self.resolution, self.resolution)

    def prepare(self, samples: list[dict]) -> None:
        """Encode the samples' crops (on a GPU worker when there is one: `encode_crops`); `keep`
        then only stores each result."""
        jobs = [(sample["jpg"], self._target(sample)) for sample in samples]
        spec = self.model_dump()
        encoded = self._offload(encode_crops, spec, jobs) if self._offload else encode_crops(spec, jobs)
        for sample, (latent, box) in zip(samples, encoded["latents"]):
            sample[_PREPARED] = (latent, box, encoded["vae"])

    def keep(self, sample) -> Decision:
        from curate.pipeline.models.latents import (
            LATENT_EXT, META_CROP, META_FINGERPRINT, META_PRECISION, META_SCALING, META_SIZE, META_VAE,
            latent_to_bytes,
        )

        if _PREPARED not in sample:  # judged alone (apply_chain): a batch of one
            self.prepare([sample])
        latent, box, vae = sample.pop(_PREPARED)
        sample.setdefault("extra", {})[LATENT_EXT] = latent_to_bytes(latent)
        sample["meta"].update({META_VAE: vae["name"], META_FINGERPRINT: vae["fingerprint"],
                               META_SCALING: vae["scaling_factor"], META_SIZE: list(self._target(sample)),
                               META_CROP: list(box), META_PRECISION: vae["precision"]})
        return True


def encode_crops(spec: dict, jobs: list[tuple[bytes, tuple[int, int]]]) -> dict:
    """The filter's GPU work, run where its `offload` sends it: {"latents": [(latent as fp16, crop
    box)] for each (stored JPEG, crop size), "vae": what the json says of the VAE}. Crops of one
    size are encoded together, `batch_size` at a time; the VAE is loaded once per process."""
    import torch

    from curate.pipeline.models.latents import encode, pixels_batch
    from curate.pipeline.models.vae import cached_vae

    f = VaeLatents(**spec)
    loaded = cached_vae(f.vae, f.tiny_seed, f.device, f.precision, f.compile)
    out: list = [None] * len(jobs)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, (_, size) in enumerate(jobs):
        by_size.setdefault(tuple(size), []).append(i)
    # Every crop is handed to the decoding threads at once, so they decode the next batches while
    # the GPU encodes this one (a batch at a time would leave the GPU idle while each decodes).
    pending = {i: _DECODERS.submit(_crop, jobs[i][0], tuple(jobs[i][1])) for i in range(len(jobs))}
    for size, indexes in by_size.items():
        for start in range(0, len(indexes), f.batch_size):
            chunk = indexes[start:start + f.batch_size]
            crops = [pending.pop(i).result() for i in chunk]
            images = [crop for crop, _ in crops]
            if f.compile:  # one batch shape per crop size: a short batch would compile again
                images += [images[-1]] * (f.batch_size - len(images))
            with torch.no_grad():
                latents = encode(loaded.vae, pixels_batch(images, loaded.device, loaded.dtype))[:len(chunk)]
                # Stored as fp16 (latent_to_bytes): rounded on the device, copied back at half the bytes.
                latents = latents.float().to(torch.float16).cpu().numpy()
            for i, (_, box), latent in zip(chunk, crops, latents):
                out[i] = (latent, box)
    vae = {"name": loaded.name, "fingerprint": loaded.fingerprint,
           "scaling_factor": loaded.vae.config.scaling_factor, "precision": loaded.precision}
    return {"latents": out, "vae": vae}


def _crop(jpg: bytes, size: tuple[int, int]):
    """The stored JPEG decoded and cropped to `size` as training crops it: (image, crop box)."""
    from PIL import Image

    from curate.pipeline.models.latents import fit_crop

    return fit_crop(Image.open(io.BytesIO(jpg)).convert("RGB"), size)
