"""`curate eval`: generate with each (scheduler, steps), measure, write eval.json, grids, eval.html.

Read top to bottom:

    config, output folder                   (a rerun with other settings is refused; same settings resume)
    prompts (a seed each), the CLIP model, the FID Inception (or none: metrics.inception: off)
    reference features                      (cached next to the reference set; computed once)
    the model (any StableDiffusionPipeline folder, hub id, or tiny) -> Sampler (sampler.py)
    per (scheduler, steps), unless done:    batches of prompts -> uint8 images (timed: images/s,
                                            peak GPU memory) -> PNGs with prompt and seed, and features;
                                            runs/NAME-STEPS.npz + .json written last (the done marker)
    metrics of every setting from the saved features (metrics.py), eval.json, grids, eval.html

The saved features make the metrics cheap to recompute: a resumed run, or a changed reference
set, measures again without generating again.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from curate.pipeline.config import changed_settings, dump_config
from curate.pipeline.errors import UserError
from curate.pipeline.shards import atomic_path
from curate.train.eval.config import RESUMABLE_CHANGES, EvalConfig, load_eval_config
from curate.train.eval.data import Prompt, load_prompts, reference_set
from curate.train.eval.features import FeatureSet, reference_features, text_embeddings
from curate.train.eval.metrics import clip_score, frechet_distance, inception_score, kernel_distance, maybe

GRID_IMAGES = 8  # the first prompts, shown in each scheduler's grid


def check_output(cfg: EvalConfig, out: Path, overwrite: bool) -> None:
    saved = out / "eval-config.yaml"
    if overwrite and out.exists():
        shutil.rmtree(out)
    elif saved.is_file():
        changed = changed_settings(yaml.safe_load(saved.read_text()) or {}, cfg.model_dump(), RESUMABLE_CHANGES)
        if changed:
            raise UserError(f"{out} holds an evaluation with other settings ({', '.join(changed)}); "
                            "use --overwrite to start over or another output.path")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(dump_config(cfg))


def resolve_clip(cfg: EvalConfig) -> tuple[str, Optional[str]]:
    """metrics.clip, or the CLIP model the held-out `curate run` scored its data with."""
    if cfg.metrics.clip.model:
        return cfg.metrics.clip.model, cfg.metrics.clip.pretrained
    for spec in [*cfg.prompts.shards, *cfg.reference.shards]:
        run_config = Path(spec) / "config.yaml"
        if run_config.is_file():
            clip = (yaml.safe_load(run_config.read_text()) or {}).get("clip") or {}
            if clip.get("model"):
                return clip["model"], clip.get("pretrained")
    raise UserError("metrics.clip.model: not set, and no `curate run` output among prompts.shards / "
                    "reference.shards to take its CLIP model from")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def save_png(image: np.ndarray, path: Path, prompt: Prompt, scheduler: str, steps: int, guidance: float) -> None:
    info = PngInfo()
    info.add_text("prompt", prompt.text)
    info.add_text("seed", str(prompt.seed))
    info.add_text("parameters", json.dumps({"prompt": prompt.text, "seed": prompt.seed, "scheduler": scheduler,
                                            "steps": steps, "guidance_scale": guidance}))
    Image.fromarray(image).save(path, pnginfo=info)


def generate_setting(cfg: EvalConfig, sampler, prompts: list[Prompt], name: str, steps: int, inception, clip,
                     out: Path, progress: bool) -> dict:
    """Generate every prompt with one (scheduler, steps); save images and features; return the timing."""
    g = cfg.generation
    tag = f"{name}-{steps}"
    folder = out / "images" / tag
    if g.save_images:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    features = FeatureSet(inception, clip, cfg.metrics.feature_batch_size)
    timings: list[tuple[float, int]] = []
    peak, grid = 0, []
    cuda = sampler.device.type == "cuda"
    bar = tqdm(total=len(prompts), desc=tag, unit="image", disable=not progress, dynamic_ncols=True)
    index = []  # images/TAG/index.jsonl: file, prompt, seed
    for start in range(0, len(prompts), g.batch_size):
        chunk = prompts[start:start + g.batch_size]
        # A compiled UNet sees one shape: the last batch is padded with copies of its last prompt.
        pad = g.batch_size - len(chunk) if sampler.compiled else 0
        texts = [p.text for p in chunk] + [chunk[-1].text] * pad
        seeds = [p.seed for p in chunk] + [chunk[-1].seed] * pad
        if cuda:
            torch.cuda.synchronize(sampler.device)
            torch.cuda.reset_peak_memory_stats(sampler.device)
        began = time.perf_counter()
        images = sampler.sample(texts, seeds, name, steps, g.guidance_scale, g.resolution, g.resolution)
        timings.append((time.perf_counter() - began, len(chunk)))  # sample() ends with a copy to the CPU
        if cuda:
            peak = max(peak, torch.cuda.max_memory_allocated(sampler.device))
        images = images[:len(chunk)].numpy()
        features.add(images)
        grid += list(images[:GRID_IMAGES - len(grid)])
        if g.save_images:
            for i, (image, prompt) in enumerate(zip(images, chunk), start):
                save_png(image, folder / f"{i:05d}.png", prompt, name, steps, g.guidance_scale)
                index.append({"file": f"{i:05d}.png", "prompt": prompt.text, "seed": prompt.seed})
        bar.update(len(chunk))
    bar.close()
    if g.save_images:
        (folder / "index.jsonl").write_text("".join(json.dumps(e) + "\n" for e in index))
    # The first batch carries the warm-up (cuDNN autotuning, compilation): left out when there are others.
    timed = timings[1:] if len(timings) > 1 else timings
    seconds, count = sum(t for t, _ in timed), sum(n for _, n in timed)
    timing = {"scheduler": name, "steps": steps, "images": len(prompts),
              "images_per_second": count / seconds if seconds else None,
              "seconds_per_image": seconds / count if count else None,
              "peak_gpu_gib": peak / 2**30 if cuda else None,
              "generation_seconds": sum(t for t, _ in timings), "first_batch_excluded": len(timings) > 1}
    runs = out / "runs"
    runs.mkdir(exist_ok=True)
    with atomic_path(runs / f"{tag}.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, grid=np.stack(grid), **features.arrays())
    with atomic_path(runs / f"{tag}.json") as tmp:  # last: the setting is done
        tmp.write_text(json.dumps(timing, indent=1))
    return timing


def measure(cfg: EvalConfig, generated: dict, reference: dict, prompt_text: np.ndarray) -> dict:
    m = cfg.metrics
    out: dict = {}
    if "inception_pool" in generated and "inception_pool" in reference:
        out["fid"] = maybe(frechet_distance, generated["inception_pool"], reference["inception_pool"])
        kid = maybe(kernel_distance, generated["inception_pool"], reference["inception_pool"],
                    subsets=m.kid_subsets, subset_size=m.kid_subset_size)
        out["kid"], out["kid_std"] = kid if kid else (None, None)
        score = maybe(inception_score, generated["inception_logits"], splits=m.is_splits)
        out["inception_score"], out["inception_score_std"] = score if score else (None, None)
    if "clip" in generated:
        out["fd_clip"] = maybe(frechet_distance, generated["clip"], reference["clip"])
        out["clip_score"] = clip_score(generated["clip"], prompt_text)
    return out


def evaluate(cfg: EvalConfig, *, overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Run the evaluation `cfg` describes; returns what eval.json holds."""
    from curate.pipeline.models.clip import load_clip
    from curate.pipeline.models.device import resolve_device
    from curate.train.eval.inception import load_inception
    from curate.train.eval.sampler import Sampler, resolve_dtype
    from curate.train.model import load_components

    out = Path(cfg.output.path)
    g = cfg.generation
    device = torch.device(resolve_device(g.device))
    dtype = resolve_dtype(g.precision, device)
    # Everything that can fail on the user's input fails before anything is written or generated.
    prompts = load_prompts(cfg.prompts)
    clip_model, clip_pretrained = resolve_clip(cfg)
    inception = None if cfg.metrics.inception == "off" else load_inception(cfg.metrics.inception, str(device))
    clip = load_clip(clip_model, clip_pretrained, device=str(device), precision="fp32")
    reference = reference_set(cfg.reference_shards(), cfg.reference.folder, cfg.reference.count,
                              out / "reference-cache")
    check_output(cfg, out, overwrite)
    if inception is not None and not inception.standard:
        log(f"note: {inception.source} is not pytorch-fid's public FID Inception file: FID, KID and IS are not "
            "comparable with published numbers")
    ref, ref_cache = reference_features(reference, g.resolution, inception, clip, clip.name,
                                        cfg.metrics.feature_batch_size, cfg.reference.cache, log=log)
    prompt_text = text_embeddings(clip, [p.text for p in prompts])

    pending = [(n, s) for n, s in g.settings() if not (out / "runs" / f"{n}-{s}.json").is_file()]
    if pending:
        parts = load_components(cfg.model.pretrained, tiny_seed=cfg.model.tiny_seed)
        if getattr(parts, "sdxl", False):
            raise UserError("model.pretrained: an SDXL pipeline; curate eval samples Stable Diffusion 1.x/2.x models")
        sampler = Sampler.from_components(parts, device, dtype, g.compile)
        for name, steps in pending:
            timing = generate_setting(cfg, sampler, prompts, name, steps, inception, clip, out, progress)
            log(f"{name} {steps} steps: {len(prompts)} images, {timing['images_per_second'] or 0:.2f} images/s")

    results = []
    for name, steps in g.settings():
        tag = f"{name}-{steps}"
        timing = json.loads((out / "runs" / f"{tag}.json").read_text())
        with np.load(out / "runs" / f"{tag}.npz", allow_pickle=False) as saved:
            generated = {k: saved[k] for k in saved.files}
        results.append({**timing, **measure(cfg, generated, ref, prompt_text)})

    reference_summary = {"images": int(len(ref["clip"])), "source": cfg.reference.folder or cfg.reference_shards(),
                         "cache": str(ref_cache) if ref_cache else None}
    if "inception_pool" in ref:
        weights = inception.model.net.fc.weight.detach().double().cpu().numpy()
        score = maybe(inception_score, ref["inception_pool"] @ weights.T, splits=cfg.metrics.is_splits)
        reference_summary["inception_score"] = score[0] if score else None
    if "clip_text" in ref:
        reference_summary["clip_score"] = clip_score(ref["clip"], ref["clip_text"])

    import diffusers

    summary = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "model": cfg.model.pretrained,
        "device": device_name(device), "precision": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "prompts": {"count": len(prompts), "source": cfg.prompts.file or cfg.prompts.shards, "seed": cfg.prompts.seed},
        "reference": reference_summary,
        "inception": None if inception is None else {"file": inception.source, "sha256": inception.sha256,
                                                      "standard": inception.standard},
        "clip": {"model": clip_model, "pretrained": clip_pretrained},
        "generation": {"guidance_scale": g.guidance_scale, "resolution": g.resolution, "batch_size": g.batch_size,
                       "compile": g.compile},
        "results": results,
    }
    with atomic_path(out / "eval.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    from curate.train.eval.page import write_grids, write_page

    write_page(out, summary, write_grids(out, summary, prompts))
    return summary


COLUMNS = [("fid", "FID", "{:.2f}"), ("kid", "KID", "{:.4f}"), ("fd_clip", "FD-CLIP", "{:.4f}"),
           ("inception_score", "IS", "{:.2f}"), ("clip_score", "CLIP score", "{:.2f}"),
           ("images_per_second", "images/s", "{:.2f}"), ("seconds_per_image", "s/image", "{:.3f}"),
           ("peak_gpu_gib", "peak GiB", "{:.1f}")]


def format_table(results: list[dict], label: str = "scheduler") -> str:
    """The results as a fixed-width table; a missing value is '-'."""
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in results)]
    head = [label, "steps"] + [c[1] for c in columns]
    rows = [[r.get("label", r["scheduler"]), str(r["steps"])] +
            [fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in columns] for r in results]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head)] + [line(r) for r in rows])


def main_from_args(args) -> int:
    """`curate eval` (pipeline/cli.py hands its parsed arguments here)."""
    cfg = load_eval_config(args.config, args.set, model=args.model, prompts=args.prompts, reference=args.reference,
                           schedulers=args.schedulers, output=args.output)
    summary = evaluate(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    print()
    print(format_table(summary["results"]))
    out = Path(cfg.output.path)
    print(f"\nreference    {summary['reference']['images']} images"
          + (f" (features cached in {summary['reference']['cache']})" if summary["reference"]["cache"] else ""))
    print(f"results      {out / 'eval.json'}")
    print(f"report       {out / 'eval.html'}")
    return 0
