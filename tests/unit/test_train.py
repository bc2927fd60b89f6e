"""Training's parts without a training run: the offline tokenizer, the data selection (rules,
buckets, bad samples) on shards written here, and the diffusion objective's targets.
`curate train` itself: tests/e2e/test_train_run.py."""

from __future__ import annotations

import warnings

import open_clip
import pytest
import torch

from curate.pipeline.errors import UserError
from curate.train.config import load_train_config
from curate.train.data import DataError, shard_urls, training_stream
from curate.train.objective import diffusion_loss
from curate.train.tokenizer import clip_tokenizer
from train_helpers import train_config, write_shard
from train_helpers import one_torch_thread  # noqa: F401 (an autouse fixture)


def test_offline_tokenizer_matches_open_clip():
    ours, theirs = clip_tokenizer(), open_clip.get_tokenizer("ViT-L-14")
    captions = ["two red circles on the left of a blue background", "A PHOTO of my dog's café, isn't it?!",
                "numbers 1234 and ½ symbols & émojis 🐱", "日本語のキャプション", ""]
    for caption in captions:
        expected = theirs([caption])[0].tolist()
        expected = expected[:expected.index(49407) + 1]  # open_clip pads with 0 after <|endoftext|>
        assert ours(caption).input_ids == expected, caption
    assert len(ours) == 49408 and ours.model_max_length == 77


def test_selection_buckets_and_bad_samples(tmp_path):
    wide, tall = [64, 32], [32, 64]
    specs = [
        {"key": "keep_square", "size": (48, 40), "meta": {"clip_similarity": 0.40, "punsafe": 0.01}},
        {"key": "keep_wide1", "size": (64, 32), "meta": {"clip_similarity": 0.35, "punsafe": 0.2, "bucket": wide}},
        {"key": "keep_wide2", "size": (70, 36), "meta": {"clip_similarity": 0.50, "punsafe": 0.0, "bucket": wide}},
        {"key": "keep_tall1", "size": (32, 64), "meta": {"clip_similarity": 0.31, "punsafe": 0.3, "bucket": tall}},
        {"key": "keep_tall2", "size": (32, 64), "meta": {"clip_similarity": 0.90, "punsafe": 0.1, "bucket": tall}},
        {"key": "drop_clip", "size": (64, 64), "meta": {"clip_similarity": 0.10, "punsafe": 0.0}},
        {"key": "drop_unsafe", "size": (64, 64), "meta": {"clip_similarity": 0.90, "punsafe": 0.9}},
        {"key": "drop_small", "size": (40, 20), "meta": {"clip_similarity": 0.90, "punsafe": 0.0}},
        {"key": "broken", "size": (64, 64), "meta": {"clip_similarity": 0.90, "punsafe": 0.0}, "corrupt": True},
    ]
    write_shard(tmp_path / "00000.tar", specs)
    cfg = load_train_config(train_config(
        tmp_path / "t.yaml", tmp_path, tmp_path / "out", data__workers=0, data__min_clip_similarity=0.3,
        data__max_punsafe=0.5, data__min_size=30, data__shuffle_buffer=4))
    stream = iter(training_stream(cfg.data, shard_urls(cfg.data.shards), 2, seed=1, vae_fingerprint="none"))
    seen, shapes = set(), {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            batch = next(stream)
            assert set(batch) == {"pixels", "captions", "keys"}, batch
            seen.update(batch["keys"])
            kinds = {k.rsplit("_", 1)[-1].rstrip("12") for k in batch["keys"]}
            assert len(kinds) == 1, batch["keys"]  # one bucket per batch
            shapes[kinds.pop()] = tuple(batch["pixels"].shape)
    assert seen == {s["key"] for s in specs if s["key"].startswith("keep")}
    assert shapes == {"square": (2, 3, 32, 32), "wide": (2, 3, 32, 64), "tall": (2, 3, 64, 32)}
    assert any("broken" in str(w.message) or "cannot identify" in str(w.message) for w in caught)

    # A rule on a field the shards lack is an error, not an empty stream.
    cfg.data.max_punsafe = None
    write_shard(tmp_path / "00000.tar", [{"key": "a", "size": (40, 40)}])
    with pytest.raises(DataError, match="no clip_similarity") as info:
        next(iter(training_stream(cfg.data, shard_urls(cfg.data.shards), 2, seed=1, vae_fingerprint="none")))
    assert isinstance(info.value, UserError) and str(info.value).endswith("00000.tar: a)")

    # So is a required cached latent that is not there.
    cfg.data.min_clip_similarity, cfg.data.latents = None, "required"
    with pytest.raises(DataError, match=r"data.latents is required but the cached latent of a \(.*\) does not fit: it has none"):
        next(iter(training_stream(cfg.data, shard_urls(cfg.data.shards), 2, seed=1, vae_fingerprint="none")))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_objective_targets_follow_ddpm(prediction_type):
    """A predictor that knows x0 and answers exactly what DDPM asks for (ε, or v = √ᾱ·ε − √(1−ᾱ)·x0)
    has zero loss, noise offset and Min-SNR weighting included; one that answers zeros does not."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from curate.train.model import SD_SCHEDULE
    from curate.train.objective import snr_weights

    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    x0, embeddings = torch.randn(6, 4, 8, 8), torch.zeros(6, 77, 32)
    alpha_bar = scheduler.alphas_cumprod

    def oracle(x_t, t, _):
        a = alpha_bar[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return type("Out", (), {"sample": eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0})

    def zeros(x_t, t, _):
        return type("Out", (), {"sample": torch.zeros_like(x_t)})

    options = dict(noise_offset=0.1, snr_gamma=5.0)
    assert diffusion_loss(oracle, scheduler, x0, embeddings, torch.Generator().manual_seed(0), **options) < 1e-6
    assert diffusion_loss(zeros, scheduler, x0, embeddings, torch.Generator().manual_seed(0), **options) > 0.05
    t = torch.arange(0, 1000, 37)
    snr = compute_snr(scheduler, t)  # diffusers' own SNR, as its training scripts weight with it
    expected = torch.clamp(snr, max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    torch.testing.assert_close(snr_weights(scheduler, t, 5.0), expected.float())
