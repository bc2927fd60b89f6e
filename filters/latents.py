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

The crops are made where the write task runs; their encoding (`encode_batches`) runs on a GPU
worker when the run has one: the write task sends the crops there as uint8 arrays
(pipeline/offload.py) and stays on its CPU worker. The VAE is loaded once per
process that encodes (module cache). On a GPU it runs in bf16 and channels_last, and with
`compile: true` its encoder is compiled: about 2.5x faster once warm, worth it for runs of many
shards (each new crop size compiles once per GPU worker; while it compiles, that worker's other
batches are encoded eagerly, so the run does not stop for it).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
from pydantic import Field, PrivateAttr

from curate.filters.base import Decision, Filter
from curate.pipeline.errors import require_extra

# Where `prepare` leaves a sample's (latent, crop box, what the json says of the VAE) for `keep`.
_PREPARED = "_vae_latent"
# Threads that decode and crop a batch's stored images (PIL releases the GIL while it decodes).
_DECODERS = ThreadPoolExecutor(4, thread_name_prefix="vae-latents-decode")
# Which (VAE, batch shape) pairs have a compiled encoder ready ("ready") or being built ("building")
# in this process (`compiled_when_ready`).
_COMPILED: dict = {}
_COMPILED_LOCK = threading.Lock()


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
        require_extra("train", "the vae_latents filter", ("diffusers",), import_now=False)

    def setup(self, context: dict[str, Any]) -> None:
        # Where `prepare`'s encoding runs: a GPU worker's task in a Dask run with GPU workers;
        # without a runner (the filter used alone), here.
        self._offload = context.get("offload")

    def _target(self, sample) -> tuple[int, int]:
        meta = sample["meta"]
        return tuple(meta["bucket"]) if meta.get("bucket") else (self.resolution, self.resolution)

    def prepare(self, samples: list[dict]) -> None:
        """Crop the samples' stored images here (CPU work, where the write runs), then encode the
        crops where the GPU is (`encode_batches`, through the offload runner); `keep` only stores
        each result. Only uint8 pixels travel to the GPU worker: its process feeds the GPU and does
        no image work, which would compete with that for its GIL."""
        from curate.pipeline.models.latents import decode_crop

        targets = [self._target(sample) for sample in samples]
        crops = list(_DECODERS.map(lambda sample, target: decode_crop(sample["jpg"], target), samples, targets))
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, target in enumerate(targets):
            by_size.setdefault(target, []).append(i)
        # Batches of one crop size, `batch_size` crops each: what one call of the encoder takes.
        order = [chunk for indexes in by_size.values()
                 for chunk in (indexes[start:start + self.batch_size] for start in range(0, len(indexes), self.batch_size))]
        batches = [np.stack([crops[i][0] for i in chunk]) for chunk in order]
        spec = self.model_dump()
        encoded = self._offload(encode_batches, spec, batches) if self._offload else encode_batches(spec, batches)
        for chunk, latents in zip(order, encoded["latents"]):
            for i, latent in zip(chunk, latents):
                samples[i][_PREPARED] = (latent, crops[i][1], encoded["vae"])

    def warm_up(self, context: dict[str, Any]) -> None:
        """Load the VAE where the GPU is and, unless the run crops to aspect buckets, encode one blank
        batch of the square crop (with `compile`, that builds the compiled encoder for the shape every
        full batch has). With buckets no batch has that shape: compiling it would take the compiler
        from the first real shape for a minute, for nothing."""
        square = [] if context.get("buckets") else [np.zeros((self.batch_size, self.resolution, self.resolution, 3), np.uint8)]
        encode_batches(self.model_dump(), square)

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


def encode_batches(spec: dict, batches: list) -> dict:
    """The filter's GPU work, run where its `offload` sends it: {"latents": [fp16 latents (B, C,
    h, w) for each uint8 (B, H, W, 3) batch of crops], "vae": what the json says of the VAE}. The
    VAE is loaded once per process."""
    # Where it runs: diffusers that is there but does not import is one clear line per shard here.
    require_extra("train", "the vae_latents filter", ("diffusers",))
    import torch

    from curate.pipeline.models.latents import encode, pixels_batch
    from curate.pipeline.models.vae import cached_vae

    f = VaeLatents(**spec)
    loaded = cached_vae(f.vae, f.tiny_seed, f.device, f.precision, f.compile)
    out = []
    for batch in batches:
        n = len(batch)
        if f.compile and n < f.batch_size:  # one batch shape per crop size: a short batch would compile again
            batch = np.concatenate([batch, np.repeat(batch[-1:], f.batch_size - n, axis=0)])
        pixels = pixels_batch(batch, loaded.device, loaded.dtype)
        with torch.no_grad():
            if loaded.compiled is None:
                latents = encode(loaded.vae, pixels)
            else:
                latents = compiled_when_ready((id(loaded), tuple(pixels.shape)), lambda: encode(loaded.compiled, pixels),
                                              lambda: encode(loaded.vae, pixels))
            latents = latents[:n]
            # Stored as fp16 (latent_to_bytes): rounded on the device, copied back at half the bytes.
            out.append(latents.float().to(torch.float16).cpu().numpy())
    vae = {"name": loaded.name, "fingerprint": loaded.fingerprint,
           "scaling_factor": loaded.vae.config.scaling_factor, "precision": loaded.precision}
    return {"latents": out, "vae": vae}


def compiled_when_ready(key, compiled, eager):
    """`compiled()` once the compiled encoder for `key` is built, `eager()` while another thread builds it.

    The first call for a key builds the compiled graph (SD's encoder: about a minute on an H200
    with cold caches) and returns its result. A GPU worker runs two tasks at once: the other one
    meanwhile encodes with the eager VAE (the same weights) instead of waiting, so the writes go on
    through the build; and a compiled encoder is never built twice by two threads at once (each would
    make its own Dynamo graph). Eager and compiled latents of one VAE and precision agree to within
    rounding, and the cache records the same VAE and precision for both."""
    with _COMPILED_LOCK:
        state = _COMPILED.get(key)
        if state is None:
            _COMPILED[key] = "building"
    if state == "ready":
        return compiled()
    if state == "building":
        return eager()
    try:
        result = compiled()
    except BaseException:
        with _COMPILED_LOCK:
            del _COMPILED[key]  # the next call tries again
        raise
    with _COMPILED_LOCK:
        _COMPILED[key] = "ready"
    return result
