"""Tests for filters/: keep or drop with a Rejection, per-reason counts, chain order, config errors."""

from __future__ import annotations

from typing import ClassVar

import pytest

from curate.filters import FILTERS, Filter, FilterConfigError, Rejection, apply_chain, build_chain, build_stage_chain
from curate.filters.caption import CaptionLength


def sample(caption):
    return {"key": "0000000000", "jpg": b"", "caption": caption, "meta": {}}


def reason_of(rejection):
    """The counted reason of a Rejection, None for a kept sample."""
    return None if rejection is None else rejection.reason


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
    assert reason_of(f(sample(caption))) == reason


def test_caption_length_checks_words_before_chars():
    f = CaptionLength(min_words=2, min_chars=100)
    assert reason_of(f(sample("one"))) == "caption_too_short: <2 words"
    assert reason_of(f(sample("one two"))) == "caption_too_short: <100 chars"


@pytest.mark.parametrize(
    "params, caption, metric, value, threshold",
    [
        ({"min_words": 3}, "two words", "words", 2, 3),
        ({"max_words": 3}, "one two three four", "words", 4, 3),
        ({"min_chars": 10}, "short", "chars", 5, 10),
        ({"max_chars": 10}, "a caption longer than ten", "chars", 25, 10),
    ],
)
def test_caption_length_rejection_carries_the_measure(params, caption, metric, value, threshold):
    rejection = CaptionLength(**params)(sample(caption))
    assert (rejection.filter, rejection.metric, rejection.value, rejection.threshold) == (
        "caption_length", metric, value, threshold)
    columns = rejection.columns()
    assert columns["reject_metric"] == metric and columns["reject_value"] == float(value)
    assert columns["reason"] == rejection.reason and columns["status"] == "filtered"


def test_caption_length_drops_some_and_keeps_others_with_counts():
    f = CaptionLength(min_words=2, max_words=4)
    captions = ["a red circle", "blue", "", "one two three four five", "two squares", None]
    reasons = [reason_of(f(sample(c))) for c in captions]
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
    """Test filter: drops captions of odd length, on the metric "chars"."""

    name: ClassVar[str] = "even_length"

    def keep(self, s):
        caption = s["caption"]
        if len(caption) % 2:
            return self.reject("odd_length", "chars", len(caption))
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
    for caption in ["ab", "abc", "abcd", "a", "xyz", "abcdef"]:
        f(sample(caption))
    assert f.counts == {"kept": 3, "dropped: odd_length": 3}


def test_reject_names_the_filter():
    assert EvenLength()(sample("abc")) == Rejection("odd_length", filter="even_length", metric="chars", value=3)


class Answers(Filter):
    """Test filter answering whatever its caption names."""

    name: ClassVar[str] = "answers"

    def keep(self, s):
        return {"rejection": Rejection("made_by_hand"), "false": False, "tuple": (False, "old_form")}[s["caption"]]


def test_a_rejection_made_by_hand_gets_the_filter_name():
    f = Answers()
    assert f(sample("rejection")) == Rejection("made_by_hand", filter="answers")
    assert f.counts == {"dropped: made_by_hand": 1}


@pytest.mark.parametrize("caption", ["false", "tuple"])
def test_keep_answers_true_or_a_rejection_only(caption):
    f = Answers()
    with pytest.raises(TypeError, match="filter answers: keep\\(\\) must return True or a Rejection"):
        f(sample(caption))
    assert f.counts == {}


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

    assert reason_of(apply_chain(chain, sample("one"))) == "caption_too_short: <2 words"
    assert apply_chain(chain, sample("odd one")) == Rejection("odd_length", filter="even_length", metric="chars", value=7)
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
    assert reason_of(apply_chain(chain, sample("hello world"))) == "caption_too_long: >5 chars"


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


# --- order within a stage ----------------------------------------------------------------------


def test_cleaning_then_safety_then_the_rest_whatever_the_yaml_order():
    specs = [
        {"name": "caption_length", "min_words": 2},
        {"name": "caption_blocklist", "words": ["bad"]},
        {"name": "caption_clean"},
        {"name": "url_blocklist", "domains": ["blocked.example"]},
    ]
    chain = build_stage_chain(specs, "row")
    assert [f.name for f in chain] == ["caption_clean", "caption_blocklist", "url_blocklist", "caption_length"]
    # A one-word unsafe caption is rejected for safety, not for its length: its reason is what
    # keeps it out of the report.
    sample = {"key": "k", "url": "http://ok.example/a.jpg", "caption": "bad", "meta": {}}
    rejections = [f(sample) for f in chain]
    assert rejections[1].reason == "unsafe: caption_blocklist"


# --- clip_similarity and declared score fields -----------------------------------------------


def test_clip_similarity_rejection_carries_the_score_and_threshold():
    from curate.filters.clip import ClipSimilarity

    f = ClipSimilarity(min_similarity=0.28)
    rejection = f({"key": "0", "meta": {"clip_similarity": 0.21}})
    assert rejection == Rejection("clip_similarity<0.28", filter="clip_similarity", metric="clip_similarity",
                                  value=0.21, threshold=0.28)
    assert f({"key": "1", "meta": {"clip_similarity": 0.28}}) is None
    assert f.counts == {"dropped: clip_similarity<0.28": 1, "kept": 1}


def test_score_fields_are_declared_per_filter():
    from curate.filters import score_fields

    # The score stage writes clip_similarity; the filter only reads it.
    chain = build_chain([{"name": "caption_length", "min_words": 2}, {"name": "clip_similarity", "min_similarity": 0.2},
                         {"name": "caption_language", "languages": ["en"]}])
    assert [f.score_fields() for f in chain] == [[], [], ["language_score"]]
    assert score_fields(chain + chain) == ["language_score"]  # each once
