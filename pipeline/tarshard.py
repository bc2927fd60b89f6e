"""WebDataset tar shards, written reproducibly.

The same samples always give the same bytes (fixed mtime, owner and mode), so a
resumed run and an uninterrupted one produce identical shards and a shard can be
checked by its hash. Readers see an ordinary WebDataset: `{key}.{ext}` members,
grouped by key, in write order.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Iterator


class TarShardWriter:
    def __init__(self, path: Path):
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o444
            info.mtime = 0
            info.uname = info.gname = "curate"
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> "TarShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) in file order, the way webdataset groups members."""
    key, fields = None, {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            member_key, _, ext = base.partition(".")
            if member_key != key:
                if key is not None:
                    yield key, fields
                key, fields = member_key, {}
            fields[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, fields
