"""Fetch one image over HTTP(S), refusing what a crawler of the open web must refuse.

Why not urllib: urllib follows redirects by itself and connects wherever DNS says,
so a URL (or a redirect) naming an internal service would be fetched. Here every
hop is resolved, each address is checked against the policy, and the socket is
connected to the checked address itself (no second DNS lookup to race).

Every failure becomes a short, low-cardinality reason (`failed_to_download: HTTP 404`)
that stats can count, plus a free-text detail for the row's parquet record.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

from curate.pipeline.config import DownloadConfig

_REDIRECTS = {301, 302, 303, 307, 308}
_CHUNK = 64 * 1024
_BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
_SSL_CONTEXT = ssl.create_default_context()
# What an ASCII DNS name or IP literal (IPv6 without brackets) can hold once lowercased.
_HOST_CHARS = re.compile(r"[a-z0-9._:-]+")


@dataclass
class FetchResult:
    data: Optional[bytes]
    reason: Optional[str] = None  # None on success
    detail: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.reason is None


class FetchError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail or reason


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address that an IPv6 one reaches through a translation mechanism, if any.

    Mapped (::ffff:a.b.c.d), 6to4 (2002:AABB:CCDD::), NAT64 (64:ff9b::a.b.c.d) and the
    deprecated compatible form (::a.b.c.d) all lead to an IPv4 host, which must be judged
    as itself: otherwise 2002:7f00:1:: would be a way around the loopback rule.
    """
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # :: and ::1 are IPv6's own
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_block_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_private: bool) -> Optional[str]:
    """Why an address must not be contacted, or None if it may be.

    Blocked always: link-local (169.254.169.254 is the cloud metadata service),
    multicast, unspecified and reserved. Blocked unless `allow_private`: loopback
    and private ranges (the demo and tests fetch from 127.0.0.1 with it on).
    """
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            ip = embedded
        elif ip.is_site_local:  # deprecated fec0::/10, still routed like a private range
            return None if allow_private else "private"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return None if allow_private else "loopback"
    if ip.is_private or not ip.is_global:
        # is_private covers 10/8, 172.16/12, 192.168/16, fc00::/7 ...; not is_global
        # adds shared (100.64/10) and reserved ranges.
        if ip.is_reserved:
            return "reserved"
        return None if allow_private else "private"
    return None


def _connector(allow_private: bool):
    """A replacement for http.client's socket creation that checks the address first."""

    def create_connection(address, timeout, source_address=None):
        host, port = address
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise FetchError("failed_to_download: dns error", f"{host}: {exc}") from exc
        last_exc: Exception | None = None
        for family, socktype, proto, _, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
            why = address_block_reason(ip, allow_private)
            if why:
                raise FetchError("blocked_address", f"{host} resolves to {ip} ({why})")
            sock = socket.socket(family, socktype, proto)
            try:
                sock.settimeout(timeout)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                last_exc = exc
        raise last_exc or OSError(f"no address for {host}")

    return create_connection


def _split(url: str):
    try:
        return urlsplit(url)
    except ValueError as exc:  # e.g. "http://[::1/x": an unclosed IPv6 bracket
        raise FetchError("invalid_url: bad host", f"{type(exc).__name__}: {exc}"[:200]) from exc


def _ascii_host(hostname: str) -> str:
    """The host as DNS sees it (IDNA for Unicode names), or FetchError for a host that no DNS
    name or IP literal can be: spaces, control characters or percent signs must never reach
    the resolver as a query."""
    try:
        host = hostname.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise FetchError("invalid_url: bad host", str(exc)[:200]) from exc
    if not _HOST_CHARS.fullmatch(host):
        raise FetchError("invalid_url: bad host", repr(hostname)[:200])
    return host


def _open_connection(url: str, cfg: DownloadConfig, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = _split(url)
    if parts.scheme not in ("http", "https"):
        raise FetchError("invalid_url: unsupported scheme", f"scheme {parts.scheme or '(none)'!r}")
    if not parts.hostname:
        raise FetchError("invalid_url: no host", url)
    host = _ascii_host(parts.hostname)
    try:
        port = parts.port
    except ValueError as exc:
        raise FetchError("invalid_url: bad port", str(exc)) from exc
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=_SSL_CONTEXT)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn._create_connection = _connector(cfg.allow_private_addresses)  # checked before every connect
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return conn, target


def user_agent(cfg: DownloadConfig) -> str:
    if cfg.user_agent_token:
        return f"{_BROWSER_UA} (compatible; {cfg.user_agent_token}; +https://github.com/curate/curate)"
    return _BROWSER_UA


def robots_disallowed(headers: http.client.HTTPMessage, cfg: DownloadConfig) -> Optional[str]:
    """The X-Robots-Tag directive that opts this image out, if any.

    `X-Robots-Tag: noai` applies to every agent; `X-Robots-Tag: otherbot: noai` only
    to the agent named (compared with our user-agent token).
    """
    banned = {d.strip().lower() for d in cfg.disallowed_header_directives}
    token = (cfg.user_agent_token or "").strip().lower()
    for value in headers.get_all("X-Robots-Tag") or []:
        agent, _, rest = value.partition(":")
        # "unavailable_after: <date>" is a directive with a value, not an agent prefix.
        if rest and " " not in agent.strip() and agent.strip().lower() not in ("unavailable_after",):
            if agent.strip().lower() != token:
                continue
            value = rest
        for directive in value.split(","):
            if directive.strip().lower() in banned:
                return directive.strip().lower()
    return None


def _quote_unsafe(url: str) -> str:
    """Percent-encode spaces and non-ASCII characters in path, query and fragment, as browsers
    do. The host is left alone: a Unicode name is IDNA-encoded when connecting, and a host
    that needs quoting is not a host (`_ascii_host` refuses it)."""
    parts = _split(url)
    safe = ":/?#[]@!$&'()*+,;=%~"
    return urlunsplit((parts.scheme, parts.netloc, quote(parts.path, safe=safe),
                       quote(parts.query, safe=safe), quote(parts.fragment, safe=safe)))


def fetch_once(url: str, cfg: DownloadConfig, check_url: Optional[Callable[[str], Optional[str]]] = None) -> bytes:
    deadline = time.monotonic() + cfg.timeout
    for _hop in range(cfg.max_redirects + 1):
        conn, target = _open_connection(url, cfg, cfg.timeout)
        try:
            conn.putrequest("GET", target, skip_accept_encoding=True)
            conn.putheader("User-Agent", user_agent(cfg))
            conn.putheader("Accept", "image/*,*/*;q=0.8")
            conn.endheaders()
            resp = conn.getresponse()
            if resp.status in _REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise FetchError("failed_to_download: redirect without location", f"HTTP {resp.status}")
                try:
                    url = _quote_unsafe(urljoin(url, location))
                except ValueError as exc:
                    raise FetchError("invalid_url: bad redirect", f"Location {location!r}"[:200]) from exc
                refused = check_url(url) if check_url else None
                if refused:  # e.g. a redirect onto a blocklisted domain
                    raise FetchError(refused, f"redirect to {url}"[:200])
                continue
            if resp.status != 200:
                raise FetchError(f"failed_to_download: HTTP {resp.status}", f"HTTP {resp.status} {resp.reason}")
            directive = robots_disallowed(resp.msg, cfg)
            if directive:
                raise FetchError("disallowed_by_x_robots_tag", f"X-Robots-Tag: {directive}")
            ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if ctype.startswith("text/"):
                raise FetchError("failed_to_download: not an image", f"Content-Type {ctype}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > cfg.max_bytes:
                raise FetchError("failed_to_download: too large", f"Content-Length {length} > {cfg.max_bytes}")
            chunks, size = [], 0
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > cfg.max_bytes:
                    raise FetchError("failed_to_download: too large", f"more than {cfg.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise FetchError("failed_to_download: timeout", f"body not complete after {cfg.timeout}s")
                chunks.append(chunk)
            # http.client returns a short body silently when the server hangs up early.
            if length and length.isdigit() and size != int(length):
                raise FetchError("failed_to_download: incomplete body", f"{size} of {length} bytes")
            return b"".join(chunks)
        finally:
            conn.close()
    raise FetchError("failed_to_download: too many redirects", f"more than {cfg.max_redirects}")


def fetch(url: Optional[str], cfg: DownloadConfig, check_url: Optional[Callable[[str], Optional[str]]] = None) -> FetchResult:
    """Fetch with retries. Never raises: failures come back as a reason. `check_url(url)` is
    asked about every redirect target and returns a rejection reason or None."""
    if url is None or not str(url).strip():
        return FetchResult(None, "invalid_url: missing", "empty URL")
    try:
        url = _quote_unsafe(str(url).strip())
    except FetchError as exc:
        return FetchResult(None, exc.reason, exc.detail)
    result = FetchResult(None, "failed_to_download: not attempted")
    for _attempt in range(cfg.retries + 1):
        try:
            return FetchResult(fetch_once(url, cfg, check_url))
        except FetchError as exc:
            result = FetchResult(None, exc.reason, exc.detail)
            if exc.reason.startswith(("invalid_url", "blocked_address", "disallowed", "unsafe")) or "HTTP 4" in exc.reason:
                return result  # retrying cannot change these answers
        except http.client.IncompleteRead as exc:
            result = FetchResult(None, "failed_to_download: incomplete body", f"{len(exc.partial)} bytes received")
        except (socket.timeout, TimeoutError):
            result = FetchResult(None, "failed_to_download: timeout", f"no answer within {cfg.timeout}s")
        except ssl.SSLError as exc:
            result = FetchResult(None, "failed_to_download: tls error", str(exc)[:200])
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            result = FetchResult(None, "failed_to_download: connection error", f"{type(exc).__name__}: {exc}"[:200])
        except UnicodeError as exc:
            return FetchResult(None, "invalid_url: bad host", str(exc)[:200])
        except Exception as exc:  # one row's surprise must not fail its shard; still counted by name
            return FetchResult(None, "failed_to_download: unexpected error", f"{type(exc).__name__}: {exc}"[:200])
    return result
