"""Caption rules: clean the text, then drop captions that cannot teach a model anything.

All of them are "row" filters: they need no image, so a row they drop is never
downloaded, and the caption they leave is the one written beside the image.
"""

from __future__ import annotations

import functools
import html
import re
from typing import Optional

from pydantic import Field, PrivateAttr, field_validator

from curate.filters.base import CLEANING, Decision, Filter


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
            return self.reject(f"caption_too_short: <{self.min_words} words", "words", words, self.min_words)
        if self.max_words is not None and words > self.max_words:
            return self.reject(f"caption_too_long: >{self.max_words} words", "words", words, self.max_words)
        if len(caption) < self.min_chars:
            return self.reject(f"caption_too_short: <{self.min_chars} chars", "chars", len(caption), self.min_chars)
        if self.max_chars is not None and len(caption) > self.max_chars:
            return self.reject(f"caption_too_long: >{self.max_chars} chars", "chars", len(caption), self.max_chars)
        return True

    def thresholds(self) -> list[tuple[str, float]]:
        limits = [("words", self.min_words or None), ("words", self.max_words),
                  ("chars", self.min_chars or None), ("chars", self.max_chars)]
        return [(metric, float(t)) for metric, t in limits if t is not None]

    def measures(self, sample) -> dict[str, float]:
        caption = sample.get("caption") or ""
        return {"words": float(len(caption.split())), "chars": float(len(caption))}


# A tag starts with a letter, "/" or "!" right after "<", so "a < b > c" is left alone.
_HTML_TAG = re.compile(r"<(?:[A-Za-z/!][^<>]*)>")
# Invisible characters that split.() does not count as space but that break word matching.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u2060\ufeff\u00ad"))


def clean_caption(text: str) -> str:
    """Fix mojibake, strip HTML tags and entities, collapse whitespace.

    >>> clean_caption("<b>caf\u00c3\u00a9</b> &amp;  bar")
    'café & bar'
    """
    import ftfy  # imported here: only runs that configure caption_clean pay for it

    text = ftfy.fix_text(text)
    # Twice: alt text scraped from HTML is often escaped twice ("&amp;lt;b&amp;gt;").
    for _ in range(2):
        text = _HTML_TAG.sub(" ", html.unescape(text))
    return " ".join(text.translate(_INVISIBLE).split())


class CaptionClean(Filter):
    """Rewrite the caption: fix mojibake (ftfy), strip HTML, collapse whitespace.

    Drops only a caption that is empty after cleaning ("caption_empty"); put it before
    the other caption rules so they judge the cleaned text.
    """

    name = "caption_clean"

    priority = CLEANING
    stage = "row"

    def keep(self, sample) -> Decision:
        sample["caption"] = clean_caption(sample.get("caption") or "")
        return True if sample["caption"] else self.reject("caption_empty")


# Alt text that names a file or a placeholder instead of describing the image.
_FILE_NAME = re.compile(r"[\w\-.() ]+\.(jpe?g|png|gif|webp|bmp|tiff?|heic|avif|svg)", re.I)
# Camera and phone file stems: IMG_1234, DSC0001, DSC_0001, P1010001, PXL_20230101_123456789,
# IMG-20230101-WA0001, "IMG_1234 (2)".
_CAMERA_NAME = re.compile(r"((img|dsc[nf]?|dcim|pxl|mvimg|gopr)[_\- ]?\d[\w\-]*|p\d{7})( ?\(\d+\))?", re.I)
_NUMBERS_ONLY = re.compile(r"[\d\s.,:;_\-/#()]+")
_URL = re.compile(r"(https?://|www\.)\S+", re.I)
# Placeholder words, compared after dropping trailing numbering ("Image 3", "untitled-1").
BOILERPLATE_WORDS = frozenset({
    "image", "images", "img", "photo", "photos", "picture", "pictures", "pic", "pics", "thumbnail",
    "thumb", "default", "untitled", "placeholder", "no image", "image not found", "no photo",
    "image unavailable", "photo unavailable", "unnamed", "null", "none", "undefined", "n/a",
    "blank", "file", "logo", "icon", "banner", "avatar", "screenshot",
})
_TRAILING_NUMBERING = re.compile(r"[\s\d_\-.()#:]+$")


class CaptionBoilerplate(Filter):
    """Drop alt text that is a file name, a camera file stem, a URL, a bare number or a
    placeholder word ("image", "untitled", "photo", ...). `patterns`: extra regular
    expressions, each matched against the whole caption, case-insensitively."""

    name = "caption_boilerplate"
    stage = "row"
    patterns: list[str] = Field(default_factory=list)

    _compiled: list[re.Pattern] = PrivateAttr(default_factory=list)

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"{p!r} is not a regular expression ({exc})") from None
        return patterns

    def model_post_init(self, context) -> None:
        self._compiled = [_FILE_NAME, _CAMERA_NAME, _NUMBERS_ONLY, _URL]
        self._compiled += [re.compile(p, re.I) for p in self.patterns]

    def keep(self, sample) -> Decision:
        caption = (sample.get("caption") or "").strip()
        if not caption:
            return True  # an empty caption is caption_clean's or caption_length's to judge
        if any(p.fullmatch(caption) for p in self._compiled):
            return self.reject("caption_boilerplate")
        if _TRAILING_NUMBERING.sub("", caption).casefold() in BOILERPLATE_WORDS:
            return self.reject("caption_boilerplate")
        return True


@functools.lru_cache(maxsize=None)
def language_identifier():
    """py3langid's model, shipped inside its package (nothing is downloaded); once per process."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class CaptionLanguage(Filter):
    """Keep captions detected (py3langid, 97 languages) as one of `languages` (ISO 639-1
    codes) with probability ≥ `min_confidence`; otherwise drop as
    "caption_language: <detected>", where a detection below `min_confidence` is "und".

    Short captions give uncertain detections ("a cat" is not confidently anything), so a
    high `min_confidence` also drops short captions in the wanted language. The detected
    language and its probability are written to the json as `language`, `language_score`.
    """

    name = "caption_language"
    stage = "row"
    languages: list[str] = Field(min_length=1)
    min_confidence: float = Field(0.5, ge=0, le=1)

    @field_validator("languages")
    @classmethod
    def _known(cls, languages: list[str]) -> list[str]:
        known = set(language_identifier().labels)
        unknown = [code for code in languages if code not in known]
        if unknown:
            raise ValueError(f"unknown language code(s) {unknown}; known: {', '.join(sorted(known))}")
        return languages

    def keep(self, sample) -> Decision:
        language, score = language_identifier().classify(sample.get("caption") or "")
        sample["meta"]["language"], sample["meta"]["language_score"] = language, round(score, 4)
        detected = language if score >= self.min_confidence else "und"
        if detected in self.languages:
            return True
        # A confident detection of another language is not a threshold decision; "und" is.
        if detected == "und":
            return self.reject("caption_language: und", "language_score", score, self.min_confidence)
        return self.reject(f"caption_language: {detected}")

    def score_fields(self) -> list[str]:
        return ["language_score"]

    def thresholds(self) -> list[tuple[str, float]]:
        return [("language_score", self.min_confidence)]
