"""Which images are big enough: the selection rules on image size, judged on the ORIGINAL
upright size read from the image header, before a pixel is decoded.

A "bytes" filter: it runs in the download stage right after the fetch, so an image it drops
is never decoded nor stored. The output size is not a filter's business: the `resize:`
section sets it, applied once where the image is decoded (pipeline/image.py).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from pydantic import Field

from curate.filters.base import Decision, Filter, Rejection


class Resolution(Filter):
    """Drop images too small, too large or too elongated, judged on the original image.

    Reasons: "resolution: side<256", "resolution: area<65536", "resolution: area>4194304",
    "resolution: aspect>3", "resolution: bytes<10000". An image whose header cannot be read
    has no known size: it is kept here, and the decoder rejects it (`decode_error`).
    """

    name = "resolution"
    stage = "bytes"
    min_side: int = Field(0, ge=0)  # of the shorter side
    min_area: int = Field(0, ge=0)
    max_area: Optional[int] = Field(None, ge=1)
    max_aspect_ratio: Optional[float] = Field(None, ge=1)  # long side / short side
    min_bytes: int = Field(0, ge=0)  # of the file as downloaded

    def keep(self, sample) -> Decision:
        width, height = sample.get("original_width"), sample.get("original_height")
        if width is not None and height is not None:
            side, area, aspect = min(width, height), width * height, max(width, height) / max(1, min(width, height))
            size = f"{width}x{height}"  # the row's error_message, as for the download's own rejections
            if side < self.min_side:
                return self._drop(f"resolution: side<{self.min_side}", "side", side, self.min_side, size)
            if area < self.min_area:
                return self._drop(f"resolution: area<{self.min_area}", "area", area, self.min_area, size)
            if self.max_area is not None and area > self.max_area:
                return self._drop(f"resolution: area>{self.max_area}", "area", area, self.max_area, size)
            if self.max_aspect_ratio is not None and max(width, height) > self.max_aspect_ratio * side:
                return self._drop(f"resolution: aspect>{self.max_aspect_ratio:g}", "aspect", aspect,
                                  self.max_aspect_ratio, size)
        nbytes = len(sample["data"])
        if nbytes < self.min_bytes:
            return self._drop(f"resolution: bytes<{self.min_bytes}", "bytes", nbytes, self.min_bytes, f"{nbytes} bytes")
        return True

    def thresholds(self) -> list[tuple[str, float]]:
        limits = [("side", self.min_side or None), ("area", self.min_area or None), ("area", self.max_area),
                  ("aspect", self.max_aspect_ratio), ("bytes", self.min_bytes or None)]
        return [(metric, float(t)) for metric, t in limits if t is not None]

    def measures(self, sample) -> dict[str, float]:
        """From a written sample's json: its original size (the header's) and bytes as fetched."""
        meta = sample.get("meta") or {}
        width, height = meta.get("original_width"), meta.get("original_height")
        values = {}
        if width and height:
            side = min(width, height)
            values.update(side=float(side), area=float(width * height), aspect=max(width, height) / side)
        if meta.get("bytes") is not None:
            values["bytes"] = float(meta["bytes"])
        return values

    def _drop(self, reason: str, metric: str, value: float, threshold: float, detail: str) -> Rejection:
        return dataclasses.replace(self.reject(reason, metric, value, threshold), detail=detail)
