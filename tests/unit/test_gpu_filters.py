"""Sample filters that need a GPU (issue 15, item 8): judged in batches (`Filter.prepare`), and
the write task of their run routed to the GPU workers."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from curate.filters import FILTERS, apply_chain, apply_chain_batched, build_chain
from curate.pipeline.config import RunConfig
from curate.pipeline.layout import RunLayout
from curate.pipeline.plan import Plan

GPU = {"resources": {"GPU": 1}}


def _samples(n: int) -> list[dict]:
    out = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.new("RGB", (40 + 8 * (i % 3), 32), (30 * i % 255, 90, 160)).save(buffer, "JPEG")
        out.append({"key": f"k{i}", "jpg": buffer.getvalue(), "caption": "one two three" if i % 4 else "x",
                    "meta": {"bucket": [32, 32] if i % 2 else None}, "extra": {}})
    return out


def test_batched_chain_decides_and_counts_as_sample_by_sample():
    specs = [{"name": "caption_length", "min_words": 2}, {"name": "vae_latents", "vae": "tiny", "resolution": 16,
                                                          "batch_size": 3}]
    one_by_one, batched = build_chain(specs), build_chain(specs)
    seen = []  # what the real hook is given
    original = type(batched[1]).prepare

    def spy(self, samples):
        seen.append([s["key"] for s in samples])
        return original(self, samples)

    a, b = _samples(9), _samples(9)
    expected = [apply_chain(one_by_one, s) for s in a]
    type(batched[1]).prepare = spy
    try:
        got = apply_chain_batched(batched, b)
    finally:
        type(batched[1]).prepare = original
    assert [r and r.reason for r in got] == [r and r.reason for r in expected]
    assert [f.counts for f in batched] == [f.counts for f in one_by_one]
    # The GPU filter got one batch: only the samples the caption filter kept.
    assert seen == [[s["key"] for s, r in zip(b, got) if r is None]]
    for x, y in zip(a, b):
        if "latent.npy" in x["extra"]:
            left = np.load(io.BytesIO(x["extra"]["latent.npy"]))
            right = np.load(io.BytesIO(y["extra"]["latent.npy"]))
            # A batch of 3 against batches of 1: the same latents up to the convolutions' summation
            # order (oneDNN picks other kernels for other batch sizes) and the fp16 they are stored in.
            np.testing.assert_allclose(left, right, atol=1e-2)
            assert np.abs(left - right).mean() < 2e-3
            assert x["meta"] == y["meta"]


def test_a_gpu_filter_alone_gives_the_run_gpu_workers(tmp_path):
    # Without CLIP scoring too: the embedded cluster gets its GPU layout and GPU tasks ask for it.
    from curate.pipeline.plan import uses_gpu

    base = {"input": {"paths": ["x.parquet"]}, "output": {"path": str(tmp_path)}}
    cases = [({}, []), ({"clip": {"enabled": True}}, []), ({"clip": {"enabled": True, "device": "cpu"}}, []),
             ({}, [{"name": "vae_latents", "vae": "tiny"}]), ({}, [{"name": "caption_length", "min_words": 2}])]
    assert [uses_gpu(RunConfig.model_validate({**base, **extra, "filters": filters})) for extra, filters in cases] == [
        False, True, False, True, False]


def test_a_run_with_a_gpu_filter_sends_its_batches_to_the_gpu_workers(tmp_path):
    # The write stays on the CPU workers (where those offer CPU slots); the GPU filter's batches are
    # sent with the GPU resources (the write task's `offload` argument).
    assert FILTERS["vae_latents"].needs_gpu and not FILTERS["caption_length"].needs_gpu
    base = {"input": {"paths": ["x.parquet"]}, "output": {"path": str(tmp_path)}, "clip": {"enabled": True}}
    cpu = {"resources": {"CPU": 1}}
    for filters, gpu, cpu_options, offload in (([{"name": "caption_length", "min_words": 2}], GPU, {}, None),
                                               ([{"name": "caption_length", "min_words": 2}], GPU, cpu, None),
                                               ([{"name": "vae_latents", "vae": "tiny"}], GPU, cpu, {"GPU": 1}),
                                               ([{"name": "vae_latents", "vae": "tiny"}], {}, {}, None)):
        cfg = RunConfig.model_validate({**base, "filters": filters})
        plan = Plan(cfg, RunLayout(tmp_path), 1, gpu, cpu_options=cpu_options)
        [write] = plan.write_tasks(0, cfg.filter_specs(), after_prepare=False)
        assert write.options == cpu_options and write.args[4] == offload
        download, score = plan.prepare_tasks(0, "x.parquet")
        assert (download.options, score.options) == (cpu_options, gpu)


def _where_am_i(tag):
    from distributed import get_worker

    return tag, get_worker().name


def _write_like_task(resources):
    # What a write task does: build its runner inside the task and send work with it.
    from curate.pipeline.offload import offload_runner

    return offload_runner(resources)(_where_am_i, "sent")


def _where_and_what(tag, crops):
    from distributed import get_worker

    return tag, get_worker().name, int(crops.sum())


def _send_crops(resources):
    # A write task sending an array (as vae_latents sends its crops).
    from curate.pipeline.offload import offload_runner

    return offload_runner(resources)(_where_and_what, "crops", np.full((4, 8, 8, 3), 3, dtype=np.uint8))


def test_offload_runs_the_batch_on_a_gpu_worker_and_never_deadlocks():
    # The embedded GPU layout (real worker processes; no GPU needed to start it): a CPU worker
    # offering CPU slots and "gpu-0" offering GPU=2 with 2 threads.
    from curate.pipeline.cluster import dask_client
    from curate.pipeline.config import DaskConfig
    from curate.pipeline.offload import offload_runner, run_here

    assert offload_runner({"GPU": 1}) is run_here and offload_runner(None) is run_here  # not in a worker
    with dask_client(DaskConfig(n_workers=1), gpus=1) as client:
        client.wait_for_workers(2, timeout=60)
        gpu = next(a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "gpu-0")
        # From a task on the CPU worker, the batch runs on the GPU worker.
        assert client.submit(_write_like_task, {"GPU": 1}, resources={"CPU": 1}, pure=False).result(60) == (
            "sent", "gpu-0")
        # An array argument arrives whole (scattered by the sending worker, fetched worker to worker).
        assert client.submit(_send_crops, {"GPU": 1}, resources={"CPU": 1}, pure=False).result(60) == (
            "crops", "gpu-0", 4 * 8 * 8 * 3 * 3)
        # Without resources it runs in the task's own process (the CPU layout).
        assert client.submit(_write_like_task, None, resources={"CPU": 1}, pure=False).result(60) == ("sent", "cpu-0")
        # Writes on every thread of the GPU worker (a cluster whose GPU workers run writes too): each
        # waits for a GPU task that needs one of those threads, which runs because the waiting tasks
        # seceded from the pool.
        writes = [client.submit(_write_like_task, {"GPU": 1}, workers=[gpu], pure=False) for _ in range(2)]
        assert [w.result(60) for w in writes] == [("sent", "gpu-0")] * 2


def test_pixels_travel_as_uint8_and_scale_as_to_pixels_does():
    # The batched path (uint8 to the device, scaled there) gives to_pixels' values exactly.
    import torch

    from curate.pipeline.models.latents import pixels_batch, to_pixels

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (3, 24, 40, 3), dtype=np.uint8)
    batch = pixels_batch(crops, torch.device("cpu"), torch.float32)
    assert batch.shape == (3, 3, 24, 40) and batch.dtype == torch.float32 and batch.is_contiguous()
    np.testing.assert_array_equal(batch.numpy(), np.stack([to_pixels(Image.fromarray(crop)) for crop in crops]))
    assert pixels_batch(crops, torch.device("cpu"), torch.bfloat16).dtype == torch.bfloat16


def test_decode_crop_is_the_training_crop_of_the_stored_image():
    # What the filter encodes is what training would crop from the stored JPEG: the same pixels and box
    # as fit_crop on the decoded image, for a crop of another aspect and for one of the image's own size.
    from curate.pipeline.models.latents import decode_crop, fit_crop

    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(buffer, "JPEG")
    stored = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    for size in ((16, 16), (50, 30)):
        array, box = decode_crop(buffer.getvalue(), size)
        expected, expected_box = fit_crop(stored, size)
        assert array.dtype == np.uint8 and array.shape == (size[1], size[0], 3) and box == expected_box
        np.testing.assert_array_equal(array, np.asarray(expected))
    assert decode_crop(buffer.getvalue(), (50, 30))[1] == (0, 0, 50, 30)
    gray = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(gray, "PNG")
    assert decode_crop(gray.getvalue(), (8, 8))[0].shape == (8, 8, 3)  # other modes become RGB


def test_the_latent_cache_records_its_precision_and_bf16_stays_near_fp32():
    # precision: auto is fp32 on the CPU; bf16 asked for runs in bf16 and says so, with latents
    # close to the fp32 ones and the same VAE fingerprint (training matches on the fingerprint).
    from curate.pipeline.models.latents import META_FINGERPRINT, META_PRECISION

    runs = {}
    for precision in ("auto", "bf16"):
        [latents] = build_chain([{"name": "vae_latents", "vae": "tiny", "resolution": 16, "device": "cpu",
                                  "precision": precision}])
        samples = _samples(4)
        assert apply_chain_batched([latents], samples) == [None] * 4
        runs[precision] = samples
    fp32, bf16 = runs["auto"], runs["bf16"]
    assert {s["meta"][META_PRECISION] for s in fp32} == {"fp32"}
    assert {s["meta"][META_PRECISION] for s in bf16} == {"bf16"}
    assert fp32[0]["meta"][META_FINGERPRINT] == bf16[0]["meta"][META_FINGERPRINT]
    for a, b in zip(fp32, bf16):
        left, right = (np.load(io.BytesIO(s["extra"]["latent.npy"])).astype(np.float32) for s in (a, b))
        scale = np.abs(left).max()
        assert scale > 0.1 and not np.array_equal(left, right)  # really another precision
        assert np.abs(left - right).max() < 0.05 * scale  # bf16 has 8 significant bits


def test_a_compiled_encoder_is_built_once_and_other_calls_run_eagerly_meanwhile():
    # Two GPU-worker threads: the first call for a key builds the compiled encoder; a call arriving
    # while it builds runs the eager VAE at once (the writes go on) instead of waiting or building
    # it a second time; once built, every call runs the compiled one. A failed build is tried again.
    import threading

    from curate.filters.latents import compiled_when_ready

    key = ("vae", (32, 3, 8, 8), object())  # a key no other test made
    building, release, builds = threading.Event(), threading.Event(), []

    def build_slowly():
        builds.append(1)
        building.set()
        assert release.wait(30)
        return "compiled"

    first = []
    thread = threading.Thread(target=lambda: first.append(compiled_when_ready(key, build_slowly, lambda: "eager")))
    thread.start()
    assert building.wait(30)
    # While the first call builds: eager, without waiting for it.
    assert compiled_when_ready(key, build_slowly, lambda: "eager") == "eager"
    release.set()
    thread.join(30)
    assert first == ["compiled"] and builds == [1]
    assert compiled_when_ready(key, lambda: "compiled", lambda: "eager") == "compiled"

    other = ("vae", (32, 3, 16, 16), object())

    def fail():
        raise RuntimeError("compile failed")

    with pytest.raises(RuntimeError):
        compiled_when_ready(other, fail, lambda: "eager")
    assert compiled_when_ready(other, lambda: "compiled", lambda: "eager") == "compiled"


def test_the_compiled_vae_shares_the_eager_ones_weights():
    # cached_vae(compile=True) keeps the eager VAE usable beside the compiled one: the same modules
    # and weights (nothing copied), only the twin's encoder compiled, and the two encode alike.
    import torch

    from curate.pipeline.models.cache import forget
    from curate.pipeline.models.latents import encode
    from curate.pipeline.models.vae import cached_vae

    loaded = cached_vae("tiny", device="cpu", precision="fp32", compile=True)
    try:
        eager, twin = loaded.vae, loaded.compiled
        assert twin is not eager and twin.encoder._orig_mod is eager.encoder
        assert not hasattr(eager.encoder, "_orig_mod")  # the eager VAE stays eager
        assert twin.decoder is eager.decoder and twin.quant_conv is eager.quant_conv
        assert [p.data_ptr() for p in twin.parameters()] == [p.data_ptr() for p in eager.parameters()]
        pixels = torch.rand(2, 3, 16, 16) * 2 - 1
        with torch.no_grad():
            torch.testing.assert_close(encode(twin, pixels), encode(eager, pixels), rtol=1e-4, atol=1e-4)
    finally:
        forget("vae")


def test_warm_up_loads_what_the_first_gpu_task_would(monkeypatch):
    """The calls a GPU worker makes when it joins a run (pipeline/plan.py `warm_ups`) build the
    very cache entries the tasks then use: after them, the first batch loads nothing."""
    from curate.pipeline.models import cache, vae as vae_module
    from curate.pipeline.plan import warm_ups

    cache.forget()
    spec = {"name": "vae_latents", "vae": "tiny", "resolution": 16, "batch_size": 3, "tiny_seed": 5}
    cfg = RunConfig.model_validate({"input": {"paths": ["x.parquet"]}, "output": {"path": "out"},
                                    "clip": {"enabled": False}, "filters": [{"name": "caption_length"}, spec]})
    calls = warm_ups(cfg)
    assert len(calls) == 1  # the GPU filter only: no CLIP scoring in this run
    assert calls[0][1][1] == {"buckets": False}  # square crops: the warm-up encodes a batch of them
    for fn, args in calls:
        fn(*args)

    def no_second_load(*a, **k):
        raise AssertionError("the VAE was loaded again after the warm-up")

    monkeypatch.setattr(vae_module, "load_vae", no_second_load)
    f = build_chain([spec])[0]
    f.setup({})
    samples = _samples(3)
    f.prepare(samples)
    assert all(f.keep(s) is True and "latent.npy" in s["extra"] for s in samples)
    cache.forget()


def test_warm_up_of_a_scoring_run_loads_the_scorer_model():
    from curate.pipeline.models import cache
    from curate.pipeline.models.clip import TINY_CLIP
    from curate.pipeline.plan import warm_ups
    from curate.pipeline.stages.score import _scorer, warm_up_scoring

    cache.forget()
    cfg = RunConfig.model_validate({"input": {"paths": ["x.parquet"]}, "output": {"path": "out"},
                                    "clip": {"enabled": True, "model": TINY_CLIP, "pretrained": None}})
    calls = warm_ups(cfg)
    assert [fn for fn, _ in calls] == [warm_up_scoring]
    assert _scorer(cfg.clip)._clip is None
    for fn, args in calls:
        fn(*args)
    assert _scorer(cfg.clip)._clip is not None and _scorer(cfg.clip).clip.name
    # Scoring on the CPU by choice: no GPU worker, nothing to warm up.
    assert warm_ups(RunConfig.model_validate({"input": {"paths": ["x.parquet"]}, "output": {"path": "out"},
                                              "clip": {"enabled": True, "model": TINY_CLIP, "pretrained": None, "device": "cpu"}})) == []
    cache.forget()


def test_warm_up_in_a_bucketed_run_loads_the_vae_but_encodes_no_square_batch(monkeypatch):
    """With aspect buckets no batch has the square crop's shape: compiling it would be wasted."""
    from curate.pipeline.models import cache, latents, vae as vae_module
    from curate.pipeline.plan import warm_ups

    cache.forget()
    spec = {"name": "vae_latents", "vae": "tiny", "resolution": 16, "batch_size": 3, "tiny_seed": 6}
    cfg = RunConfig.model_validate({"input": {"paths": ["x.parquet"]}, "output": {"path": "out"},
                                    "resize": {"mode": "buckets", "size": 64}, "filters": [spec]})
    (fn, args), = warm_ups(cfg)
    assert args[1] == {"buckets": True}

    def no_encode(*a, **k):
        raise AssertionError("the warm-up encoded a batch")

    monkeypatch.setattr(latents, "encode", no_encode)
    fn(*args)
    monkeypatch.setattr(vae_module, "load_vae", no_encode)  # loaded once, by the warm-up
    assert vae_module.cached_vae("tiny", 6, "auto", "auto", False).name == "tiny:6"
    cache.forget()
