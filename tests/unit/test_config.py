"""Tests for pipeline.config: YAML in, typed config out, every mistake named by its key path."""

from __future__ import annotations

import math

import pytest
import yaml

from curate.pipeline.config import RunConfig, apply_override, dump_config, load_config
from curate.pipeline.errors import UserError


def _write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _minimal(**sections):
    data = {"input": {"paths": ["urls.parquet"]}, "output": {"path": "out"}}
    for name, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(name, {}).update(values)
        else:
            data[name] = values
    return data


def test_minimal_config_gets_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, _minimal()))
    assert cfg.input.paths == ["urls.parquet"]
    assert cfg.input.url_col == "URL" and cfg.input.caption_col == "TEXT"
    assert cfg.download.allow_private_addresses is False
    assert cfg.download.timeout == 10.0
    assert (cfg.resize.size, cfg.resize.mode, cfg.resize.upscale, cfg.resize.quality) == (512, "keep_ratio", False, 95)
    assert cfg.download.max_image_area == 89_478_485
    assert cfg.filters == []


def test_single_path_string_becomes_list(tmp_path):
    data = _minimal()
    data["input"]["paths"] = "one.csv"
    assert load_config(_write(tmp_path, data)).input.paths == ["one.csv"]


def test_unknown_key_names_its_path(tmp_path):
    path = _write(tmp_path, _minimal(download={"timout": 5}))
    with pytest.raises(UserError) as exc:
        load_config(path)
    assert "download.timout: unknown key" in str(exc.value)
    assert str(path) in str(exc.value)


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(UserError, match=r"downlaod: unknown key"):
        load_config(_write(tmp_path, _minimal(downlaod={"timeout": 5})))


def test_wrong_type_names_path_and_expects_a_number(tmp_path):
    with pytest.raises(UserError) as exc:
        load_config(_write(tmp_path, _minimal(download={"timeout": "fast"})))
    message = str(exc.value)
    assert "download.timeout: expected a number" in message
    assert "'fast'" in message


def test_wrong_int_type(tmp_path):
    with pytest.raises(UserError, match=r"input\.rows_per_shard: expected a number"):
        load_config(_write(tmp_path, _minimal(input={"rows_per_shard": "many"})))


def test_wrong_bool_type(tmp_path):
    with pytest.raises(UserError, match=r"download\.allow_private_addresses: expected true or false"):
        load_config(_write(tmp_path, _minimal(download={"allow_private_addresses": "perhaps"})))


def test_out_of_range_value_names_path(tmp_path):
    with pytest.raises(UserError, match=r"input\.rows_per_shard: "):
        load_config(_write(tmp_path, _minimal(input={"rows_per_shard": 0})))


def test_missing_required_section(tmp_path):
    with pytest.raises(UserError, match=r"output: required key missing"):
        load_config(_write(tmp_path, {"input": {"paths": ["a.csv"]}}))


def test_several_errors_on_one_line(tmp_path):
    with pytest.raises(UserError) as exc:
        load_config(_write(tmp_path, _minimal(download={"timout": 1, "retries": "x"})))
    message = str(exc.value)
    assert "\n" not in message
    assert "download.timout: unknown key" in message
    assert "download.retries: expected a number" in message


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_line(tmp_path):
    path = _write(tmp_path, "input:\n  paths: [a.csv\noutput:\n  path: out\n")
    with pytest.raises(UserError) as exc:
        load_config(path)
    assert "not valid YAML" in str(exc.value)
    assert "(line " in str(exc.value)


def test_top_level_not_a_mapping(tmp_path):
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_empty_file_reports_missing_sections(tmp_path):
    with pytest.raises(UserError, match=r"input: required key missing"):
        load_config(_write(tmp_path, ""))


# --- --set overrides ---------------------------------------------------------


def test_apply_override_creates_nested_keys_and_parses_yaml():
    data: dict = {}
    apply_override(data, "download.timeout=2.5")
    apply_override(data, "download.allow_private_addresses=true")
    apply_override(data, "input.paths=[a.csv, b.csv]")
    apply_override(data, "input.caption_col=null")
    apply_override(data, "output.path=")
    assert data == {
        "download": {"timeout": 2.5, "allow_private_addresses": True},
        "input": {"paths": ["a.csv", "b.csv"], "caption_col": None},
        "output": {"path": ""},
    }


def test_apply_override_value_may_contain_equals():
    data: dict = {}
    apply_override(data, "input.url_col=a=b")
    assert data == {"input": {"url_col": "a=b"}}


def test_apply_override_into_list_by_index():
    data = {"filters": [{"name": "caption_length", "min_words": 1}]}
    apply_override(data, "filters.0.min_words=4")
    assert data["filters"][0]["min_words"] == 4


def test_apply_override_without_equals_is_an_error():
    with pytest.raises(UserError, match=r"--set download\.timeout: expected KEY=VALUE"):
        apply_override({}, "download.timeout")


def test_apply_override_through_a_scalar_is_an_error():
    data = {"download": 5}
    with pytest.raises(UserError, match="download is not a section"):
        apply_override(data, "download.timeout.x=1")


def test_load_config_applies_overrides_after_file(tmp_path):
    path = _write(tmp_path, _minimal(download={"timeout": 9}))
    cfg = load_config(
        path,
        overrides=[
            "download.timeout=1.5",
            "input.paths=[x.parquet, y.csv]",
            "resize.size=64",
            "filters=[{name: caption_length, min_words: 2}]",
        ],
    )
    assert cfg.download.timeout == 1.5
    assert cfg.input.paths == ["x.parquet", "y.csv"]
    assert cfg.resize.size == 64
    assert cfg.filter_specs() == [{"name": "caption_length", "min_words": 2}]


def test_override_with_wrong_type_is_validated(tmp_path):
    with pytest.raises(UserError, match=r"download\.timeout: expected a number"):
        load_config(_write(tmp_path, _minimal()), overrides=["download.timeout=soon"])


def test_override_with_unknown_key_is_validated(tmp_path):
    with pytest.raises(UserError, match=r"resize\.imagesize: unknown key"):
        load_config(_write(tmp_path, _minimal()), overrides=["resize.imagesize=64"])


# --- filters -------------------------------------------------------------------


def test_unknown_filter_name(tmp_path):
    data = _minimal(filters=[{"name": "caption_length"}, {"name": "clip_scroe", "threshold": 0.3}])
    with pytest.raises(UserError) as exc:
        load_config(_write(tmp_path, data))
    message = str(exc.value)
    assert "filters.1.name: unknown filter 'clip_scroe'" in message
    assert "caption_length" in message  # the known names are listed


def test_misspelled_filter_parameter(tmp_path):
    data = _minimal(filters=[{"name": "caption_length", "min_word": 3}])
    with pytest.raises(UserError, match=r"filters\.0\.min_word: unknown parameter"):
        load_config(_write(tmp_path, data))


def test_filter_parameter_wrong_type(tmp_path):
    data = _minimal(filters=[{"name": "caption_length", "min_words": "three"}])
    with pytest.raises(UserError, match=r"filters\.0\.min_words: "):
        load_config(_write(tmp_path, data))


def test_filter_without_name(tmp_path):
    data = _minimal(filters=[{"min_words": 3}])
    with pytest.raises(UserError, match=r"filters\.0\.name: required key missing"):
        load_config(_write(tmp_path, data))


# --- dump ----------------------------------------------------------------------


def test_dump_config_round_trips_through_load(tmp_path):
    data = _minimal(
        input={"paths": ["a.parquet", "b.csv.gz"], "extra_cols": ["WIDTH"], "rows_per_shard": 7},
        download={"timeout": 2.5, "allow_private_addresses": True, "disallowed_header_directives": ["noai"]},
        resize={"size": 64, "mode": "center_crop"},
        filters=[{"name": "caption_length", "min_words": 2, "max_chars": 80},
                 {"name": "resolution", "max_aspect_ratio": math.inf}],
    )
    original = load_config(_write(tmp_path, data))
    assert math.isinf(original.filter_specs()[1]["max_aspect_ratio"])
    text = dump_config(original)
    assert ".inf" in text
    again = load_config(_write(tmp_path, text, name="resolved.yaml"))
    assert again == original
    assert math.isinf(again.filter_specs()[1]["max_aspect_ratio"])
    assert again.filter_specs()[0] == {"name": "caption_length", "min_words": 2, "max_chars": 80}


def test_dump_config_round_trips_finite_aspect(tmp_path):
    original = load_config(_write(tmp_path, _minimal(resize={"size": 256, "mode": "buckets", "bucket_max_ratio": 2.5})))
    again = RunConfig.model_validate(yaml.safe_load(dump_config(original)))
    assert again.resize.bucket_max_ratio == 2.5
    assert again == original


# --- retired keys: each is an error that says what replaces it ----------------------------


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"resize": {"image_size": 384}}, "resize.image_size: renamed: use resize.size"),
        ({"resize": {"resize_mode": "center_crop"}}, "resize.resize_mode: renamed: use resize.mode"),
        ({"resize": {"resize_only_if_bigger": True}},
         "resize.resize_only_if_bigger: replaced by resize.upscale, its opposite "
         "(resize_only_if_bigger: true is upscale: false)"),
        ({"resize": {"min_image_size": 64}},
         "resize.min_image_size: moved to the resolution filter: its min_side (filters: - name: resolution)"),
        ({"resize": {"max_aspect_ratio": 3.0}},
         "resize.max_aspect_ratio: moved to the resolution filter: its max_aspect_ratio (filters: - name: resolution)"),
        ({"resize": {"max_image_area": 10_000}}, "resize.max_image_area: moved: use download.max_image_area"),
        ({"resize": {"encode_quality": 90}}, "resize.encode_quality: renamed: use resize.quality"),
        ({"output": {"encode_quality": 90}}, "output.encode_quality: replaced by resize.quality, the one JPEG quality"),
        ({"filters": [{"name": "caption_length"}, {"name": "resize", "size": 256, "mode": "buckets"}]},
         "filters.1: the resize filter is gone: the resize: section sets the output size "
         "(resize.size, resize.mode: buckets)"),
    ],
)
def test_retired_key_says_what_replaces_it(tmp_path, sections, message):
    path = _write(tmp_path, _minimal(**sections))
    with pytest.raises(UserError) as exc:
        load_config(path)
    assert str(exc.value) == f"{path}: {message}"


def test_retired_keys_are_all_named_on_one_line(tmp_path):
    path = _write(tmp_path, _minimal(resize={"image_size": 256, "min_image_size": 64, "size": 256}))
    with pytest.raises(UserError) as exc:
        load_config(path)
    assert str(exc.value) == (f"{path}: resize.image_size: renamed: use resize.size; resize.min_image_size: "
                              "moved to the resolution filter: its min_side (filters: - name: resolution)")


def test_retired_key_given_with_set_is_refused_too(tmp_path):
    with pytest.raises(UserError, match=r"resize\.image_size: renamed: use resize\.size$"):
        load_config(_write(tmp_path, _minimal()), overrides=["resize.image_size=512"])


def test_the_new_keys_load(tmp_path):
    cfg = load_config(_write(tmp_path, _minimal(
        resize={"size": 384, "mode": "buckets", "upscale": True, "bucket_max_ratio": 3.0,
                "interpolation": "lanczos", "quality": 90},
        download={"max_image_area": 50_000_000},
        filters=[{"name": "resolution", "min_side": 64, "max_aspect_ratio": 4}])))
    assert (cfg.resize.size, cfg.resize.mode, cfg.resize.upscale) == (384, "buckets", True)
    assert (cfg.resize.bucket_max_ratio, cfg.resize.interpolation, cfg.resize.quality) == (3.0, "lanczos", 90)
    assert cfg.download.max_image_area == 50_000_000


@pytest.mark.parametrize(
    "resize, message",
    [
        ({"size": 300, "mode": "buckets"}, r"resize\.size: for mode buckets, a multiple of 64 \(got 300\)$"),
        ({"mode": "stretch"}, r"resize\.mode: "),
        ({"interpolation": "nearest"}, r"resize\.interpolation: "),
        ({"quality": 0}, r"resize\.quality: "),
        ({"bucket_max_ratio": 0.5}, r"resize\.bucket_max_ratio: "),
    ],
)
def test_resize_section_errors_name_the_key(tmp_path, resize, message):
    with pytest.raises(UserError, match=message):
        load_config(_write(tmp_path, _minimal(resize=resize)))
