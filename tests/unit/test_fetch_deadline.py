"""A fetch ends within its timeout whatever the server does: a server that drips one byte at a
time keeps every read inside any read timeout, so only a deadline on the whole fetch ends it.
Against the loopback test server's /drip routes."""

from __future__ import annotations

import threading
import time

import pytest

from curate.pipeline.config import DownloadConfig
from curate.pipeline.fetch import fetch

TIMEOUT = 1.0
MARGIN = 1.0  # what "within timeout" may overrun by: the watcher thread's wake-up and the close


def cfg(**kw) -> DownloadConfig:
    return DownloadConfig(allow_private_addresses=True, timeout=TIMEOUT, **kw)


@pytest.mark.parametrize("route", ["drip/0.2/100", "drip-headers/0.2/images/a.jpg"], ids=["body", "headers"])
def test_a_dripping_server_is_cut_at_the_deadline(server, route):
    (server.root_dir / "images").mkdir(exist_ok=True)
    (server.root_dir / "images" / "a.jpg").write_bytes(b"\xff\xd8" + b"x" * 100)
    started = time.monotonic()
    got = fetch(f"{server.base_url}/{route}", cfg())  # 100+ bytes at 5 a second: 20 s if let run
    elapsed = time.monotonic() - started
    assert not got.ok and got.reason == "failed_to_download: timeout"
    assert elapsed < TIMEOUT + MARGIN, elapsed


def test_retries_each_get_their_own_deadline(server):
    started = time.monotonic()
    got = fetch(f"{server.base_url}/drip/0.2/100", cfg(retries=1))
    assert got.reason == "failed_to_download: timeout"
    assert 2 * TIMEOUT - 0.1 < time.monotonic() - started < 2 * (TIMEOUT + MARGIN)
    assert server.path_requests["/drip/0.2/100"] == 2


def test_many_fetches_at_once_each_end_on_time_and_fast_ones_are_untouched(server):
    """The download stage fetches in many threads: one watcher serves them all."""
    (server.root_dir / "images").mkdir(exist_ok=True)
    (server.root_dir / "images" / "b.jpg").write_bytes(b"\xff\xd8" + b"y" * 5000)
    results, times = {}, {}

    def one(i):
        url = f"{server.base_url}/drip/0.1/200" if i % 2 else f"{server.base_url}/images/b.jpg"
        t = time.monotonic()
        results[i] = fetch(url, cfg())
        times[i] = time.monotonic() - t

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(results[i].reason == "failed_to_download: timeout" for i in range(1, 16, 2))
    assert all(results[i].ok and len(results[i].data) == 5002 for i in range(0, 16, 2))
    assert max(times.values()) < TIMEOUT + MARGIN, times
