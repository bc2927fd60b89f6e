"""CLIP's tokenizer without the internet.

Stable Diffusion 1.x conditions on OpenAI CLIP ViT-L/14's text encoder, whose tokenizer is
CLIP's byte-level BPE (49,408 tokens, 77 positions). Its files (vocab.json, merges.txt)
normally come from the hub; open_clip ships the same BPE merges inside its package
(`bpe_simple_vocab_16e6.txt.gz`). The vocabulary follows from the merges exactly as
open_clip's SimpleTokenizer builds it: the 256 byte-characters, the same with `</w>`,
one token per merge, then the two special tokens. So a checkpoint without a tokenizer
folder, or a machine without internet, still gets the real tokenizer.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from functools import lru_cache

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

# CLIP's BPE has 49152 - 256 - 2 merges; the file has a header line and a few more lines.
N_MERGES = 49152 - 256 - 2
MAX_LENGTH = 77  # CLIP's text context, as in Stable Diffusion's tokenizer_config.json


@lru_cache(maxsize=1)
def clip_bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of CLIP's BPE, built from the merges file open_clip ships."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    # open_clip names these <start_of_text>/<end_of_text>; OpenAI's and the hub's files
    # use the names below. The ids (49406, 49407) are what matters, and they agree.
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, [" ".join(m) for m in merges]


def write_clip_tokenizer(folder: str, pad_token: str = "<|endoftext|>") -> None:
    """Write the hub's file layout (vocab.json, merges.txt, tokenizer_config.json) into `folder`."""
    vocab, merges = clip_bpe_vocab()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"model_max_length": MAX_LENGTH, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": pad_token, "do_lower_case": True}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)


# SDXL's second tokenizer (tokenizer_2/, for the OpenCLIP bigG text encoder) is the same BPE
# padding with "!" (id 0), as OpenCLIP pads with zeros.
SDXL_PAD_TOKEN_2 = "!"


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Stable Diffusion 1.x's CLIPTokenizer, built offline (pads with <|endoftext|>, 77 tokens);
    pad_token="!" gives SDXL's tokenizer_2."""
    # Through files rather than constructor arguments: the one loading path every
    # transformers version has (the constructor's arguments changed in 5.0).
    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer(folder, pad_token)
        return CLIPTokenizer.from_pretrained(folder)


def has_tokenizer(folder: str, subfolder: str = "tokenizer") -> bool:
    return os.path.isfile(os.path.join(folder, subfolder, "vocab.json"))
