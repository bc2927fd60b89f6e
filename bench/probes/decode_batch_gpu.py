"""Probe: the score stage's `decode_batch` on a GPU with a mixed batch (JPEG, PNG, WebP, garbage,
a cut JPEG): one batched nvJPEG call when the formats are mixed, every image in order.

    python bench/probes/decode_batch_gpu.py
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def encoded(fmt: str, color, size=(24, 16)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def main() -> None:
    import torchvision.io

    from curate.pipeline.stages.score import decode_batch

    calls = []
    real = torchvision.io.decode_jpeg

    def counted(data, *args, **kwargs):
        calls.append(len(data) if isinstance(data, list) else 1)
        return real(data, *args, **kwargs)

    torchvision.io.decode_jpeg = counted
    jpg = encoded("JPEG", (200, 10, 10))
    images, errors = decode_batch([jpg, encoded("PNG", (1, 2, 250)), b"garbage", jpg, encoded("WEBP", (9, 9, 9))], "cuda")
    print("mixed: calls", calls, "errors", [e and e[:40] for e in errors],
          "devices", [im.device.type if im is not None else None for im in images],
          "png pixel", images[1][:, 0, 0].tolist())
    calls.clear()
    images, errors = decode_batch([jpg, jpg[: len(jpg) // 3], jpg], "cuda")
    print("cut jpeg: calls", calls, "errors", [e and e[:40] for e in errors],
          "shapes", [tuple(im.shape) if im is not None else None for im in images])


if __name__ == "__main__":
    main()
