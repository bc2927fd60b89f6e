"""`curate eval` configuration: YAML validated into typed models (the rules of `curate run`'s
and `curate train`'s configs: unknown keys are errors naming their path, `--set a.b=value`
overrides any value).

    model:      pretrained: a StableDiffusionPipeline folder (`curate train` writes OUTPUT/pipeline;
                the train output folder itself works too), a hub id, or tiny
    prompts:    file: a .txt (one prompt a line) or .jsonl ({"prompt", "seed"?}); or shards:
                held-out shards (a `curate run` output) whose captions are the prompts
    reference:  real images: shards (default: prompts.shards) or a folder of image files
    generation: schedulers × steps ("ddim:50"), guidance, resolution, batch size, precision
    metrics:    inception (the FID weights file, auto, or off), clip (open_clip model for FD
                and CLIP score; default: the one the held-out run scored with), KID and IS settings
    output:     path
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from curate.pipeline.config import apply_override, read_config_mapping, validated

# name in the config -> (diffusers class, settings on top of the model's scheduler config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddpm": ("DDPMScheduler", {}),
    # set_alpha_to_one=False: the last step as Stable Diffusion's own configs (train/model.py too)
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": False}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # as Stable Diffusion 1.5 ships it
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
}
_SETTING = re.compile(r"^\s*([a-z+-]+)\s*:\s*(\d+)\s*$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    # A StableDiffusionPipeline folder, a `curate train` output folder (its pipeline/), a hub id
    # (needs internet), or "tiny" (curate's random-weight test model).
    pretrained: str
    tiny_seed: int = 0

    @field_validator("pretrained")
    @classmethod
    def _pipeline_folder(cls, value: str) -> str:
        if os.path.isdir(value):
            folder = Path(value)
            if not (folder / "model_index.json").is_file() and (folder / "pipeline" / "model_index.json").is_file():
                folder = folder / "pipeline"  # a `curate train` output folder
            return str(folder.resolve())
        return value


class PromptsSection(Section):
    file: Optional[str] = None  # .txt: one prompt a line; .jsonl: {"prompt": ..., "seed": ...}
    shards: list[str] = Field(default_factory=list)  # held-out shards: their captions
    count: Optional[int] = Field(None, ge=1)  # at most this many (spread evenly over the shards)
    seed: int = 0  # prompt i is generated from seed + i (a .jsonl line's own seed wins)

    @field_validator("shards", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source(self):
        if bool(self.file) == bool(self.shards):
            raise ValueError("give one of prompts.file or prompts.shards")
        return self


class ReferenceSection(Section):
    shards: list[str] = Field(default_factory=list)  # default: prompts.shards
    folder: Optional[str] = None  # or image files (png, jpg, webp, ...), recursively
    count: Optional[int] = Field(None, ge=2)  # at most this many (spread evenly); default: all
    # Features are cached next to the reference set (REFERENCE/.curate-eval/), else in the output.
    cache: bool = True

    @field_validator("shards", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _not_both(self):
        if self.shards and self.folder:
            raise ValueError("give reference.shards or reference.folder, not both")
        return self


class GenerationSection(Section):
    # scheduler:steps, e.g. ["ddpm:1000", "ddim:50", "pndm:50", "dpm++:20"]
    schedulers: list[str] = Field(default_factory=lambda: ["ddim:50"], min_length=1)
    guidance_scale: float = Field(7.5, ge=0)
    resolution: int = Field(512, ge=8)
    batch_size: int = Field(8, ge=1)
    # auto: bf16 on a GPU, fp32 on a CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    compile: bool = False  # torch.compile the UNet (pays from a few hundred UNet calls on)
    save_images: bool = True  # images/SCHEDULER-STEPS/NNNNN.png with prompt and seed

    @field_validator("schedulers", mode="before")
    @classmethod
    def _comma_list(cls, value):
        return [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @field_validator("schedulers")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        out = []
        for item in value:
            m = _SETTING.match(str(item))
            if not m or m.group(1) not in SCHEDULERS or int(m.group(2)) < 1:
                raise ValueError(f"{item!r}: expected SCHEDULER:STEPS with SCHEDULER one of {', '.join(SCHEDULERS)}")
            out.append(f"{m.group(1)}:{int(m.group(2))}")
        if len(set(out)) != len(out):
            raise ValueError("a scheduler:steps is listed twice")
        return out

    def settings(self) -> list[tuple[str, int]]:
        return [(s.split(":")[0], int(s.split(":")[1])) for s in self.schedulers]


class ClipSection(Section):
    # open_clip's naming (pipeline/models/clip.py): ViT-B-32 + laion2b_s34b_b79k, local-dir:..., hf-hub:...
    # None: the model the held-out `curate run` scored with (its config.yaml).
    model: Optional[str] = None
    pretrained: Optional[str] = None


class MetricsSection(Section):
    # The FID Inception's weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth as a path,
    # auto (torch hub's cache; downloaded where there is internet), or off (no FID / KID / IS).
    inception: str = "auto"
    clip: ClipSection = Field(default_factory=ClipSection)
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    is_splits: int = Field(10, ge=1)
    feature_batch_size: int = Field(50, ge=1)  # images per Inception / CLIP forward pass

    @field_validator("inception", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        return "off" if value is False else value  # YAML reads a bare `off` as false


class OutputSection(Section):
    path: str  # eval.json, eval.html, grids, images/


class EvalConfig(Section):
    model: ModelSection
    prompts: PromptsSection
    reference: ReferenceSection = Field(default_factory=ReferenceSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    output: OutputSection

    def reference_shards(self) -> list[str]:
        if self.reference.folder:
            return []
        return self.reference.shards or self.prompts.shards


# Settings that may change between a run and its resumption without mixing two evaluations:
# more scheduler settings, other output options.
RESUMABLE_CHANGES = {"generation.schedulers", "generation.save_images", "generation.compile",
                     "generation.batch_size", "metrics.feature_batch_size"}


def apply_shortcuts(data: dict, model=None, prompts=None, reference=None, schedulers=None, output=None) -> None:
    """The command line's shortcuts, on a raw config mapping (before any --set)."""
    if model:
        data.setdefault("model", {})["pretrained"] = model
    if prompts:
        section = data.setdefault("prompts", {})
        section.pop("file", None), section.pop("shards", None)
        section["file" if os.path.isfile(prompts) else "shards"] = prompts
    if reference:
        section = data.setdefault("reference", {})
        section.pop("folder", None), section.pop("shards", None)
        shards = any(Path(reference).glob("*.tar")) or (Path(reference) / "shards").is_dir()
        section["folder" if os.path.isdir(reference) and not shards else "shards"] = reference
    if schedulers:
        data.setdefault("generation", {})["schedulers"] = schedulers
    if output:
        data.setdefault("output", {})["path"] = output


def load_eval_config(path: Optional[str], overrides: list[str] | None = None, **shortcuts) -> EvalConfig:
    """Read a YAML eval config (or none: the shortcuts and --set alone), apply the shortcuts
    (model, prompts, reference, schedulers, output) and `--set` overrides, validate. Errors
    are UserError."""
    data = read_config_mapping(Path(path)) if path else {}
    apply_shortcuts(data, **shortcuts)
    for assignment in overrides or []:
        apply_override(data, assignment)
    return validated(EvalConfig, data, path or "curate eval")
