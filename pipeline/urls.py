"""Hosts as DNS and the blocklists see them: the one normalization that the fetch (which
connects to a host) and the URL blocklist (which compares hosts) share."""

from __future__ import annotations

import ipaddress
import re

# What an ASCII DNS name or IP literal (IPv6 without brackets) can hold once lowercased.
_HOST_CHARS = re.compile(r"[a-z0-9._:-]+")


def normalize_host(host: str, strict: bool = False) -> str:
    """Lower case, no brackets or trailing dot, an IP address in its canonical form, an
    internationalized name in its ASCII (IDNA) form: "Bücher.Example." → "xn--bcher-kva.example".

    strict (the fetch): raise ValueError for a host that no DNS name or IP literal can be
    (spaces, control characters, percent signs must never reach the resolver as a query).
    Otherwise (comparing against a list) a name IDNA refuses is compared as written.
    """
    host = (host if strict else host.strip()).strip("[]").rstrip(".").lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        if strict:
            raise ValueError(f"{host!r}: {exc}"[:200]) from exc
        return host
    if strict and not _HOST_CHARS.fullmatch(host):
        raise ValueError(repr(host)[:200])
    return host
