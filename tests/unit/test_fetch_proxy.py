"""Egress through an HTTP proxy: a forward proxy process of this test on 127.0.0.1 in front of the
loopback image server. The address rules still judge every target before the proxy is asked."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from curate.pipeline.config import DownloadConfig
from curate.pipeline.fetch import fetch, proxy_for


class _Forward(BaseHTTPRequestHandler):
    """GET http://host:port/path → the same request to that host, the answer back. It only ever
    connects to 127.0.0.1, whatever it is asked: a test must not reach another address."""

    def do_GET(self):
        self.server.seen.append(self.path)
        target = urlsplit(self.path)
        if target.hostname != "127.0.0.1":
            self.send_error(403, "this test proxy only reaches 127.0.0.1")
            return
        upstream = http.client.HTTPConnection("127.0.0.1", target.port, timeout=5)
        upstream.request("GET", target.path + (f"?{target.query}" if target.query else ""))
        answer = upstream.getresponse()
        body = answer.read()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        upstream.close()

    def log_message(self, *args):
        pass


@pytest.fixture()
def proxy():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Forward)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture()
def image(server):
    (server.root_dir / "images").mkdir(exist_ok=True)
    (server.root_dir / "images" / "a.jpg").write_bytes(b"\xff\xd8 an image")
    return f"{server.base_url}/images/a.jpg"


def proxy_url(proxy) -> str:
    return f"http://127.0.0.1:{proxy.server_address[1]}"


def test_a_configured_proxy_carries_the_fetch(proxy, image, server):
    got = fetch(image, DownloadConfig(allow_private_addresses=True, proxy=proxy_url(proxy), timeout=5))
    assert got.ok and got.data == b"\xff\xd8 an image"
    assert proxy.seen == [image]  # the absolute URL, as a client asks a proxy
    assert server.path_requests["/images/a.jpg"] == 1


def test_the_environment_names_the_proxy_and_no_proxy_bypasses_it(proxy, image, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", proxy_url(proxy))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    cfg = DownloadConfig(allow_private_addresses=True, timeout=5)
    assert fetch(image, cfg).ok and proxy.seen == [image]
    assert proxy_for("http", "127.0.0.1", cfg.model_copy(update={"proxy_from_environment": False})) is None
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert fetch(image, cfg).ok and proxy.seen == [image]  # direct this time


def test_the_address_rules_still_apply_before_the_proxy_is_asked(proxy, image):
    """Under the default setting a loopback target is refused, through a proxy as without one."""
    got = fetch(image, DownloadConfig(proxy=proxy_url(proxy), timeout=5))
    assert not got.ok and got.reason == "blocked_address"
    assert proxy.seen == []


def test_a_proxy_setting_must_be_a_url():
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        DownloadConfig(proxy="localhost:3128")
