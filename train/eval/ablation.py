"""`make ablation-demo`: does curation make the model better? The same model, trained the same
way on the demo's data twice, raw and curated, measured on the same held-out prompts.

    1. the demo's data (2,000 synthetic scenes with planted faults: wrong captions, tiny and
       extreme-aspect images, broken URLs), served from 127.0.0.1, through `curate run` twice:
         raw      configs/demo.yaml with `filters: []`: every downloaded sample is written
         curated  configs/demo.yaml as it is: caption, resolution and CLIP filters
    2. held-out data: fresh scenes from another seed, all captions right, as a `curate run`
       output (ablation-work/heldout): the prompts (captions) and the reference images
    3. the starting model: curate's tiny model with its VAE fitted to scenes of a third seed.
       The tiny model's VAE is random, and a random VAE decodes anything to coloured noise, so
       no image metric could tell two UNets apart; a fitted one reconstructs the scenes. Both
       training runs start from this same folder (ablation-work/base).
    4. `curate train configs/train-demo.yaml` on each, same seed and steps, no selection at load
       time (data.min_clip_similarity and data.min_size off: what the shards hold is trained on)
    5. `curate eval configs/eval-demo.yaml` on each: the same prompts, seeds and reference images;
       one table. FD-CLIP and CLIP score use the tiny CLIP (it knows these scenes); FID / KID /
       IS also where `--inception PATH` gives pytorch-fid's weights file.

    python -m curate.train.eval.ablation                 # CPU, a few minutes (make ablation-demo)
    python -m curate.train.eval.ablation --steps 3000 --benchmarks BENCHMARKS.md   # GPU, the real run
    python -m curate.train.eval.ablation --heldout-only   # just ablation-work/heldout (configs/eval-demo.yaml reads it)

A step already done (its output in ablation-work/) is skipped; --fresh starts over.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from curate.pipeline.benchmarks import update_section

REPO_CONFIGS = Path("configs")
HEADING = "## Ablation: raw vs curated training data"


def log(message: str) -> None:
    print(message, flush=True)


def curate(*args: str) -> None:
    command = [sys.executable, "-m", "curate.pipeline.cli", *args]
    log("$ curate " + " ".join(args))
    if subprocess.call(command) != 0:
        raise SystemExit(f"ablation: `curate {args[0]}` failed")


def demo_runs(work: Path, rows: int) -> dict[str, Path]:
    """The demo's data through `curate run`, raw and curated."""
    from curate.pipeline.demo.devserver import DevServer
    from curate.pipeline.demo.synthetic import generate_dataset

    outputs = {"raw": work / "raw", "curated": work / "curated"}
    if all((o / "stats.json").is_file() for o in outputs.values()):
        return outputs
    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)
    (data / "images").mkdir(parents=True)
    with DevServer(data) as server:
        urls = generate_dataset(data, rows, base_url=server.base_url, seed=0)  # the demo's data
        common = ["--set", f"input.paths=[{urls}]", "--overwrite", "--no-progress"]
        curate("run", str(REPO_CONFIGS / "demo.yaml"), "--set", f"output.path={outputs['raw']}", "--set", "filters=[]",
               *common)
        curate("run", str(REPO_CONFIGS / "demo.yaml"), "--set", f"output.path={outputs['curated']}", *common)
    return outputs


def heldout_run(folder: Path, n: int, clip_model: str, seed: int = 1) -> Path:
    """Fresh scenes with right captions as a `curate run` output: shards/00000.tar + config.yaml."""
    from curate.pipeline.demo.synthetic import caption, random_scene, render
    from curate.pipeline.shards import sample_key
    from curate.pipeline.tarshard import TarShardWriter

    if (folder / "shards" / "00000.tar").is_file():
        return folder
    import yaml

    rng = random.Random(seed)
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    with TarShardWriter(folder / "shards" / "00000.tar") as tar:
        for i in range(n):
            scene = random_scene(rng)
            data = io.BytesIO()
            render(scene, 256, 256, rng).save(data, format="JPEG", quality=95)
            text = caption(scene)
            key = sample_key(0, i, n)
            tar.write(key, {"jpg": data.getvalue(), "txt": text.encode(),
                            "json": json.dumps({"key": key, "caption": text, "width": 256, "height": 256}).encode()})
    (folder / "config.yaml").write_text(yaml.safe_dump({"clip": {"enabled": True, "model": clip_model, "pretrained": None}}))
    return folder


def fit_tiny_vae(steps: int, device: str, resolution: int = 32, seed: int = 2, log=log):
    """The tiny VAE fitted to reconstruct synthetic scenes (seed 2: in neither training set), its
    scaling_factor set so the latents have unit variance (as Stable Diffusion's 0.18215 does)."""
    import numpy as np
    import torch

    from curate.pipeline.demo.synthetic import random_scene, render
    from curate.pipeline.models.latents import fit_crop, to_pixels
    from curate.pipeline.models.vae import tiny_vae

    if device == "cpu":  # a small model: one thread (two spinning OpenMP threads on a busy 2-core machine: ~20x slower)
        torch.set_num_threads(1)
    rng = random.Random(seed)
    scenes = []
    for _ in range(1024):
        w, h = rng.choice([(256, 256), (320, 256), (256, 320)])
        scenes.append(to_pixels(fit_crop(render(random_scene(rng), w, h, rng), (resolution, resolution))[0]))
    data = torch.from_numpy(np.stack(scenes)).to(device)
    vae = tiny_vae(0).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    generator = torch.Generator(device).manual_seed(seed)
    started = time.time()
    for step in range(steps):
        x = data[torch.randint(0, len(data), (16,), generator=generator, device=device)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(data[i:i + 256]).latent_dist.mean for i in range(0, len(data), 256)])
        error = torch.nn.functional.mse_loss(vae.decode(latents[:256]).sample, data[:256]).item()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    log(f"tiny VAE fitted: {steps} steps in {time.time() - started:.0f} s, reconstruction MSE {error:.4f} "
        f"(pixels in [-1, 1]), scaling_factor {vae.config.scaling_factor:.3f}")
    return vae.cpu()


def base_model(folder: Path, vae_steps: int, device: str) -> Path:
    from curate.train.model import load_components, save_pipeline

    if (folder / "model_index.json").is_file():
        return folder
    parts = load_components("tiny")
    parts.vae = fit_tiny_vae(vae_steps, device)
    save_pipeline(parts, parts.unet, folder)
    return folder


def written(run: Path) -> int:
    return json.loads((run / "stats.json").read_text())["written"]


def table(results: dict[str, dict], runs: dict[str, Path]) -> tuple[str, list[dict]]:
    from curate.train.eval.run import format_table

    rows = []
    for name, summary in results.items():
        for r in summary["results"]:
            rows.append({**r, "label": f"{name} ({written(runs[name])} samples), {r['scheduler']}"})
    reference = next(iter(results.values()))["reference"]
    text = format_table(rows, label="training data, scheduler")
    text += (f"\nheld-out reference: {reference['images']} images, CLIP score with their own captions "
             f"{reference.get('clip_score') or float('nan'):.2f}")
    return text, rows


def markdown(rows: list[dict], results: dict, args, seconds: float) -> str:
    import datetime

    any_summary = next(iter(results.values()))
    columns = [("fid", "FID", "{:.2f}"), ("kid", "KID", "{:.4f}"), ("fd_clip", "FD-CLIP ↓", "{:.4f}"),
               ("inception_score", "IS", "{:.2f}"), ("clip_score", "CLIP score ↑", "{:.2f}")]
    columns = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    lines = [f"{HEADING} ({datetime.date.today().isoformat()}, {any_summary['device']})", "",
             f"`python -m curate.train.eval.ablation --steps {args.steps}` ({seconds / 60:.1f} minutes): curate's tiny "
             f"model (VAE fitted for {args.vae_steps} steps, same start for both) trained {args.steps} steps, seed 0, on "
             f"the demo's {args.rows} rows, raw (`filters: []`) or curated (configs/demo.yaml); evaluated on "
             f"{any_summary['prompts']['count']} held-out prompts and images (fresh scenes, right captions) with "
             f"configs/eval-demo.yaml; CLIP = curate's tiny CLIP. Reference images' CLIP score with their captions: "
             f"{any_summary['reference'].get('clip_score') or float('nan'):.2f}.", "",
             "| training data | scheduler | " + " | ".join(c[1] for c in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for r in rows:
        lines.append(f"| {r['label'].split(',')[0]} | {r['scheduler']} {r['steps']} | "
                     + " | ".join(fmt.format(r[k]) if r.get(k) is not None else "–" for k, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="ablation-work")
    parser.add_argument("--rows", type=int, default=2000, help="the demo's data (make demo: 2000)")
    parser.add_argument("--steps", type=int, default=200, help="training steps of each model")
    parser.add_argument("--vae-steps", type=int, default=250)
    parser.add_argument("--heldout", type=int, default=200, help="held-out prompts and reference images")
    parser.add_argument("--inception", default="off", help="pytorch-fid's weights file, for FID / KID / IS")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--benchmarks", help="write the table into this markdown file (BENCHMARKS.md)")
    parser.add_argument("--fresh", action="store_true", help="start over")
    parser.add_argument("--heldout-only", action="store_true",
                        help="only write the held-out run (WORK/heldout), e.g. for `curate eval configs/eval-demo.yaml`")
    args = parser.parse_args(argv)

    from curate.pipeline.models.clip import TINY_CLIP
    from curate.pipeline.models.device import resolve_device

    started = time.time()
    work = Path(args.work)
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    heldout = heldout_run(work / "heldout", args.heldout, TINY_CLIP)
    if args.heldout_only:
        log(f"held-out run: {heldout}")
        return 0
    runs = demo_runs(work, args.rows)
    base = base_model(work / "base", args.vae_steps, device)
    results = {}
    for name, run in runs.items():
        trained = work / f"train-{name}"
        if not (trained / "pipeline" / "model_index.json").is_file():
            curate("train", str(REPO_CONFIGS / "train-demo.yaml"), "--overwrite", "--no-progress",
                   "--set", f"data.shards=[{run}]", "--set", "data.min_clip_similarity=null", "--set", "data.min_size=0",
                   "--set", f"model.pretrained={base}", "--set", f"training.steps={args.steps}",
                   "--set", f"training.device={args.device}", "--set", "validation.every=0",
                   "--set", f"output.path={trained}")
        evaluated = work / f"eval-{name}"
        curate("eval", str(REPO_CONFIGS / "eval-demo.yaml"), "--overwrite", "--no-progress",
               "--model", str(trained), "--output", str(evaluated),
               "--set", f"prompts.shards=[{heldout}]", "--set", f"prompts.count={args.heldout}",
               "--set", f"reference.count={args.heldout}", "--set", f"metrics.inception={args.inception}",
               "--set", f"generation.device={args.device}")
        results[name] = json.loads((evaluated / "eval.json").read_text())
    text, rows = table(results, runs)
    log("\n" + text)
    md = markdown(rows, results, args, time.time() - started)
    (work / "ablation.md").write_text(md)
    (work / "ablation.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1))
    if args.benchmarks:
        update_section(args.benchmarks, HEADING, md)
        log(f"{args.benchmarks} updated")
    log(f"\nsamples: {work}/eval-raw/grid-ddim.png, {work}/eval-curated/grid-ddim.png; "
        f"pages: {work}/eval-*/eval.html; table: {work}/ablation.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
