"""CLIP scoring throughput: curate's score stage against a clip-retrieval-style loader, same run.

Data: photo-like JPEGs of 256 px short side (256-384 px long side, ~18 KB) with captions of
10-20 words, in raw curate download shards (`{key}.jpg` + `{key}.json`), generated once into
bench-work/clip/ (a few thousand unique images repeated to fill the shards).

For each model (random weights: speed does not depend on them):

- baseline, clip-retrieval style: a torch DataLoader over `webdataset.WebDataset(shards)
  .decode("pil").to_tuple("jpg", "json")`, the model's open_clip preprocess and tokenizer
  mapped in the workers, batch 256, one worker per core (at most 16), pinned memory; the model
  in fp16 (`model.half()`); encode_image + encode_text + cosine similarity per batch, results
  to CPU numpy. Timed from the DataLoader's `iter()` (worker start-up included) to the last
  batch's numpy; the model is created and warmed beforehand. It writes nothing.
- curate: `pipeline.score.score_shard` over every shard, in this one process, on a GPU two
  shards at a time in two threads as a Dask GPU worker runs them (SCORE_TASKS_PER_GPU; nvJPEG
  decode, GPU preprocessing, bf16); again one shard at a time. Timed from the first shard's
  call to the last shard's done-marker, embeddings and metadata written; the model is loaded
  (`load_clip`) and warmed by one untimed shard beforehand.
- models alone: eager `encode_image` on random pixels + `encode_text` on caption tokens, no
  data at all: the ceiling for both.
- agreement: the same images scored by curate's GPU path and by its CPU path (PIL + open_clip
  preprocess, fp32), same weights: max |difference in similarity|.

    python bench/clip_score.py                       # GPU run; writes BENCHMARKS.md
    python bench/clip_score.py --quick --no-write    # CPU smoke test, tiny model, ~1 minute

--quick runs on CPU with a tiny open_clip architecture registered from a config written to
bench-work/clip/, 256 images in 2 shards; it never writes BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.download import cpu_name  # noqa: E402
from curate.pipeline.cluster import SCORE_TASKS_PER_GPU  # noqa: E402
from curate.pipeline.shards import sample_key, shard_name  # noqa: E402
from curate.pipeline.demo.synthetic import photo_like_jpeg  # noqa: E402
from curate.pipeline.tarshard import TarShardWriter, iter_tar_samples  # noqa: E402

WORK = REPO / "bench-work" / "clip"
HEADING = "## CLIP scoring"

# Targets for curate on one H100/H200 (images/s, end to end from tar shards).
TARGETS = {"ViT-B-32": 15_000, "ViT-L-14": 3_500}
# curate's batch size, the models-alone batch and the agreement subset, per model.
CURATE_BATCH = {"ViT-B-32": 1024, "ViT-L-14": 512}
ALONE_BATCH = {"ViT-B-32": 1024, "ViT-L-14": 256}
AGREE_IMAGES = {"ViT-B-32": 512, "ViT-L-14": 128}  # the CPU path of L-14 in fp32 is slow

# The --quick model: a ViT small enough that a CPU scores a few hundred images in seconds.
TINY = "bench-tiny-ViT"
TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# Photo-like JPEG quality: 92 and 93 alternate for a mean of about 18 KB at 256 x 256-384 px.
QUALITIES = (92, 93)


def log(*args) -> None:
    print(*args, flush=True)


# ---------------------------------------------------------------- data


def _unique_image(index: int) -> tuple[bytes, int, int]:
    rng = random.Random(1_000_003 * index + 17)
    long = rng.randint(256, 384)
    width, height = (long, 256) if rng.random() < 0.5 else (256, long)
    return photo_like_jpeg(width, height, rng, quality=rng.choice(QUALITIES)), width, height


def _caption_vocabulary() -> list[str]:
    """Whole-word tokens of CLIP's BPE vocabulary, roughly in frequency order (merge order)."""
    from open_clip.tokenizer import SimpleTokenizer

    words = []
    for token in SimpleTokenizer().encoder:
        if token.endswith("</w>"):
            word = token[:-4]
            if len(word) >= 3 and word.isalpha():
                words.append(word)
    return words


def make_captions(n: int, seed: int = 0) -> list[str]:
    """n distinct captions of 10-20 words drawn Zipf-like from a ~30k-word vocabulary."""
    vocab = _caption_vocabulary()
    cum = list(itertools.accumulate(1.0 / (rank + 20) for rank in range(len(vocab))))
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        words = rng.choices(vocab, cum_weights=cum, k=rng.randint(10, 20))
        words[0] = words[0].capitalize()
        if rng.random() < 0.4:
            at = rng.randint(2, len(words) - 2)
            words[at] += ","
        captions.append(" ".join(words))
    return captions


def make_shards(n_images: int, shard_size: int, n_unique: int, processes: int) -> tuple[Path, dict]:
    """Raw download shards 00000.tar ... in a folder named by the settings; made once, reused."""
    folder = WORK / f"shards-{n_images}x{shard_size}-u{n_unique}"
    marker = folder / "complete.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        log(f"data: reusing {folder.relative_to(REPO)} ({info['images']} images in {info['shards']} shards)")
        return folder, info
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    with multiprocessing.Pool(processes) as pool:
        unique = pool.map(_unique_image, range(n_unique), chunksize=max(1, n_unique // (processes * 8)))
    generated = time.perf_counter() - started
    captions = make_captions(n_images)
    n_shards = -(-n_images // shard_size)
    index = 0
    for shard in range(n_shards):
        with TarShardWriter(folder / f"{shard_name(shard)}.tar") as tar:
            for i in range(min(shard_size, n_images - shard * shard_size)):
                jpg, width, height = unique[index % n_unique]
                key = sample_key(shard, i, shard_size)
                meta = {"key": key, "url": f"https://images.example.com/{index}.jpg", "caption": captions[index],
                        "width": width, "height": height}
                tar.write(key, {"jpg": jpg, "json": json.dumps(meta).encode()})
                index += 1
    sizes = [len(u[0]) for u in unique]
    used = [len(unique[i % n_unique][0]) for i in range(n_images)]
    words = [len(c.split()) for c in captions]
    info = {
        "images": n_images, "shards": n_shards, "shard_size": shard_size, "unique": n_unique,
        "mean_kb": sum(used) / len(used) / 1024, "min_kb": min(sizes) / 1024, "max_kb": max(sizes) / 1024,
        "mean_words": sum(words) / len(words),
        "tar_mb": sum(p.stat().st_size for p in folder.glob("*.tar")) / 2**20,
    }
    marker.write_text(json.dumps(info, indent=1))
    log(f"data: {n_unique} unique images in {generated:.1f} s on {processes} processes, {n_images} samples in "
        f"{n_shards} shards written in {time.perf_counter() - started:.1f} s total ({info['tar_mb']:.0f} MB)")
    return folder, info


def make_subset_shard(shards_dir: Path, n: int) -> Path:
    """The first n samples of shard 0 as shard 0 of another folder (same keys)."""
    folder = WORK / f"agree-{shards_dir.name}-{n}"
    tar_path = folder / f"{shard_name(0)}.tar"
    if tar_path.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tmp = tar_path.with_suffix(".tmp")
    with TarShardWriter(tmp) as tar:
        for i, (key, fields) in enumerate(iter_tar_samples(shards_dir / f"{shard_name(0)}.tar")):
            if i == n:
                break
            tar.write(key, fields)
    tmp.rename(tar_path)
    return folder


# ---------------------------------------------------------------- helpers


def register_tiny_model() -> None:
    import open_clip

    folder = WORK / "model_configs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CONFIG, indent=1))
    if TINY not in open_clip.list_models():
        open_clip.add_model_config(path)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forget_models() -> None:
    """Drop curate's per-process model caches so the next model has the GPU to itself."""
    import torch
    from curate.pipeline.models.cache import forget

    forget("scorer")
    forget("clip")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def copy_weights(src, dst) -> None:
    """Give `dst` (a LoadedClip) the weights of `src`, whatever their devices and dtypes."""
    state = {}
    for key, value in src.model.state_dict().items():
        value = value.detach().to("cpu")
        state[key] = value.to(dst.dtype) if value.is_floating_point() else value
    dst.model.load_state_dict(state)  # copies into dst's parameters, on dst's device


def slug(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in model)


def fmt_rate(x: Optional[float]) -> str:
    return f"{x:,.0f}" if x is not None else "—"


# ---------------------------------------------------------------- measurements


class _Prep:
    """Runs in the DataLoader workers: the model's own preprocess and tokenizer, per sample."""

    def __init__(self, preprocess, tokenizer):
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __call__(self, sample):
        image, meta = sample
        return self.preprocess(image), self.tokenizer([meta.get("caption") or ""])[0]


def run_baseline(model_name: str, tars: list[Path], device: str, workers: int, batch: int) -> dict:
    import open_clip
    import torch
    import webdataset as wds

    started = time.perf_counter()
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=None, device=device, weights_only=True)
    model.eval()
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model = model.to(dtype)
    tokenizer = open_clip.get_tokenizer(model_name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    with torch.inference_mode():  # warm-up: kernels and cuBLAS handles, outside the timing
        model.encode_image(torch.randn(batch, 3, size, size, device=device, dtype=dtype), normalize=True)
        model.encode_text(tokenizer(["a warm-up caption"] * batch).to(device), normalize=True)
    sync(device)
    load_s = time.perf_counter() - started

    n_workers = max(1, min(workers, len(tars)))  # webdataset gives each worker whole shards
    dataset = (
        wds.WebDataset([str(t) for t in tars], shardshuffle=False)
        .decode("pil")
        .to_tuple("jpg", "json")
        .map(_Prep(preprocess, tokenizer))
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, num_workers=n_workers, pin_memory=device.startswith("cuda"))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    n = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for images, tokens in loader:
            images = images.to(device, non_blocking=True).to(dtype)
            tokens = tokens.to(device, non_blocking=True)
            img = model.encode_image(images, normalize=True)
            txt = model.encode_text(tokens, normalize=True)
            sim = (img * txt).sum(dim=-1)
            img_np, txt_np, sim_np = img.float().cpu().numpy(), txt.float().cpu().numpy(), sim.float().cpu().numpy()
            n += len(sim_np)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    del model, img_np, txt_np
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"images": n, "seconds": seconds, "rate": n / seconds, "workers": n_workers, "load_s": load_s,
            "peak": peak}


def clip_cfg(model: str, device: str, precision: str, batch: int, gpu_decode: bool = True,
             reader_processes="auto"):
    from curate.pipeline.config import ClipConfig

    return ClipConfig(enabled=True, model=model, pretrained=None, device=device, precision=precision,
                      batch_size=batch, gpu_decode=gpu_decode, reader_processes=reader_processes)


def score_all(shards_dir: Path, shard_ids: list[int], out: Path, cfg, at_once: int = 1) -> tuple[int, list[float]]:
    """score_shard over the shards, `at_once` of them at a time in threads of this process (as a
    Dask GPU worker runs its score tasks: pipeline/cluster.py, SCORE_TASKS_PER_GPU)."""
    from concurrent.futures import ThreadPoolExecutor

    from curate.pipeline.stages.score import score_shard

    shutil.rmtree(out, ignore_errors=True)

    def one(sid):
        return score_shard(sid, {}, str(shards_dir), str(out / "emb"), str(out / "markers"), cfg)

    with ThreadPoolExecutor(at_once) as pool:
        results = list(pool.map(one, shard_ids))
    n, per_shard = 0, []
    for sid, stats in zip(shard_ids, results):
        n += stats["scored"] + stats["decode_errors"]
        per_shard.append(stats["seconds"])
        if stats["decode_errors"]:
            log(f"    shard {sid}: {stats['decode_errors']} decode errors")
    return n, per_shard


def run_curate(model: str, shards_dir: Path, n_shards: int, device: str, batch: int, reader_processes: int,
               at_once: int = 1) -> dict:
    import torch
    from curate.pipeline.models.clip import load_clip

    precision = "bf16" if device.startswith("cuda") else "fp32"
    cfg = clip_cfg(model, device, precision, batch, reader_processes=reader_processes)
    started = time.perf_counter()
    load_clip(model, None, device, precision)
    sync(device)
    load_s = time.perf_counter() - started

    # Warm-up: one whole shard, untimed (nvJPEG handles, kernels, cuBLAS, the allocator). Its
    # results are kept: the agreement check compares them with the CPU path.
    warm = WORK / "out" / slug(model) / "warmup"
    started = time.perf_counter()
    score_all(shards_dir, [0], warm, cfg)
    sync(device)
    warm_s = time.perf_counter() - started

    out = WORK / "out" / slug(model) / "timed"
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    n, per_shard = score_all(shards_dir, list(range(n_shards)), out, cfg, at_once)
    sync(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    shutil.rmtree(out, ignore_errors=True)
    return {"images": n, "seconds": seconds, "rate": n / seconds, "batch": batch, "load_s": load_s,
            "warm_s": warm_s, "per_shard": per_shard, "peak": peak, "warm_dir": warm / "emb", "cfg": cfg,
            "readers": reader_processes, "at_once": at_once}


SCALING_WORKER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from bench.clip_score import SCORE_TASKS_PER_GPU, clip_cfg, score_all
from pathlib import Path
model, shards, out, batch, part, parts, n_shards = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
cfg = clip_cfg(model, "cuda", "bf16", batch)
score_all(shards, [part % n_shards], out / "warm", cfg)  # load + warm-up, untimed
print("READY", flush=True)
sys.stdin.readline()
started = time.perf_counter()
n, _ = score_all(shards, list(range(part, n_shards, parts)), out / "timed", cfg, SCORE_TASKS_PER_GPU)
print("DONE", n, time.perf_counter() - started, flush=True)
"""


def run_scaling(model: str, shards_dir: Path, n_shards: int, batch: int, gpus: int) -> dict:
    """curate's score stage on 1 and on `gpus` GPUs at once: one process per GPU (as one Dask GPU
    worker per GPU runs it), each scoring every gpus-th shard; all start together after their
    warm-up, timed until the last finishes."""
    rates = {}
    for n in sorted({1, gpus}):
        procs = []
        for i in range(n):
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(i))
            procs.append(subprocess.Popen(
                [sys.executable, "-c", SCALING_WORKER, str(REPO), model, str(shards_dir),
                 str(WORK / "out" / slug(model) / f"scale{n}-{i}"), str(batch), str(i), str(n), str(n_shards)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
        for p in procs:
            line = p.stdout.readline()
            if not line.startswith("READY"):
                raise RuntimeError(f"scaling worker failed to start: {line!r}")
        started = time.perf_counter()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        images = 0
        for p in procs:
            done = p.stdout.readline().split()
            if not done or done[0] != "DONE":
                raise RuntimeError("scaling worker failed")
            images += int(done[1])
            p.wait()
        seconds = time.perf_counter() - started
        rates[n] = {"images": images, "seconds": seconds, "rate": images / seconds}
        log(f"  {model} scaling, {n} GPU(s): {images} images in {seconds:.2f} s = {images / seconds:,.0f} images/s")
    result = {"gpus": gpus, "rates": rates}
    if gpus > 1:
        result["efficiency"] = rates[gpus]["rate"] / (gpus * rates[1]["rate"])
    return result


def run_models_alone(model: str, device: str, precision: str, batch: int, captions: list[str],
                     min_seconds: float, mode: str = "full") -> dict:
    """Eager encode_image + encode_text on ready tensors. mode "full": the text tower over all
    77 positions (open_clip's own calls); "trimmed": text padding cut to the longest caption,
    as curate runs it (pipeline/clip_text.py)."""
    import torch
    from curate.pipeline.models.clip import load_clip

    clip = load_clip(model, None, device, precision)
    size = clip.image_size
    pixels = torch.randn(batch, 3, size, size, device=device).clamp_(-2, 2).to(clip.dtype)
    tokens = clip.tokenizer((captions * (batch // max(1, len(captions)) + 1))[:batch])
    tokens = (tokens if mode == "full" else clip.prepare_tokens(tokens)).to(device)

    def step():
        if mode == "full":
            clip.model.encode_image(pixels, normalize=True)
            clip.model.encode_text(tokens, normalize=True)
        else:
            clip.encode_image(pixels)
            clip.encode_text(tokens)

    with torch.inference_mode():
        for _ in range(2):
            step()
        sync(device)
        iters, started = 0, time.perf_counter()
        while True:
            step()
            sync(device)
            iters += 1
            if iters >= 3 and time.perf_counter() - started >= min_seconds:
                break
        seconds = time.perf_counter() - started
    return {"images": batch * iters, "seconds": seconds, "rate": batch * iters / seconds, "batch": batch}


def run_stages(model: str, shards_dir: Path, cfg) -> dict:
    """curate's per-batch work taken apart on shard 0, each stage alone, in this process: reading
    the tar (+ json), tokenizing the captions, decoding + preprocessing the images. Shows which
    stage bounds the end-to-end rate (they run one after another in score.py's main thread,
    except the tar reading, which a thread overlaps)."""
    import torch
    from curate.pipeline.stages.score import ClipScorer
    from curate.pipeline.score_reader import ReaderPool, read_batches

    tar = shards_dir / f"{shard_name(0)}.tar"
    started = time.perf_counter()
    batches = list(read_batches(tar, cfg.batch_size))
    read_s = time.perf_counter() - started
    pool = ReaderPool(cfg.model, 2)
    try:
        list(pool.batches(tar, cfg.batch_size))  # start-up and warm-up
        started = time.perf_counter()
        for _ in pool.batches(tar, cfg.batch_size):
            pass
        readers_s = time.perf_counter() - started
    finally:
        pool.close()
    n = sum(len(b.keys) for b in batches)
    scorer = ClipScorer(cfg)
    clip = scorer.clip
    started = time.perf_counter()
    for b in batches:
        clip.tokenizer(b.captions)
    tokenize_s = time.perf_counter() - started
    gpu_path = scorer.on_gpu and cfg.gpu_decode
    nvjpeg = None
    if gpu_path:  # score.py silently falls back to PIL per image when nvJPEG fails: say so here
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            data = torch.frombuffer(bytearray(batches[0].jpgs[0]), dtype=torch.uint8)
            decode_jpeg([data, data], mode=ImageReadMode.RGB, device=clip.device)
            nvjpeg = "ok"
        except Exception as exc:
            nvjpeg = f"FAILED ({_short_error(exc)})"
    pixels = scorer._pixels_gpu if gpu_path else scorer._pixels_cpu
    with torch.inference_mode():
        pixels(batches[0].jpgs)  # warm-up
        sync(clip.device)
        started = time.perf_counter()
        for b in batches:
            pixels(b.jpgs)
        sync(clip.device)
        decode_s = time.perf_counter() - started
    decode_threads = {t: n / _decode_in_threads(scorer, batches, t) for t in (2, 3, 4)} if gpu_path else {}
    return {"images": n, "read": n / read_s, "tokenize": n / tokenize_s, "decode": n / decode_s,
            "readers": n / readers_s, "decode_threads": decode_threads,
            "decode_what": "nvJPEG + GPU preprocess" if gpu_path else "PIL + open_clip preprocess",
            "nvjpeg": nvjpeg}


def _decode_in_threads(scorer, batches: list, threads: int) -> float:
    """Seconds to decode + preprocess `batches` on the GPU in `threads` threads, each on its own
    CUDA stream, as score.py's embed_all does (PREPARE_THREADS of them) while the model runs."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    local = threading.local()

    def prepare(batch):
        if not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream()
        with torch.cuda.stream(local.stream), torch.inference_mode():
            scorer._pixels_gpu(batch.jpgs)
        local.stream.synchronize()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(prepare, batches[:threads]))  # each thread's stream and nvJPEG state
        started = time.perf_counter()
        list(pool.map(prepare, batches))
        return time.perf_counter() - started


def _similarities(emb_dir: Path) -> dict[str, float]:
    from curate.pipeline.embeddings import read_scores

    return {k: s for k, (s, _, _) in read_scores(emb_dir, 0).items() if s is not None}


def _max_diff(a: dict[str, float], b: dict[str, float]) -> tuple[float, float, int]:
    keys = sorted(set(a) & set(b))
    d = np.abs(np.array([a[k] for k in keys]) - np.array([b[k] for k in keys]))
    return (float(d.max()), float(d.mean()), len(keys)) if len(keys) else (float("nan"), float("nan"), 0)


def run_agreement(model: str, shards_dir: Path, n: int, device: str, curate: dict) -> dict:
    """GPU path (bf16, nvJPEG; and in fp32) against the CPU path (PIL, fp32) on the same images."""
    from curate.pipeline.models.clip import load_clip

    subset = make_subset_shard(shards_dir, n)
    base = WORK / "out" / slug(model) / "agree"
    shutil.rmtree(base, ignore_errors=True)
    main = load_clip(model, None, curate["cfg"].device, curate["cfg"].precision)

    cpu_clip = load_clip(model, None, "cpu", "fp32")
    if cpu_clip is not main:
        copy_weights(main, cpu_clip)
    started = time.perf_counter()
    score_all(subset, [0], base / "cpu", clip_cfg(model, "cpu", "fp32", 64))
    cpu_s = time.perf_counter() - started
    cpu_sims = _similarities(base / "cpu" / "emb")

    result = {"images": len(cpu_sims), "cpu_s": cpu_s}
    if device.startswith("cuda"):
        # curate's own GPU run (the warm-up shard) on the same keys.
        result["max"], result["mean"], result["compared"] = _max_diff(_similarities(curate["warm_dir"]), cpu_sims)
        fp32 = load_clip(model, None, device, "fp32")
        copy_weights(main, fp32)
        score_all(subset, [0], base / "gpu-fp32", clip_cfg(model, device, "fp32", 256))
        result["fp32_max"], result["fp32_mean"], _ = _max_diff(_similarities(base / "gpu-fp32" / "emb"), cpu_sims)
        result["what"] = "GPU path (nvJPEG, GPU preprocess, bf16) vs CPU path (PIL, open_clip preprocess, fp32)"
    else:
        # No GPU: run the GPU path's code (batched torchvision decode + gpu_preprocess) on the CPU.
        result["max"], result["mean"], result["compared"] = _max_diff(
            _gpu_path_on_cpu(cpu_clip, subset / f"{shard_name(0)}.tar", model), cpu_sims)
        result["what"] = ("GPU path's code run on the CPU (torchvision decode + gpu_preprocess, fp32) "
                          "vs CPU path (PIL, open_clip preprocess, fp32)")
    return result


def _gpu_path_on_cpu(clip, tar_path: Path, model: str) -> dict[str, float]:
    from curate.pipeline.stages.score import ClipScorer
    from curate.pipeline.score_reader import read_batches

    class GpuPathOnCpu(ClipScorer):
        on_gpu = True  # takes _pixels_gpu with the model's device (cpu)

    scorer = GpuPathOnCpu(clip_cfg(model, "cpu", "fp32", 64))
    scorer._clip = clip
    sims = {}
    for batch in read_batches(tar_path, 64):
        img, txt, errors = scorer.embed(batch)
        for key, s, e in zip(batch.keys, (img * txt).sum(axis=1), errors):
            if e is None:
                sims[key] = float(s)
    return sims


# ---------------------------------------------------------------- main


def _version(package: str) -> str:
    from importlib.metadata import version

    try:
        return version(package)
    except Exception:
        return "?"


def _short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")[:160]


def bench_model(model: str, args, shards_dir: Path, info: dict, device: str, captions: list[str]) -> dict:
    import torch

    torch.manual_seed(0)  # the same random weights in every run
    row: dict = {"model": model}
    quick = args.quick
    batch = args.batch or (64 if quick else CURATE_BATCH.get(model, 512))
    tars = sorted(shards_dir.glob("*.tar"))

    steps = []
    if not args.skip_baseline:
        steps.append(("baseline", lambda: run_baseline(model, tars, device, args.workers, 64 if quick else 256)))
    # As curate runs on a GPU: 2 reader processes, SCORE_TASKS_PER_GPU shards at once; then the
    # same one shard at a time.
    at_once = SCORE_TASKS_PER_GPU if device.startswith("cuda") else 1
    steps.append(("curate", lambda: run_curate(model, shards_dir, info["shards"], device, batch, 2, at_once)))
    if at_once > 1:
        steps.append(("curate_one", lambda: run_curate(model, shards_dir, info["shards"], device, batch, 2, 1)))
    precision = "bf16" if device.startswith("cuda") else "fp32"
    alone_batch = 32 if quick else ALONE_BATCH.get(model, 256)
    steps.append(("stages", lambda: run_stages(model, shards_dir, row["curate"]["cfg"])))
    steps.append(("alone", lambda: run_models_alone(model, device, precision, alone_batch, captions,
                                                    0.5 if quick else 3.0)))
    steps.append(("alone_trim", lambda: run_models_alone(model, device, precision, alone_batch, captions,
                                                         0.5 if quick else 3.0, mode="trimmed")))
    if args.gpus > 1:
        steps.append(("scaling", lambda: run_scaling(model, shards_dir, info["shards"], batch, args.gpus)))
    agree_n = args.agree_images or (64 if quick else AGREE_IMAGES.get(model, 256))
    steps.append(("agree", lambda: run_agreement(model, shards_dir, agree_n, device, row["curate"])))

    for name, fn in steps:
        if name in ("agree", "stages") and "curate" not in row:
            row[f"{name}_error"] = "skipped: the curate run failed"
            continue
        try:
            row[name] = result = fn()
        except Exception as exc:
            traceback.print_exc()
            row[f"{name}_error"] = _short_error(exc)
            log(f"  {model} {name}: FAILED {row[f'{name}_error']}")
            continue
        if name == "baseline":
            log(f"  {model} baseline: {result['images']} images in {result['seconds']:.2f} s = {result['rate']:,.0f} "
                f"images/s ({result['workers']} workers; model create+warm-up {result['load_s']:.1f} s, untimed"
                + (f"; peak GPU memory {result['peak'] / 2**30:.1f} GiB" if result["peak"] else "") + ")")
        elif name in ("curate", "curate_one"):
            shards = ", ".join(f"{s:.2f}" for s in result["per_shard"])
            log(f"  {model} {name} ({result['readers']} reader processes, {result['at_once']} shard(s) at once): {result['images']} images in {result['seconds']:.2f} s = {result['rate']:,.0f} "
                f"images/s (batch {result['batch']}; load {result['load_s']:.1f} s and warm-up shard "
                f"{result['warm_s']:.1f} s untimed; per shard s: {shards})")
        elif name == "stages":
            log(f"  {model} curate stages alone on {result['images']} images: tar read + json {result['read']:,.0f}/s, "
                f"tokenizer {result['tokenize']:,.0f}/s, 2 reader processes (read + tokenize) {result['readers']:,.0f}/s, {result['decode_what']} {result['decode']:,.0f}/s"
                + "".join(f", in {t} threads {r:,.0f}/s" for t, r in result.get("decode_threads", {}).items())
                + (f"; batched nvJPEG decode: {result['nvjpeg']}" if result["nvjpeg"] else ""))
        elif name in ("alone", "alone_trim"):
            log(f"  {model} models alone{' (text padding trimmed)' if name == 'alone_trim' else ''}: "
                f"{result['rate']:,.0f} images/s (batch {result['batch']}, {result['images']} images in "
                f"{result['seconds']:.2f} s)")
        elif name == "agree":
            extra = f", GPU fp32 vs CPU: max {result['fp32_max']:.4f}" if "fp32_max" in result else ""
            log(f"  {model} agreement on {result['compared']} images: max |Δ similarity| {result['max']:.4f}, "
                f"mean {result['mean']:.5f}{extra} (CPU path {result['cpu_s']:.1f} s) — {result['what']}")
    return row


def render(rows: list[dict], args, info: dict, device: str, device_name: str, total_s: float) -> str:
    import torch

    gpu = device.startswith("cuda")
    date = datetime.date.today().isoformat()
    cores = os.cpu_count() or 1
    workers = {r["baseline"]["workers"] for r in rows if "baseline" in r}
    lines = [
        f"{HEADING} ({date}, {device_name})",
        "",
        f"`bench/clip_score.py{' --quick' if args.quick else ''}`: {info['images']:,} photo-like JPEGs "
        f"({info['unique']:,} unique, repeated), 256 px short side × 256–384 px, mean {info['mean_kb']:.1f} KB, "
        f"in {info['shards']} raw curate shards of {info['shard_size']:,}; captions of 10–20 words "
        f"(mean {info['mean_words']:.1f}). Random weights. {cpu_name()}, {cores} cores; torch {torch.__version__}, "
        f"torchvision {_version('torchvision')}, open_clip {_version('open_clip_torch')}, "
        f"webdataset {_version('webdataset')}. Whole run {total_s / 60:.1f} min.",
        "",
        f"- **baseline** (clip-retrieval style): `webdataset.WebDataset(shards).decode(\"pil\").to_tuple(\"jpg\", "
        f"\"json\")`, open_clip preprocess + tokenizer in {'/'.join(str(w) for w in sorted(workers)) or '—'} "
        f"DataLoader workers (one per shard at most), batch {64 if args.quick else 256}"
        f"{', pinned memory' if gpu else ''}; model {'fp16 (`model.half()`)' if gpu else 'fp32'}; encode_image + "
        "encode_text + cosine similarity, results to CPU numpy, nothing written. Timed from `iter(loader)` "
        "(worker start-up included) to the last batch; model created and warmed beforehand.",
        f"- **curate**: `pipeline.score.score_shard` over every shard in order, one process "
        f"({'nvJPEG decode, GPU preprocessing, bf16' if gpu else 'CPU path: PIL, open_clip preprocess, fp32'}) "
        "with 2 reader processes reading the tar and tokenizing (pipeline/score_reader.py)"
        + (f", {SCORE_TASKS_PER_GPU} shards at a time in threads, as a Dask GPU worker runs its score tasks "
           "(pipeline/cluster.py); *one shard at a time*: the same, shard after shard" if gpu else "")
        + ". Timed from the first shard's call to the last done-marker, embeddings and metadata written; "
        "model loaded and one shard scored (warm-up) beforehand.",
        f"- **models alone**: eager {'bf16' if gpu else 'fp32'} encode_image (random pixels) + encode_text "
        "(caption tokens), no data: the ceiling; first with the text tower over all 77 positions (open_clip's "
        "`encode_text`), then as curate runs it, padding trimmed to the batch's longest caption (same result, "
        "pipeline/clip_text.py).",
        "- **max |Δ sim|**: the same images through curate's "
        + ("GPU path (bf16) and CPU path (PIL + open_clip preprocess, fp32), same weights; in brackets the GPU path "
           "in fp32 (preprocessing alone). Required: ≤ 0.01." if gpu else
           "GPU path's code run on the CPU (torchvision decode + gpu_preprocess) and its CPU path, fp32, same "
           "weights. Required: ≤ 0.01."),
        "",
        "| model | baseline images/s | curate images/s | speed-up | curate, one shard at a time | models alone "
        "images/s (77 / trimmed) | target (curate) | peak GPU memory (curate) | max \\|Δ sim\\| |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        b, c, a, g = r.get("baseline"), r.get("curate"), r.get("alone"), r.get("agree")
        base = (f"{fmt_rate(b['rate'])} ({b['images']:,} images)" if b else
                r.get("baseline_error", "skipped"))
        cur = f"{fmt_rate(c['rate'])} ({c['images']:,} images, batch {c['batch']})" if c else r.get("curate_error")
        speed = f"{c['rate'] / b['rate']:.2f}×" if b and c else "—"
        at = r.get("alone_trim")
        alone = (f"{fmt_rate(a['rate'])} / {fmt_rate(at['rate']) if at else r.get('alone_trim_error')} "
                 f"(batch {a['batch']})" if a else r.get("alone_error"))
        target = TARGETS.get(r["model"]) if gpu else None
        if target is None:
            tgt = "n/a (CPU)" if not gpu else "—"
        else:
            tgt = f"≥ {target:,}: " + ("met" if c and c["rate"] >= target else "MISSED")
        peak = f"{c['peak'] / 2**30:.1f} GiB" if c and c.get("peak") else "—"
        if g:
            agree = f"{g['max']:.4f}" + (f" ({g['fp32_max']:.4f})" if "fp32_max" in g else "")
            agree += f", {g['compared']} images: " + ("ok" if g["max"] <= 0.01 else "OVER 0.01")
        else:
            agree = r.get("agree_error", "—")
        co = r.get("curate_one")
        one_at_a_time = fmt_rate(co["rate"]) if co else r.get("curate_one_error", "—")
        lines.append(f"| {r['model']} | {base} | {cur} | {speed} | {one_at_a_time} | {alone} | {tgt} | {peak} | {agree} |")
    lines.append("")
    stages = [r for r in rows if "stages" in r]
    if stages:
        lines.append("curate's stages, each alone on shard 0 (images/s; in score.py these overlap: tar reading + "
                     "tokenizing in 2 reader processes, decoding + preprocessing in two threads on side CUDA streams, "
                     "and the model): "
                     + "; ".join(f"{r['model']}: tar read + json {fmt_rate(r['stages']['read'])} and tokenizer "
                                 f"{fmt_rate(r['stages']['tokenize'])} in one thread, 2 reader processes "
                                 f"{fmt_rate(r['stages']['readers'])}, {r['stages']['decode_what']} "
                                 f"{fmt_rate(r['stages']['decode'])}"
                                 + "".join(f", in {t} threads {fmt_rate(v)}"
                                           for t, v in r["stages"]["decode_threads"].items())
                                 for r in stages) + "."
                     + (f" Batched nvJPEG decode: {stages[0]['stages']['nvjpeg']}." if stages[0]["stages"]["nvjpeg"]
                        else ""))
        lines.append("")
    scaled = [r for r in rows if "scaling" in r]
    for r in scaled:
        sc = r["scaling"]
        one, many = sc["rates"][1], sc["rates"][sc["gpus"]]
        lines.append(f"Scaling, {r['model']} (one scoring process per GPU, each with its reader processes, every "
                     f"{sc['gpus']}th shard): 1 GPU {fmt_rate(one['rate'])} images/s, {sc['gpus']} GPUs "
                     f"{fmt_rate(many['rate'])} images/s: **{sc['efficiency']:.0%} efficiency** (goal ≥ 90%: "
                     + ("met" if sc["efficiency"] >= 0.9 else "MISSED") + ").")
        lines.append("")
    for r in rows:
        if "scaling_error" in r:
            lines.append(f"Scaling, {r['model']}: failed: {r['scaling_error']}")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma-separated open_clip names (default ViT-B-32,ViT-L-14)")
    parser.add_argument("--images", type=int, default=None, help="total images in shards (default 80000)")
    parser.add_argument("--shard-size", type=int, default=None, help="images per shard (default 5000)")
    parser.add_argument("--unique", type=int, default=4000, help="distinct JPEGs, repeated to fill the shards")
    parser.add_argument("--workers", type=int, default=None, help="baseline DataLoader workers (default min(16, cores))")
    parser.add_argument("--batch", type=int, default=None, help="curate batch size (default 1024 B-32, 512 otherwise)")
    parser.add_argument("--agree-images", type=int, default=None, help="images for the GPU/CPU agreement check")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: tiny model, 256 images, no write")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--gpus", type=int, default=1, help="also measure scaling over this many GPUs")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    args.models = args.models or (TINY if args.quick else "ViT-B-32,ViT-L-14")
    # 16 shards by default: webdataset hands each DataLoader worker whole shards, so fewer shards
    # than workers would leave baseline workers idle.
    args.images = args.images or (256 if args.quick else 80_000)
    args.shard_size = args.shard_size or (128 if args.quick else 5_000)
    args.workers = args.workers or (2 if args.quick else min(16, cores))
    run_started = time.perf_counter()

    # Data first, before torch is imported (the generator pool forks).
    shards_dir, info = make_shards(args.images, args.shard_size, min(args.unique, args.images), cores)
    log(f"data: {info['images']} images, mean {info['mean_kb']:.1f} KB (unique: {info['min_kb']:.1f}–"
        f"{info['max_kb']:.1f} KB), captions of {info['mean_words']:.1f} words on average, "
        f"{info['shards']} shards in {shards_dir.relative_to(REPO)}")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if TINY in args.models:
        register_tiny_model()
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU only: {cpu_name()}"
    log(f"device: {device_name}; torch {torch.__version__}; {cores} cores; baseline workers {args.workers}")
    if device == "cpu" and not args.quick:
        log("warning: no GPU; the default sizes are meant for a GPU (use --quick on a CPU)")
    try:
        shm = shutil.disk_usage("/dev/shm").total
        if shm < 4 * 2**30:
            log(f"warning: /dev/shm is {shm / 2**30:.1f} GiB; the baseline DataLoader passes batches through it")
    except OSError:
        pass
    captions = make_captions(1024, seed=1)

    rows = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        log(f"\n== {model}")
        try:
            rows.append(bench_model(model, args, shards_dir, info, device, captions))
        except Exception as exc:
            traceback.print_exc()
            rows.append({"model": model, "curate_error": _short_error(exc)})
        finally:
            try:
                forget_models()
            except Exception:
                traceback.print_exc()
        # Written after every model, so that a run stopped by a time limit keeps what it measured.
        table = render(rows, args, info, device, device_name, time.perf_counter() - run_started)
        if not args.quick and not args.no_write:
            from bench.download import update_benchmarks

            update_benchmarks(HEADING, table)
            log(f"BENCHMARKS.md updated ({len(rows)} model(s))")

    log("\n" + table)
    if args.quick:
        log("(--quick: BENCHMARKS.md not written)")


if __name__ == "__main__":
    main()
