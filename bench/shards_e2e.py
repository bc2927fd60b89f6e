"""`curate run` end to end over existing WebDataset shards, beside a clip-retrieval-style loop, same run.

Data: photo-like JPEGs with sides of 256-512 px (each side drawn on its own) and captions of
10-20 words, in img2dataset's layout: 10,000-sample tars `00000.tar` ... holding `{key}.jpg`,
`{key}.txt` (the caption) and `{key}.json` (url, caption, key, status, width, height, original
size, sha256, LAION's similarity / punsafe / pwatermark), written with webdataset's TarWriter as
img2dataset writes them, keys as img2dataset forms them (shard id, then the index in the shard),
plus img2dataset's per-shard `NNNNN.parquet` and `NNNNN_stats.json`. A few thousand unique
images are repeated to fill the tars. Generated once, on every core, into bench-work/shards-e2e/
(a folder per size setting) and reused.

For each model (open_clip names, `pretrained: null`: random weights, speed does not depend on them):

- curate: `python -m curate.pipeline.cli run CONFIG --progress-every 2` in a subprocess, as a user runs
  it: `input: {paths: [TARS], format: webdataset}`, clip enabled on cuda (bf16, batch 1024 for
  ViT-B-32, 512 for ViT-L-14: what bench/clip_score.py gives curate), one cheap filter
  (`resolution` min_side 264, judged on the image header: drops ~6%), a fresh output folder.
  Timed by the wall clock from the start of the subprocess to its exit (interpreter, Dask cluster
  start-up and model loading included, as a user waits for them); images/s end to end = images
  read (stats.json rows_in) / those seconds. stats.json's own duration and rate are shown too.
  While it runs, `nvidia-smi --query-compute-apps=pid,used_memory` every 0.2 s: the peak of each
  process (the curate run's GPU worker) and of their total.
- baseline, clip-retrieval style: bench/clip_score.py's `run_baseline` over the same tars (a
  torch DataLoader over `webdataset.WebDataset(tars).decode("pil")`, open_clip preprocess in the
  workers, fp16 model, batch 256; model created and warmed beforehand, untimed; nothing written).
  webdataset gives each DataLoader worker whole tars: at most one worker per tar.
- model alone: bench/clip_score.py's `run_models_alone` (eager encode_image on random pixels +
  encode_text, no data), the text tower over all 77 positions and trimmed as curate runs it.

Targets: ViT-B-32 >= 12,000 images/s end to end; ViT-L-14 >= 90% of the model alone (trimmed:
the ceiling for curate's own forward pass).

    python bench/shards_e2e.py                        # GPU run; writes BENCHMARKS.md after each model
    python bench/shards_e2e.py --quick --no-write     # CPU dry run: tiny CLIP, 2,000 images in 2 tars
    python bench/shards_e2e.py --pycache /tmp/pyc     # where this host writes no bytecode (see bytecode_state)

The table's header says whether fresh processes import from cached bytecode: on the H200 host of session
13, PYTHONDONTWRITEBYTECODE was set and torch had no .pyc files, so every GPU worker compiled torch,
torchvision and open_clip from source (`import open_clip` 13.8-15.5 s), seconds of the start that a
normal install does not pay; --pycache measures the run as from one.

--quick runs everything on the CPU with curate's shipped tiny CLIP (`local-dir:` model, so the
Dask workers of the `curate run` subprocess load it too: an open_clip architecture registered in
this process would not exist there), 2,000 images in 2 tars; it never writes BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.clip_score import (  # noqa: E402
    ALONE_BATCH, CURATE_BATCH, QUALITIES, _short_error, _version, fmt_rate, forget_models, make_captions,
    run_baseline, run_models_alone, slug,
)
from bench.download import cpu_name  # noqa: E402
from curate.pipeline.benchmarks import update_section  # noqa: E402
from curate.pipeline.demo.synthetic import photo_like_jpeg  # noqa: E402
from curate.pipeline.shards import sample_key, shard_name  # noqa: E402

WORK = REPO / "bench-work" / "shards-e2e"
HEADING = "## curate run over existing shards"
MIN_SIDE = 264  # the resolution filter's threshold: sides are 256-512, so ~6% of the images are dropped
MAX_LIVE_LINES = 40  # of the curate run's output echoed as it comes (the device tool keeps the last 12,000 chars)
B32_TARGET = 12_000  # images/s end to end
L14_SHARE = 0.90  # of the model alone

_T0 = time.perf_counter()


def log(*args) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp} +{time.perf_counter() - _T0:6.1f}s]", *args, flush=True)


# ---------------------------------------------------------------- data

_UNIQUE: list = []  # (jpg bytes, width, height, sha256), inherited by the tar writers (fork)
_CAPTIONS: list = []  # one per sample, likewise


def _unique_image(index: int) -> tuple[bytes, int, int, str]:
    rng = random.Random(7_000_003 * index + 29)
    width, height = rng.randint(256, 512), rng.randint(256, 512)
    jpg = photo_like_jpeg(width, height, rng, quality=rng.choice(QUALITIES))
    return jpg, width, height, hashlib.sha256(jpg).hexdigest()


def _write_tar(job: tuple) -> dict:
    """One img2dataset-style shard: NNNNN.tar (jpg, txt, json per key), NNNNN.parquet, NNNNN_stats.json."""
    import pandas as pd
    import webdataset as wds

    folder, shard, count, first, shard_size = job
    folder = Path(folder)
    started = time.time()
    rng = random.Random(shard)
    rows = []
    tmp = folder / f"{shard_name(shard)}.tar.tmp"
    with wds.TarWriter(str(tmp)) as sink:
        for i in range(count):
            index = first + i
            jpg, width, height, sha = _UNIQUE[index % len(_UNIQUE)]
            key = sample_key(shard, i, shard_size)
            meta = {
                "url": f"https://images.example.com/photos/{index}.jpg", "caption": _CAPTIONS[index],
                "similarity": round(rng.uniform(0.28, 0.42), 6), "punsafe": round(rng.uniform(0, 0.1), 6),
                "pwatermark": round(rng.uniform(0, 0.5), 6),
                "key": key, "status": "success", "error_message": None,
                "width": width, "height": height, "original_width": width, "original_height": height,
                "exif": None, "sha256": sha,
            }
            sink.write({"__key__": key, "jpg": jpg, "txt": _CAPTIONS[index], "json": meta})
            rows.append(meta)
    pd.DataFrame(rows).to_parquet(folder / f"{shard_name(shard)}.parquet", index=False)
    (folder / f"{shard_name(shard)}_stats.json").write_text(json.dumps({
        "count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0,
        "duration": time.time() - started, "bytes_downloaded": sum(len(_UNIQUE[(first + i) % len(_UNIQUE)][0])
                                                                   for i in range(count)),
        "start_time": started, "end_time": time.time(), "status_dict": {"success": count},
    }, indent=4))
    tmp.rename(folder / f"{shard_name(shard)}.tar")
    return {"shard": shard, "seconds": time.time() - started}


def make_shards(n_images: int, shard_size: int, n_unique: int, processes: int) -> tuple[Path, dict]:
    """img2dataset-style shards in a folder named by the settings; made once, reused."""
    global _UNIQUE, _CAPTIONS
    folder = WORK / f"{n_images}x{shard_size}-u{n_unique}"
    marker = folder / "complete.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        log(f"data: reusing {folder.relative_to(REPO)} ({info['images']:,} images in {info['shards']} tars, "
            f"{info['tar_mb']:,.0f} MB)")
        return folder, info
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log(f"data: generating {n_unique:,} unique JPEGs on {processes} processes ...")
    started = time.perf_counter()
    ctx = multiprocessing.get_context("fork")  # the writers inherit _UNIQUE
    with ctx.Pool(processes) as pool:
        _UNIQUE = pool.map(_unique_image, range(n_unique), chunksize=max(1, n_unique // (processes * 8)))
    unique_s = time.perf_counter() - started
    # In this process (open_clip's vocabulary takes seconds to load: once, not once per writer).
    # It imports torch, without touching CUDA: the writers forked below never use it.
    _CAPTIONS = make_captions(n_images)
    n_shards = -(-n_images // shard_size)
    log(f"data: {n_unique:,} unique JPEGs in {unique_s:.1f} s, captions by {time.perf_counter() - started:.1f} s; writing {n_images:,} samples into {n_shards} tars ...")
    jobs = [(str(folder), s, min(shard_size, n_images - s * shard_size), s * shard_size, shard_size)
            for s in range(n_shards)]
    with ctx.Pool(min(processes, n_shards)) as pool:
        for done in pool.imap_unordered(_write_tar, jobs):
            log(f"data:   {shard_name(done['shard'])}.tar written in {done['seconds']:.1f} s")
    used = [len(_UNIQUE[i % n_unique][0]) for i in range(n_images)]
    sides = [min(u[1], u[2]) for u in _UNIQUE]
    info = {
        "images": n_images, "shards": n_shards, "shard_size": shard_size, "unique": n_unique,
        "mean_kb": sum(used) / len(used) / 1024,
        "below_min_side": sum(s < MIN_SIDE for s in sides) / len(sides),
        "tar_mb": sum(p.stat().st_size for p in folder.glob("*.tar")) / 2**20,
        "seconds": time.perf_counter() - started,
    }
    marker.write_text(json.dumps(info, indent=1))
    _UNIQUE, _CAPTIONS = [], []
    log(f"data: {n_images:,} samples in {n_shards} tars ({info['tar_mb']:,.0f} MB, mean {info['mean_kb']:.1f} KB "
        f"a JPEG) in {info['seconds']:.1f} s")
    return folder, info


# ---------------------------------------------------------------- GPU memory


class GpuMemoryPoller:
    """`nvidia-smi --query-compute-apps=pid,used_memory` every `every` seconds in a thread: the
    peak MiB of each process and of their total (one poll's sum). Every GPU_EVERY polls also the
    GPU's utilization, SM clock and power (`gpu_samples`: seconds after start, %, MHz, W), to tell
    a run whose GPU slowed (clocks, power) from one that left it idle."""

    GPU_EVERY = 5

    def __init__(self, every: float = 0.2):
        self.every = every
        self.peak_by_pid: dict[int, int] = {}
        self.peak_total = 0
        self.peak_total_at: Optional[float] = None  # seconds after the poller started
        self.polls = 0
        self.error: Optional[str] = None
        self.gpu_samples: list[tuple[float, float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def available() -> bool:
        return shutil.which("nvidia-smi") is not None

    def _poll(self) -> dict[int, int]:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise RuntimeError((out.stderr or out.stdout).strip()[:200] or f"exit {out.returncode}")
        found = {}
        for line in out.stdout.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                found[int(parts[0])] = found.get(int(parts[0]), 0) + int(parts[1])
        return found

    @staticmethod
    def _poll_gpu() -> Optional[tuple[float, float, float]]:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu,clocks.sm,power.draw", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10)
        try:  # the first GPU's line
            util, clock, power = (float(p) for p in out.stdout.splitlines()[0].split(","))
            return util, clock, power
        except (IndexError, ValueError):
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                found = self._poll()
                if self.polls % self.GPU_EVERY == 0 and (gpu := self._poll_gpu()) is not None:
                    self.gpu_samples.append((round(started - self._started, 2), *gpu))
            except Exception as exc:  # keep polling: one slow or failed call is not the end
                self.error = _short_error(exc)
                found = {}
            self.polls += 1
            for pid, mib in found.items():
                self.peak_by_pid[pid] = max(self.peak_by_pid.get(pid, 0), mib)
            if sum(found.values()) > self.peak_total:
                self.peak_total = sum(found.values())
                self.peak_total_at = started - self._started
            self._stop.wait(max(0.0, self.every - (time.perf_counter() - started)))

    def __enter__(self) -> "GpuMemoryPoller":
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def _descendants(root: int) -> set[int]:
    """`root` and every process below it, from /proc (pids in this namespace)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


# ---------------------------------------------------------------- curate run


# What a `curate run` and its GPU worker import: the packages compiled by --pycache are those these pull in.
IMPORTED_BY_A_RUN = ("curate.pipeline.cli", "curate.pipeline.run", "curate.pipeline.stages.score", "open_clip",
                     "torchvision.io", "distributed", "pandas", "pyarrow.parquet")


def bytecode_state() -> str:
    """Whether fresh processes here import from cached bytecode. Where PYTHONDONTWRITEBYTECODE is set
    and the packages were installed without their .pyc files (seen on the H200 host, session 13),
    every fresh process compiles torch, torchvision and open_clip from source: seconds of a run's
    start that a user's pip install (which writes the .pyc files) does not pay."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    cached = bool(spec and spec.origin and Path(importlib.util.cache_from_source(spec.origin)).exists())
    writes = not sys.flags.dont_write_bytecode
    prefix = sys.pycache_prefix
    return (f"bytecode {'written' if writes else 'not written (PYTHONDONTWRITEBYTECODE)'}, torch's "
            f"{'cached' if cached else 'not cached'}" + (f" (prefix {prefix})" if prefix else ""))


def compile_to_prefix(prefix: Path) -> float:
    """Compiles every package a `curate run` imports (IMPORTED_BY_A_RUN and what they pull in, found
    in a child process) into PYTHONPYCACHEPREFIX=prefix, then sets that for this process's children
    (the curate runs and their Dask workers): they import as from a normal install. Returns the seconds."""
    started = time.perf_counter()
    # Each top-level module's folders (a package) or file, the standard library's too: under a
    # prefix, Python looks for bytecode there and nowhere else.
    finder = ("import importlib, sys\n"
              f"for name in {IMPORTED_BY_A_RUN!r}: importlib.import_module(name)\n"
              "for module in list(sys.modules.values()):\n"
              "    if '.' not in module.__name__:\n"
              "        print(*(getattr(module, '__path__', None) or [getattr(module, '__file__', None)]), sep='\\n')\n")
    found = subprocess.run([sys.executable, "-c", finder], capture_output=True, text=True, check=False)
    paths = sorted({line for line in found.stdout.splitlines() if os.path.isdir(line) or line.endswith(".py")}
                   | {str(REPO / folder) for folder in ("pipeline", "filters", "train")})
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(prefix)}
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", str(os.cpu_count() or 1), *paths],
                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)
    return time.perf_counter() - started


def curate_config(model: str, tars_dir: Path, out: Path, device: str, batch: int) -> dict:
    precision = "bf16" if device.startswith("cuda") else "fp32"
    return {
        "input": {"paths": [str(tars_dir / "*.tar")], "format": "webdataset"},
        "output": {"path": str(out)},
        "clip": {"enabled": True, "model": model, "pretrained": None, "device": device,
                 "precision": precision, "batch_size": batch},
        "filters": [{"name": "resolution", "min_side": MIN_SIDE}],
    }


def run_logged(cmd: list[str], log_path: Path, timeout: float, poll: bool) -> dict:
    """Run `cmd` (a `curate run`) in its own session, its output to `log_path` and its first lines
    to ours as they come; stopped with all its processes past `timeout`; nvidia-smi polled meanwhile
    when `poll`. Returns wall (s), rc, lines, tree (the pids of the run's processes), poller (or
    None), timed_out (an Event) and log (the log's path in the repository)."""
    poller = GpuMemoryPoller() if poll else None
    lines: list[str] = []
    with open(log_path, "w") as log_file:
        if poller:
            poller.__enter__()
        started, started_epoch = time.perf_counter(), time.time()
        # Its own session, so that a run past the timeout is stopped with all its worker processes.
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True)
        tree: set[int] = {proc.pid}
        stop_tree = threading.Event()

        def watch_tree() -> None:  # the run's processes, to tell its GPU workers apart in nvidia-smi
            while not stop_tree.is_set():
                try:
                    tree.update(_descendants(proc.pid))
                except Exception:
                    pass
                stop_tree.wait(0.5)

        threading.Thread(target=watch_tree, daemon=True).start()
        timed_out = threading.Event()

        def stop() -> None:
            timed_out.set()
            _kill_group(proc)

        timer = threading.Timer(timeout, stop)
        timer.start()
        try:
            for line in proc.stdout:
                log_file.write(line)
                lines.append(line.rstrip("\n"))
                if len(lines) <= MAX_LIVE_LINES:
                    log(f"    | {line.rstrip()[:300]}")
                elif len(lines) == MAX_LIVE_LINES + 1:
                    log(f"    | ... (more in {log_path.relative_to(REPO)}; its last lines follow at the end)")
            rc = proc.wait()
        finally:
            wall = time.perf_counter() - started
            timer.cancel()
            stop_tree.set()
            if proc.poll() is None:
                _kill_group(proc)
            if poller:
                poller.__exit__()
    if len(lines) > MAX_LIVE_LINES:
        for line in lines[-8:]:
            log(f"    | {line[:300]}")
    return {"wall": wall, "rc": rc, "lines": lines, "tree": tree, "poller": poller, "timed_out": timed_out,
            "started_epoch": started_epoch, "log": str(log_path.relative_to(REPO))}


def finished_stats(run: dict, out: Path, timeout: float, result: dict) -> dict:
    """The stats.json of a `run_logged` run that ended well; else CurateRunFailed with its last
    lines and `result` (what was measured anyway)."""
    stats_path = out / "stats.json"
    if run["rc"] != 0 or not stats_path.exists():
        tail = " / ".join(l for l in run["lines"][-6:] if l.strip())[-600:]
        why = f"timed out after {timeout:.0f} s" if run["timed_out"].is_set() else f"exit {run['rc']}"
        raise CurateRunFailed(f"curate run {why}: {tail or 'no output'} (log: {run['log']})", result)
    return json.loads(stats_path.read_text())


def run_curate(model: str, tars_dir: Path, device: str, batch: int, timeout: float, poll: bool) -> dict:
    """`curate run CONFIG --progress-every 2` in a subprocess (`run_logged`), timed from start to
    exit, nvidia-smi polled meanwhile; what it did, from its stats and done-markers."""
    import yaml

    base = WORK / "runs" / slug(model)
    out = base / "out"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    config_path = base / "config.yaml"
    config = curate_config(model, tars_dir, out, device, batch)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    # Progress lines every 2 s (plain, timestamped: stderr is no terminal) show in curate.log when
    # each stage's shards finished: where the start-up and the scoring time went.
    cmd = [sys.executable, "-m", "curate.pipeline.cli", "run", str(config_path), "--progress-every", "2", "--log-level", "debug"]
    log(f"  curate: {' '.join(cmd[1:])}  (config: input {config['input']}, clip {config['clip']['device']} "
        f"{config['clip']['precision']} batch {batch}, filter resolution min_side {MIN_SIDE})")
    run = run_logged(cmd, base / "curate.log", timeout, poll)
    wall, rc, tree, poller, started_epoch = (run[k] for k in ("wall", "rc", "tree", "poller", "started_epoch"))
    result = {"wall": wall, "rc": rc, "log": run["log"], "batch": batch}
    if poller:
        ours = {pid: mib for pid, mib in poller.peak_by_pid.items() if pid in tree}
        others = {pid: mib for pid, mib in poller.peak_by_pid.items() if pid not in tree and pid != os.getpid()}
        # nvidia-smi may show pids of another namespace (a container): then no pid is the run's,
        # and the largest process on the GPU stands for it (flagged in the table).
        result.update({
            "gpu_peak_by_pid": poller.peak_by_pid, "gpu_peak_total": poller.peak_total, "gpu_polls": poller.polls,
            "gpu_peak_total_at": poller.peak_total_at,
            "gpu_peak_run": max(ours.values()) if ours else (max(others.values()) if others else None),
            "gpu_run_pids": sorted(ours), "gpu_pids_matched": bool(ours), "gpu_poll_error": poller.error,
        })
    result.update(_score_window(out, started_epoch))
    if poller and result.get("score_first_start") is not None:
        result.update(_gpu_in_window(poller.gpu_samples, result["score_first_start"], result["score_last_end"]))
    stats = finished_stats(run, out, timeout, result)
    result.update({
        "stats": stats, "images": stats.get("rows_in"), "written": stats.get("written"),
        "rate": (stats.get("rows_in") or 0) / wall,
    })
    shutil.rmtree(out / "shards", ignore_errors=True)  # the written copy of the input: GBs, not needed
    return result


def _score_window(out: Path, started_epoch: float) -> dict:
    """From the score stage's done markers (work/score/NNNNN.done.json: `seconds` of the task,
    written at its end): when the first score task started and the last ended, relative to the
    start of the subprocess, and the images scored in between (those the header filter kept)."""
    spans, scored, tasks, helped = [], 0, [], 0
    try:
        for marker in (out / "work" / "score").glob("*.done.json"):
            info = json.loads(marker.read_text())
            end = marker.stat().st_mtime - started_epoch
            spans.append((end - float(info["seconds"]), end))
            scored += int(info.get("scored", 0)) + int(info.get("decode_errors", 0))
            helped += int(info.get("helper_decoded", 0))
            tasks.append({"shard": marker.name.split(".")[0], "start": round(end - float(info["seconds"]), 1),
                          "seconds": round(float(info["seconds"]), 2), "embed": info.get("embed_seconds"),
                          "ready": info.get("ready_seconds"),
                          "retries": info.get("gpu_alloc_retries"), "reserved": info.get("gpu_peak_reserved_gib")})
    except Exception as exc:
        return {"score_window_error": _short_error(exc)}
    if not spans:
        return {}
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    return {"score_first_start": first, "score_last_end": last, "score_scored": scored,
            "score_rate": scored / (last - first) if last > first else None, "score_tasks": len(spans),
            # Of the scored images: decoded by the decoding helpers on the host's cores.
            "score_helper_decoded": helped,
            # The slowest score tasks (outliers of 23-32 s against ~2 s were seen in earlier runs).
            "score_slowest": sorted(tasks, key=lambda t: -t["seconds"])[:4]}


def _gpu_in_window(samples: list, first: float, last: float) -> dict:
    """The GPU's utilization, SM clock and power over the scoring span (poller seconds ≈ run seconds:
    both start as the subprocess does)."""
    inside = [s for s in samples if first <= s[0] <= last]
    if not inside:
        return {}
    clocks = sorted(s[2] for s in inside)
    return {"gpu_util_mean": sum(s[1] for s in inside) / len(inside), "gpu_clock_min": clocks[0],
            "gpu_clock_median": clocks[len(clocks) // 2], "gpu_clock_max": clocks[-1],
            "gpu_power_mean": sum(s[3] for s in inside) / len(inside), "gpu_samples_in_span": len(inside)}


class CurateRunFailed(RuntimeError):
    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------- one model


def bench_model(model: str, args, tars_dir: Path, info: dict, device: str, captions: list[str]) -> dict:
    row: dict = {"model": model, "label": args.label_for(model)}
    gpu = device.startswith("cuda")
    batch = args.batch or (64 if args.quick else CURATE_BATCH.get(model, 512))
    tars = sorted(tars_dir.glob("*.tar"))
    precision = "bf16" if gpu else "fp32"
    alone_batch = 32 if args.quick else ALONE_BATCH.get(model, 256)
    alone_s = 0.5 if args.quick else 3.0

    steps = [("curate", lambda: run_curate(model, tars_dir, device, batch, args.run_timeout, gpu
                                           and GpuMemoryPoller.available()))]
    if not args.skip_baseline:
        base_tars = tars[:args.baseline_tars] if args.baseline_tars else tars
        steps.append(("baseline", lambda: run_baseline(model, base_tars, device, args.workers,
                                                       64 if args.quick else 256)))
    steps.append(("alone", lambda: run_models_alone(model, device, precision, alone_batch, captions, alone_s)))
    steps.append(("alone_trim", lambda: run_models_alone(model, device, precision, alone_batch, captions,
                                                         alone_s, mode="trimmed")))
    for name, fn in steps:
        log(f"  {args.label_for(model)} {name}: starting")
        try:
            row[name] = result = fn()
        except Exception as exc:
            if isinstance(exc, CurateRunFailed):
                row[name + "_partial"] = exc.result
                row[f"{name}_error"] = str(exc).replace("|", "/").replace("\n", " ")[:400]
            else:
                _print_traceback()
                row[f"{name}_error"] = _short_error(exc)
            log(f"  {args.label_for(model)} {name}: FAILED {row[f'{name}_error']}")
            continue
        finally:
            if name in ("alone", "alone_trim"):
                forget_models()  # curate's model cache in this process: free the GPU for the next run
        if name == "curate":
            s = result["stats"]
            mem = ""
            if "gpu_peak_total" in result:
                mem = (f"; peak GPU memory: run's process {_mib(result['gpu_peak_run'])}, all processes "
                       f"{_mib(result['gpu_peak_total'])} ({result['gpu_polls']} polls; per pid "
                       + ", ".join(f"{p}: {_mib(m)}" for p, m in sorted(result["gpu_peak_by_pid"].items())) + ")")
            log(f"  {args.label_for(model)} curate: {result['images']:,} images read, {result['written']:,} written in "
                f"{result['wall']:.1f} s wall = {result['rate']:,.0f} images/s end to end (stats.json: "
                f"{s.get('duration_seconds')} s, {s.get('rows_per_second')} rows/s; task s by stage "
                f"{s.get('task_seconds_by_stage')}; {_phases(result)}){mem}")
        elif name == "baseline":
            log(f"  {args.label_for(model)} baseline: {result['images']:,} images in {result['seconds']:.1f} s = "
                f"{result['rate']:,.0f} images/s ({result['workers']} workers; model create + warm-up "
                f"{result['load_s']:.1f} s untimed"
                + (f"; peak torch allocation {result['peak'] / 2**30:.1f} GiB" if result.get("peak") else "") + ")")
        else:
            log(f"  {args.label_for(model)} model alone{' (text trimmed)' if name == 'alone_trim' else ' (77 positions)'}: "
                f"{result['rate']:,.0f} images/s (batch {result['batch']})")
    return row


def _print_traceback() -> None:
    """The traceback's end only: the device tool keeps the last 12,000 characters of output."""
    text = traceback.format_exc()
    print(text if len(text) <= 1500 else "... " + text[-1500:], end="", flush=True)


def _cell(text: str, limit: int = 120) -> str:
    text = str(text).replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _phases(c: dict) -> str:
    """Where the wall clock went, from the score markers: start-up, scoring, the rest."""
    if c.get("score_first_start") is None:
        return "score window unknown" + (f" ({c['score_window_error']})" if c.get("score_window_error") else "")
    window = c["score_last_end"] - c["score_first_start"]
    rate = f", {fmt_rate(c['score_rate'])} images/s" if c.get("score_rate") else ""
    return (f"first score task started at {c['score_first_start']:.1f} s (includes the model load), "
            f"{c['score_tasks']} score tasks over {window:.1f} s ({c['score_scored']:,} images{rate}), "
            f"last ended {c['wall'] - c['score_last_end']:.1f} s before exit")


def _mib(mib: Optional[int]) -> str:
    return "—" if mib is None else f"{mib / 1024:.1f} GiB"


# ---------------------------------------------------------------- table


def render(rows: list[dict], args, info: dict, device: str, device_name: str, total_s: float) -> str:
    import torch

    gpu = device.startswith("cuda")
    date = datetime.date.today().isoformat()
    cores = os.cpu_count() or 1
    workers = sorted({r["baseline"]["workers"] for r in rows if "baseline" in r})
    lines = [
        f"{HEADING} ({date}, {device_name}, {cores} cores)",
        "",
        f"`bench/shards_e2e.py{' --quick' if args.quick else ''}`: {info['images']:,} photo-like JPEGs "
        f"({info['unique']:,} unique, repeated), sides 256–512 px, mean {info['mean_kb']:.1f} KB, in "
        f"{info['shards']} img2dataset-style tars of {info['shard_size']:,} (`jpg` + `txt` + `json`, "
        f"{info['tar_mb']:,.0f} MB); captions of 10–20 words. Random weights (`pretrained: null`). "
        f"{cpu_name()}, {cores} cores; torch {torch.__version__}, open_clip {_version('open_clip_torch')}, "
        f"dask {_version('dask')}; {info.get('bytecode', 'bytecode not checked')}. Whole run {total_s / 60:.1f} min.",
        "",
        f"- **curate run**: `curate run CONFIG --progress-every 2` in a subprocess, as a user runs it: `input.format: "
        f"webdataset` over the tars, clip on {device} ({'bf16' if gpu else 'fp32'}), filter `resolution` "
        f"min_side {MIN_SIDE} (header only; drops ~{info.get('below_min_side', 0.06):.0%}), fresh output folder. "
        "Wall clock from start to exit (interpreter, Dask cluster, model load included); **images/s = images "
        "read / wall s**; in brackets stats.json's own `duration_seconds`.",
        "- **start-up / scoring**: from the score stage's done markers (`work/score/NNNNN.done.json`, its task "
        "seconds and file time): when the first score task started (interpreter, Dask cluster, reading; the model "
        "load is inside the first task), and the span from the first score task's start to the last one's end, "
        "with the images it scored (those the header filter kept) per second of that span.",
        "- **peak GPU memory**: `nvidia-smi --query-compute-apps` every 0.2 s during the curate run: the "
        "largest process of the run (its GPU worker) / all processes on the GPU (this script's own CUDA context, "
        "left from the previous model's baseline, included).",
        f"- **baseline**: bench/clip_score.py's clip-retrieval-style loop over the same tars "
        f"(`webdataset.WebDataset(tars).decode(\"pil\")`, open_clip preprocess in "
        f"{'/'.join(map(str, workers)) or '—'} DataLoader workers, one per tar at most, batch "
        f"{64 if args.quick else 256}, {'fp16' if gpu else 'fp32'}); model created and warmed beforehand, untimed.",
        "- **model alone**: eager encode_image (random pixels) + encode_text, no data: text tower over 77 "
        "positions / trimmed as curate runs it. Targets: ViT-B-32 ≥ "
        f"{B32_TARGET:,} images/s end to end; ViT-L-14 ≥ {L14_SHARE:.0%} of the model alone (trimmed).",
        "",
        "| model | curate run images/s (end to end) | wall s (stats.json s) | start-up s / scoring s (images/s) | "
        "images read / written | baseline images/s | vs baseline | model alone images/s (77 / trimmed) | "
        "curate / model alone | target | peak GPU memory (run / all) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    notes, verdicts = [], []
    for r in rows:
        c, b, a, at = r.get("curate"), r.get("baseline"), r.get("alone"), r.get("alone_trim")
        part = c or r.get("curate_partial") or {}
        if c:
            cur = f"**{fmt_rate(c['rate'])}** (batch {c['batch']})"
            wall = f"{c['wall']:.1f} ({c['stats'].get('duration_seconds', '—')})"
            counts = f"{c['images']:,} / {c['written']:,}"
        else:
            cur = _cell(f"failed: {r.get('curate_error', '?')}", 300)
            wall = f"{part['wall']:.1f}" if part.get("wall") else "—"
            counts = "—"
        if part.get("score_first_start") is not None:
            window = part["score_last_end"] - part["score_first_start"]
            phases = (f"{part['score_first_start']:.1f} / {window:.1f}"
                      + (f" ({fmt_rate(part['score_rate'])})" if part.get("score_rate") else ""))
        else:
            phases = "—"
        base = f"{fmt_rate(b['rate'])} ({b['images']:,} images)" if b else _cell(r.get("baseline_error", "skipped"))
        vs = f"{c['rate'] / b['rate']:.2f}×" if b and c else "—"
        ceiling = at or a
        alone = (f"{fmt_rate(a['rate']) if a else '—'} / {fmt_rate(at['rate']) if at else '—'}"
                 if a or at else _cell(r.get("alone_error", "—")))
        share = f"{c['rate'] / ceiling['rate']:.0%}" if c and ceiling else "—"
        if not gpu:
            target = "n/a (CPU)"
        elif r["model"] == "ViT-B-32":
            target = f"≥ {B32_TARGET:,}/s: " + ("met" if c and c["rate"] >= B32_TARGET else "**MISSED**")
        elif r["model"] == "ViT-L-14":
            target = (f"≥ {L14_SHARE:.0%} of alone: "
                      + ("met" if c and ceiling and c["rate"] >= L14_SHARE * ceiling["rate"] else "**MISSED**"))
        else:
            target = "—"
        if gpu and target != "—":
            verdicts.append((r["label"], target, c is None))
        if "gpu_peak_total" in part:
            mem = f"{_mib(part.get('gpu_peak_run'))} / {_mib(part['gpu_peak_total'])}"
            if not part.get("gpu_pids_matched"):
                mem += " †"
                notes.append(f"{r['label']}: † no nvidia-smi pid belonged to the run's process tree (another pid "
                             "namespace?): the largest other process stands for the run's")
            if part.get("gpu_peak_total_at") is not None:
                notes.append(f"{r['label']}: GPU memory peaked {part['gpu_peak_total_at']:.1f} s into the run "
                             f"({part['gpu_polls']} polls; per pid: "
                             + ", ".join(f"{p} {_mib(m)}" for p, m in sorted(part["gpu_peak_by_pid"].items())) + ")")
        else:
            mem = "not measured" if gpu else "n/a (CPU)"
        lines.append(f"| {r['label']} | {cur} | {wall} | {phases} | {counts} | {base} | {vs} | {alone} | {share} | "
                     f"{target} | {mem} |")
    lines.append("")
    if gpu and verdicts:
        missed = [f"{label}: {target.replace('**', '')}" + (" (the curate run failed)" if failed else "")
                  for label, target, failed in verdicts if "MISSED" in target]
        lines += [("**Missed** — " + "; ".join(missed) + "." if missed else "Targets met."), ""]
    for r in rows:
        c = r.get("curate")
        if c and c["stats"].get("task_seconds_by_stage"):
            notes.append(f"{r['label']}: task seconds by stage {c['stats']['task_seconds_by_stage']}, "
                         f"stats.json {c['stats'].get('images_per_second')} images written/s")
        if c and c.get("score_slowest"):
            notes.append(f"{r['label']}: slowest score tasks " + ", ".join(
                f"{t['shard']} {t['seconds']} s (embedding {t['embed']} s, of which {t['ready']} s until the model was "
                f"ready, from {t['start']} s, "
                f"{t['retries']} allocator retries in the process so far, {t['reserved']} GiB reserved)" for t in c["score_slowest"]))
        if c and c.get("gpu_samples_in_span"):
            notes.append(f"{r['label']}: over the scoring span the GPU was {c['gpu_util_mean']:.0f}% utilized on average, "
                         f"SM clock {c['gpu_clock_min']:.0f} / {c['gpu_clock_median']:.0f} / {c['gpu_clock_max']:.0f} MHz "
                         f"(min / median / max), {c['gpu_power_mean']:.0f} W on average ({c['gpu_samples_in_span']} samples)")
        if c and c.get("score_scored"):
            notes.append(f"{r['label']}: {c.get('score_helper_decoded', 0):,} of the {c['score_scored']:,} scored images "
                         f"decoded by the decoding helpers on the host's cores")
        if "alone_trim_error" in r and "alone" in r:
            notes.append(f"{r['label']}: model alone, trimmed: failed: {_cell(r['alone_trim_error'])}")
        part = r.get("curate") or r.get("curate_partial") or {}
        if part.get("gpu_poll_error"):
            notes.append(f"{r['label']}: nvidia-smi: {part['gpu_poll_error']}")
    if notes:
        lines += ["Details: " + "; ".join(notes) + ".", ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma-separated open_clip names (default ViT-B-32,ViT-L-14)")
    parser.add_argument("--images", type=int, default=None, help="images in the tars (default 100000)")
    parser.add_argument("--shard-size", type=int, default=None, help="samples per tar (default 10000)")
    parser.add_argument("--unique", type=int, default=None, help="distinct JPEGs, repeated (default 4000)")
    parser.add_argument("--workers", type=int, default=None, help="baseline DataLoader workers (default min(16, cores))")
    parser.add_argument("--batch", type=int, default=None, help="curate's clip.batch_size (default 1024 B-32, 512 otherwise)")
    parser.add_argument("--baseline-tars", type=int, default=0, help="baseline over the first N tars only (default all)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--run-timeout", type=float, default=None,
                        help="seconds before a curate run is stopped and its row marked failed (default 180; quick 240)")
    parser.add_argument("--quick", action="store_true", help="CPU dry run: curate's tiny CLIP, 2,000 images in 2 tars")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--pycache", default=None, metavar="DIR",
                        help="compile every package a curate run imports (torch, open_clip, dask, ...) into DIR and "
                             "run curate with PYTHONPYCACHEPREFIX=DIR: its workers import as from a normal install, "
                             "where this host writes no bytecode")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    from curate.pipeline.models.clip import TINY_CLIP

    args.models = args.models or (TINY_CLIP if args.quick else "ViT-B-32,ViT-L-14")
    args.images = args.images or (2_000 if args.quick else 100_000)
    args.shard_size = args.shard_size or (1_000 if args.quick else 10_000)
    args.unique = min(args.unique or (200 if args.quick else 4_000), args.images)
    args.workers = args.workers or (2 if args.quick else min(16, cores))
    args.run_timeout = args.run_timeout or (240 if args.quick else 180)
    args.label_for = lambda m: "tiny CLIP (curate's, local-dir)" if m == TINY_CLIP else m
    log(f"shards_e2e: models {args.models}; {args.images:,} images in tars of {args.shard_size:,}; {cores} cores")

    # Data first, before torch is imported (the generator pools fork).
    tars_dir, info = make_shards(args.images, args.shard_size, args.unique, cores)

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU only: {cpu_name()}"
    if args.pycache:
        log(f"bytecode: compiled into {args.pycache} in {compile_to_prefix(Path(args.pycache)):.1f} s "
            "(PYTHONPYCACHEPREFIX for the curate runs)")
    info["bytecode"] = bytecode_state() + (f"; compiled into {args.pycache} for the curate runs" if args.pycache else "")
    log(f"device: {device_name}; torch {torch.__version__}; baseline workers {args.workers}; "
        f"nvidia-smi {'found' if GpuMemoryPoller.available() else 'not found'}; {info['bytecode']}")
    if device == "cpu" and not args.quick:
        log("warning: no GPU; the default sizes are meant for a GPU (use --quick on a CPU)")
    captions = make_captions(1024, seed=1)

    rows: list[dict] = []
    table = ""
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        log(f"== {args.label_for(model)}")
        try:
            rows.append(bench_model(model, args, tars_dir, info, device, captions))
        except Exception as exc:
            _print_traceback()
            rows.append({"model": model, "label": args.label_for(model), "curate_error": _short_error(exc)})
        finally:
            try:
                forget_models()
            except Exception:
                _print_traceback()
        # After every model, so that a run cut off by a time limit keeps what it measured.
        table = render(rows, args, info, device, device_name, time.perf_counter() - _T0)
        if not args.quick and not args.no_write:
            update_section(REPO / "BENCHMARKS.md", HEADING, table)
            log(f"BENCHMARKS.md updated ({len(rows)} model(s))")
        log("table so far:\n" + table)
    log("done" + (" (BENCHMARKS.md not written)" if args.quick or args.no_write else ""))


if __name__ == "__main__":
    main()
