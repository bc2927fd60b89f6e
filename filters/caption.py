"""Caption rules."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from filters.base import Decision, Filter


class CaptionLength(Filter):
    """Drop captions with too few or too many words or characters."""

    name = "caption_length"
    stage = "row"  # needs no image: rows it drops are never downloaded
    min_words: int = Field(0, ge=0)
    max_words: Optional[int] = Field(None, ge=1)
    min_chars: int = Field(0, ge=0)
    max_chars: Optional[int] = Field(None, ge=1)

    def keep(self, sample) -> Decision:
        caption = sample.get("caption") or ""
        words = len(caption.split())
        if words < self.min_words:
            return False, f"caption_too_short: <{self.min_words} words"
        if self.max_words is not None and words > self.max_words:
            return False, f"caption_too_long: >{self.max_words} words"
        if len(caption) < self.min_chars:
            return False, f"caption_too_short: <{self.min_chars} chars"
        if self.max_chars is not None and len(caption) > self.max_chars:
            return False, f"caption_too_long: >{self.max_chars} chars"
        return True
