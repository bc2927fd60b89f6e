"""The rule filters on data whose answer is known: caption cleaning, boilerplate and language,
keyword and URL blocklists, LAION's columns, resolution limits (the output size and aspect
buckets are pipeline/image.py's: tests/unit/test_image.py)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from curate.filters import FILTERS, FilterConfigError, build_chain
from curate.filters.blocklist import CaptionBlocklist, UrlBlocklist, words_of
from curate.pipeline.urls import normalize_host
from curate.filters.caption import CaptionBoilerplate, CaptionClean, CaptionLanguage, clean_caption
from curate.filters.laion import LaionColumns
from curate.filters.resolution import Resolution
from curate.pipeline.config import load_config
from curate.pipeline.errors import UserError
from curate.pipeline.demo.synthetic import caption as scene_caption
from curate.pipeline.demo.synthetic import random_scene


def row(caption="a caption", url="http://example.org/a.jpg", **meta):
    return {"key": "0000000000", "url": url, "caption": caption, "meta": dict(meta)}


def test_every_rule_filter_is_registered_under_its_name():
    for cls in (CaptionClean, CaptionBoilerplate, CaptionLanguage, CaptionBlocklist, UrlBlocklist,
                LaionColumns, Resolution):
        assert FILTERS[cls.name] is cls


# --- caption_clean ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("cafÃ©", "café"),  # UTF-8 read as Latin-1 (mojibake)
        ("The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", "The Mona Lisa doesn't have eyebrows."),
        ("<b>a</b> &amp; b", "a & b"),
        ("&amp;lt;i&amp;gt;twice escaped&amp;lt;/i&amp;gt;", "twice escaped"),
        ('<a href="x.html">link</a><br/>text<!-- note -->', "link text"),
        ("  many \n\t spaces  ", "many spaces"),
        ("zero\u200bwidth", "zerowidth"),
        ("a < b > c", "a < b > c"),  # not a tag: kept
        ("plain caption", "plain caption"),
    ],
)
def test_caption_clean_rewrites_the_caption(raw, clean):
    s = row(raw)
    assert CaptionClean()(s) is None
    assert s["caption"] == clean == clean_caption(raw)


@pytest.mark.parametrize("raw", ["", None, "   ", "<br/><p></p>", "&nbsp;"])
def test_caption_clean_drops_only_captions_left_empty(raw):
    f = CaptionClean()
    assert judge(f, row(raw)) == "caption_empty"
    assert f.counts == {"dropped: caption_empty": 1}


def test_caption_clean_leaves_synthetic_captions_alone():
    rng = random.Random(3)
    for _ in range(50):
        text = scene_caption(random_scene(rng))
        s = row(text)
        CaptionClean()(s)
        assert s["caption"] == text


# --- caption_boilerplate ------------------------------------------------------------------------

BOILERPLATE = [
    "IMG_1234.jpg", "IMG_1234", "img 0042", "DSC0001", "DSC_0001", "DSCN1234", "P1010001",
    "PXL_20230101_123456789", "IMG-20230101-WA0001", "IMG_1234 (2)", "Sunset.JPG", "my file.png",
    "image", "Image 3", "photo", "Photo #2", "untitled", "untitled-1", "picture", "thumbnail",
    "default", "placeholder", "12345", "2023-01-01", "https://example.org/x.jpg", "www.example.org",
]
DESCRIPTIVE = [
    "a photo of a cat", "image of a dog on a beach", "three red circles on a blue background",
    "P-38 Lightning", "Untitled painting by an unknown artist", "picture frame on a wall",
    "2 cats", "Route 66",
]


@pytest.mark.parametrize("caption", BOILERPLATE)
def test_caption_boilerplate_drops_file_names_and_placeholders(caption):
    assert judge(CaptionBoilerplate(), row(caption)) == "caption_boilerplate"


@pytest.mark.parametrize("caption", DESCRIPTIVE)
def test_caption_boilerplate_keeps_descriptions(caption):
    assert CaptionBoilerplate()(row(caption)) is None


def test_caption_boilerplate_extra_patterns_match_the_whole_caption():
    f = CaptionBoilerplate(patterns=[r"stock photo \d+", r"click (here|to enlarge)"])
    assert judge(f, row("Stock Photo 123")) == "caption_boilerplate"
    assert judge(f, row("Click to enlarge")) == "caption_boilerplate"
    assert f(row("a stock photo 123 of a cat")) is None  # whole caption only


def test_caption_boilerplate_bad_pattern_is_a_config_error():
    with pytest.raises(FilterConfigError, match=r"^filters\.0\.patterns: .*not a regular expression"):
        build_chain([{"name": "caption_boilerplate", "patterns": ["(unclosed"]}])


# --- caption_language ---------------------------------------------------------------------------

SENTENCES = {
    "en": "A dog plays in the park with a red ball",
    "de": "Ein Hund spielt im Park mit einem roten Ball",
    "fr": "Un chien joue dans le parc avec une balle rouge",
    "it": "Il gatto dorme sul divano accanto alla finestra",
    "ja": "猫がテーブルの上で寝ている",
}


@pytest.mark.parametrize("language, sentence", sorted(SENTENCES.items()))
def test_caption_language_detects_and_keeps_only_the_wanted(language, sentence):
    english = CaptionLanguage(languages=["en"])
    s = row(sentence)
    reason = judge(english, s)
    assert s["meta"]["language"] == language
    assert s["meta"]["language_score"] >= 0.5
    assert reason == (None if language == "en" else f"caption_language: {language}")
    assert CaptionLanguage(languages=[language, "en"])(row(sentence)) is None


def test_caption_language_uncertain_detection_is_und():
    # Two words are not confidently any language.
    assert judge(CaptionLanguage(languages=["en"], min_confidence=0.5), row("a cat")) == "caption_language: und"
    assert judge(CaptionLanguage(languages=["en"], min_confidence=0.5), row("")) == "caption_language: und"


def test_caption_language_rejections_as_data():
    f = CaptionLanguage(languages=["en"], min_confidence=0.5)
    assert f.score_fields() == ["language_score"]
    # Too uncertain: a threshold decision on the detection's probability.
    s = row("a cat")
    rejection = f(s)
    assert (rejection.filter, rejection.metric, rejection.threshold) == ("caption_language", "language_score", 0.5)
    assert rejection.value < 0.5 and rejection.value == pytest.approx(s["meta"]["language_score"], abs=1e-4)
    # Confidently another language: no threshold was missed.
    rejection = f(row(SENTENCES["de"]))
    assert (rejection.reason, rejection.filter, rejection.metric, rejection.value, rejection.threshold) == (
        "caption_language: de", "caption_language", None, None, None)


def test_caption_language_keeps_every_synthetic_caption_as_english():
    rng = random.Random(4)
    f = CaptionLanguage(languages=["en"])
    for _ in range(100):
        f(row(scene_caption(random_scene(rng))))
    assert f.counts == {"kept": 100}


def test_caption_language_unknown_code_is_a_config_error():
    with pytest.raises(FilterConfigError, match=r"^filters\.0\.languages: .*unknown language code\(s\) \['english'\]"):
        build_chain([{"name": "caption_language", "languages": ["english"]}])
    with pytest.raises(FilterConfigError, match=r"^filters\.0\.languages: "):
        build_chain([{"name": "caption_language", "languages": []}])


def test_caption_language_model_ships_in_its_package_and_needs_no_network():
    # A fresh process in which every socket connect fails: the detector still loads and works.
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network used')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from filters.caption import language_identifier\n"
        "print(language_identifier().classify('Der Hund spielt im Park mit einem Ball')[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "de"


# --- caption_blocklist --------------------------------------------------------------------------


def test_blocked_word_dropped_while_the_same_letters_inside_another_word_kept():
    f = CaptionBlocklist(words=["bad"])
    assert judge(f, row("a bad dog")) == "unsafe: caption_blocklist"
    assert judge(f, row("bad")) == "unsafe: caption_blocklist"
    assert judge(f, row("so bad!")) == "unsafe: caption_blocklist"
    assert judge(f, row("well-bad-ish")) == "unsafe: caption_blocklist"  # hyphens separate words
    for kept in ["a badge", "badminton court", "sinbad", "abbadon", "bath"]:
        assert f(row(kept)) is None, kept
    assert f.counts == {"dropped: unsafe: caption_blocklist": 4, "kept": 5}


@pytest.mark.parametrize("caption", ["BAD", "Bad", "ＢＡＤ", "ｂａｄ dog", "a BaD day"])
def test_blocklist_is_unicode_normalized_and_case_folded(caption):
    assert judge(CaptionBlocklist(words=["bad"]), row(caption)) == "unsafe: caption_blocklist"


def test_blocklist_entries_are_normalized_too():
    f = CaptionBlocklist(words=["ＳＴＲＡßＥ"])  # fullwidth and ß in the list
    assert words_of("ＳＴＲＡßＥ") == ("strasse",)
    assert judge(f, row("die Strasse")) == "unsafe: caption_blocklist"
    assert judge(f, row("die STRASSE")) == "unsafe: caption_blocklist"
    assert f(row("die Straßenbahn")) is None


def test_invisible_characters_and_entities_do_not_split_a_blocked_word():
    f = CaptionBlocklist(words=["bad"])
    for caption in ["b\u200bad photo", "b\u00adad photo", "b\u200dad", "b\u2063ad", "b\u034fad", "&#98;ad", "B&amp;AD"[:0] + "&#x62;AD"]:
        assert f({"caption": caption}).reason == "unsafe: caption_blocklist", caption
    assert f({"caption": "a badge"}) is None


def test_blocklist_phrases_match_whole_words_in_a_row():
    f = CaptionBlocklist(words=["red circle"])
    assert judge(f, row("one red circle on a blue background")) == "unsafe: caption_blocklist"
    assert judge(f, row("one RED  circle")) == "unsafe: caption_blocklist"
    assert f(row("two red circles")) is None
    assert f(row("a circle, red")) is None
    assert f(row("red")) is None


def test_blocklist_rejections_name_the_filter_and_no_threshold():
    for f, sample in ((CaptionBlocklist(words=["bad"]), row("a bad dog")),
                      (UrlBlocklist(domains=["example.org"]), row(url="http://cdn.example.org/1.jpg"))):
        rejection = f(sample)
        assert (rejection.filter, rejection.metric, rejection.value, rejection.threshold) == (f.name, None, None, None)
        assert rejection.is_safety and rejection.columns()["reject_filter"] == f.name
        assert f.score_fields() == []
    # The same rejection answers the download stage's question about a redirect target.
    f = UrlBlocklist(domains=["example.org"])
    assert f.url_rejection("https://example.org/x.jpg") == f(row(url="https://example.org/x.jpg"))
    assert f.url_rejection("https://example.com/x.jpg") is None


def test_blocklist_on_synthetic_captions_drops_exactly_the_captions_with_the_word():
    rng = random.Random(5)
    captions = [scene_caption(random_scene(rng)) for _ in range(300)]
    f = CaptionBlocklist(words=["triangle"])
    dropped = [c for c in captions if f(row(c)) is not None]
    expected = [c for c in captions if "triangle" in c.replace(",", " ").split()]
    assert dropped == expected and 0 < len(expected) < 300
    # Plural "triangles" shares the letters but is another word: those captions are kept.
    assert any("triangles" in c and c not in dropped for c in captions)


def test_blocklist_file_with_comments(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# one entry a line\nbad\n\n  worse word  \n#ignored\n", encoding="utf-8")
    f = CaptionBlocklist(path=str(path), words=["awful"])
    assert judge(f, row("a worse  word")) == "unsafe: caption_blocklist"
    assert judge(f, row("so bad")) == "unsafe: caption_blocklist"
    assert judge(f, row("awful")) == "unsafe: caption_blocklist"
    assert f(row("ignored")) is None
    assert f(row("worse")) is None


def test_blocklist_config_errors(tmp_path):
    with pytest.raises(FilterConfigError, match=r"^filters\.0\.path: .*list file not found"):
        build_chain([{"name": "caption_blocklist", "path": str(tmp_path / "missing.txt")}])
    with pytest.raises(FilterConfigError, match=r"at least one word"):
        build_chain([{"name": "caption_blocklist"}])
    with pytest.raises(FilterConfigError, match=r"^filters\.0\.word: unknown parameter"):
        build_chain([{"name": "caption_blocklist", "word": ["bad"]}])


# --- url_blocklist ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, blocked",
    [
        ("http://example.com/a.jpg", True),
        ("https://cdn.example.com/a.jpg", True),
        ("https://a.b.CDN.Example.COM./a.jpg", True),  # case and the trailing dot of an FQDN
        ("https://example.com:8443/a.jpg", True),
        ("https://user@example.com/a.jpg", True),
        ("http://notexample.com/a.jpg", False),
        ("http://example.com.evil.org/a.jpg", False),
        ("http://example.org/a.jpg", False),
        ("http://other.org/?u=http://example.com/", False),
        ("http://www.bücher.de/x.jpg", True),  # listed as Unicode, matched as IDNA
        ("http://xn--bcher-kva.de/x.jpg", True),
        ("http://192.0.2.7/x.jpg", True),
        ("http://192.0.2.70/x.jpg", False),
        ("http://[2001:db8::1]/x.jpg", True),
    ],
)
def test_url_blocklist_domains_block_themselves_and_their_subdomains(url, blocked):
    f = UrlBlocklist(domains=["example.com", "Bücher.de", "192.0.2.7", "2001:DB8:0::1"])
    assert judge(f, row(url=url)) == ("unsafe: url_blocklist" if blocked else None)


def test_normalize_host():
    assert normalize_host("Bücher.Example.") == "xn--bcher-kva.example"
    assert normalize_host("[2001:DB8::0:1]") == "2001:db8::1"


def test_url_blocklist_prefixes():
    f = UrlBlocklist(prefixes=["https://Images.Example.org/private/"])
    assert judge(f, row(url="https://images.example.org/private/1.jpg")) == "unsafe: url_blocklist"
    assert judge(f, row(url="HTTPS://IMAGES.EXAMPLE.ORG/private/1.jpg")) == "unsafe: url_blocklist"
    assert f(row(url="https://images.example.org/public/1.jpg")) is None
    assert f(row(url="https://images.example.org/Private/1.jpg")) is None  # paths are case-sensitive
    assert f(row(url="http://images.example.org/private/1.jpg")) is None  # another scheme


def test_url_blocklist_file_and_errors(tmp_path):
    path = tmp_path / "domains.txt"
    path.write_text("# blocked hosts\nexample.com\n*.wild.org\n", encoding="utf-8")
    f = UrlBlocklist(path=str(path))
    assert judge(f, row(url="http://x.example.com/1.jpg")) == "unsafe: url_blocklist"
    assert judge(f, row(url="http://a.wild.org/1.jpg")) == "unsafe: url_blocklist"
    assert f(row(url="not a url")) is None  # left to the fetch, which rejects it with its own reason
    with pytest.raises(FilterConfigError, match=r"looks like a URL; list URLs under prefixes"):
        build_chain([{"name": "url_blocklist", "domains": ["http://example.com/x"]}])
    with pytest.raises(FilterConfigError, match=r"is not a URL"):
        build_chain([{"name": "url_blocklist", "prefixes": ["example.com/x"]}])
    with pytest.raises(FilterConfigError, match=r"at least one domain"):
        build_chain([{"name": "url_blocklist"}])


# --- laion_columns ------------------------------------------------------------------------------


def test_laion_punsafe_threshold():
    f = LaionColumns()  # punsafe ≥ 0.5 dropped, pwatermark not checked
    assert judge(f, row(punsafe=0.9)) == "unsafe: laion_punsafe>=0.5"
    assert judge(f, row(punsafe=0.5)) == "unsafe: laion_punsafe>=0.5"
    assert f(row(punsafe=0.49, pwatermark=0.99)) is None
    assert f(row(punsafe=float("nan"))) is None
    assert f(row(punsafe=None)) is None
    assert f(row()) is None
    assert f.counts == {"dropped: unsafe: laion_punsafe>=0.5": 2, "kept": 4, "unchecked: no punsafe": 3}


def test_laion_rejections_carry_the_column_its_value_and_the_threshold():
    f = LaionColumns(punsafe_threshold=0.45, pwatermark_threshold=0.8)
    rejection = f(row(punsafe=0.7, pwatermark=0.1))
    assert (rejection.filter, rejection.metric, rejection.value, rejection.threshold) == (
        "laion_columns", "punsafe", 0.7, 0.45)
    rejection = f(row(punsafe="0.1", pwatermark=0.93))  # a value the reader kept as text
    assert (rejection.metric, rejection.value, rejection.threshold) == ("pwatermark", 0.93, 0.8)
    assert rejection.columns() == {
        "status": "filtered", "reason": "watermark: pwatermark>=0.8", "error_message": None,
        "reject_filter": "laion_columns", "reject_metric": "pwatermark", "reject_value": 0.93, "reject_threshold": 0.8,
    }
    assert f.score_fields() == []  # it judges input columns, it writes none


def test_laion_research_safe_and_watermark_thresholds():
    f = LaionColumns(punsafe_threshold=0.45, pwatermark_threshold=0.8)
    assert judge(f, row(punsafe=0.46, pwatermark=0.1)) == "unsafe: laion_punsafe>=0.45"
    assert judge(f, row(punsafe=0.1, pwatermark=0.8)) == "watermark: pwatermark>=0.8"
    assert f(row(punsafe=0.1, pwatermark=0.79)) is None
    assert f(row(punsafe=0.1, pwatermark=None)) is None
    assert f.counts["unchecked: no pwatermark"] == 1
    watermark_only = LaionColumns(punsafe_threshold=None, pwatermark_threshold=0.5)
    assert watermark_only(row(punsafe=1.0, pwatermark=0.2)) is None
    assert watermark_only.input_columns() == ["pwatermark"]
    with pytest.raises(ValueError, match="check nothing"):
        LaionColumns(punsafe_threshold=None)


def _config(tmp_path, extra_cols, filters):
    data = {"input": {"paths": ["urls.parquet"], "extra_cols": extra_cols}, "output": {"path": "out"},
            "filters": filters}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_laion_columns_without_the_columns_in_extra_cols_is_refused_at_config_time(tmp_path):
    filters = [{"name": "caption_length"}, {"name": "laion_columns", "pwatermark_threshold": 0.8}]
    with pytest.raises(UserError) as exc:
        load_config(_config(tmp_path, ["WIDTH", "punsafe"], filters))
    assert str(exc.value).endswith(
        "filters.1: laion_columns reads input column(s) pwatermark: add them to input.extra_cols")
    assert load_config(_config(tmp_path, ["punsafe", "pwatermark"], filters)).filters[1].name == "laion_columns"


# --- resolution ---------------------------------------------------------------------------------


def sized(width, height, nbytes=50_000):
    """A sample as the download stage gives it to the bytes filters: the fetched bytes and the
    original upright size read from their header (None: the header could not be read)."""
    return {"key": "0", "url": "http://example.org/a.jpg", "caption": "x", "meta": {},
            "data": bytes(nbytes), "sha256": "0" * 64, "original_width": width, "original_height": height}


def judge(f, sample):
    """The reason of the filter's Rejection, or None when it keeps the sample."""
    rejection = f(sample)
    return rejection and rejection.reason


@pytest.mark.parametrize(
    "params, size, reason",
    [
        ({"min_side": 256}, (300, 255), "resolution: side<256"),
        ({"min_side": 256}, (256, 900), None),
        ({"min_area": 100_000}, (300, 300), "resolution: area<100000"),
        ({"min_area": 90_000}, (300, 300), None),
        ({"max_area": 1_000_000}, (1001, 1000), "resolution: area>1000000"),
        ({"max_area": 1_000_000}, (1000, 1000), None),
        ({"max_aspect_ratio": 3}, (301, 100), "resolution: aspect>3"),
        ({"max_aspect_ratio": 3}, (100, 301), "resolution: aspect>3"),
        ({"max_aspect_ratio": 3}, (300, 100), None),
        ({"max_aspect_ratio": 2.5}, (251, 100), "resolution: aspect>2.5"),
    ],
)
def test_resolution_limits(params, size, reason):
    assert judge(Resolution(**params), sized(*size)) == reason


def test_resolution_drops_say_what_they_measured():
    rejection = Resolution(min_side=256)(sized(300, 255))
    assert (rejection.filter, rejection.metric, rejection.value, rejection.threshold) == ("resolution", "side", 255, 256)
    assert rejection.detail == "300x255"  # the row's error_message
    rejection = Resolution(max_aspect_ratio=2.5)(sized(100, 251))
    assert (rejection.metric, rejection.value, rejection.threshold) == ("aspect", 2.51, 2.5)


def test_resolution_min_bytes_and_order():
    f = Resolution(min_side=64, min_bytes=10_000)
    assert judge(f, sized(500, 500, nbytes=9_999)) == "resolution: bytes<10000"
    assert judge(f, sized(500, 500, nbytes=10_000)) is None
    assert judge(f, sized(50, 500, nbytes=1)) == "resolution: side<64"  # sides are checked first


def test_resolution_runs_on_the_header_before_decoding():
    assert Resolution.stage == "bytes"
    # A header that could not be read: the size is unknown, so the image is kept here and the
    # decoder rejects it (decode_error); the bytes rule still applies.
    f = Resolution(min_side=64, max_aspect_ratio=3, min_bytes=100)
    assert judge(f, sized(None, None, nbytes=500)) is None
    assert judge(f, sized(None, None, nbytes=50)) == "resolution: bytes<100"


@pytest.mark.parametrize("name", ["demo.yaml", "laion-subset.yaml"])
def test_shipped_configs_build_their_filter_chains(name):
    cfg = load_config(REPO / "configs" / name)
    by_name = {f.name: f for f in build_chain(cfg.filter_specs())}
    assert "caption_clean" in by_name
    assert by_name["resolution"].min_side == 64 and by_name["resolution"].stage == "bytes"
    assert "resize" not in FILTERS
    assert cfg.resize.mode == "buckets" and cfg.resize.upscale is False
