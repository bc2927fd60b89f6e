"""A real S3 API server on 127.0.0.1 for the object storage tests: moto's standalone server
(`python -m moto.server`), the one s3fs's own test suite runs against, in its own process.

The endpoint is named in each run's config (`storage.s3.endpoint_url`); the credentials are the
environment's (`S3Server.env`), as a user's would be, so none is ever written in a config.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

# moto accepts any key unless told otherwise; these are placeholders, not secrets.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "curate-test-key-id", "AWS_SECRET_ACCESS_KEY": "curate-test-secret-key",
               "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict:
        """The environment a process talking to this server gets: the credentials, no proxy for loopback."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(CREDENTIALS)
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        return env

    @property
    def storage(self) -> dict:
        """The `storage:` section of a run config that reaches this server."""
        return {"s3": {"endpoint_url": self.endpoint}}

    def filesystem(self):
        """An s3fs filesystem on this server, for the test's own setup and checks."""
        import s3fs

        return s3fs.S3FileSystem(key=CREDENTIALS["AWS_ACCESS_KEY_ID"], secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                 endpoint_url=self.endpoint, skip_instance_cache=True, use_listings_cache=False)

    def __enter__(self) -> "S3Server":
        self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                      env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return self
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("moto server did not start")
                time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
