"""Probe: the model alone, held for as long as a run scores, window by window, with the GPU's clocks.

bench/shards_e2e.py measures "model alone" over a few seconds; a 300,000-image ViT-L-14 run scores for
~140 s, over which nvidia-smi showed the SM clock at a median of 1,755 MHz (max 1,980) and ~593 W
(session 13). This probe runs the same eager forward as bench/clip_score.py's `run_models_alone`
(text trimmed as curate runs it), one model, without a pause, for --seconds, printing the images/s of each --window seconds with
the SM clock, power and temperature at its end: whether the model's own rate drops as the GPU heats.

    python bench/probes/sustained_model.py [--model ViT-L-14] [--seconds 150] [--window 10] [--batch 256]
    python bench/probes/sustained_model.py --quick   # CPU dry run: tiny CLIP, 6 s
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.clip_score import make_captions  # noqa: E402


def gpu_state() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "no nvidia-smi"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-L-14")
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--window", type=float, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        from curate.pipeline.models.clip import TINY_CLIP
        model, device, precision, batch, seconds, window = TINY_CLIP, "cpu", "fp32", 16, 6, 2
    else:
        model, device, precision, batch, seconds, window = args.model, "cuda", "bf16", args.batch, args.seconds, args.window
    import time

    import torch
    from curate.pipeline.models.clip import load_clip

    clip = load_clip(model, None, device, precision)
    size = clip.image_size
    pixels = torch.randn(batch, 3, size, size, device=device).clamp_(-2, 2).to(clip.dtype)
    tokens = clip.prepare_tokens(clip.tokenizer(make_captions(batch, seed=1))).to(device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    print(f"{model} alone on {device} ({precision}, batch {batch}, text trimmed); at start: {gpu_state()}", flush=True)
    rates = []
    with torch.inference_mode():
        for _ in range(2):  # warm-up
            clip.encode_image(pixels), clip.encode_text(tokens)
        sync()
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            window_start, images = time.perf_counter(), 0
            while time.perf_counter() - window_start < window:
                clip.encode_image(pixels), clip.encode_text(tokens)
                sync()
                images += batch
            rates.append(images / (time.perf_counter() - window_start))
            print(f"  {time.perf_counter() - started:6.1f} s: {rates[-1]:8,.0f} images/s; GPU {gpu_state()}", flush=True)
    print(f"first window {rates[0]:,.0f}, last {rates[-1]:,.0f} images/s ({rates[-1] / rates[0]:.0%}); "
          f"mean over all {sum(rates) / len(rates):,.0f}", flush=True)

if __name__ == "__main__":
    main()
