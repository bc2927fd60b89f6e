"""The fast text path computes exactly what open_clip computes."""

import random

import open_clip
import pytest
import torch

from curate.pipeline.models.clip import TINY_CLIP, load_clip
from curate.pipeline.models.clip_text import FastClipTokenizer, can_trim_text, encode_text_trimmed, fast_tokenizer, trim_tokens
from curate.pipeline.demo.synthetic import caption, random_scene

AWKWARD = [
    "Café crème brûlée — “quoted” text", "&amp; Tom &amp;amp; Jerry", "A  long\ttext\nwith spaces",
    "日本語のテキスト 東京", "emoji 😀🎉 party!!!", "IMG_1234.JPG", "", "   ", "don't stop we're it's",
    "x" * 500, "word " * 200, "Ünïcödé ÀÉÎ", "cafÃ© mojibake", "\x00ctrl\x07chars", "<start_of_text> hi",
    "123456 7.5% $40", "<b>bold</b> &lt;tag&gt;", "Straße ǅ ﬁ ligature",
]


@pytest.fixture(scope="module")
def simple():
    return open_clip.get_tokenizer("ViT-B-32")


def test_same_ids_as_open_clip(simple):
    rng = random.Random(0)
    texts = [caption(random_scene(rng)) for _ in range(300)] + AWKWARD
    fast = fast_tokenizer(simple)
    assert isinstance(fast, FastClipTokenizer)
    assert torch.equal(fast(texts), simple(texts))
    assert torch.equal(fast(texts, context_length=16), simple(texts, context_length=16))
    # A second call answers from the word cache: still the same ids.
    assert torch.equal(fast(texts), simple(texts))


def test_other_tokenizers_are_left_alone():
    class NotSimple:
        pass

    other = NotSimple()
    assert fast_tokenizer(other) is other


def test_trimmed_text_tower_equals_full(simple):
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    assert can_trim_text(model)
    tokens = simple(["a red circle", "four blue squares at the top of a white background", "x"])
    trimmed = trim_tokens(tokens)
    assert trimmed.shape[1] < tokens.shape[1]
    assert (trimmed[:, -1] != 0).any()  # nothing but padding was cut
    with torch.no_grad():
        full = model.encode_text(tokens, normalize=True)
        fast = encode_text_trimmed(model, trimmed)
    assert torch.allclose(full, fast, atol=1e-5)


def test_tiny_clip_uses_the_fast_path():
    clip = load_clip(TINY_CLIP, None, "cpu", "fp32")
    assert isinstance(clip.tokenizer, FastClipTokenizer) and clip.trim_text
    tokens = clip.tokenizer(["two green triangles on a black background"])
    prepared = clip.prepare_tokens(tokens)
    assert prepared.shape[1] < tokens.shape[1]  # cut on the CPU, before the copy to the device
    with torch.no_grad():
        assert torch.allclose(clip.encode_text(prepared), clip.model.encode_text(tokens, normalize=True), atol=1e-5)


@pytest.mark.parametrize("size", [224, 230])  # 230: the conv drops the 6 pixels past the last whole patch
def test_patch_embedding_as_matmul_equals_the_convolution(size):
    from curate.pipeline.models.clip import PatchEmbedMatmul

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    pixels = torch.randn(3, 3, 224, 224)
    conv = model.visual.conv1
    assert PatchEmbedMatmul.applies_to(conv)
    with torch.no_grad():
        x = torch.randn(2, 3, size, size)
        assert torch.allclose(PatchEmbedMatmul.module(conv)(x), conv(x), atol=1e-4)
        before = model.encode_image(pixels, normalize=True)
        model.visual.conv1 = PatchEmbedMatmul.module(conv)
        after = model.encode_image(pixels, normalize=True)
    assert torch.allclose(before, after, atol=1e-5)
    assert not PatchEmbedMatmul.applies_to(torch.nn.Conv2d(3, 8, 3, stride=1))
    assert not PatchEmbedMatmul.applies_to(torch.nn.Conv2d(3, 8, 4, stride=4, bias=True))
