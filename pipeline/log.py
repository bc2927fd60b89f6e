"""Logging for `curate run` and friends: the `curate` logger, to stderr and optionally a file.

Lines carry a timestamp and a level, so a batch job's log (nohup, SLURM, `> log`) reads on its
own: `2026-12-01 17:10:02 INFO progress: download 12/40 ...`. Workers' records of the `curate`
logger reach the driver's log too (Dask's `Client.forward_logging`).
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

LEVELS = ("debug", "info", "warning", "error")
FORMAT = "%(asctime)s %(levelname)s %(message)s"


def configure(level: str = "info", log_file: Optional[str] = None) -> logging.Logger:
    logger = logging.getLogger("curate")
    logger.setLevel(logging.DEBUG if log_file else getattr(logging, level.upper()))
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    formatter = logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setLevel(getattr(logging, level.upper()))
    stream.setFormatter(formatter)
    logger.addHandler(stream)
    if log_file:
        file = logging.FileHandler(log_file, encoding="utf-8")
        file.setLevel(logging.DEBUG)
        file.setFormatter(formatter)
        logger.addHandler(file)
    return logger
