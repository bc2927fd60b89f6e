"""The one per-process model cache: a model (or anything costly to build: a scorer, a reader
pool, a set of concept embeddings) is built once per worker process and key, whoever asks.

Dask runs several tasks of a worker in threads, so building is under a lock; it is
re-entrant because one cached thing may build another (concept embeddings load the CLIP).
"""

from __future__ import annotations

import threading
from typing import Callable, Hashable, TypeVar

T = TypeVar("T")

_built: dict[Hashable, object] = {}
_lock = threading.RLock()


def cached(key: Hashable, build: Callable[[], T]) -> T:
    """`build()` the first time `key` is asked for in this process, the same object after that."""
    with _lock:
        if key not in _built:
            _built[key] = build()
        return _built[key]  # type: ignore[return-value]


def forget(kind: str | None = None) -> None:
    """Drop cached objects (all, or those whose key starts with `kind`): benchmarks free a GPU
    between models this way."""
    with _lock:
        for key in [k for k in _built if kind is None or (isinstance(k, tuple) and k and k[0] == kind)]:
            del _built[key]
