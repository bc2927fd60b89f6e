"""The text side of CLIP scoring, made fast without changing its result.

- `FastClipTokenizer`: exactly the token ids of open_clip's `SimpleTokenizer` (CLIP's BPE),
  about ten times faster. open_clip runs ftfy on every caption and re-encodes every word
  byte by byte before its BPE cache lookup: about 7,000 captions/s on one core, which alone
  capped the score stage far below the GPU's speed. Here a caption that is plain printable
  ASCII (where ftfy changes nothing) skips ftfy, and each distinct word's ids are cached
  whole, so a caption costs one regex split and a dict lookup per word. Any other caption
  goes through open_clip's own cleaning. The BPE itself is open_clip's (`SimpleTokenizer.bpe`).
  (Hugging Face `tokenizers` was tried first: ~14,000 captions/s on a 16-core host, slower
  than this cache.)
- `encode_text_trimmed`: CLIP's text tower on tokens cut to the longest caption of the
  batch instead of the full 77 positions. With a causal mask and the end-of-text token
  pooled, positions after it never influence the result, so this is the same computation
  minus the padding (LAION captions are ~20 tokens: ~3× less text work).
"""

from __future__ import annotations

import html

import numpy as np

# Distinct words kept in a tokenizer's cache before it is emptied (bounds memory).
WORD_CACHE_SIZE = 500_000


def _clean(text: str) -> str:
    """open_clip's `_clean_lower`, with a shortcut for plain ASCII (where ftfy changes nothing)."""
    if text.isascii() and text.isprintable():
        if "&" in text:
            text = html.unescape(html.unescape(text))
        return " ".join(text.split()).lower()
    from open_clip.tokenizer import _clean_lower

    return _clean_lower(text)


class FastClipTokenizer:
    """Drop-in for an open_clip SimpleTokenizer (`tokenizer(texts) -> LongTensor [n, context]`)."""

    def __init__(self, simple):
        self._simple = simple
        self._words: dict[str, list[int]] = {}
        self.context_length = simple.context_length
        self.sot, self.eot = simple.sot_token_id, simple.eot_token_id

    def _word_ids(self, word: str) -> list[int]:
        ids = self._words.get(word)
        if ids is None:
            s = self._simple
            if len(self._words) >= WORD_CACHE_SIZE:
                self._words.clear()
            symbols = "".join(s.byte_encoder[b] for b in word.encode("utf-8"))
            ids = self._words[word] = [s.encoder[t] for t in s.bpe(symbols).split(" ")]
        return ids

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in self._simple.pat.findall(_clean(text)):
            ids.extend(self._word_ids(word))
        return ids

    def __call__(self, texts, context_length: int | None = None):
        import torch

        if isinstance(texts, str):
            texts = [texts]
        n_ctx = context_length or self.context_length
        out = np.zeros((len(texts), n_ctx), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [self.sot, *self.encode(text)[: n_ctx - 2], self.eot]
            out[i, : len(ids)] = ids
        return torch.from_numpy(out)


def fast_tokenizer(tokenizer):
    """A FastClipTokenizer standing in for `tokenizer` when it is a plain open_clip
    SimpleTokenizer (lower-case cleaning, truncation); otherwise the tokenizer itself."""
    try:
        from open_clip.tokenizer import SimpleTokenizer, _clean_lower
    except ImportError:
        return tokenizer
    if type(tokenizer) is not SimpleTokenizer or tokenizer.reduction_fn is not None:
        return tokenizer
    if tokenizer.clean_fn is not _clean_lower:
        return tokenizer
    return FastClipTokenizer(tokenizer)


def can_trim_text(model) -> bool:
    """True when `encode_text_trimmed` computes exactly what `model.encode_text` does: open_clip's
    CLIP class with a causal mask and end-of-text (argmax) pooling."""
    try:
        from open_clip.model import CLIP
    except ImportError:
        return False
    return (
        isinstance(model, CLIP)
        and getattr(model, "text_pool_type", None) == "argmax"
        and getattr(model, "attn_mask", None) is not None
    )


def trim_tokens(tokens):
    """Cut padding columns: keep up to the last non-zero token of the longest row."""
    nonzero = (tokens != 0).any(dim=0).nonzero()
    length = int(nonzero.max()) + 1 if len(nonzero) else 1
    return tokens[:, :length]


def encode_text_trimmed(model, tokens, normalize: bool = True):
    """`model.encode_text` on padding-trimmed tokens (see module docstring); `tokens` already
    trimmed by `trim_tokens`."""
    import torch.nn.functional as F
    from open_clip.transformer import text_global_pool

    n = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:n].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type)
    if model.text_projection is not None:
        x = model.text_projection(x) if hasattr(model.text_projection, "weight") else x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x
