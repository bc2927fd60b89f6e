"""The rule filters on data whose answer is known: caption cleaning, boilerplate and language,
keyword and URL blocklists, LAION's columns, resolution limits, resize and aspect buckets."""

from __future__ import annotations

import io
import math
import random
import subprocess
import sys

import pytest
import yaml
from PIL import Image, ImageDraw

from curate.filters import FILTERS, FilterConfigError, build_chain
from curate.filters.blocklist import CaptionBlocklist, UrlBlocklist, normalize_host, words_of
from curate.filters.caption import CaptionBoilerplate, CaptionClean, CaptionLanguage, clean_caption
from curate.filters.laion import LaionColumns
from curate.filters.resolution import Resize, Resolution, aspect_buckets, choose_bucket
from curate.pipeline.config import load_config
from curate.pipeline.errors import UserError
from curate.pipeline.demo.synthetic import caption as scene_caption
from curate.pipeline.demo.synthetic import random_scene


def row(caption="a caption", url="http://example.org/a.jpg", **meta):
    return {"key": "0000000000", "url": url, "caption": caption, "meta": dict(meta)}


def test_every_rule_filter_is_registered_under_its_name():
    for cls in (CaptionClean, CaptionBoilerplate, CaptionLanguage, CaptionBlocklist, UrlBlocklist,
                LaionColumns, Resolution, Resize):
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
    assert f(row(raw)) == "caption_empty"
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
    assert CaptionBoilerplate()(row(caption)) == "caption_boilerplate"


@pytest.mark.parametrize("caption", DESCRIPTIVE)
def test_caption_boilerplate_keeps_descriptions(caption):
    assert CaptionBoilerplate()(row(caption)) is None


def test_caption_boilerplate_extra_patterns_match_the_whole_caption():
    f = CaptionBoilerplate(patterns=[r"stock photo \d+", r"click (here|to enlarge)"])
    assert f(row("Stock Photo 123")) == "caption_boilerplate"
    assert f(row("Click to enlarge")) == "caption_boilerplate"
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
    reason = english(s)
    assert s["meta"]["language"] == language
    assert s["meta"]["language_score"] >= 0.5
    assert reason == (None if language == "en" else f"caption_language: {language}")
    assert CaptionLanguage(languages=[language, "en"])(row(sentence)) is None


def test_caption_language_uncertain_detection_is_und():
    # Two words are not confidently any language.
    assert CaptionLanguage(languages=["en"], min_confidence=0.5)(row("a cat")) == "caption_language: und"
    assert CaptionLanguage(languages=["en"], min_confidence=0.5)(row("")) == "caption_language: und"


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
    assert f(row("a bad dog")) == "unsafe: caption_blocklist"
    assert f(row("bad")) == "unsafe: caption_blocklist"
    assert f(row("so bad!")) == "unsafe: caption_blocklist"
    assert f(row("well-bad-ish")) == "unsafe: caption_blocklist"  # hyphens separate words
    for kept in ["a badge", "badminton court", "sinbad", "abbadon", "bath"]:
        assert f(row(kept)) is None, kept
    assert f.counts == {"dropped: unsafe: caption_blocklist": 4, "kept": 5}


@pytest.mark.parametrize("caption", ["BAD", "Bad", "ＢＡＤ", "ｂａｄ dog", "a BaD day"])
def test_blocklist_is_unicode_normalized_and_case_folded(caption):
    assert CaptionBlocklist(words=["bad"])(row(caption)) == "unsafe: caption_blocklist"


def test_blocklist_entries_are_normalized_too():
    f = CaptionBlocklist(words=["ＳＴＲＡßＥ"])  # fullwidth and ß in the list
    assert words_of("ＳＴＲＡßＥ") == ("strasse",)
    assert f(row("die Strasse")) == "unsafe: caption_blocklist"
    assert f(row("die STRASSE")) == "unsafe: caption_blocklist"
    assert f(row("die Straßenbahn")) is None


def test_blocklist_phrases_match_whole_words_in_a_row():
    f = CaptionBlocklist(words=["red circle"])
    assert f(row("one red circle on a blue background")) == "unsafe: caption_blocklist"
    assert f(row("one RED  circle")) == "unsafe: caption_blocklist"
    assert f(row("two red circles")) is None
    assert f(row("a circle, red")) is None
    assert f(row("red")) is None


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
    assert f(row("a worse  word")) == "unsafe: caption_blocklist"
    assert f(row("so bad")) == "unsafe: caption_blocklist"
    assert f(row("awful")) == "unsafe: caption_blocklist"
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
    assert f(row(url=url)) == ("unsafe: url_blocklist" if blocked else None)


def test_normalize_host():
    assert normalize_host("Bücher.Example.") == "xn--bcher-kva.example"
    assert normalize_host("[2001:DB8::0:1]") == "2001:db8::1"


def test_url_blocklist_prefixes():
    f = UrlBlocklist(prefixes=["https://Images.Example.org/private/"])
    assert f(row(url="https://images.example.org/private/1.jpg")) == "unsafe: url_blocklist"
    assert f(row(url="HTTPS://IMAGES.EXAMPLE.ORG/private/1.jpg")) == "unsafe: url_blocklist"
    assert f(row(url="https://images.example.org/public/1.jpg")) is None
    assert f(row(url="https://images.example.org/Private/1.jpg")) is None  # paths are case-sensitive
    assert f(row(url="http://images.example.org/private/1.jpg")) is None  # another scheme


def test_url_blocklist_file_and_errors(tmp_path):
    path = tmp_path / "domains.txt"
    path.write_text("# blocked hosts\nexample.com\n*.wild.org\n", encoding="utf-8")
    f = UrlBlocklist(path=str(path))
    assert f(row(url="http://x.example.com/1.jpg")) == "unsafe: url_blocklist"
    assert f(row(url="http://a.wild.org/1.jpg")) == "unsafe: url_blocklist"
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
    assert f(row(punsafe=0.9)) == "unsafe: laion_punsafe>=0.5"
    assert f(row(punsafe=0.5)) == "unsafe: laion_punsafe>=0.5"
    assert f(row(punsafe=0.49, pwatermark=0.99)) is None
    assert f(row(punsafe=float("nan"))) is None
    assert f(row(punsafe=None)) is None
    assert f(row()) is None
    assert f.counts == {"dropped: unsafe: laion_punsafe>=0.5": 2, "kept": 4, "unchecked: no punsafe": 3}


def test_laion_research_safe_and_watermark_thresholds():
    f = LaionColumns(punsafe_threshold=0.45, pwatermark_threshold=0.8)
    assert f(row(punsafe=0.46, pwatermark=0.1)) == "unsafe: laion_punsafe>=0.45"
    assert f(row(punsafe=0.1, pwatermark=0.8)) == "watermark: pwatermark>=0.8"
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
    return {"key": "0", "jpg": b"", "caption": "x", "meta": {"original_width": width, "original_height": height,
                                                             "bytes": nbytes, "width": width, "height": height}}


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
    assert Resolution(**params)(sized(*size)) == reason


def test_resolution_min_bytes_and_order():
    f = Resolution(min_side=64, min_bytes=10_000)
    assert f(sized(500, 500, nbytes=9_999)) == "resolution: bytes<10000"
    assert f(sized(500, 500, nbytes=10_000)) is None
    assert f(sized(50, 500, nbytes=1)) == "resolution: side<64"  # sides are checked first


# --- resize and aspect buckets ------------------------------------------------------------------


def jpeg(width, height, colour=(30, 120, 200)):
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="JPEG", quality=95)
    return out.getvalue()


def halves(width, height):
    """Left half red, right half blue: shows where a crop took its pixels from."""
    im = Image.new("RGB", (width, height), (220, 30, 30))
    ImageDraw.Draw(im).rectangle((width // 2, 0, width, height), fill=(30, 70, 220))
    out = io.BytesIO()
    im.save(out, format="PNG")  # lossless, so the colour edge is sharp
    return out.getvalue()


def resized(f, data, width=None, height=None):
    s = {"key": "0", "jpg": data, "caption": "x", "meta": {"width": width, "height": height}}
    reason = f(s)
    assert reason is None
    with Image.open(io.BytesIO(s["jpg"])) as im:
        im.load()
        assert im.format == "JPEG" and im.mode == "RGB"
        assert [s["meta"]["width"], s["meta"]["height"]] == list(im.size)
        return s, im.copy()


@pytest.mark.parametrize("size_in", [(640, 480), (480, 640), (1000, 333), (200, 150), (97, 301), (256, 256)])
@pytest.mark.parametrize("interpolation", ["lanczos", "area"])
def test_resize_keep_ratio_keeps_the_aspect_within_a_pixel(size_in, interpolation):
    w, h = size_in
    _, im = resized(Resize(size=256, interpolation=interpolation), jpeg(w, h))
    assert min(im.size) == 256  # small images are enlarged too: every sample at the training size
    long_in, long_out = max(w, h), max(im.size)
    assert abs(long_out - long_in * 256 / min(w, h)) <= 1
    assert (im.width >= im.height) == (w >= h)


@pytest.mark.parametrize("interpolation", ["lanczos", "bicubic", "bilinear", "area"])
def test_resize_center_crop_takes_the_middle(interpolation):
    s, im = resized(Resize(size=128, mode="center_crop", interpolation=interpolation), halves(400, 200))
    assert im.size == (128, 128)
    # 400x200 → 256x128, the middle 128 columns: the red/blue edge is in the middle.
    left, right = im.getpixel((40, 64)), im.getpixel((88, 64))
    assert left[0] > 150 > left[2] and right[2] > 150 > right[0]
    assert "bucket" not in s["meta"]


def test_resize_at_target_size_is_not_reencoded():
    data = jpeg(256, 320)
    s, _ = resized(Resize(size=256), data)
    assert s["jpg"] is data
    s, _ = resized(Resize(size=256, mode="buckets"), jpeg(320, 192))
    assert s["meta"]["bucket"] == [320, 192]


def test_resize_drops_an_image_it_cannot_decode_or_would_make_huge():
    f = Resize(size=64)
    s = {"key": "0", "jpg": b"not an image", "caption": "x", "meta": {}}
    assert f(s) == "decode_error"
    sliver = {"key": "0", "jpg": jpeg(2, 4000), "caption": "x", "meta": {}}
    assert Resize(size=4096)(sliver) == "image_area_too_large"  # 4096 x 8192000 if it were made
    assert Resize(size=4096, mode="center_crop")(sliver) == "image_area_too_large"


def test_aspect_buckets_are_multiples_of_64_with_about_the_target_area():
    assert aspect_buckets(256, 2.0) == ((192, 320), (256, 256), (320, 192))
    assert aspect_buckets(512, 2.0) == ((384, 640), (448, 576), (512, 512), (576, 448), (640, 384))
    for size, ratio in [(512, 2.0), (768, 3.0), (1024, 4.0)]:
        buckets = aspect_buckets(size, ratio)
        assert (size, size) in buckets
        for w, h in buckets:
            assert w % 64 == 0 and h % 64 == 0
            assert 0.75 * size * size <= w * h <= size * size
            assert 1 / ratio <= w / h <= ratio
            assert (h, w) in buckets


@pytest.mark.parametrize(
    "size_in, bucket",
    [
        ((1000, 1000), (512, 512)),
        ((1920, 1080), (640, 384)),  # 16:9 → 5:3, the widest of max_ratio 2
        ((1080, 1920), (384, 640)),
        ((800, 600), (576, 448)),  # 4:3 → 9:7
        ((600, 800), (448, 576)),
        ((3000, 500), (640, 384)),  # beyond max_ratio: the most elongated bucket
        ((300, 280), (512, 512)),
    ],
)
def test_bucket_choice_and_output_size(size_in, bucket):
    assert choose_bucket(*size_in, aspect_buckets(512, 2.0)) == bucket
    s, im = resized(Resize(size=512, mode="buckets", max_ratio=2.0), jpeg(*size_in))
    assert im.size == bucket and s["meta"]["bucket"] == list(bucket)


def test_bucket_choice_is_the_closest_aspect():
    buckets = aspect_buckets(512, 2.0)
    for w, h in [(1000, 700), (500, 900), (640, 641), (1234, 567)]:
        chosen = choose_bucket(w, h, buckets)
        best = min(abs(math.log(bw / bh) - math.log(w / h)) for bw, bh in buckets)
        assert abs(math.log(chosen[0] / chosen[1]) - math.log(w / h)) == best


def test_buckets_crop_only_the_minimal_excess_from_the_centre():
    # 400x600 (2:3) into bucket 192x320 (3:5): scaled to 213x320, 21 columns cropped, about half each side.
    s, im = resized(Resize(size=256, mode="buckets", interpolation="bicubic"), halves(400, 600))
    assert s["meta"]["bucket"] == [192, 320] and im.size == (192, 320)
    red_columns = sum(1 for x in range(im.width) if im.getpixel((x, 160))[0] > 128)
    assert abs(red_columns - 96) <= 2  # the red/blue edge stays in the middle
    # An image of exactly a bucket's aspect loses nothing: both colours reach the borders.
    s, im = resized(Resize(size=256, mode="buckets"), halves(384, 640))
    assert im.size == (192, 320)
    assert im.getpixel((0, 160))[0] > 150 and im.getpixel((191, 160))[2] > 150


def test_resize_config_errors():
    with pytest.raises(FilterConfigError, match=r"^filters\.0\.size: .*required"):
        build_chain([{"name": "resize"}])
    with pytest.raises(FilterConfigError, match=r"multiple of 64"):
        build_chain([{"name": "resize", "size": 300, "mode": "buckets"}])
    with pytest.raises(FilterConfigError, match=r"^filters\.0\.mode: "):
        build_chain([{"name": "resize", "size": 256, "mode": "stretch"}])
    with pytest.raises(FilterConfigError, match=r"^filters\.0\.interpolation: "):
        build_chain([{"name": "resize", "size": 256, "interpolation": "nearest"}])


@pytest.mark.parametrize("name", ["demo.yaml", "laion-subset.yaml"])
def test_shipped_configs_build_their_filter_chains(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / name)
    by_name = {f.name: f for f in build_chain(cfg.filter_specs())}
    assert "caption_clean" in by_name
    assert by_name["resize"].mode == "buckets"
