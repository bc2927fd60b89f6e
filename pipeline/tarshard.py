"""WebDataset tar shards, written reproducibly.

The same samples always give the same bytes (fixed mtime, owner and mode), so a
resumed run and an uninterrupted one produce identical shards and a shard can be
checked by its hash. Readers see an ordinary WebDataset: `{key}.{ext}` members,
grouped by key, in write order.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from curate.pipeline import storage


# Member names are {key}.{ext}: a key is letters, digits, - and _ (curate's keys are shard and row
# numbers); an extension is such words joined by dots (jpg, latent.npy). So no member can name a
# path outside the folder a reader extracts to (no "/", no "..", no absolute path).
_KEY = re.compile(r"[A-Za-z0-9_-]+")
_EXT = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


# The fixed parts of every member's ustar header: mode 0444, uid/gid 0, mtime 0, owner "curate".
_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile pads the archive to whole records of 20 blocks
_OWNER = b"curate".ljust(32, b"\0")


def _ustar_header(name: bytes, size: int) -> bytes:
    """A regular file member's header, byte for byte what `tarfile` writes for our TarInfo
    (USTAR_FORMAT, mode 0o444, mtime 0, uname/gname "curate"), built without its per-member
    Python object work: tarfile took ~70 µs a member, a third of the write stage's time."""
    header = b"".join((
        name.ljust(100, b"\0"),
        b"0000444\0", b"0000000\0", b"0000000\0",  # mode, uid, gid
        b"%011o\0" % size, b"00000000000\0",        # size, mtime
        b"        ", b"0", b"\0" * 100,               # checksum (spaces while summed), type, link
        b"ustar\x0000", _OWNER, _OWNER,                # magic + version, uname, gname
        b"\0" * 16, b"\0" * 155,                     # devmajor, devminor (none: not a device), prefix
    )).ljust(_BLOCK, b"\0")
    checksum = b"%06o\0 " % sum(header)
    return header[:148] + checksum + header[156:]


class TarShardWriter:
    """Writes `{key}.{ext}` members; the bytes equal `tarfile`'s for the same members
    (tests/unit/test_tarshard.py compares them), so any tar reader reads them."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self._written = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        for ext in fields:
            if not _KEY.fullmatch(key) or not _EXT.fullmatch(ext):
                raise ValueError(f"unsafe tar member name {key!r}.{ext!r}")
        for ext, data in fields.items():
            name = f"{key}.{ext}".encode()
            if len(name) > 100:  # ustar keeps longer names only split at a "/", which ours never have
                raise ValueError(f"tar member name longer than 100 bytes: {name.decode()!r}")
            header = _ustar_header(name, len(data))
            padding = -len(data) % _BLOCK
            self._file.write(header)
            self._file.write(data)
            self._file.write(b"\0" * padding)
            self._written += len(header) + len(data) + padding

    def close(self) -> None:
        if self._file.closed:
            return
        end = self._written + 2 * _BLOCK  # two zero blocks end the archive
        self._file.write(b"\0" * (2 * _BLOCK + (-end % _RECORD)))
        self._file.close()

    def __enter__(self) -> "TarShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) in file order, the way webdataset groups members."""
    return _group_by_key(_iter_members(path))


def _group_by_key(members: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, {ext: value}) from consecutive (member name, value) pairs named {key}.{ext}."""
    key, fields = None, {}
    for name, value in members:
        member_key, _, ext = name.rsplit("/", 1)[-1].partition(".")
        if member_key != key:
            if key is not None:
                yield key, fields
            key, fields = member_key, {}
        fields[ext] = value
    if key is not None:
        yield key, fields


def _iter_members(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file member, in file order (`scan_tar` walks the headers)."""
    with storage.open_file(path) as f:  # a local file, or an object read as a stream
        for entry in _scan(f):
            if entry.kind == "file":
                f.seek(entry.offset)
                yield entry.name, f.read(entry.size)


def iter_sample_spans(path: str | Path) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """Yield (key, {ext: (offset, size)}) in file order: where each member's bytes lie in the
    file, without reading them. For readers that map the file and take views of it."""
    return _group_by_key((e.name, (e.offset, e.size)) for e in scan_tar(path) if e.kind == "file")


BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
# pax records that change nothing about where a member's bytes lie, or that are applied here.
_PAX_UNDERSTOOD = {"path", "size", "mtime", "atime", "ctime", "uid", "gid", "uname", "gname", "comment"}


def _octal(field: bytes) -> int:
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _checksum_ok(header: bytes) -> bool:
    try:
        checksum = _octal(header[148:156])
    except ValueError:
        return False
    return checksum == sum(header[:148]) + 8 * 32 + sum(header[156:])


def _pax_records(f, header: bytes, offset: int, file_size: int) -> dict[str, str] | None:
    """The records of a pax extended header ('x', for the next member), or None when `header` is
    not one (or not valid: then the caller's other checks decide)."""
    if header[156:157] != b"x" or header[257:262] != b"ustar" or not _checksum_ok(header):
        return None
    try:
        size = _octal(header[124:136])
    except ValueError:
        return None
    if offset + BLOCK + size > file_size:
        raise TarDamaged(f"the tar ends inside a pax header at byte {offset}")
    f.seek(offset + BLOCK)
    data, records, pos = f.read(size), {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            return None
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _plain_file_header(header: bytes) -> tuple[str, int] | None:
    """(name, size) of a ustar regular-file header with a valid checksum, else None."""
    if header[156:157] not in (b"0", b"\0") or header[257:262] != b"ustar":
        return None
    size_field = header[124:136]
    if size_field[:1] in (b"\x80", b"\xff"):  # base-256 size: leave it to tarfile
        return None
    try:
        size = _octal(size_field)
    except ValueError:
        return None
    if not _checksum_ok(header):
        return None
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    if prefix:
        name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size


# --- reading tars curate did not write (existing WebDataset / img2dataset shards as input) ---

class TarEntry(NamedTuple):
    name: str
    offset: int  # where the member's data starts in the file
    size: int    # 0 for anything but a regular file
    kind: str    # "file", "directory", "link" or "other" (devices, fifos)


class TarDamaged(tarfile.ReadError):
    """A tar that ends early or holds a header that is not one; `cut_member` names the member
    whose data was cut, when the cut fell inside one."""

    def __init__(self, detail: str, cut_member: str | None = None):
        super().__init__(detail)
        self.detail = detail
        self.cut_member = cut_member


def looks_like_tar(first_block: bytes) -> bool:
    """Whether a file's first 512 bytes open a tar: an end-of-archive block (an empty tar) or a
    header with a valid checksum (unsigned or signed sum, as tarfile accepts)."""
    if len(first_block) < BLOCK:
        return False
    if first_block[:BLOCK] == _ZERO_BLOCK:
        return True
    header = first_block[:BLOCK]
    try:
        checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    blanked = header[:148] + b" " * 8 + header[156:]
    return checksum in (sum(blanked), sum(b - 256 if b > 127 else b for b in blanked))


def scan_tar(path: str | Path) -> Iterator[TarEntry]:
    """Every member of a local tar file in file order, from its headers alone: regular files with
    where their bytes lie, and the other kinds too (so a caller can count what it skips).

    A tar cut short (inside a header or a member's data, or before its end-of-archive blocks) or
    holding a block that is no header raises TarDamaged, after every member before the damage
    has been yielded: what was read stays usable.

    Plain ustar file headers (what TarShardWriter and webdataset write) are parsed here directly,
    several times faster than `tarfile`, which matters when the score stage reads tens of
    thousands of samples a second; at the first header of any other kind (pax, GNU long names,
    links, base-256 sizes) the rest of the file is handed to `tarfile`."""
    with storage.open_file(path) as f:
        yield from _scan(f)


def _scan(f) -> Iterator[TarEntry]:
    """`scan_tar` over an open file; the caller may read members between entries (each step seeks)."""
    file_size = f.seek(0, io.SEEK_END)
    offset = 0
    pax: dict[str, str] = {}  # a pax extended header's records, for the member that follows it
    pax_offset = 0  # where that header starts: tarfile goes back to it if the member is not plain
    while True:
        f.seek(offset)
        header = f.read(BLOCK)
        if header == _ZERO_BLOCK:
            return
        if not header and offset == 0:  # an empty file: no members (TarShardWriter never writes one)
            return
        if not header:
            raise TarDamaged(f"the tar ends at byte {offset} without its end-of-archive blocks")
        if len(header) < BLOCK:
            raise TarDamaged(f"the tar ends inside a header at byte {offset}", cut_member=_partial_name(header))
        records = _pax_records(f, header, offset, file_size)
        if records is not None:
            # webdataset's (so img2dataset's) TarWriter puts one before every member, for its
            # float mtime: read here, or every such tar would take tarfile's slow path.
            pax, pax_offset = records, offset
            size = _octal(header[124:136])
            offset += BLOCK + size + (-size % BLOCK)
            continue
        parsed = _plain_file_header(header)
        if parsed is None or not set(pax) <= _PAX_UNDERSTOOD:  # GNU headers, directories, links: tarfile reads the rest
            yield from _scan_with_tarfile(f, pax_offset if pax else offset, file_size)
            return
        name, size = parsed
        name = pax.get("path", name)
        size = int(pax.get("size", size))
        pax = {}
        data_offset = offset + BLOCK
        if data_offset + size > file_size:
            raise TarDamaged(f"the tar ends inside member {name}", cut_member=name)
        yield TarEntry(name, data_offset, size, "file")
        offset = data_offset + size + (-size % BLOCK)


def _kind(member: tarfile.TarInfo) -> str:
    if member.isfile():
        return "file"
    if member.isdir():
        return "directory"
    return "link" if member.issym() or member.islnk() else "other"


def _scan_with_tarfile(f, start: int, file_size: int) -> Iterator[TarEntry]:
    f.seek(start)
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if member.isfile() and member.offset_data + member.size > file_size:
                    raise TarDamaged(f"the tar ends inside member {member.name}", cut_member=member.name)
                # offsets are absolute: tarfile counts from fileobj.tell() at open
                yield TarEntry(member.name, member.offset_data, member.size if member.isfile() else 0, _kind(member))
            end = tar.offset
    except tarfile.ReadError as exc:
        raise TarDamaged(f"unreadable tar data after byte {start} ({exc})") from exc
    # tarfile stops without a word at a header it cannot read: say why it stopped.
    f.seek(end)
    block = f.read(BLOCK)
    if block == _ZERO_BLOCK:
        return
    if not block:
        raise TarDamaged(f"the tar ends at byte {end} without its end-of-archive blocks")
    if len(block) < BLOCK:
        raise TarDamaged(f"the tar ends inside a header at byte {end}", cut_member=_partial_name(block))
    raise TarDamaged(f"no tar header at byte {end}")


def _partial_name(header: bytes) -> str | None:
    """The member name in a header cut short, when its name field made it whole (ends in NUL)."""
    name, nul, _ = header[:100].partition(b"\0")
    return name.decode("utf-8", "surrogateescape") if nul and name else None
