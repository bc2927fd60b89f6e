"""Fetch one image over HTTP(S), refusing what a crawler of the open web must refuse.

Why not urllib: urllib follows redirects by itself and connects wherever DNS says,
so a URL (or a redirect) naming an internal service would be fetched. Here every
hop is resolved, each address is checked against the policy, and the socket is
connected to the checked address itself (no second DNS lookup to race).

Every failure becomes a `Rejection` (filter "download") with a short, low-cardinality
reason (`failed_to_download: HTTP 404`) that stats can count, plus a free-text detail for
the row's parquet record; a `FetchError` also says whether trying again could help.
"""

from __future__ import annotations

import contextlib
import heapq
import http.client
import ipaddress
import itertools
import socket
import ssl
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

from curate.pipeline.config import DownloadConfig
from curate.pipeline.records import FAILED_TO_DOWNLOAD, Rejection
from curate.pipeline.urls import normalize_host

_REDIRECTS = {301, 302, 303, 307, 308}
_CHUNK = 64 * 1024
_BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
_SSL_CONTEXT = ssl.create_default_context()


# The stage's name in the rejections it makes (a redirect refused by a URL filter is that filter's).
FETCH = "download"


@dataclass
class FetchResult:
    data: Optional[bytes]
    rejection: Optional[Rejection] = None  # None on success
    http_status: Optional[int] = None  # a failure's HTTP status, where the server answered (404, 503)

    @property
    def ok(self) -> bool:
        return self.rejection is None

    @property
    def reason(self) -> Optional[str]:
        return None if self.rejection is None else self.rejection.reason

    @property
    def detail(self) -> Optional[str]:
        return None if self.rejection is None else self.rejection.detail


def _failed(reason: str, detail: str) -> FetchResult:
    return FetchResult(None, Rejection(reason, filter=FETCH, detail=detail, status=FAILED_TO_DOWNLOAD))


class FetchError(Exception):
    """A fetch that failed: its rejection, and whether another attempt could succeed
    (`retryable`: a timeout, a dropped connection, a 5xx may pass next time; a 4xx, an
    invalid URL, a blocked address or an opt-out will not). Every raise decides it.
    The row's status is FAILED_TO_DOWNLOAD, as img2dataset records any failed fetch, unless the
    rejection is a filter's (a redirect onto a blocked URL: `filter` and `status` are that filter's)."""

    def __init__(self, reason: str, detail: str = "", *, retryable: bool, filter: str = FETCH,
                 status: str = FAILED_TO_DOWNLOAD, http_status: Optional[int] = None):
        super().__init__(reason)
        self.rejection = Rejection(reason, filter=filter, detail=detail or reason, status=status)
        self.retryable = retryable
        self.http_status = http_status  # the answer's status, as a number for the report


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


def _checked_addresses(host: str, port: int, allow_private: bool):
    """The addresses `host` resolves to (getaddrinfo entries), each judged by the address rules
    as it is reached: a blocked one raises FetchError before it could be used."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchError("failed_to_download: dns error", f"{host}: {exc}", retryable=True) from exc
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        why = address_block_reason(ip, allow_private)
        if why:
            raise FetchError("blocked_address", f"{host} resolves to {ip} ({why})", retryable=False)
        yield info


def _connector(allow_private: bool):
    """A replacement for http.client's socket creation that checks the address first."""

    def create_connection(address, timeout, source_address=None):
        host, port = address
        last_exc: Exception | None = None
        for family, socktype, proto, _, sockaddr in _checked_addresses(host, port, allow_private):
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
        raise FetchError("invalid_url: bad host", f"{type(exc).__name__}: {exc}"[:200], retryable=False) from exc


def _open_connection(url: str, cfg: DownloadConfig, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = _split(url)
    if parts.scheme not in ("http", "https"):
        raise FetchError("invalid_url: unsupported scheme", f"scheme {parts.scheme or '(none)'!r}", retryable=False)
    if not parts.hostname:
        raise FetchError("invalid_url: no host", url, retryable=False)
    try:
        host = normalize_host(parts.hostname, strict=True)
    except ValueError as exc:
        raise FetchError("invalid_url: bad host", str(exc), retryable=False) from exc
    try:
        port = parts.port
    except ValueError as exc:
        raise FetchError("invalid_url: bad port", str(exc), retryable=False) from exc
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    proxy = proxy_for(parts.scheme, host, cfg)
    if proxy is not None:
        return _via_proxy(proxy, parts.scheme, host, port, target, cfg, timeout)
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=_SSL_CONTEXT)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn._create_connection = _connector(cfg.allow_private_addresses)  # checked before every connect
    return conn, target


def proxy_for(scheme: str, host: str, cfg: DownloadConfig) -> Optional[str]:
    """The proxy URL to reach `host` through, or None for a direct connection: download.proxy,
    else (when allowed) HTTP_PROXY / HTTPS_PROXY unless NO_PROXY names the host."""
    if cfg.proxy:
        return cfg.proxy
    if not cfg.proxy_from_environment:
        return None
    proxies = urllib.request.getproxies_environment()
    if not proxies.get(scheme) or urllib.request.proxy_bypass_environment(host, proxies):
        return None
    return proxies[scheme]


def check_target(host: str, port: Optional[int], allow_private: bool) -> None:
    """The address rules for a host the proxy will connect to: every address it resolves to is
    judged here, before anything is sent (the proxy resolves it again; a name whose answer
    changes in between is the proxy's own policy's to refuse)."""
    for _ in _checked_addresses(host, port or 443, allow_private):
        pass


def _via_proxy(proxy: str, scheme: str, host: str, port: Optional[int], target: str, cfg: DownloadConfig,
               timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """A connection to the proxy: plain HTTP asks it for the absolute URL; HTTPS tunnels through
    it (CONNECT) and speaks TLS with the target. The proxy itself is infrastructure the user
    configured, so its own address is not judged by the row rules."""
    check_target(host, port, cfg.allow_private_addresses)
    p = urlsplit(proxy)
    if scheme == "https":
        conn = http.client.HTTPSConnection(p.hostname, p.port or 8080, timeout=timeout, context=_SSL_CONTEXT)
        conn.set_tunnel(host, port or 443)
        return conn, target
    conn = http.client.HTTPConnection(p.hostname, p.port or 8080, timeout=timeout)
    netloc = f"[{host}]" if ":" in host else host
    return conn, f"http://{netloc}{f':{port}' if port else ''}{target}"


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
    that needs quoting is not a host (`normalize_host` refuses it)."""
    parts = _split(url)
    safe = ":/?#[]@!$&'()*+,;=%~"
    return urlunsplit((parts.scheme, parts.netloc, quote(parts.path, safe=safe),
                       quote(parts.query, safe=safe), quote(parts.fragment, safe=safe)))


class _Deadlines:
    """Ends fetches that run past their deadline, whatever the server does.

    A socket timeout bounds each read, not the fetch: a server that drips a byte a second
    (headers or body) keeps every read within it forever, and the thread, its shard's task
    and its worker slot wait with it. One thread per process watches the sockets of the
    fetches in flight and shuts down each one whose deadline has passed; the blocked read
    then returns, and the fetch ends as a timeout.
    """

    def __init__(self):
        self._heap: list[tuple[float, int]] = []
        self._live: dict[int, socket.socket] = {}
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None

    @contextlib.contextmanager
    def guard(self, sock: socket.socket, deadline: float):
        token = next(self._ids)
        with self._cond:
            self._live[token] = sock
            heapq.heappush(self._heap, (deadline, token))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._watch, name="curate-fetch-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._live.pop(token, None)

    def _watch(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)  # finished in time
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, token = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                try:
                    self._live.pop(token).shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


_DEADLINES = _Deadlines()


def _timed_out(cfg: DownloadConfig, what: str) -> FetchError:
    return FetchError("failed_to_download: timeout", f"{what} not complete after {cfg.timeout}s", retryable=True)


def fetch_once(url: str, cfg: DownloadConfig, check_url: Optional[Callable[[str], Optional[Rejection]]] = None) -> bytes:
    """One attempt: every hop of it, connect, headers and body, ends within cfg.timeout."""
    deadline = time.monotonic() + cfg.timeout
    for _hop in range(cfg.max_redirects + 1):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timed_out(cfg, "redirects")
        conn, target = _open_connection(url, cfg, remaining)
        try:
            conn.connect()
            with _DEADLINES.guard(conn.sock, deadline):
                return_value = _exchange(conn, target, url, cfg, check_url, deadline)
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() >= deadline:  # the deadline cut the socket: whatever broke, it is a timeout
                raise _timed_out(cfg, "response") from exc
            raise
        finally:
            conn.close()
        if isinstance(return_value, bytes):
            return return_value
        url = return_value  # a redirect: the next hop
    raise FetchError("failed_to_download: too many redirects", f"more than {cfg.max_redirects}", retryable=False)


def _exchange(conn: http.client.HTTPConnection, target: str, url: str, cfg: DownloadConfig,
              check_url: Optional[Callable[[str], Optional[Rejection]]], deadline: float) -> bytes | str:
    """One request on an open connection: the body, or the URL a redirect points to."""
    conn.putrequest("GET", target, skip_accept_encoding=True)
    conn.putheader("User-Agent", user_agent(cfg))
    conn.putheader("Accept", "image/*,*/*;q=0.8")
    conn.endheaders()
    resp = conn.getresponse()
    if resp.status in _REDIRECTS:
        location = resp.getheader("Location")
        if not location:
            raise FetchError("failed_to_download: redirect without location", f"HTTP {resp.status}",
                             retryable=False, http_status=resp.status)
        try:
            url = _quote_unsafe(urljoin(url, location))
        except ValueError as exc:
            raise FetchError("invalid_url: bad redirect", f"Location {location!r}"[:200], retryable=False) from exc
        refused = check_url(url) if check_url else None
        if refused is not None:  # e.g. a redirect onto a blocklisted domain: that filter's rejection
            raise FetchError(refused.reason, f"redirect to {url}"[:200], retryable=False, filter=refused.filter,
                             status=refused.status)
        return url
    if resp.status != 200:
        # A 4xx is the server's answer about this URL; a 5xx (or an odd 1xx/2xx/3xx) may pass next time.
        raise FetchError(f"failed_to_download: HTTP {resp.status}", f"HTTP {resp.status} {resp.reason}",
                         retryable=not 400 <= resp.status < 500, http_status=resp.status)
    directive = robots_disallowed(resp.msg, cfg)
    if directive:
        raise FetchError("disallowed_by_x_robots_tag", f"X-Robots-Tag: {directive}", retryable=False)
    ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
    if ctype.startswith("text/"):
        # Retried: sites serve error and rate-limit pages as 200 text/html.
        raise FetchError("failed_to_download: not an image", f"Content-Type {ctype}", retryable=True)
    length = resp.getheader("Content-Length")
    if length and length.isdigit() and int(length) > cfg.max_bytes:
        raise FetchError("failed_to_download: too large", f"Content-Length {length} > {cfg.max_bytes}",
                         retryable=False)
    chunks, size = [], 0
    while True:
        chunk = resp.read1(_CHUNK)  # what has arrived, up to _CHUNK: the deadline is checked as it trickles
        if not chunk:
            break
        size += len(chunk)
        if size > cfg.max_bytes:
            raise FetchError("failed_to_download: too large", f"more than {cfg.max_bytes} bytes", retryable=False)
        if time.monotonic() > deadline:
            raise _timed_out(cfg, "body")
        chunks.append(chunk)
    if time.monotonic() >= deadline:  # the deadline cut the body short
        raise _timed_out(cfg, "body")
    # http.client returns a short body silently when the server hangs up early.
    if length and length.isdigit() and size != int(length):
        raise FetchError("failed_to_download: incomplete body", f"{size} of {length} bytes", retryable=True)
    return b"".join(chunks)


def fetch(url: Optional[str], cfg: DownloadConfig, check_url: Optional[Callable[[str], Optional[Rejection]]] = None) -> FetchResult:
    """Fetch with retries. Never raises: a failure comes back as a rejection. `check_url(url)` is
    asked about every redirect target and returns a Rejection or None."""
    if url is None or not str(url).strip():
        return _failed("invalid_url: missing", "empty URL")
    try:
        url = _quote_unsafe(str(url).strip())
    except FetchError as exc:
        return FetchResult(None, exc.rejection)
    result = _failed("failed_to_download: not attempted", "no attempt made")
    for _attempt in range(cfg.retries + 1):
        try:
            return FetchResult(fetch_once(url, cfg, check_url))
        except FetchError as exc:
            result = FetchResult(None, exc.rejection, exc.http_status)
            if not exc.retryable:
                return result
        except http.client.IncompleteRead as exc:
            result = _failed("failed_to_download: incomplete body", f"{len(exc.partial)} bytes received")
        except (socket.timeout, TimeoutError):
            result = _failed("failed_to_download: timeout", f"no answer within {cfg.timeout}s")
        except ssl.SSLError as exc:
            result = _failed("failed_to_download: tls error", str(exc)[:200])
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            result = _failed("failed_to_download: connection error", f"{type(exc).__name__}: {exc}"[:200])
        except UnicodeError as exc:
            return _failed("invalid_url: bad host", str(exc)[:200])
        except Exception as exc:  # one row's surprise must not fail its shard; still counted by name
            return _failed("failed_to_download: unexpected error", f"{type(exc).__name__}: {exc}"[:200])
    return result
