"""The score stage: CLIP image and text embeddings and their cosine similarity, per shard.

Reads a raw download shard (or, for existing shards as input, the input tar at the offsets
the read stage recorded: pipeline/sources.py), embeds every image and caption with open_clip,
and writes, row-aligned (the layout clip-retrieval users know):

    embeddings/img_emb/img_emb_NNNNN.npy     float16 [n, dim], L2-normalized
    embeddings/text_emb/text_emb_NNNNN.npy   float16 [n, dim], L2-normalized
    embeddings/metadata/metadata_NNNNN.parquet  key, clip_similarity, clip_model, status, reason
                                                (the write stage adds url, caption, written)

so that later filters (safety heads, aesthetic, dedup) reuse the embeddings.

Two image paths that give the same scores (within 0.01):
- CPU: PIL decode and the model's own open_clip preprocess transform.
- GPU: batched nvJPEG decode (`torchvision.io.decode_jpeg(device="cuda")`), then
  center crop, bicubic antialiased resize and normalization on the GPU. An image the
  GPU decoder rejects is retried on the CPU decoder; if that fails too the sample is
  rejected as `decode_error`. One bad image never fails a shard.
"""

from __future__ import annotations

import io
import itertools
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.pipeline import storage
from curate.pipeline.config import ClipConfig
from curate.pipeline.decode_helpers import OFFER_AHEAD, BatchShare, DecodePool, default_count
from curate.pipeline.embeddings import histogram
from curate.pipeline.image import DECODE_BUDGET
from curate.pipeline.layout import embedding_files
from curate.pipeline.models.cache import cached
from curate.pipeline.models.clip import LoadedClip, load_clip
from curate.pipeline.models.device import resolve_device
from curate.pipeline.records import FAILED_TO_RESIZE, SUCCESS
from curate.pipeline.score_reader import Batch, ReaderPool
from curate.pipeline.shards import atomic_path, run_once
from curate.pipeline.sources import score_batches

# The reason of a sample whose image CLIP's decoder could not read (the write stage rejects it).
DECODE_ERROR = "decode_error"

# Threads decoding and preprocessing batches on the GPU while the model runs: nvJPEG's
# CPU-side Huffman decoding is the slow part, and two threads decode ~1.35x faster than one
# (H200 host: 16,700 → 22,300 images/s; four threads are no faster).
PREPARE_THREADS = 2

def _prefetched(batches: Iterator[Batch], depth: int = 2) -> Iterator[Batch]:
    """Read the next batches in a thread while the model computes. When the consumer stops
    early (an error in the model), the thread stops too and closes `batches`, so a reader
    holding helper processes or a file gives them back."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for b in batches:
                if not put(b):
                    return
            put(done)
        except BaseException as exc:  # surfaced in the consumer
            put(exc)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    threading.Thread(target=produce, daemon=True).start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _offered(batches: Iterator[Batch], share: BatchShare, ahead: int) -> Iterator[tuple[int, Batch]]:
    """(number, batch) in order, each offered to the decoding helpers `ahead` batches before it is
    given out, so that they can decode its end while earlier batches are prepared."""
    pending: deque = deque()
    for number, batch in enumerate(batches):
        share.offer(number, batch.jpgs)
        pending.append((number, batch))
        if len(pending) > ahead:
            yield pending.popleft()
    yield from pending


def _decode_cpu(jpg: bytes):
    """The image as RGB, decoded by Pillow within the process's DECODE_BUDGET, as the download
    stage's decodes are: every image passed the read stage's area check alone, but decode_batch's
    threads decode several at once."""
    from PIL import Image

    with Image.open(io.BytesIO(jpg)) as im, DECODE_BUDGET.hold(im.width * im.height):
        return im.convert("RGB")


class ClipScorer:
    """Embeds batches of (jpg bytes, caption). The model loads on first use, once per process."""

    def __init__(self, cfg: ClipConfig):
        self.cfg = cfg
        self._clip: Optional[LoadedClip] = None

    @property
    def clip(self) -> LoadedClip:
        if self._clip is None:
            self._clip = load_clip(self.cfg.model, self.cfg.pretrained, self.cfg.device, self.cfg.precision)
            if self._clip.device.startswith("cuda") and self.cfg.gpu_memory_limit_gib:
                limit_gpu_memory(self._clip.device, self.cfg.gpu_memory_limit_gib)
        return self._clip

    @property
    def on_gpu(self) -> bool:
        return self.clip.device.startswith("cuda")

    def embed(self, batch: Batch, share: Optional[BatchShare] = None,
              number: int = 0) -> tuple[np.ndarray, np.ndarray, list[Optional[str]]]:
        """(image embeddings, text embeddings, per-sample decode error or None) of one batch;
        rows of failed images are zeros. With `share`, decoding helpers may have done part of it."""
        import torch

        with torch.inference_mode():
            pixels, tokens, errors = self._inputs(batch, share, number)
            image, text = self._forward(pixels, tokens, errors)
        return image.float().cpu().numpy(), text.float().cpu().numpy(), errors

    def embed_all(self, batches: Iterator[Batch], helpers: Optional[DecodePool] = None,
                  counts: Optional[dict] = None) -> Iterator[tuple[Batch, np.ndarray, np.ndarray, list[Optional[str]]]]:
        """`embed` over many batches, in order. On a GPU, decoding and preprocessing run in
        PREPARE_THREADS threads, each on its own CUDA stream, while the model computes the
        previous batch; results stay on the GPU until the end, so nothing waits for a copy
        per batch. With `helpers` (pipeline/decode_helpers.py), their processes decode the ends of
        batches offered to them ahead; `counts["helper_decoded"]` adds up the images they did."""
        if helpers is None:
            yield from self._embed_all(enumerate(batches), None)
            return
        with helpers.share(self.clip.image_size, _squashes(self.clip)) as share:
            yield from self._embed_all(_offered(batches, share, OFFER_AHEAD), share)
            if counts is not None:
                counts["helper_decoded"] = counts.get("helper_decoded", 0) + share.helped_images

    def _embed_all(self, numbered: Iterator[tuple[int, Batch]], share: Optional[BatchShare]):
        if not self.on_gpu:
            for number, batch in numbered:
                yield (batch, *self.embed(batch, share, number))
            return
        import torch

        device = self.clip.device
        local = threading.local()

        def prepare(number: int, batch: Batch):  # runs in a pool thread, on that thread's own CUDA stream
            stream = getattr(local, "stream", None)
            if stream is None:
                stream = local.stream = torch.cuda.Stream(device=device)
            with torch.cuda.stream(stream), torch.inference_mode():
                pixels, tokens, errors = self._inputs(batch, share, number)
                ready = torch.cuda.Event()
                ready.record(stream)
            return batch, pixels, tokens, errors, ready

        results = []
        main = torch.cuda.current_stream(device)
        with ThreadPoolExecutor(PREPARE_THREADS) as pool:
            # In order, a few batches ahead: the model never waits for a decode it could overlap.
            window = deque(pool.submit(prepare, *item) for item in itertools.islice(numbered, PREPARE_THREADS + 1))
            while window:
                batch, pixels, tokens, errors, ready = window.popleft().result()
                following = next(numbered, None)
                if following is not None:
                    window.append(pool.submit(prepare, *following))
                main.wait_event(ready)
                for t in (pixels, tokens):
                    if t is not None:
                        t.record_stream(main)  # memory made on a side stream, used on this one
                with torch.inference_mode():
                    image, text = self._forward(pixels, tokens, errors)
                results.append((batch, image, text, errors))
        for batch, image, text, errors in results:
            yield batch, image.float().cpu().numpy(), text.float().cpu().numpy(), errors

    def _inputs(self, batch: Batch, share: Optional[BatchShare] = None, number: int = 0):
        """(pixels on device or None, token ids on device, per-image decode errors). With `share`,
        the images the helpers did not take are decoded here first, then theirs are added."""
        import torch

        clip = self.clip
        here = len(batch.jpgs) if share is None else share.take(number)
        pixels, errors = self._pixels(batch.jpgs[:here])
        parts = [] if pixels is None else [pixels]
        for start, end, helped, helped_errors in (share.helped(number) if share is not None else ()):
            if helped is None:  # the helper could not: decoded here
                part, part_errors = self._pixels(batch.jpgs[start:end])
            else:
                part, part_errors = (self._helper_pixels(helped) if len(helped) else None), helped_errors
            if part is not None:
                parts.append(part)
            errors.extend(part_errors)
        pixels = None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts)
        if pixels is not None:
            pixels = pixels.to(clip.dtype)
        tokens = batch.tokens if batch.tokens is not None else clip.tokenizer(batch.captions)
        tokens = clip.prepare_tokens(tokens)
        if clip.device.startswith("cuda"):
            tokens = tokens.pin_memory()
        return pixels, tokens.to(clip.device, non_blocking=True), errors

    def _pixels(self, jpgs: list):
        """(pixels of the images that decoded, or None; per-image errors), decoded in this process."""
        if self.on_gpu and self.cfg.gpu_decode:
            return self._pixels_gpu(jpgs)
        return self._pixels_cpu(jpgs)

    def _helper_pixels(self, pixels):
        """A helper's uint8 [k, size, size, 3] as model input on the device."""
        x = pixels.to(self.clip.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return normalize_pixels(x, self.clip)

    def _forward(self, pixels, tokens, errors):
        """(image, text) embeddings in fp32 on the device; rows of failed images are zeros.
        Nothing here waits for the GPU, so the CPU can queue the next batch meanwhile."""
        import torch

        clip = self.clip
        text = clip.encode_text(tokens).float()
        ok = [i for i, e in enumerate(errors) if e is None]
        if len(ok) == len(errors):
            return clip.encode_image(pixels).float(), text
        image = torch.zeros((len(errors), text.shape[1]), device=text.device)
        if ok:
            image[_on_device(ok, text.device)] = clip.encode_image(pixels).float()
        return image, text

    def _pixels_cpu(self, jpgs: list[bytes]):
        import torch

        tensors, errors = [], []
        for jpg in jpgs:
            try:
                tensors.append(self.clip.preprocess(_decode_cpu(jpg)))
                errors.append(None)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
        pixels = torch.stack(tensors).to(self.clip.device) if tensors else None
        return pixels, errors

    def _pixels_gpu(self, jpgs: list[bytes]):
        images, errors = decode_batch(jpgs, self.clip.device)
        good = [im for im in images if im is not None]
        pixels = gpu_preprocess(good, self.clip) if good else None
        return pixels, errors


# How a JPEG file starts (SOI, then a marker): what nvJPEG's batch may be given.
JPEG_MAGIC = b"\xff\xd8\xff"


def decode_batch(jpgs: list, device: str, progressive_on_cpu: Optional[bool] = None) -> tuple[list, list[Optional[str]]]:
    """Images (uint8 CHW tensors on `device`, None where one did not decode) and per-image errors,
    in order. The JPEGs go to nvJPEG (`decode_jpeg` on `device`) in one batched call; other
    formats (PNG, WebP: input shards hold them) and, on a GPU (`progressive_on_cpu` None), progressive
    JPEGs (`is_progressive`) are decoded on the host's cores from the start, in CPU_DECODE_THREADS
    threads: one other format in the batch would make the batched call fail. Only when the batched
    call still fails (a JPEG nvJPEG refuses) is each JPEG tried alone, and then on the CPU."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    images: list = [None] * len(jpgs)
    errors: list[Optional[str]] = [None] * len(jpgs)
    if progressive_on_cpu is None:
        progressive_on_cpu = torch.device(device).type == "cuda"
    jpeg = [i for i, j in enumerate(jpgs)
            if bytes(j[:3]) == JPEG_MAGIC and not (progressive_on_cpu and is_progressive(j))]
    # Views of the mapped tar (ReaderPool) go to nvJPEG as they are; bytes are copied once.
    datas = {i: torch.from_numpy(jpgs[i]) if isinstance(jpgs[i], np.ndarray)
             else torch.frombuffer(bytearray(jpgs[i]), dtype=torch.uint8) for i in jpeg}
    decoded = None
    if jpeg:
        try:
            decoded = decode_jpeg([datas[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        except Exception:
            decoded = None
    if decoded is not None:
        for i, image in zip(jpeg, decoded):
            images[i] = image
    if decoded is None:  # the batch failed: each JPEG alone
        for i in jpeg:
            try:
                images[i] = decode_jpeg(datas[i], mode=ImageReadMode.RGB, device=device)
            except Exception:
                pass
    # Other formats, progressive JPEGs, and JPEGs nvJPEG refuses that the CPU decoder accepts;
    # each moved to the device as it comes, so that its host copy is freed.
    on_cpu = [i for i in range(len(jpgs)) if images[i] is None]
    for i, (pixels, error) in zip(on_cpu, _decoded_on_cpu([jpgs[i] for i in on_cpu])):
        if pixels is None:
            errors[i] = error
            continue
        try:
            images[i] = torch.from_numpy(pixels).permute(2, 0, 1).to(device)
        except Exception as exc:  # one image's error (a device out of memory too), never the batch's
            errors[i] = f"{type(exc).__name__}: {exc}"[:200]
    return images, errors


# Threads that decode a batch's images on the host's cores (Pillow releases the GIL while it
# decodes): progressive JPEGs and other formats, which nvJPEG would decode one at a time.
CPU_DECODE_THREADS = 8
_cpu_pool: Optional[ThreadPoolExecutor] = None
_cpu_pool_lock = threading.Lock()


def _decoded_on_cpu(jpgs: list) -> Iterator[tuple[Optional[np.ndarray], Optional[str]]]:
    """(RGB pixels [h, w, 3] or None, error or None) of each image, decoded by Pillow, in order;
    more than one at a time in a shared pool of CPU_DECODE_THREADS threads, with at most twice
    that many decoded and not yet taken (a batch of large originals is not held whole)."""
    global _cpu_pool

    if len(jpgs) < 2:
        yield from map(_decode_pixels, jpgs)
        return
    with _cpu_pool_lock:
        if _cpu_pool is None:
            _cpu_pool = ThreadPoolExecutor(CPU_DECODE_THREADS, thread_name_prefix="cpu-decode")
    window: deque = deque()
    for jpg in jpgs:
        window.append(_cpu_pool.submit(_decode_pixels, jpg))
        if len(window) >= 2 * CPU_DECODE_THREADS:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


def _decode_pixels(jpg) -> tuple[Optional[np.ndarray], Optional[str]]:
    """One image's RGB pixels (a writable copy: torch.from_numpy warns on read-only arrays) or its error."""
    try:
        return np.array(_decode_cpu(jpg)), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"[:200]


# JPEG start-of-frame markers (C0-CF, less DHT C4, JPG C8 and DAC CC), and those of progressive coding.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE_SOF = frozenset((0xC2, 0xC6, 0xCA, 0xCE))


def is_progressive(jpg) -> bool:
    """Whether a JPEG's frame is progressive, from its segment headers (nothing is decoded).

    nvJPEG's hardware engines take baseline JPEGs only; torchvision's batched call decodes the others
    one at a time in software, with a synchronization each: 637-933 progressive images/s on an H200
    against 23,000-36,000 baseline ones (bench/probes/nvjpeg_path.py), so a batch with a few
    progressive images would wait for them. Web images are often progressive (curate passes an
    upright RGB JPEG that needs no resize through unchanged; published shards keep their originals).
    A malformed header reads as not progressive: the decoders then judge it."""
    data = memoryview(jpg)
    pos, end = 2, len(data) - 3
    while pos < end:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker in _SOF:
            return marker in _PROGRESSIVE_SOF
        elif marker in (0xDA, 0xD9):  # start of scan, end of image: no frame header before them
            return False
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
        else:
            pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
    return False


def gpu_preprocess(images: list, clip: LoadedClip):
    """open_clip's eval transform on the GPU: bicubic antialiased resize to the model's input
    size (after a center square crop for resize_mode "shortest", the default; the whole image
    for "squash"), [0, 1] scaling, mean/std normalization.

    For "shortest", cropping the square first and resizing second (open_clip resizes, then
    crops) lets every image with the same short side share one batched resize; curate's
    normalized images mostly share their short side, so a batch is a handful of resize calls.
    """
    import torch
    import torch.nn.functional as F

    size = clip.image_size
    squash = _squashes(clip)
    device = images[0].device
    groups: dict[tuple[int, int], list[int]] = {}
    crops = []
    for i, im in enumerate(images):
        _, h, w = im.shape
        if not squash:
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            im = im[:, top:top + side, left:left + side]
        crops.append(im)
        groups.setdefault(tuple(im.shape[1:]), []).append(i)
    # Each group's resized images go to consecutive rows, then one gather puts them in batch order:
    # an input tar's batch comes in hundreds of sizes, and this copies one index to the GPU per
    # batch instead of one per group (py-spy showed those copies in the preparing threads; the
    # run's rate on an H200 did not measurably change).
    grouped = torch.empty((len(images), 3, size, size), device=device)
    order: list[int] = []
    for shape, idx in groups.items():
        batch = torch.stack([crops[i] for i in idx]) if len(idx) > 1 else crops[idx[0]][None]
        batch = batch.float()
        if shape != (size, size):
            batch = F.interpolate(batch, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        grouped[len(order):len(order) + len(idx)] = batch
        order.extend(idx)
    if order == list(range(len(images))):
        out = grouped
    else:
        row_of = [0] * len(images)  # image i lies in row row_of[i] of `grouped`
        for row, i in enumerate(order):
            row_of[i] = row
        out = grouped[_on_device(row_of, device)]
        del grouped  # the batch twice over is ~1.2 GB at 1,024 images: not kept while normalizing
    return normalize_pixels(out, clip)


def _squashes(clip: LoadedClip) -> bool:
    """Whether the model's preprocessing resizes the whole image to a square (open_clip's "squash"),
    rather than its center square ("shortest", the default)."""
    return clip.model.visual.preprocess_cfg.get("resize_mode") == "squash"


def normalize_pixels(pixels, clip: LoadedClip):
    """Float pixels of 0..255 (N, 3, H, W) as the model's input: scaled to [0, 1], then open_clip's mean/std."""
    cfg = clip.model.visual.preprocess_cfg
    mean = _on_device(list(cfg["mean"]), pixels.device).view(1, 3, 1, 1)
    std = _on_device(list(cfg["std"]), pixels.device).view(1, 3, 1, 1)
    return (pixels.clamp_(0, 255) / 255.0 - mean) / std


def _on_device(values: list, device):
    """A small list as a tensor on `device`, copied without waiting for the GPU: a plain list
    used as an index is copied from pageable memory, which makes the CPU wait until the GPU
    has finished all the work queued on the stream before it."""
    import torch

    tensor = torch.tensor(values)
    if torch.device(device).type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)



# Reader processes per GPU scorer when `clip.reader_processes` is "auto" (one tokenizes ~20,000
# captions/s; two keep ahead of the GPU). The CPU path reads in-process: there the model is
# the bottleneck and extra processes would compete with it for the cores.
GPU_READER_PROCESSES = 2


def limit_gpu_memory(device: str, gib: float) -> None:
    """Cap this process's PyTorch allocations on `device` at `gib` (or the whole GPU if smaller).

    What a scoring worker held without it (ViT-B-32, 48,000 rows on an H200: 83.8 GB in
    nvidia-smi) was mostly the allocator's cache: freed blocks kept for reuse, per CUDA stream,
    in the many sizes that full-resolution decoded images make. Under the cap the allocator
    returns cached blocks and retries before it would go past it."""
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), index)


def _gpu_memory(scorer: ClipScorer) -> dict:
    """The scoring process's GPU memory so far (PyTorch's allocator: in use at the peak, and held),
    in GiB, for the done-marker: what a shared GPU gives up to this worker."""
    if not scorer.on_gpu:
        return {}
    import torch

    device = torch.device(scorer.clip.device)
    # Retries, in this process so far (not this task's alone: the count is the allocator's, and the
    # other score task shares it): allocations that met the cap, so the allocator returned its cached
    # blocks (which waits for the GPU) and tried again. Many of them mean the cap is too low.
    return {"gpu_peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "gpu_peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
            "gpu_alloc_retries": int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))}


def _reader_pool(cfg: ClipConfig) -> Optional[ReaderPool]:
    """The reader processes for this config (started now, so that they start while the model
    loads), or None to read in-process."""
    processes = cfg.reader_processes
    if processes == "auto":
        processes = GPU_READER_PROCESSES if resolve_device(cfg.device).startswith("cuda") else 0
    if not processes:
        return None
    pool = cached(("reader_pool", cfg.model, processes), lambda: ReaderPool(cfg.model, processes))
    pool.start()
    return pool


def _decode_pool(cfg: ClipConfig) -> Optional[DecodePool]:
    """The decoding helpers for this config (started now, beside the model's loading), or None."""
    processes = cfg.decode_processes
    if processes == "auto":  # on a GPU only: on the CPU the model is the bottleneck, and needs the cores
        processes = default_count() if resolve_device(cfg.device).startswith("cuda") else 0
    if not processes:
        return None
    pool = cached(("decode_pool", processes), lambda: DecodePool(processes))
    pool.start()
    return pool


def _scorer(cfg: ClipConfig) -> ClipScorer:
    key = (cfg.model, cfg.pretrained, cfg.device, cfg.precision, cfg.gpu_decode)
    return cached(("scorer", *key), lambda: ClipScorer(cfg))


def _ready(cfg: ClipConfig) -> tuple[Optional[ReaderPool], Optional[DecodePool], ClipScorer]:
    """The process's reader pool and decoding helpers (started first, so that their processes start
    while the model loads) and its scorer with the model loaded (or its loading, by another thread,
    waited for)."""
    pool = _reader_pool(cfg)
    helpers = _decode_pool(cfg)
    scorer = _scorer(cfg)
    scorer.clip
    return pool, helpers, scorer


def warm_up_scoring(cfg: ClipConfig) -> None:
    """What the first score task of a process would wait for, done before it comes (a GPU worker
    joining the run: pipeline/cluster.py `WarmUp`): the reader processes and decoding helpers
    started, torch and open_clip imported, the model loaded onto the device."""
    _ready(cfg)


def score_shard(shard_id: int, downloaded: dict, download_dir: str, emb_dir: str, marker_dir: str, cfg: ClipConfig) -> dict:
    """Score one downloaded shard. Returns its stats (with a similarity histogram); done shards
    are not redone. `downloaded` orders this task after the shard's download."""
    out = embedding_files(emb_dir, shard_id)

    def work() -> dict:
        for path in out.values():
            storage.make_dirs(storage.parent(path))
        started = time.time()
        pool, helpers, scorer = _ready(cfg)
        ready = time.time() - started
        counts = {"helper_decoded": 0}
        keys, sims, img_parts, txt_parts = [], [], [], []
        # The readers map the tar (the download's, or the input tar: pipeline/sources.py), a local file
        # (in object storage, a temporary copy of it). Reading the tar and tokenizing run beside the
        # model: in reader processes, or in the prefetch thread.
        tokenizer = scorer.clip.tokenizer if pool is None else None
        with score_batches(download_dir, shard_id, cfg.batch_size, tokenizer, pool) as batches:
            for batch, img, txt, errors in scorer.embed_all(_prefetched(batches), helpers, counts):
                sim = (img * txt).sum(axis=1)
                keys.extend(batch.keys)
                sims.extend(None if e else float(s) for s, e in zip(sim, errors))
                img_parts.append(img.astype(np.float16))
                txt_parts.append(txt.astype(np.float16))
        embedded = time.time() - started  # the rest is writing the files

        dim = img_parts[0].shape[1] if img_parts else scorer.clip.embed_dim  # (0, dim): concatenates with the others
        for name, parts in (("img_emb", img_parts), ("text_emb", txt_parts)):
            with atomic_path(out[name]) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, np.concatenate(parts) if parts else np.zeros((0, dim), np.float16))
        failed = [s is None for s in sims]  # the image did not decode for CLIP
        table = pa.table({
            "key": pa.array(keys, pa.string()),
            "clip_similarity": pa.array(sims, pa.float32()),
            "clip_model": pa.array([scorer.clip.name] * len(keys), pa.string()),
            "status": pa.array([FAILED_TO_RESIZE if f else SUCCESS for f in failed], pa.string()),
            "reason": pa.array([DECODE_ERROR if f else None for f in failed], pa.string()),
        })
        with atomic_path(out["metadata"]) as tmp:
            pq.write_table(table, tmp)

        scored = np.array([s for s in sims if s is not None], dtype=np.float32)
        return {
            "shard": shard_id,
            "scored": int(len(scored)),
            "decode_errors": int(len(sims) - len(scored)),
            "histogram": histogram(scored),
            "model": scorer.clip.name,
            "device": scorer.clip.device,
            "embed_seconds": round(embedded, 3),
            # Of embed_seconds: until the reader processes and the model were there. For download shards
            # it also holds the wait for the other score task's shard, which holds the reader pool.
            "ready_seconds": round(ready, 3),
            # Of the images: decoded by the decoding helpers on the host's cores (pipeline/decode_helpers.py).
            "helper_decoded": counts["helper_decoded"],
            **_gpu_memory(scorer),
        }

    return run_once(marker_dir, shard_id, work, outputs=out.values())
