"""A local HTTP image server that misbehaves on purpose.

The demo, the tests and the benchmarks need the failure modes of the real web
(slow hosts, truncated bodies, HTML error pages, redirect chains, opt-out
headers, dropped connections, huge responses) reproducibly and offline.

NAME is a path relative to ROOT, e.g. images/000001.jpg.  Plain files live at
/images/..., and each failure is a prefix in front of a plain path, so a URL
list can plant exactly the faults it wants by inserting one:
http://HOST/images/000001.jpg -> http://HOST/slow/2/images/000001.jpg.

    /images/...                  the file ROOT/images/...
    /status/CODE/...             that status, short body
    /slow/SECONDS/NAME           the file, after a delay
    /truncated/NAME              full Content-Length, half the body, then close
    /html/NAME                   200 with an HTML error page
    /robots/DIRECTIVE/NAME       the file with "X-Robots-Tag: DIRECTIVE"
    /redirect/N/NAME             N redirects, then the plain file URL /NAME
    /redirect-to?url=URL         one redirect to URL
    /drop/NAME                   close without any response
    /big/NBYTES                  NBYTES of image/jpeg, streamed
    /drip/SECONDS/NBYTES         headers at once, then the NBYTES body one byte every SECONDS
    /drip-headers/SECONDS/NAME   the response (status line and headers too) one byte every SECONDS

It binds only to loopback: it serves files and follows no authentication, so
it must never be reachable from another machine.

    python -m curate.pipeline.demo.devserver ROOT [--port N]
"""

from __future__ import annotations

import argparse
import mimetypes
import pathlib
import socket
import socketserver
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

ALLOWED_HOSTS = ("127.0.0.1", "::1")

# Idle keep-alive connections are closed after this long, so that handler
# threads of clients that vanished do not pile up during a long benchmark.
_IDLE_TIMEOUT_S = 30.0

# /big streams from one preallocated buffer; starting it with a JPEG
# start-of-image marker lets content sniffing take it for an image, so only a
# size limit can stop the download.
_CHUNK_SIZE = 64 * 1024
_BIG_FIRST_CHUNK = b"\xff\xd8\xff\xe0" + bytes(_CHUNK_SIZE - 4)
_BIG_CHUNK = bytes(_CHUNK_SIZE)

_HTML_ERROR_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Image not available</title></head>\n"
    b"<body><h1>Sorry!</h1><p>This image is no longer available.</p></body></html>\n"
)


def _safe_header_value(value: str) -> bool:
    # A CR or LF would let a URL inject headers; non-latin-1 text would make
    # send_header raise halfway through the response.
    if "\r" in value or "\n" in value:
        return False
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections alive, as real image hosts do; benchmarks of
    # pooled clients would otherwise measure connection setup.
    protocol_version = "HTTP/1.1"
    timeout = _IDLE_TIMEOUT_S
    server: _HTTPServer

    def log_message(self, format: str, *args: object) -> None:
        # Per-request lines would drown test and benchmark output.
        pass

    def do_GET(self) -> None:
        dev = self.server.dev
        dev._count_request(self.path)
        url = urlsplit(self.path)
        # Split before unquoting, so that an encoded "/" inside a segment
        # (e.g. in a robots directive) cannot change the route's structure.
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        route, *args = segments or [""]
        try:
            if route == "images":
                # The plain path: the route name is also the directory name.
                self._serve_file(["images", *args])
            elif route == "status":
                self._status(args)
            elif route == "slow":
                time.sleep(self._parse_non_negative(args, float))
                self._serve_file(args[1:])
            elif route == "truncated":
                self._truncated(args)
            elif route == "html":
                self._send(200, _HTML_ERROR_PAGE, "text/html; charset=utf-8")
            elif route == "robots":
                self._robots(args)
            elif route == "redirect":
                self._redirect(args)
            elif route == "redirect-to":
                self._redirect_to(url.query)
            elif route == "drop":
                # Returning without writing anything: the server then closes
                # the socket, which the client sees as a disconnect.
                self.close_connection = True
            elif route == "big":
                self._big(self._parse_non_negative(args, int))
            elif route == "drip":
                self._drip(self._parse_non_negative(args, float), self._parse_non_negative(args[1:], int))
            elif route == "drip-headers":
                self._drip_headers(self._parse_non_negative(args, float), args[1:])
            else:
                self._send_text(404, "not found")
        except _BadRequest as e:
            self._send_text(400, str(e))

    # -- routes -------------------------------------------------------------

    def _serve_file(self, name: list[str], extra_headers: list[tuple[str, str]] | None = None) -> None:
        data = self.server.dev._read(name)
        if data is None:
            self._send_text(404, "not found")
            return
        content_type = mimetypes.guess_type(name[-1])[0] or "application/octet-stream"
        self._send(200, data, content_type, extra_headers)

    def _status(self, args: list[str]) -> None:
        try:
            code = int(args[0]) if args else -1
        except ValueError:
            code = -1
        # 1xx would leave the client waiting for a final response, and 204/304
        # must not carry a body; keep to codes that fit a simple reply.
        if not 200 <= code <= 599 or code in (204, 304):
            raise _BadRequest("status code must be 200-599, except 204 and 304")
        self._send_text(code, f"status {code}")

    def _truncated(self, name: list[str]) -> None:
        data = self.server.dev._read(name)
        if data is None:
            self._send_text(404, "not found")
            return
        self.send_response(200)
        self.send_header("Content-Type", mimetypes.guess_type(name[-1])[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        # Closing mid-body (no "Connection: close" announced) is what a
        # crashed or cut-off server looks like to the client.
        self.close_connection = True

    def _robots(self, args: list[str]) -> None:
        if len(args) < 2 or not _safe_header_value(args[0]):
            raise _BadRequest("usage: /robots/DIRECTIVE/NAME")
        self._serve_file(args[1:], [("X-Robots-Tag", args[0])])

    def _redirect(self, args: list[str]) -> None:
        hops = self._parse_non_negative(args, int)
        name = "/".join(quote(s) for s in args[1:])
        target = f"/redirect/{hops - 1}/{name}" if hops > 0 else f"/{name}"
        self._send_text(302, "redirecting", [("Location", target)])

    def _redirect_to(self, query: str) -> None:
        targets = parse_qs(query).get("url")
        if not targets or not _safe_header_value(targets[0]):
            raise _BadRequest("usage: /redirect-to?url=URL")
        self._send_text(302, "redirecting", [("Location", targets[0])])

    def _big(self, nbytes: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(nbytes))
        self.end_headers()
        sent = 0
        while sent < nbytes:
            chunk = _BIG_FIRST_CHUNK if sent == 0 else _BIG_CHUNK
            chunk = memoryview(chunk)[: nbytes - sent]
            self.wfile.write(chunk)
            sent += len(chunk)

    def _drip(self, interval: float, nbytes: int) -> None:
        """A server that answers, then trickles: each byte arrives well within any read
        timeout, so only a deadline on the whole fetch ends it."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(nbytes))
        self.end_headers()
        self._trickle(b"\xff" * nbytes, interval)

    def _drip_headers(self, interval: float, name: list[str]) -> None:
        data = self.server.dev._read(name) or b""
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n").encode()
        self._trickle(head + data, interval)
        self.close_connection = True

    def _trickle(self, data: bytes, interval: float) -> None:
        try:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(interval)
        except OSError:  # the client gave up: what a deadline is for
            self.close_connection = True

    # -- helpers ------------------------------------------------------------

    @staticmethod
    def _parse_non_negative(args: list[str], kind: type) -> int | float:
        try:
            value = kind(args[0])
        except (IndexError, ValueError):
            raise _BadRequest(f"expected a number, got {args[:1]}") from None
        if not value >= 0:  # also rejects NaN
            raise _BadRequest(f"expected a non-negative number, got {value}")
        return value

    def _send(
        self,
        code: int,
        body: bytes,
        content_type: str,
        extra_headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in extra_headers or []:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_text(self, code: int, text: str, extra_headers: list[tuple[str, str]] | None = None) -> None:
        self._send(code, (text + "\n").encode(), "text/plain; charset=utf-8", extra_headers)


class _BadRequest(Exception):
    """Malformed route arguments; answered with 400."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a slow or stuck request must not block shutdown
    # The default backlog of 5 makes a burst of parallel connects wait for
    # SYN retransmits (~1 s), which would dominate benchmark timings.
    request_queue_size = 1024
    dev: DevServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a DNS lookup that can
        # hang for seconds in a sandbox; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that hang up mid-response (size limits, timeouts) are part
        # of the point of this server; only real bugs deserve a traceback.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class DevServer:
    """Serve a directory over misbehaving routes on loopback, in a background thread.

    >>> with DevServer("demo-data") as server:
    ...     url = server.base_url + "/images/000001.jpg"
    """

    def __init__(self, root: str | pathlib.Path, host: str = "127.0.0.1", port: int = 0) -> None:
        if host not in ALLOWED_HOSTS:
            raise ValueError(f"DevServer binds only to loopback {ALLOWED_HOSTS}, not {host!r}")
        self.root = pathlib.Path(root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(f"root {self.root} is not a directory")
        self.host = host
        self.port = port  # the real port once started, when 0 was asked for
        self._lock = threading.Lock()
        # Files are kept in memory after the first read, so that serving costs
        # (almost) no CPU and benchmarks measure the client, not this server.
        # Unbounded: the synthetic data sets it serves are small.
        self._cache: dict[str, bytes] = {}
        self._requests = 0
        # GETs per request path, so a test can tell which URLs were fetched (bounded by the
        # number of distinct paths, like the file cache).
        self._path_requests: Counter[str] = Counter()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def requests(self) -> int:
        """Number of GET requests received so far (every route, every outcome)."""
        with self._lock:
            return self._requests

    @property
    def path_requests(self) -> Counter[str]:
        """A copy of the number of GET requests per path (e.g. "/images/000001.jpg")."""
        with self._lock:
            return Counter(self._path_requests)

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("DevServer is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> DevServer:
        if self._httpd is not None:
            raise RuntimeError("DevServer is already started")
        server_class = _HTTPServer6 if ":" in self.host else _HTTPServer
        httpd = server_class((self.host, self.port), _Handler)
        httpd.dev = self
        self.port = httpd.server_address[1]
        # A short poll interval makes stop() (and so every test teardown) quick.
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="devserver", daemon=True
        )
        self._httpd = httpd
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        assert self._thread is not None
        self._thread.join()
        self._httpd = None
        self._thread = None

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _count_request(self, path: str) -> None:
        with self._lock:
            self._requests += 1
            self._path_requests[path] += 1

    def _read(self, name: list[str]) -> bytes | None:
        """The bytes of root/NAME, or None if missing or outside root."""
        # Refuse dot segments outright, and check the resolved path too, so
        # that neither "..", an encoded "%2e%2e", nor a symlink escapes root.
        if not name or any(part in ("", ".", "..") or "/" in part or "\\" in part for part in name):
            return None
        key = "/".join(name)
        with self._lock:
            data = self._cache.get(key)
        if data is not None:
            return data
        path = self.root.joinpath(*name).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        data = path.read_bytes()
        with self._lock:
            self._cache[key] = data
        return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m curate.pipeline.demo.devserver",
        description="Serve ROOT on loopback with deliberately misbehaving routes (see module docstring).",
    )
    parser.add_argument("root", help="directory to serve, e.g. the output of synthetic.generate_dataset")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default: any free port)")
    parser.add_argument("--host", choices=ALLOWED_HOSTS, default="127.0.0.1")
    args = parser.parse_args(argv)

    server = DevServer(args.root, host=args.host, port=args.port)
    server.start()
    print(server.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
