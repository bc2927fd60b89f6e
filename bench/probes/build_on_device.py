"""Probe: how long open_clip takes to build a model (random init, then moved) on the CPU and then the GPU,
against built under `torch.device("cuda")` (what pipeline/models/clip.py does): the weights initialized
on the GPU. Each order once per model, in one process, after the CUDA context exists.

    python bench/probes/build_on_device.py [--models ViT-B-32,ViT-L-14]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="ViT-B-32,ViT-L-14")
    args = parser.parse_args()
    import open_clip
    import torch

    torch.zeros(1, device="cuda")
    for model in args.models.split(","):
        for where in ("cpu then cuda", "on cuda", "cpu then cuda", "on cuda"):
            started = time.perf_counter()
            if where == "on cuda":
                with torch.device("cuda"):
                    built = open_clip.create_model(model, pretrained=None, device="cuda", weights_only=True)
            else:
                built = open_clip.create_model(model, pretrained=None, device="cuda", weights_only=True)
            torch.cuda.synchronize()
            print(f"{model:10s} built {where:14s}: {time.perf_counter() - started:6.2f} s", flush=True)
            del built
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
