"""Drop captions that repeat one word over and over: SEO alt text such as "shoes shoes cheap
shoes shoes sale". Such a caption teaches a text-to-image model little about its image; the
Gopher rules for web text (Rae et al., 2021) drop documents by the same kind of measure.

    - name: caption_repetition
      max_word_fraction: 0.4     # the most frequent word may be at most 40% of the words
      min_words: 4               # shorter captions are never judged ("a cat, a cat" is fine)

The reason is "caption_repetition>0.4", with metric `repeated_word_fraction`: the share of
the caption's words (case-folded) taken by its most frequent word.
"""

from __future__ import annotations

import re
from collections import Counter

from pydantic import Field

from curate.filters.base import Decision, Filter

_WORD = re.compile(r"\w+")


def repeated_word_fraction(caption: str) -> tuple[float, int]:
    """(share of the most frequent word among the words, number of words) of a caption."""
    words = _WORD.findall(caption.casefold())
    if not words:
        return 0.0, 0
    return Counter(words).most_common(1)[0][1] / len(words), len(words)


class CaptionRepetition(Filter):
    """Drop captions whose most frequent word is more than `max_word_fraction` of their words."""

    name = "caption_repetition"
    stage = "row"  # needs no image: rows it drops are never downloaded
    max_word_fraction: float = Field(0.4, gt=0, le=1)
    min_words: int = Field(4, ge=1)

    def keep(self, sample) -> Decision:
        fraction, words = repeated_word_fraction(sample.get("caption") or "")
        if words >= self.min_words and fraction > self.max_word_fraction:
            return self.reject(f"caption_repetition>{self.max_word_fraction:g}", "repeated_word_fraction",
                               round(fraction, 4), self.max_word_fraction)
        return True

    def thresholds(self) -> list[tuple[str, float]]:
        return [("repeated_word_fraction", self.max_word_fraction)]

    def measures(self, sample) -> dict[str, float]:
        fraction, words = repeated_word_fraction(sample.get("caption") or "")
        return {"repeated_word_fraction": round(fraction, 4)} if words >= self.min_words else {}
