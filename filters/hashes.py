"""Image hash blocklist: drop images whose bytes hash to a listed digest.

How known abuse material was removed from LAION-5B for Re-LAION-5B: lists of hashes of
known images, matched against the images' bytes. A "bytes" filter: it runs in the
download stage on the bytes as fetched, before anything is decoded or stored, so a
matched image is never written anywhere (not the output, not the raw download shard, not
the report); its row keeps the URL, caption and digest with the reason
"unsafe: hash_blocklist".

    - name: hash_blocklist
      paths: [/lists/sha256.txt, /lists/md5.txt]

Each file holds one hex digest per line: sha256 (64 digits) or md5 (32), told apart by
length, in any case. Empty lines and `#` comments are skipped, and anything after the
digest and a space is ignored, so `sha256sum` / `md5sum` output works as it is. A line
that is not a digest is an error naming the file and line, when the config is read.
Paths are read where the config is loaded and by every worker: absolute paths on a cluster.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

from pydantic import Field, PrivateAttr, field_validator

from curate.filters.base import SAFETY, Decision, Filter
from curate.filters.lists import read_list_lines

_HEX = re.compile(r"[0-9a-f]+")


@functools.lru_cache(maxsize=16)
def _digests(path: str, mtime_ns: int, size: int) -> tuple[frozenset, frozenset]:
    """(sha256 digests, md5 digests) of one list file; cached per process and file version."""
    sha256, md5 = set(), set()
    for number, line in read_list_lines(path):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        digest = fields[0].lower()
        if _HEX.fullmatch(digest) and len(digest) == 64:
            sha256.add(digest)
        elif _HEX.fullmatch(digest) and len(digest) == 32:
            md5.add(digest)
        else:
            raise ValueError(f"{path}:{number}: {digest[:80]!r} is not a sha256 (64 hex digits) "
                             "or md5 (32 hex digits) digest")
    return frozenset(sha256), frozenset(md5)


def read_blocklist(path: str | os.PathLike) -> tuple[frozenset, frozenset]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"hash list not found: {path}")
    stat = path.stat()
    return _digests(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


class HashBlocklist(Filter):
    """Drop images whose sha256 or md5 is listed, as "unsafe: hash_blocklist"."""

    name = "hash_blocklist"

    priority = SAFETY
    stage = "bytes"
    paths: list[str] = Field(min_length=1)

    _sha256: frozenset = PrivateAttr(default=frozenset())
    _md5: frozenset = PrivateAttr(default=frozenset())

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("paths")
    @classmethod
    def _readable(cls, paths: list[str]) -> list[str]:
        for p in paths:
            read_blocklist(p)  # a missing file or a bad line fails here, naming filters.N.paths
        return paths

    def model_post_init(self, context) -> None:
        lists = [read_blocklist(p) for p in self.paths]
        self._sha256 = frozenset().union(*(sha for sha, _ in lists))
        self._md5 = frozenset().union(*(md5 for _, md5 in lists))

    def keep(self, sample) -> Decision:
        data = sample["data"]
        sha256 = sample.get("sha256") or hashlib.sha256(data).hexdigest()
        if sha256 in self._sha256:
            return self.reject("unsafe: hash_blocklist")
        # md5 only when some list has md5 digests: most lists are sha256 only.
        if self._md5 and hashlib.md5(data, usedforsecurity=False).hexdigest() in self._md5:
            return self.reject("unsafe: hash_blocklist")
        return True
