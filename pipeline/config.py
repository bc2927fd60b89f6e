"""Run configuration: YAML validated into typed models.

Config is data. Every section is a pydantic model that forbids unknown keys,
so a typo is an error that names its path (`download.timout: unknown key`)
instead of a setting silently ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from urllib.parse import urlsplit
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from curate.filters import FILTERS, FilterConfigError, build_chain
from curate.pipeline import storage
from curate.pipeline.errors import UserError
from curate.pipeline.geometry import BUCKET_STEP

# Pillow's own decompression-bomb limit: the default of download.max_image_area.
MAX_IMAGE_AREA = 89_478_485


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(Section):
    """Where the input is: URL lists and how their columns are named, or existing WebDataset /
    img2dataset tar shards (`format: webdataset`, README "Existing shards as input")."""

    # Local paths, globs, or fsspec URLs (s3://, hf://, https://...); for tar shards also brace
    # expansion (shards/{00000..00999}.tar).
    paths: list[str]
    # auto: chosen per file from its suffix (.parquet, .csv, .tsv, .jsonl/.json, optionally .gz);
    # webdataset when every path ends in .tar.
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "webdataset"] = "auto"
    url_col: str = "URL"
    caption_col: Optional[str] = "TEXT"
    # Input columns carried into each sample's json and the shard parquet (LAION's
    # WIDTH, HEIGHT, similarity, punsafe, pwatermark, hash, ...). Missing ones are an error.
    # webdataset: every field of a sample's json is carried; these are only placed first (null where absent).
    extra_cols: list[str] = Field(default_factory=list)
    # Rows of each input shard cut from URL lists; with them it also sets the keys' index digits
    # (img2dataset's rule). An input tar is one shard whatever its size: there this only sets the
    # digits, so a tar holds at most this many samples (README "Existing shards as input").
    rows_per_shard: int = Field(10_000, ge=1)
    # Rows read from the input per batch; bounds the reader's memory.
    read_batch_rows: int = Field(8_192, ge=1)

    # webdataset only: the caption is the sample's `txt` member (null), or this field of its `json` member.
    caption_field: Optional[str] = None
    # webdataset only: the members that are a sample's image, by extension, the first found in this order.
    image_exts: list[str] = Field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"], min_length=1)

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("image_exts")
    @classmethod
    def _bare_extensions(cls, value: list[str]) -> list[str]:
        return [ext.lower().lstrip(".") for ext in value]

    @model_validator(mode="before")
    @classmethod
    def _tar_paths_are_shards(cls, data: Any) -> Any:
        """format auto with every path a .tar: existing shards (webdataset), saved as such in config.yaml."""
        if isinstance(data, dict) and data.get("format", "auto") == "auto":
            paths = data.get("paths")
            paths = [paths] if isinstance(paths, str) else paths
            if isinstance(paths, list) and paths and all(isinstance(p, str) and p.endswith(".tar") for p in paths):
                data = {**data, "format": "webdataset"}
        return data


class OutputConfig(Section):
    path: str
    # Keep the raw download shards (work/download) after the final shards are written.
    keep_intermediate: bool = False


class DownloadConfig(Section):
    timeout: float = Field(10.0, gt=0)
    retries: int = Field(0, ge=0)
    # Concurrent fetches inside one shard task; fetching is I/O bound.
    threads: int = Field(32, ge=1)
    # Sent in the User-Agent and matched against `X-Robots-Tag: token: directive`.
    user_agent_token: Optional[str] = "curate"
    # X-Robots-Tag directives that opt an image out of AI training.
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    max_bytes: int = Field(32 * 1024 * 1024, ge=1)
    # Images with more pixels are rejected from their header, before decoding
    # (decompression bombs): `image_area_too_large`.
    max_image_area: int = Field(MAX_IMAGE_AREA, ge=1)
    max_redirects: int = Field(5, ge=0)
    # Off by default: URL lists come from the open web and must not reach internal
    # services. The demo and tests turn it on to fetch from 127.0.0.1.
    allow_private_addresses: bool = False
    # Egress through an HTTP(S) proxy (clusters that reach the internet only that way):
    # http://HOST:PORT for every fetch; null: the HTTP_PROXY / HTTPS_PROXY / NO_PROXY
    # environment of each worker, when `proxy_from_environment`. The address rules above still
    # apply to every target host, checked here before the request is sent to the proxy.
    proxy: Optional[str] = None
    proxy_from_environment: bool = True

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"expected http://HOST:PORT, got {value!r}")
        return value


class ResizeConfig(Section):
    """The output geometry, applied once, where the downloaded image is decoded (pipeline/image.py;
    see pipeline/geometry.py). Which images are kept is the `resolution` filter's business."""

    mode: Literal["keep_ratio", "center_crop", "buckets", "none"] = "keep_ratio"
    # keep_ratio / center_crop: the shorter side; buckets: about size² pixels per bucket.
    size: int = Field(512, ge=1)
    # Enlarge images smaller than size? (img2dataset's resize_only_if_bigger: true == upscale: false)
    upscale: bool = False
    bucket_max_ratio: float = Field(2.0, ge=1)  # buckets only: the most elongated bucket
    # auto: area (BOX) to shrink, lanczos to enlarge.
    interpolation: Literal["auto", "area", "lanczos", "bicubic", "bilinear"] = "auto"
    quality: int = Field(95, ge=1, le=100)  # JPEG quality of every re-encoded image

    @field_validator("size")
    @classmethod
    def _bucket_size(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("mode") == "buckets" and value % BUCKET_STEP:
            raise ValueError(f"for mode buckets, a multiple of {BUCKET_STEP} (got {value})")
        return value


class ClipConfig(Section):
    """The score stage: open_clip image-text similarity (see pipeline/clip_model.py for model forms)."""

    enabled: bool = False
    # An open_clip architecture name, or `hf-hub:ORG/REPO`, or `local-dir:PATH`.
    model: str = "ViT-B-32"
    # A pretrained tag (fetched by open_clip, needs internet) or a local checkpoint path;
    # ignored for hf-hub: and local-dir: models.
    pretrained: Optional[str] = "openai"
    device: str = "auto"  # auto → cuda when available, else cpu
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto → bf16 on GPU, fp32 on CPU
    batch_size: int = Field(512, ge=1)
    # Decode JPEGs with nvJPEG on the GPU (falls back to the CPU decoder per image).
    gpu_decode: bool = True
    # Helper processes that read shards and tokenize captions beside the scoring process
    # (pipeline/score_reader.py); 0 reads in-process. auto → 2 on a GPU, 0 on the CPU.
    reader_processes: Union[Literal["auto"], int] = "auto"
    # Helper processes that decode part of each batch on the host's idle cores while the GPU decodes
    # the rest (pipeline/decode_helpers.py); auto → on a GPU, the host's cores per GPU less 3 (at most
    # 16), 0 on the CPU. Off by default: on an H200 host with 16 cores they did not measurably speed up
    # ViT-B-32 or ViT-L-14 scoring (BENCHMARKS.md); a host whose cores are fast against its GPU may gain.
    decode_processes: Union[Literal["auto"], int] = 0
    # The most GPU memory a scoring process may hold (PyTorch's allocator frees its cache and
    # retries before going past it), so that scoring can share a GPU with training; null: no limit.
    gpu_memory_limit_gib: Optional[float] = Field(16.0, gt=0)

    @field_validator("reader_processes", "decode_processes")
    @classmethod
    def _not_negative(cls, value):
        if value != "auto" and value < 0:
            raise ValueError("must be 'auto' or a count ≥ 0")
        return value

    @field_validator("model")
    @classmethod
    def _absolute_local_dir(cls, value: str) -> str:
        # Workers may run elsewhere: a relative local-dir: is made absolute where the config is read.
        if value.startswith("local-dir:"):
            return "local-dir:" + os.path.abspath(value[len("local-dir:"):])
        return value


class DaskConfig(Section):
    # None → a LocalCluster on this machine (unless DASK_SCHEDULER_ADDRESS is set).
    scheduler: Optional[str] = None
    n_workers: Optional[int] = Field(None, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = "auto"
    # Times Dask reruns a failed shard task (a worker lost, a passing fault) before the shard
    # is recorded as failed; the run goes on with the other shards either way.
    retries: int = Field(2, ge=0)
    # Every task in this process, one after the other, no cluster: for debugging.
    in_process: bool = False


class FilterSpec(Section):
    """One entry of the filter chain: a registered filter name and its parameters."""

    model_config = ConfigDict(extra="allow")
    name: str


class RunConfig(Section):
    input: InputConfig
    output: OutputConfig
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    resize: ResizeConfig = Field(default_factory=ResizeConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    dask: DaskConfig = Field(default_factory=DaskConfig)
    filters: list[FilterSpec] = Field(default_factory=list)
    # fsspec options per protocol for the object store that input paths and output.path name, e.g.
    # {s3: {endpoint_url: "http://127.0.0.1:9000"}} for an S3-compatible server. Only where and how
    # to reach it: credentials come from the environment (AWS_ACCESS_KEY_ID, ~/.aws, fsspec's own
    # config), so that none is saved in config.yaml, logs or the report.
    storage: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("storage")
    @classmethod
    def _no_credentials(cls, value: dict) -> dict:
        secret = storage.secret_options(value)
        if secret:
            raise ValueError(f"{', '.join(secret)}: credentials do not belong in the config (it is saved with "
                             "the run); give them through the environment, e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        return value

    def filter_specs(self) -> list[dict]:
        return [f.model_dump() for f in self.filters]


def _format_error(err: dict) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key"
    if kind == "missing":
        return f"{path}: required key missing"
    if kind in ("float_parsing", "float_type", "int_parsing", "int_type"):
        return f"{path}: expected a number, got {err.get('input')!r}"
    if kind in ("bool_parsing", "bool_type"):
        return f"{path}: expected true or false, got {err.get('input')!r}"
    if kind == "value_error":
        return f"{path}: {err['msg'].removeprefix('Value error, ')}"
    return f"{path}: {err['msg']}"


def validation_message(exc: ValidationError) -> str:
    """All errors of a ValidationError on one line, each naming its key path."""
    return "; ".join(_format_error(e) for e in exc.errors())


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `--set a.b.c=value` to a raw config dict; the value is parsed as YAML."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment}: expected KEY=VALUE")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = data

    def list_index(items: list, key: str) -> int:
        if not key.isdigit() or int(key) >= len(items):
            raise UserError(f"--set {dotted}: {key} is not an index of a {len(items)}-item list")
        return int(key)

    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[list_index(node, key)]
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise UserError(f"--set {dotted}: {key} is not a section")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise UserError(f"--set {dotted}: value {raw!r} is not valid YAML") from exc
    if isinstance(node, list):
        node[list_index(node, keys[-1])] = value
    else:
        node[keys[-1]] = value


def read_config_mapping(path: Path, overrides: list[str] | None = None) -> dict:
    """A YAML config file as a mapping of sections, with `--set` overrides applied (safe_load:
    no tag runs code). Errors are UserError. Shared by `curate run` and `curate train`."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid YAML (not UTF-8 text at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        # The parser's own words say what is wrong there ("mapping values are not allowed here").
        cause = getattr(exc, "problem", None) or getattr(exc, "context", None)
        raise UserError(f"{path}: not valid YAML{where}" + (f": {cause}" if cause else "")) from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    for assignment in overrides or []:
        apply_override(data, assignment)
    return data


# Keys and filters that once existed, each with what replaces it: an old config is refused with
# the way to update it, never run with a setting silently ignored.
RETIRED_KEYS: dict[str, str] = {
    "resize.image_size": "renamed: use resize.size",
    "resize.resize_mode": "renamed: use resize.mode",
    "resize.resize_only_if_bigger": "replaced by resize.upscale, its opposite "
                                    "(resize_only_if_bigger: true is upscale: false)",
    "resize.min_image_size": "moved to the resolution filter: its min_side (filters: - name: resolution)",
    "resize.max_aspect_ratio": "moved to the resolution filter: its max_aspect_ratio (filters: - name: resolution)",
    "resize.max_image_area": "moved: use download.max_image_area",
    "resize.encode_quality": "renamed: use resize.quality",
    "output.encode_quality": "replaced by resize.quality, the one JPEG quality",
}
RETIRED_FILTERS: dict[str, str] = {
    "resize": "the resize filter is gone: the resize: section sets the output size (resize.size, resize.mode: buckets)",
}


def retired_keys(data: dict) -> list[str]:
    """`path: what replaces it` for every retired key or filter in a raw config mapping."""
    found = []
    for dotted, message in RETIRED_KEYS.items():
        section, key = dotted.split(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            found.append(f"{dotted}: {message}")
    filters = data.get("filters")
    for i, spec in enumerate(filters if isinstance(filters, list) else []):
        if isinstance(spec, dict) and spec.get("name") in RETIRED_FILTERS:
            found.append(f"filters.{i}: {RETIRED_FILTERS[spec['name']]}")
    return found


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply `--set` overrides, validate. Errors are UserError."""
    path = Path(path)
    data = read_config_mapping(path, overrides)
    retired = retired_keys(data)
    if retired:
        raise UserError(f"{path}: {'; '.join(retired)}")
    config = validated(RunConfig, data, path)
    try:
        chain = build_chain(config.filter_specs())  # a misspelled filter or parameter fails here, before any work
    except FilterConfigError as exc:
        raise UserError(f"{path}: {exc}") from exc
    for i, f in enumerate(chain):
        if config.input.format == "webdataset":
            break  # every field of a sample's json is carried: none needs listing
        missing = [c for c in f.input_columns() if c not in config.input.extra_cols]
        if missing:
            raise UserError(f"{path}: filters.{i}: {f.name} reads input column(s) {', '.join(missing)}: "
                            f"add them to input.extra_cols")
    for i, spec in enumerate(config.filter_specs()):
        if FILTERS[spec["name"]].needs_clip and not config.clip.enabled:
            raise UserError(f"{path}: filters.{i}: {spec['name']} needs clip.enabled: true")
    for i, f in enumerate(chain):
        try:
            f.check({"clip": config.clip})  # e.g. a head's input size vs the CLIP model's
        except ValueError as exc:
            raise UserError(f"{path}: filters.{i}: {f.name}: {exc}") from exc
    return config


def changed_settings(old: Any, new: Any, may_change: set[str] = frozenset(), path: str = "") -> list[str]:
    """Dotted paths of the settings that differ between two config mappings (`filters.2.min_similarity`),
    except those in `may_change` (a path, or a section: `dask`). Used to refuse resuming a run
    with other settings, naming what changed; shared by `curate run` and `curate train`."""
    if path in may_change:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        return [p for key in sorted(set(old) | set(new), key=str)
                for p in changed_settings(old.get(key), new.get(key), may_change, f"{path}.{key}".lstrip("."))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [p for i, (a, b) in enumerate(zip(old, new))
                for p in changed_settings(a, b, may_change, f"{path}.{i}".lstrip("."))]
    return [] if old == new else [path or "<root>"]


def validated(model: type[BaseModel], data: dict, where) -> BaseModel:
    """`data` validated into `model`, or one UserError naming every wrong key's path (the one
    way curate run, train and eval turn a config mapping into typed settings)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{where}: {validation_message(exc)}") from exc


def dump_config(config: BaseModel) -> str:
    """A resolved config as YAML, saved beside what it made (run, train and eval outputs)."""
    # python mode keeps inf as inf (YAML .inf); json mode would turn it into null.
    data = config.model_dump()
    return yaml.safe_dump(data, sort_keys=False)
