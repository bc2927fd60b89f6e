"""Tests for filters/: keep or drop with a reason, per-reason counts, chain order, config errors."""

from __future__ import annotations

from typing import ClassVar

import pytest

from curate.filters import FILTERS, Filter, FilterConfigError, apply_chain, build_chain
from curate.filters.caption import CaptionLength


def sample(caption):
    return {"key": "0000000000", "jpg": b"", "caption": caption, "meta": {}}


# --- CaptionLength ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, caption, reason",
    [
        ({"min_words": 3}, "two words", "caption_too_short: <3 words"),
        ({"min_words": 3}, "three whole words", None),
        ({"max_words": 3}, "one two three four", "caption_too_long: >3 words"),
        ({"max_words": 3}, "one two three", None),
        ({"min_chars": 10}, "short", "caption_too_short: <10 chars"),
        ({"min_chars": 5}, "short", None),
        ({"max_chars": 10}, "a caption longer than ten", "caption_too_long: >10 chars"),
        ({"max_chars": 10}, "0123456789", None),
        ({"min_words": 1}, None, "caption_too_short: <1 words"),  # a missing caption is empty
        ({"min_words": 1}, "   \t ", "caption_too_short: <1 words"),
        ({}, None, None),  # no limits: everything is kept
    ],
)
def test_caption_length(params, caption, reason):
    f = CaptionLength(**params)
    assert f(sample(caption)) == reason


def test_caption_length_checks_words_before_chars():
    f = CaptionLength(min_words=2, min_chars=100)
    assert f(sample("one")) == "caption_too_short: <2 words"
    assert f(sample("one two")) == "caption_too_short: <100 chars"


def test_caption_length_drops_some_and_keeps_others_with_counts():
    f = CaptionLength(min_words=2, max_words=4)
    captions = ["a red circle", "blue", "", "one two three four five", "two squares", None]
    reasons = [f(sample(c)) for c in captions]
    assert reasons == [
        None,
        "caption_too_short: <2 words",
        "caption_too_short: <2 words",
        "caption_too_long: >4 words",
        None,
        "caption_too_short: <2 words",
    ]
    assert f.counts == {
        "kept": 2,
        "dropped: caption_too_short: <2 words": 3,
        "dropped: caption_too_long: >4 words": 1,
    }


def test_caption_length_parameters_are_validated():
    with pytest.raises(ValueError):
        CaptionLength(min_words=-1)
    with pytest.raises(ValueError):
        CaptionLength(max_word=3)


# --- the base class ---------------------------------------------------------------------


class EvenLength(Filter):
    """Test filter answering in every form the contract allows."""

    name: ClassVar[str] = "even_length"

    def keep(self, s):
        caption = s["caption"]
        if caption == "bare-false":
            return False
        if caption == "tuple-true":
            return (True, "")
        if len(caption) % 2:
            return False, "odd_length"
        return True


class Recorder(Filter):
    """Keeps everything, remembering what it saw."""

    name: ClassVar[str] = "recorder"
    seen: list = []

    def keep(self, s):
        self.seen.append(s["caption"])
        return True


def test_base_class_counts_kept_and_dropped_per_reason():
    f = EvenLength()
    assert f.counts == {}
    for caption in ["ab", "abc", "abcd", "a", "xyz", "tuple-true"]:
        f(sample(caption))
    assert f.counts == {"kept": 3, "dropped: odd_length": 3}


def test_bare_false_drops_with_the_filter_name():
    f = EvenLength()
    assert f(sample("bare-false")) == "even_length"
    assert f.counts == {"dropped: even_length": 1}


def test_counts_are_per_instance():
    a, b = EvenLength(), EvenLength()
    a(sample("ab"))
    assert a.counts == {"kept": 1}
    assert b.counts == {}


def test_counts_is_a_copy():
    f = EvenLength()
    f(sample("ab"))
    f.counts["kept"] = 100
    assert f.counts == {"kept": 1}


def test_keep_must_be_implemented():
    class Unfinished(Filter):
        name: ClassVar[str] = "unfinished"

    with pytest.raises(NotImplementedError):
        Unfinished()(sample("x"))


# --- apply_chain --------------------------------------------------------------------------


def test_apply_chain_stops_at_the_first_drop():
    first = CaptionLength(min_words=2)
    second = EvenLength()
    third = Recorder(seen=[])
    chain = [first, second, third]

    assert apply_chain(chain, sample("one")) == "caption_too_short: <2 words"
    assert apply_chain(chain, sample("odd one")) == "odd_length"
    assert apply_chain(chain, sample("even one")) is None

    assert first.counts == {"kept": 2, "dropped: caption_too_short: <2 words": 1}
    assert second.counts == {"kept": 1, "dropped: odd_length": 1}  # never saw "one"
    assert third.counts == {"kept": 1}
    assert third.seen == ["even one"]


def test_empty_chain_keeps_everything():
    assert apply_chain([], sample(None)) is None


# --- build_chain ----------------------------------------------------------------------------


def test_registry_names_match_classes():
    assert FILTERS["caption_length"] is CaptionLength
    assert all(cls.name == name for name, cls in FILTERS.items())


def test_build_chain_in_order_with_parameters():
    chain = build_chain([{"name": "caption_length", "min_words": 2}, {"name": "caption_length", "max_chars": 5}])
    assert [type(f) for f in chain] == [CaptionLength, CaptionLength]
    assert chain[0].min_words == 2 and chain[1].max_chars == 5
    assert apply_chain(chain, sample("hello world")) == "caption_too_long: >5 chars"


def test_build_chain_does_not_change_the_specs():
    specs = [{"name": "caption_length", "min_words": 2}]
    build_chain(specs)
    assert specs == [{"name": "caption_length", "min_words": 2}]


def test_build_chain_unknown_filter():
    with pytest.raises(FilterConfigError) as exc:
        build_chain([{"name": "caption_length"}, {"name": "caption_lenght"}])
    known = ", ".join(sorted(FILTERS))
    assert "caption_length" in known
    assert str(exc.value) == f"filters.1.name: unknown filter 'caption_lenght' (known: {known})"


def test_build_chain_missing_name():
    with pytest.raises(FilterConfigError, match=r"^filters\.0\.name: unknown filter None"):
        build_chain([{"min_words": 2}])


def test_build_chain_misspelled_parameter():
    with pytest.raises(FilterConfigError) as exc:
        build_chain([{"name": "caption_length", "min_word": 2}])
    assert str(exc.value) == "filters.0.min_word: unknown parameter"


def test_build_chain_bad_value_names_the_parameter():
    with pytest.raises(FilterConfigError) as exc:
        build_chain([{"name": "caption_length"}, {"name": "caption_length", "max_words": 0, "min_chars": "x"}])
    message = str(exc.value)
    assert "filters.1.max_words: " in message
    assert "filters.1.min_chars: " in message
    assert "\n" not in message
