"""Dask preloads this module into the CPU workers of the embedded GPU layout (pipeline/cluster.py).

`dask_setup` runs as the worker process starts, before its task threads exist: Linux keeps a
nice value per thread, and the threads a worker starts later inherit it. So every download,
read and write task of such a worker runs at a lower CPU priority than the GPU worker's
decoding and reading, which keep the GPU fed.
"""

from __future__ import annotations

import os

# How much lower (a nice value; 0 is the default, 19 the lowest priority).
CPU_WORKER_NICENESS = 10


def dask_setup(worker) -> None:
    os.nice(CPU_WORKER_NICENESS)
