"""The text side of CLIP scoring, made fast without changing its result.

- `FastClipTokenizer`: the token ids of open_clip's `SimpleTokenizer` (CLIP's BPE), computed
  by Hugging Face `tokenizers` (Rust, no GIL) instead of pure Python. open_clip's tokenizer
  runs ftfy and a Python BPE per caption, about 7,000 captions/s on one core, which alone
  capped the score stage far below the GPU's speed. Same vocabulary and merges (taken from
  the open_clip tokenizer object itself), same pre-tokenizing regex, same truncation.
  Captions that are not plain printable ASCII still go through open_clip's own cleaning
  (ftfy + HTML unescape) in Python first, so only the common case takes the shortcut.
- `encode_text_trimmed`: CLIP's text tower on tokens cut to the longest caption of the
  batch instead of the full 77 positions. With a causal mask and the end-of-text token
  pooled, positions after it never influence the result, so this is the same computation
  minus the padding (LAION captions are ~20 tokens: ~3× less text work).
"""

from __future__ import annotations

import html

import numpy as np

# open_clip's pre-tokenizer pattern (SimpleTokenizer.pat, without its special-token alternatives).
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


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
        from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE

        merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
        bpe = BPE(vocab=dict(simple.encoder), merges=merges, continuing_subword_prefix="",
                  end_of_word_suffix="</w>", fuse_unk=False)
        tok = Tokenizer(bpe)
        # Cleaning (lower case, whitespace) is done in _clean; the split and the byte-to-unicode
        # mapping are SimpleTokenizer's.
        tok.normalizer = normalizers.Sequence([])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        sot, eot = simple.decoder[simple.sot_token_id], simple.decoder[simple.eot_token_id]
        # SimpleTokenizer also matches its special tokens inside caption text.
        tok.add_special_tokens([AddedToken(sot, normalized=False), AddedToken(eot, normalized=False)])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{sot} $A {eot}",
            special_tokens=[(sot, simple.sot_token_id), (eot, simple.eot_token_id)],
        )
        self._tok = tok
        self._eot = simple.eot_token_id
        self.context_length = simple.context_length

    def __call__(self, texts, context_length: int | None = None):
        import torch

        if isinstance(texts, str):
            texts = [texts]
        n_ctx = context_length or self.context_length
        self._tok.enable_truncation(max_length=n_ctx)  # keeps room for both special tokens
        self._tok.enable_padding(length=n_ctx, pad_id=0)
        encoded = self._tok.encode_batch([_clean(t) for t in texts])
        out = np.array([e.ids for e in encoded], dtype=np.int64).reshape(len(texts), n_ctx)
        return torch.from_numpy(out)


def fast_tokenizer(tokenizer):
    """A FastClipTokenizer standing in for `tokenizer` when it is a plain open_clip
    SimpleTokenizer (lower-case cleaning, truncation) and `tokenizers` is installed;
    otherwise the tokenizer itself."""
    try:
        from open_clip.tokenizer import SimpleTokenizer, _clean_lower
    except ImportError:
        return tokenizer
    if type(tokenizer) is not SimpleTokenizer or tokenizer.reduction_fn is not None:
        return tokenizer
    if tokenizer.clean_fn is not _clean_lower:
        return tokenizer
    try:
        return FastClipTokenizer(tokenizer)
    except ImportError:
        return tokenizer


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
