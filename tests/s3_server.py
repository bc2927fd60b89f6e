"""A real S3 API server on 127.0.0.1 for the object storage tests: moto's standalone server
(`python -m moto.server`), the one s3fs's own test suite runs against, in its own process.

The endpoint is named in each run's config (`storage.s3.endpoint_url`); the credentials are the
environment's (`S3Server.env`), as a user's would be, so none is ever written in a config.
"""

from __future__ import annotations

import json
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
    """`auth=True`: a server that checks credentials, as a real store does (moto's IAM: the first
    three requests, unauthenticated, make a user, its access key and its S3 policy; every request
    after them must be signed with that key)."""

    def __init__(self, auth: bool = False):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.auth = auth
        self.credentials = dict(CREDENTIALS)
        self._proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict:
        """The environment a process talking to this server gets: the credentials, no proxy for loopback."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(self.credentials)
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        return env

    @property
    def storage(self) -> dict:
        """The `storage:` section of a run config that reaches this server."""
        return {"s3": {"endpoint_url": self.endpoint}}

    def filesystem(self):
        """An s3fs filesystem on this server, for the test's own setup and checks."""
        import s3fs

        return s3fs.S3FileSystem(key=self.credentials["AWS_ACCESS_KEY_ID"], secret=self.credentials["AWS_SECRET_ACCESS_KEY"],
                                 endpoint_url=self.endpoint, skip_instance_cache=True, use_listings_cache=False)

    def __enter__(self) -> "S3Server":
        env = dict(self.env, **({"INITIAL_NO_AUTH_ACTION_COUNT": "3"} if self.auth else {}))
        self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("moto server did not start")
                time.sleep(0.1)
        if self.auth:
            self._make_user()
        return self

    def _make_user(self) -> None:
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="curate")
        key = iam.create_access_key(UserName="curate")["AccessKey"]
        iam.put_user_policy(UserName="curate", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        self.credentials.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
