"""Tests for pipeline.devserver against a real server on 127.0.0.1, with urllib as the client."""

from __future__ import annotations

import http.client
import pathlib
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import quote

import pytest

from conftest import REPO
from curate.pipeline.demo.devserver import DevServer
from curate.pipeline.demo.synthetic import photo_like_jpeg

SECRET = b"top secret, outside the served root"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> pathlib.Path:
    base = tmp_path_factory.mktemp("devserver")
    (base / "secret.txt").write_bytes(SECRET)  # a sibling of root: must stay unreachable
    root = base / "root"
    (root / "images" / "sub dir").mkdir(parents=True)
    (root / "images" / "photo.jpg").write_bytes(photo_like_jpeg(64, 48, random.Random(0)))
    (root / "images" / "sub dir" / "pic.png").write_bytes(b"\x89PNG\r\n\x1a\n fake png")
    (root / "images" / "cached.jpg").write_bytes(b"version 1")
    (root / "notes.txt").write_bytes(b"hello")
    return root


@pytest.fixture(scope="module")
def server(root):
    with DevServer(root) as server:
        yield server


@pytest.fixture(scope="module")
def photo(root) -> bytes:
    return (root / "images" / "photo.jpg").read_bytes()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # surface the 302 itself as an HTTPError


def get(url: str, timeout: float = 5.0, follow: bool = True):
    """(status, headers, body, final url) for any status, without raising on 4xx/5xx."""
    opener = urllib.request.build_opener() if follow else urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.headers, response.read(), response.url
    except urllib.error.HTTPError as e:
        try:
            return e.code, e.headers, e.read(), None
        finally:
            e.close()


# -- plain files --------------------------------------------------------------------------


def test_images_serves_the_file_with_type_and_length(server, photo):
    status, headers, body, _ = get(server.base_url + "/images/photo.jpg")
    assert status == 200 and body == photo
    assert headers["Content-Type"] == "image/jpeg"
    assert headers["Content-Length"] == str(len(photo))


def test_images_content_type_follows_the_extension_and_names_are_unquoted(server):
    status, headers, body, _ = get(server.base_url + "/images/" + quote("sub dir/pic.png"))
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert body.startswith(b"\x89PNG")


def test_missing_file_is_404(server):
    status, _, _, _ = get(server.base_url + "/images/nope.jpg")
    assert status == 404


def test_unknown_route_is_404(server):
    assert get(server.base_url + "/")[0] == 404
    assert get(server.base_url + "/notes.txt")[0] == 404


def test_files_are_cached_after_first_read(server, root):
    url = server.base_url + "/images/cached.jpg"
    assert get(url)[2] == b"version 1"
    (root / "images" / "cached.jpg").write_bytes(b"version 2")
    assert get(url)[2] == b"version 1"


@pytest.mark.parametrize(
    "path",
    [
        "/images/../../secret.txt",
        "/images/%2e%2e/%2e%2e/secret.txt",
        "/images/..%2f..%2fsecret.txt",
        "/slow/0/../secret.txt",
        "/truncated/%2e%2e/secret.txt",
        "/robots/noai/../secret.txt",
        "/images/./photo.jpg",
        "/slow/0/" + quote(str(pathlib.Path("/etc/passwd"))),
    ],
)
def test_paths_escaping_root_are_refused(server, path):
    # urllib sends the path verbatim (no dot-segment normalisation), so these
    # reach the server exactly as written.
    status, _, body, _ = get(server.base_url + path)
    assert status == 404
    assert SECRET not in body


def test_keep_alive_serves_several_requests_per_connection(server, photo):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        for _ in range(3):
            connection.request("GET", "/images/photo.jpg")
            assert connection.getresponse().read() == photo
    finally:
        connection.close()


# -- misbehaving routes ---------------------------------------------------------------------


@pytest.mark.parametrize("code", [403, 404, 410, 429, 500, 503])
def test_status_route_answers_that_status(server, code):
    status, headers, body, _ = get(f"{server.base_url}/status/{code}/images/photo.jpg")
    assert status == code
    assert headers["Content-Type"].startswith("text/plain")
    assert str(code).encode() in body


@pytest.mark.parametrize("bad", ["99", "600", "204", "abc"])
def test_status_route_rejects_unusable_codes(server, bad):
    assert get(f"{server.base_url}/status/{bad}/x")[0] == 400


def test_slow_route_delays_then_serves_the_file(server, photo):
    start = time.monotonic()
    status, _, body, _ = get(server.base_url + "/slow/0.4/images/photo.jpg")
    assert time.monotonic() - start >= 0.4
    assert status == 200 and body == photo


def test_slow_route_trips_a_client_timeout(server):
    with pytest.raises((TimeoutError, urllib.error.URLError)) as info:
        get(server.base_url + "/slow/2/images/photo.jpg", timeout=0.2)
    if isinstance(info.value, urllib.error.URLError):
        assert isinstance(info.value.reason, TimeoutError)


def test_truncated_route_announces_the_full_length_but_sends_half(server, photo):
    with urllib.request.urlopen(server.base_url + "/truncated/images/photo.jpg", timeout=5) as response:
        assert response.headers["Content-Length"] == str(len(photo))
        with pytest.raises(http.client.IncompleteRead) as info:
            response.read()
    assert info.value.partial == photo[: len(photo) // 2]


def test_html_route_returns_an_error_page_with_status_200(server):
    status, headers, body, _ = get(server.base_url + "/html/images/photo.jpg")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert body.lstrip().lower().startswith(b"<!doctype html")


@pytest.mark.parametrize("directive", ["noai", "otherbot: noai", "noindex, noimageai"])
def test_robots_route_adds_the_x_robots_tag(server, photo, directive):
    status, headers, body, _ = get(f"{server.base_url}/robots/{quote(directive)}/images/photo.jpg")
    assert status == 200 and body == photo
    assert headers["X-Robots-Tag"] == directive


def test_robots_route_refuses_header_injection(server):
    directive = quote("noai\r\nX-Evil: 1")
    status, headers, _, _ = get(f"{server.base_url}/robots/{directive}/images/photo.jpg")
    assert status == 400 and "X-Evil" not in headers


def test_redirect_chain_counts_down_to_the_plain_file(server, photo):
    status, headers, _, _ = get(server.base_url + "/redirect/2/images/photo.jpg", follow=False)
    assert status == 302 and headers["Location"] == "/redirect/1/images/photo.jpg"
    status, headers, _, _ = get(server.base_url + "/redirect/0/images/photo.jpg", follow=False)
    assert status == 302 and headers["Location"] == "/images/photo.jpg"

    before = server.requests
    status, _, body, final_url = get(server.base_url + "/redirect/3/images/photo.jpg")
    assert status == 200 and body == photo
    assert final_url == server.base_url + "/images/photo.jpg"
    assert server.requests - before == 5  # 4 redirects + the file


def test_long_redirect_chain_exceeds_urllib_limit(server):
    status, _, _, _ = get(server.base_url + "/redirect/20/images/photo.jpg")
    assert status == 302  # urllib gives up after 10 hops


def test_redirect_to_points_at_the_given_url(server, photo):
    target = "http://example.invalid/some/image.jpg?a=1&b=2"
    status, headers, _, _ = get(f"{server.base_url}/redirect-to?url={quote(target, safe='')}", follow=False)
    assert status == 302 and headers["Location"] == target

    target = server.base_url + "/images/photo.jpg"
    status, _, body, final_url = get(f"{server.base_url}/redirect-to?url={quote(target, safe='')}")
    assert status == 200 and body == photo and final_url == target

    assert get(server.base_url + "/redirect-to", follow=False)[0] == 400


def test_drop_route_closes_without_a_response(server):
    with pytest.raises(http.client.RemoteDisconnected):
        urllib.request.urlopen(server.base_url + "/drop/images/photo.jpg", timeout=5)


def test_big_route_streams_exactly_n_bytes(server):
    status, headers, body, _ = get(server.base_url + "/big/1000003")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert headers["Content-Length"] == "1000003" and len(body) == 1000003
    assert body.startswith(b"\xff\xd8")
    assert get(server.base_url + "/big/0")[2] == b""
    assert get(server.base_url + "/big/-1")[0] == 400


# -- server behaviour -------------------------------------------------------------------


def test_requests_counts_every_request(server):
    before = server.requests
    get(server.base_url + "/images/photo.jpg")
    get(server.base_url + "/status/500/x")
    get(server.base_url + "/nope")
    assert server.requests - before == 3


def test_client_disconnects_print_no_traceback(server, capfd):
    capfd.readouterr()
    # Hang up mid-body on a huge response, and before the answer of a slow one.
    for path in ("/big/500000000", "/slow/0.2/images/photo.jpg", "/truncated/images/photo.jpg"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            if path.startswith("/big"):
                sock.recv(65536)
            # Linger 0: close with a reset, the rudest hang-up a client can do.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    time.sleep(0.6)  # let the handlers hit the dead sockets
    assert get(server.base_url + "/images/photo.jpg")[0] == 200  # still healthy
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and captured.err == ""


def test_only_loopback_hosts_are_accepted(root):
    for host in ("0.0.0.0", "", "192.168.1.1", "::", "localhost"):
        with pytest.raises(ValueError):
            DevServer(root, host=host)


def test_ipv6_loopback(root, photo):
    server = DevServer(root, host="::1")
    try:
        server.start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert server.base_url.startswith("http://[::1]:")
        assert get(server.base_url + "/images/photo.jpg")[2] == photo
    finally:
        server.stop()


def test_stop_closes_the_port(root):
    server = DevServer(root)
    with pytest.raises(RuntimeError):
        server.base_url  # noqa: B018 - not started yet
    with server:
        url = server.base_url + "/images/photo.jpg"
        assert get(url)[0] == 200
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)
    server.stop()  # idempotent


def test_command_line_prints_the_base_url_and_exits_cleanly_on_ctrl_c(root, photo):
    command = [sys.executable, "-m", "curate.pipeline.demo.devserver", str(root), "--port", "0"]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        try:
            base_url = process.stdout.readline().decode().strip()
            assert base_url.startswith("http://127.0.0.1:")
            assert get(base_url + "/images/photo.jpg")[2] == photo
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=5) == 0
            assert process.stderr.read() == b""
        finally:
            if process.poll() is None:
                process.kill()
