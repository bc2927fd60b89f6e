"""Sample filters that need a GPU (issue 15, item 8): judged in batches (`Filter.prepare`), and
the write task of their run routed to the GPU workers."""

from __future__ import annotations

import io

import numpy as np
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


def test_a_run_with_a_gpu_filter_writes_its_shards_on_the_gpu_workers(tmp_path):
    # and the other tasks on the CPU workers, where those offer CPU slots (the embedded GPU layout)
    assert FILTERS["vae_latents"].needs_gpu and not FILTERS["caption_length"].needs_gpu
    base = {"input": {"paths": ["x.parquet"]}, "output": {"path": str(tmp_path)}, "clip": {"enabled": True}}
    cpu = {"resources": {"CPU": 1}}
    for filters, cpu_options, expected in (([{"name": "caption_length", "min_words": 2}], {}, {}),
                                           ([{"name": "caption_length", "min_words": 2}], cpu, cpu),
                                           ([{"name": "vae_latents", "vae": "tiny"}], cpu, GPU)):
        cfg = RunConfig.model_validate({**base, "filters": filters})
        plan = Plan(cfg, RunLayout(tmp_path), 1, GPU, cpu_options=cpu_options)
        [write] = plan.write_tasks(0, cfg.filter_specs(), after_prepare=False)
        assert write.options == expected
        download, score = plan.prepare_tasks(0, "x.parquet")
        assert (download.options, score.options) == (cpu_options, GPU)
