"""Frames between a process and its helper subprocesses (pipeline/score_reader.py, pipeline/decode_helpers.py):
a json header and raw numpy arrays over a pipe. Nothing is unpickled; an array is read straight into
the memory it will be used from when the receiver says where (`into`).

A frame: the header's length (8 bytes, little endian), the header (json, with each array's dtype and
shape under "arrays"), then each array's bytes.
"""

from __future__ import annotations

import json
import struct
from typing import Callable, Optional

import numpy as np

# Where a received array goes: (dtype, shape) -> a writable C-contiguous array of that dtype and shape.
Allocator = Callable[[np.dtype, tuple], np.ndarray]


def send(stream, header: dict, arrays: tuple[np.ndarray, ...] = ()) -> None:
    header = dict(header, arrays=[[a.dtype.str, list(a.shape)] for a in arrays])
    data = json.dumps(header).encode()
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    for a in arrays:
        if a.nbytes:  # (a memoryview of an empty array of several dimensions cannot be cast to bytes)
            stream.write(memoryview(np.ascontiguousarray(a)).cast("B"))
    stream.flush()


def read_exactly(stream, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) < n:
        raise EOFError
    return data


def _read_into(stream, out: np.ndarray) -> None:
    if not out.nbytes:
        return
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        got = stream.readinto(view[done:])
        if not got:
            raise EOFError
        done += got


def receive(stream, into: Optional[Allocator] = None) -> tuple[dict, list[np.ndarray]]:
    """(header, arrays) of the next frame; EOFError when the stream ends first."""
    (length,) = struct.unpack("<Q", read_exactly(stream, 8))
    header = json.loads(read_exactly(stream, length))
    arrays = []
    for dtype, shape in header.pop("arrays"):
        dtype, shape = np.dtype(dtype), tuple(shape)
        if into is not None:
            out = into(dtype, shape)
            _read_into(stream, out)
        else:
            count = int(np.prod(shape))
            out = np.frombuffer(read_exactly(stream, count * dtype.itemsize), dtype=dtype).reshape(shape)
        arrays.append(out)
    return header, arrays
