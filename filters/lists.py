"""List files the filters read (blocked words, domains, image digests): one entry a line,
`#` comment lines and empty lines skipped. Read once per process and file version: every
shard's task builds its filters again, and a list can hold millions of entries."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional


@functools.lru_cache(maxsize=16)
def _read_lines(path: str, mtime_ns: int, size: int) -> tuple[tuple[int, str], ...]:
    # Keyed on mtime and size as well, so an edited file is read again.
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(number, line.strip()) for number, line in enumerate(f, 1)]
    return tuple((n, s) for n, s in lines if s and not s.startswith("#"))


def read_list_lines(path: str | os.PathLike) -> tuple[tuple[int, str], ...]:
    """(line number, entry) of a list file: stripped non-empty lines, `#` comment lines skipped."""
    path = Path(path).resolve()
    st = path.stat()
    return _read_lines(str(path), st.st_mtime_ns, st.st_size)


def read_list_file(path: str | os.PathLike) -> tuple[str, ...]:
    """The entries of a list file (see read_list_lines)."""
    return tuple(entry for _, entry in read_list_lines(path))


def existing_file(path: Optional[str], what: str = "list file") -> Optional[str]:
    """The path made absolute (workers may run elsewhere), or ValueError when there is no such file."""
    if path is None:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ValueError(f"{what} not found: {path}")
    return path
