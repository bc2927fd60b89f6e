"""Tests for pipeline.fetch against a real, misbehaving HTTP server on loopback.

Only loopback is ever contacted. Address blocking of other ranges is tested on the
decision function itself (`address_block_reason`), never by connecting.
"""

from __future__ import annotations

import io
import ipaddress
import time
from urllib.parse import quote

import pytest
from PIL import Image

from curate.pipeline.config import DownloadConfig
from curate.pipeline.demo.devserver import DevServer
from curate.pipeline.fetch import FetchError, address_block_reason, fetch, fetch_once
from curate.pipeline.records import FAILED_TO_DOWNLOAD, FILTERED, Rejection

ALLOW = DownloadConfig(timeout=3, allow_private_addresses=True)


@pytest.fixture(scope="module")
def www(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    (root / "images").mkdir()
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(out, format="JPEG")
    (root / "images" / "a.jpg").write_bytes(out.getvalue())
    # Incompressible-ish bytes, so sizes are what they say.
    (root / "images" / "large.png").write_bytes(bytes(range(256)) * 64)  # 16 KiB
    return root


@pytest.fixture(scope="module")
def srv(www):
    with DevServer(www) as server:
        yield server


@pytest.fixture(scope="module")
def srv6(www):
    try:
        server = DevServer(www, host="::1").start()
    except OSError as exc:  # no IPv6 loopback on this machine
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def image_bytes(www):
    return (www / "images" / "a.jpg").read_bytes()


def get(srv, path, cfg=ALLOW):
    """Fetch srv/path; returns the result and how many requests the server received."""
    before = srv.requests
    result = fetch(srv.base_url + path, cfg)
    return result, srv.requests - before


# --- success and HTTP failures -----------------------------------------------------


def test_success_returns_the_file_bytes(srv, image_bytes):
    result, requests = get(srv, "/images/a.jpg")
    assert result.ok and result.reason is None
    assert result.data == image_bytes
    assert requests == 1


def test_404_is_not_retried(srv):
    result, requests = get(srv, "/status/404/", ALLOW.model_copy(update={"retries": 2}))
    assert not result.ok
    assert result.data is None
    assert result.reason == "failed_to_download: HTTP 404"
    assert requests == 1


def test_missing_file_is_404(srv):
    result, _ = get(srv, "/images/nope.jpg")
    assert result.reason == "failed_to_download: HTTP 404"


def test_500_is_retried(srv):
    result, requests = get(srv, "/status/500/", ALLOW.model_copy(update={"retries": 2}))
    assert result.reason == "failed_to_download: HTTP 500"
    assert requests == 3


def test_503(srv):
    result, _ = get(srv, "/status/503/")
    assert result.reason == "failed_to_download: HTTP 503"


def test_503_is_retried_once_with_one_retry(srv):
    result, requests = get(srv, "/status/503/", ALLOW.model_copy(update={"retries": 1}))
    assert result.reason == "failed_to_download: HTTP 503"
    assert requests == 2


def test_a_failure_is_a_rejection_of_the_download_stage(srv):
    result, _ = get(srv, "/status/404/")
    assert result.rejection == Rejection("failed_to_download: HTTP 404", filter="download",
                                         detail="HTTP 404 Not Found", status=FAILED_TO_DOWNLOAD)
    assert result.rejection.columns()["reject_filter"] == "download"
    assert result.rejection.columns()["status"] == "failed_to_download"  # img2dataset's status
    assert (result.reason, result.detail) == (result.rejection.reason, result.rejection.detail)


@pytest.mark.parametrize(
    "path, cfg, retryable",
    [
        ("/status/404/", ALLOW, False),
        ("/status/403/", ALLOW, False),
        ("/status/500/", ALLOW, True),
        ("/status/503/", ALLOW, True),
        ("/robots/noai/images/a.jpg", ALLOW, False),
        ("/redirect/0/images/a.jpg", ALLOW.model_copy(update={"max_redirects": 0}), False),
        ("/images/large.png", ALLOW.model_copy(update={"max_bytes": 100}), False),
        ("/truncated/images/a.jpg", ALLOW, True),
        ("/images/a.jpg", DownloadConfig(timeout=2), False),  # loopback under the default policy
    ],
)
def test_fetch_error_says_whether_a_retry_could_help(srv, path, cfg, retryable):
    with pytest.raises(FetchError) as info:
        fetch_once(srv.base_url + path, cfg)
    assert info.value.retryable is retryable, info.value.rejection
    assert info.value.rejection.filter == "download" and info.value.rejection.status == FAILED_TO_DOWNLOAD


def test_invalid_url_is_not_retryable():
    with pytest.raises(FetchError) as info:
        fetch_once("ftp://127.0.0.1/x.jpg", ALLOW)
    assert info.value.retryable is False and info.value.rejection.reason == "invalid_url: unsupported scheme"


def test_redirect_onto_a_refused_url_is_that_check_s_rejection_and_not_retried(srv):
    refused = Rejection("unsafe: url_blocklist", filter="url_blocklist")
    before = srv.requests
    result = fetch(srv.base_url + chain(1), ALLOW.model_copy(update={"retries": 2}),
                   check_url=lambda url: refused if url.endswith("/images/a.jpg") else None)
    assert srv.requests - before == 1  # the redirect, once; its target never
    assert (result.reason, result.rejection.filter) == ("unsafe: url_blocklist", "url_blocklist")
    assert result.rejection.status == FILTERED  # a filter's decision, not a failed download
    assert result.detail.startswith("redirect to ") and result.detail.endswith("/images/a.jpg")


def test_slow_server_times_out_within_about_the_timeout(srv):
    cfg = ALLOW.model_copy(update={"timeout": 0.5})
    start = time.monotonic()
    result, _ = get(srv, "/slow/3/images/a.jpg", cfg)
    elapsed = time.monotonic() - start
    assert result.reason == "failed_to_download: timeout"
    assert elapsed < 1.5, elapsed


def test_slow_but_within_timeout_succeeds(srv, image_bytes):
    result, _ = get(srv, "/slow/0.2/images/a.jpg", ALLOW.model_copy(update={"timeout": 2}))
    assert result.data == image_bytes


def test_truncated_body(srv):
    result, _ = get(srv, "/truncated/images/a.jpg")
    assert result.reason == "failed_to_download: incomplete body"
    assert result.data is None


def test_html_page_with_200_is_not_an_image(srv):
    result, _ = get(srv, "/html/images/a.jpg")
    assert result.reason == "failed_to_download: not an image"
    assert "text/html" in result.detail


def test_dropped_connection(srv):
    result, _ = get(srv, "/drop/images/a.jpg")
    assert result.reason == "failed_to_download: connection error"


# --- X-Robots-Tag ------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, refused",
    [
        ("noai", "noai"),
        ("NoImageAI", "noimageai"),
        ("noindex, nofollow", "noindex"),
        ("curate: noai", "noai"),  # addressed to us by our user-agent token
        ("otherbot: noai", None),  # addressed to another agent
        ("nofollow", None),
        ("unavailable_after: 25 Jun 2030 15:00:00 PST", None),
    ],
)
def test_x_robots_tag(srv, image_bytes, header, refused):
    result, _ = get(srv, f"/robots/{quote(header, safe='')}/images/a.jpg")
    if refused:
        assert result.reason == "disallowed_by_x_robots_tag"
        assert result.detail == f"X-Robots-Tag: {refused}"
        assert result.data is None
    else:
        assert result.ok, result.reason
        assert result.data == image_bytes


def test_x_robots_tag_for_our_token_without_token_configured(srv, image_bytes):
    cfg = ALLOW.model_copy(update={"user_agent_token": None})
    result, _ = get(srv, f"/robots/{quote('curate: noai', safe='')}/images/a.jpg", cfg)
    assert result.data == image_bytes
    result, _ = get(srv, "/robots/noai/images/a.jpg", cfg)
    assert result.reason == "disallowed_by_x_robots_tag"


def test_x_robots_tag_directives_are_configurable(srv, image_bytes):
    cfg = ALLOW.model_copy(update={"disallowed_header_directives": ["noimageai"]})
    result, _ = get(srv, "/robots/noai/images/a.jpg", cfg)
    assert result.data == image_bytes


# --- redirects ---------------------------------------------------------------------


def chain(redirects: int) -> str:
    """A path answered with exactly this many redirects before the file (/redirect/0/NAME is one)."""
    return f"/redirect/{redirects - 1}/images/a.jpg"


def test_redirects_within_limit(srv, image_bytes):
    result, requests = get(srv, chain(3), ALLOW.model_copy(update={"max_redirects": 5}))
    assert result.data == image_bytes
    assert requests == 4


def test_redirects_exactly_at_limit(srv, image_bytes):
    result, requests = get(srv, chain(5), ALLOW.model_copy(update={"max_redirects": 5}))
    assert result.data == image_bytes
    assert requests == 6


def test_too_many_redirects(srv):
    result, requests = get(srv, chain(6), ALLOW.model_copy(update={"max_redirects": 5}))
    assert result.reason == "failed_to_download: too many redirects"
    assert requests == 6  # stopped at the limit: the 7th URL was never requested


def test_no_redirects_allowed(srv):
    result, requests = get(srv, chain(1), ALLOW.model_copy(update={"max_redirects": 0}))
    assert result.reason == "failed_to_download: too many redirects"
    assert requests == 1


def test_redirect_to_absolute_url(srv, image_bytes):
    target = quote(srv.base_url + "/images/a.jpg", safe="")
    result, requests = get(srv, f"/redirect-to?url={target}")
    assert result.data == image_bytes
    assert requests == 2


def test_redirect_to_another_host_connects_to_that_host(srv, srv6, image_bytes):
    # Each hop is resolved and connected on its own: the second hop reaches [::1].
    target = quote(srv6.base_url + "/images/a.jpg", safe="")
    before6 = srv6.requests
    result, requests = get(srv, f"/redirect-to?url={target}")
    assert result.data == image_bytes
    assert requests == 1
    assert srv6.requests - before6 == 1


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x", "javascript:alert(1)"])
def test_redirect_to_unsupported_scheme_is_refused(srv, target):
    result, requests = get(srv, f"/redirect-to?url={quote(target, safe='')}")
    assert result.reason == "invalid_url: unsupported scheme"
    assert result.data is None
    assert requests == 1


def test_a_redirect_onto_a_blocked_url_is_refused(server):
    """The URL blocklist judges the input URL before the fetch, and every redirect target during it."""
    from urllib.parse import quote

    from curate.filters.blocklist import UrlBlocklist
    from curate.pipeline.config import DownloadConfig
    from curate.pipeline.stages.download import redirect_check
    from curate.pipeline.fetch import fetch

    (server.root_dir / "images").mkdir(exist_ok=True)
    (server.root_dir / "images" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    blocked = f"{server.base_url}/images/a.jpg"
    via = f"{server.base_url}/redirect-to?url={quote(blocked, safe='')}"
    rule = UrlBlocklist(prefixes=[blocked])
    assert rule({"url": via}) is None  # the input URL itself is not on the list
    cfg = DownloadConfig(allow_private_addresses=True, timeout=5)
    assert fetch(via, cfg).ok  # without the check the redirect is followed
    got = fetch(via, cfg, redirect_check([rule]))
    assert not got.ok and got.reason == "unsafe: url_blocklist"
    assert redirect_check([]) is None


# --- size limits ---------------------------------------------------------------------


def test_big_response_beyond_max_bytes(srv):
    cfg = ALLOW.model_copy(update={"max_bytes": 100_000})
    result, _ = get(srv, "/big/5000000", cfg)
    assert result.reason == "failed_to_download: too large"


def test_big_response_within_max_bytes(srv):
    result, _ = get(srv, "/big/200000", ALLOW.model_copy(update={"max_bytes": 200_000}))
    assert result.ok
    assert len(result.data) == 200_000
    assert result.data[:3] == b"\xff\xd8\xff"


def test_file_beyond_max_bytes(srv):
    result, _ = get(srv, "/images/large.png", ALLOW.model_copy(update={"max_bytes": 16 * 1024 - 1}))
    assert result.reason == "failed_to_download: too large"
    result, _ = get(srv, "/images/large.png", ALLOW.model_copy(update={"max_bytes": 16 * 1024}))
    assert result.ok and len(result.data) == 16 * 1024


# --- invalid URLs: refused before any request ------------------------------------------


@pytest.mark.parametrize(
    "url_of, reason",
    [
        (lambda base: "file:///etc/passwd", "invalid_url: unsupported scheme"),
        (lambda base: base.replace("http://", "ftp://") + "/images/a.jpg", "invalid_url: unsupported scheme"),
        (lambda base: "data:image/png;base64,iVBORw0KGgo=", "invalid_url: unsupported scheme"),
        (lambda base: "javascript:alert(1)", "invalid_url: unsupported scheme"),
        (lambda base: "127.0.0.1/images/a.jpg", "invalid_url: unsupported scheme"),
        (lambda base: None, "invalid_url: missing"),
        (lambda base: "", "invalid_url: missing"),
        (lambda base: "   ", "invalid_url: missing"),
        (lambda base: "http:///images/a.jpg", "invalid_url: no host"),
        (lambda base: "http://127.0.0.1:99999/images/a.jpg", "invalid_url: bad port"),
    ],
)
def test_invalid_url_makes_no_request(srv, url_of, reason):
    before = srv.requests
    result = fetch(url_of(srv.base_url), ALLOW)
    assert result.reason == reason
    assert result.data is None
    assert srv.requests == before


# --- private addresses: refused under the default policy --------------------------------


def test_default_policy_blocks_private_addresses():
    assert DownloadConfig().allow_private_addresses is False


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "127.1", "2130706433", "[::ffff:127.0.0.1]"],
)
def test_default_policy_refuses_loopback_without_a_request(srv, host):
    url = f"http://{host}:{srv.port}/images/a.jpg"
    before = srv.requests
    result = fetch(url, DownloadConfig(timeout=2))
    assert result.reason == "blocked_address"
    assert "loopback" in result.detail
    assert result.data is None
    assert srv.requests == before


def test_default_policy_refuses_ipv6_loopback_without_a_request(srv6):
    before = srv6.requests
    result = fetch(srv6.base_url + "/images/a.jpg", DownloadConfig(timeout=2))
    assert result.reason == "blocked_address"
    assert srv6.requests == before


def test_blocked_address_is_not_retried(srv):
    before = srv.requests
    result = fetch(srv.base_url + chain(1), DownloadConfig(timeout=2, retries=3))
    assert result.reason == "blocked_address"
    assert srv.requests == before


def test_same_url_allowed_when_private_addresses_allowed(srv, image_bytes):
    result = fetch(f"http://localhost:{srv.port}/images/a.jpg", ALLOW)
    assert result.data == image_bytes


# --- the address decision -----------------------------------------------------------------

# address, reason under the default policy, reason with allow_private_addresses
ADDRESSES = [
    ("169.254.169.254", "link-local", "link-local"),  # cloud metadata service
    ("10.0.0.1", "private", None),
    ("172.16.0.1", "private", None),
    ("172.31.255.255", "private", None),
    ("172.32.0.1", None, None),  # just outside 172.16/12
    ("192.168.1.1", "private", None),
    ("127.0.0.1", "loopback", None),
    ("127.255.255.254", "loopback", None),
    ("::1", "loopback", None),
    ("::ffff:127.0.0.1", "loopback", None),
    ("::ffff:169.254.169.254", "link-local", "link-local"),
    ("::ffff:10.0.0.1", "private", None),
    ("fe80::1", "link-local", "link-local"),
    ("224.0.0.1", "multicast", "multicast"),
    ("ff02::1", "multicast", "multicast"),
    ("0.0.0.0", "unspecified", "unspecified"),
    ("::", "unspecified", "unspecified"),
    ("100.64.0.1", "private", None),  # shared address space (carrier-grade NAT)
    ("fc00::1", "private", None),
    ("fd12:3456::1", "private", None),
    ("240.0.0.1", "reserved", "reserved"),
    ("8.8.8.8", None, None),
    ("2606:4700::1", None, None),
]


@pytest.mark.parametrize("address, default_reason, permissive_reason", ADDRESSES)
def test_address_decision(address, default_reason, permissive_reason):
    ip = ipaddress.ip_address(address)
    assert address_block_reason(ip, allow_private=False) == default_reason
    assert address_block_reason(ip, allow_private=True) == permissive_reason


@pytest.mark.parametrize(
    "address, embedded",
    [
        ("::127.0.0.1", "127.0.0.1"),  # IPv4-compatible (deprecated)
        ("2002:7f00:1::", "127.0.0.1"),  # 6to4
        ("2002:a9fe:a9fe::1", "169.254.169.254"),
        ("64:ff9b::a00:1", "10.0.0.1"),  # NAT64 well-known prefix
        ("64:ff9b::7f00:1", "127.0.0.1"),
        ("64:ff9b::808:808", "8.8.8.8"),
    ],
)
def test_ipv4_embedded_in_ipv6_is_judged_as_that_ipv4(address, embedded):
    ip, v4 = ipaddress.ip_address(address), ipaddress.ip_address(embedded)
    for allow in (False, True):
        assert address_block_reason(ip, allow) == address_block_reason(v4, allow), (address, allow)


def test_site_local_ipv6_is_private():
    ip = ipaddress.ip_address("fec0::1")
    assert address_block_reason(ip, allow_private=False) == "private"
    assert address_block_reason(ip, allow_private=True) is None
