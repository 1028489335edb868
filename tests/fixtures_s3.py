"""Pytest plugin: a real S3 server (moto in server mode) on 127.0.0.1 for tests.

Fixtures:

* ``s3_server`` (session): a :class:`MotoServer` subprocess that tests may
  ``freeze()``/``thaw()`` (SIGSTOP/SIGCONT, data kept) or ``stop()``/``start()``
  (same port; moto is in memory, so a restart loses every bucket).
* ``spare_moto`` (module): another :class:`MotoServer` of the test module's own,
  for replica tests that freeze one S3 server while the others stay up (so the
  shared session server is never frozen).
* ``s3_remote`` (function): a fresh, uniquely named bucket described as a
  :class:`RemoteSpec` (what a ``[remotes.NAME]`` table and a subprocess's
  environment would hold).
* ``s3_client``: a boto3 client for checking objects directly.

Helpers: :func:`running_moto_server` (start a server on a free loopback port,
close it afterwards) and :func:`new_bucket_remote` (a fresh bucket on a given
server as a :class:`RemoteSpec`).

Credentials are dummies passed explicitly to clients (or via ``RemoteSpec.env``
to subprocesses); ``os.environ`` is never changed.  Nothing but 127.0.0.1 is
contacted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

CREDENTIALS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
REGION = "us-east-1"


@dataclass
class RemoteSpec:
    """A test remote: its name, its config table and the env a subprocess needs."""

    name: str
    config: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """A moto S3 server in a subprocess on a fixed loopback port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen = False
        self._log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)

    @property
    def log_path(self) -> str:
        return self._log.name

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (if not running) and return once it answers HTTP."""
        if self.running():
            self.thaw()
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(CREDENTIALS_ENV)
        env["MOTO_PORT"] = str(self.port)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.frozen = False
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}; see {self.log_path}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto server did not answer within {timeout}s; see {self.log_path}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # an HTTP answer of any kind means it is up
        except OSError:
            return False

    def stop(self) -> None:
        """Terminate the server (its data is lost); idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
            self.frozen = False
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def freeze(self) -> None:
        """Stop the server process with SIGSTOP: connections open, nothing answers."""
        assert self.proc is not None and self.running(), "server is not running"
        os.killpg(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        """Resume a frozen server (SIGCONT); its data is intact."""
        if self.proc is not None and self.frozen:
            os.killpg(self.proc.pid, signal.SIGCONT)
        self.frozen = False

    def client(self, **config: Any) -> Any:
        """Return a boto3 S3 client for this server (path-style, dummy credentials)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=CREDENTIALS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS_ENV["AWS_SECRET_ACCESS_KEY"],
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 3}, **config),
        )

    def close(self) -> None:
        self.stop()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)


@contextlib.contextmanager
def running_moto_server() -> Iterator[MotoServer]:
    """A :class:`MotoServer` on a free 127.0.0.1 port, answering; closed (log removed) on exit.

    Skips the calling test when moto's server mode or boto3 is not installed.
    """
    pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


def new_bucket_name() -> str:
    return f"omnifs-test-{uuid.uuid4().hex[:16]}"


def new_bucket_remote(server: MotoServer, name: str | None = None, client: Any = None) -> RemoteSpec:
    """Create a fresh bucket on ``server`` and describe it as a remote.

    The remote is called ``name`` (by default ``s3-PORT``); ``client`` is a boto3
    client for ``server`` to create the bucket with (by default a new one).
    """
    bucket = new_bucket_name()
    (client or server.client()).create_bucket(Bucket=bucket)
    return RemoteSpec(
        name=name or f"s3-{server.port}",
        config={
            "type": "s3",
            "bucket": bucket,
            "endpoint_url": server.endpoint_url,
            "region": REGION,
            "addressing_style": "path",
        },
        env=dict(CREDENTIALS_ENV),
    )


def empty_bucket(client: Any, bucket: str) -> None:
    """Delete every object, pending multipart upload and then the bucket itself."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    for up in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
    client.delete_bucket(Bucket=bucket)


def make_s3_backend(spec: RemoteSpec, **kwargs: Any) -> Any:
    """Build an ``S3Backend`` from a test remote (extra keyword arguments override)."""
    from omnifs.backends.s3 import S3Backend

    config = {k: v for k, v in spec.config.items() if k != "type"}
    opts: dict[str, Any] = {
        "access_key_id": spec.env["AWS_ACCESS_KEY_ID"],
        "secret_access_key": spec.env["AWS_SECRET_ACCESS_KEY"],
        **config,
        **kwargs,
    }
    return S3Backend(spec.name, **opts)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    """A moto S3 server subprocess for the whole session (killed at the end)."""
    with running_moto_server() as server:
        yield server


@pytest.fixture(scope="module")
def spare_moto() -> Iterator[MotoServer]:
    """A moto server of the test module's own, that its tests may freeze (the session one is shared).

    A test that freezes it thaws it again itself (it stays up for the module's
    next test); it is killed at the end of the module.
    """
    with running_moto_server() as server:
        yield server


@pytest.fixture
def s3_client(s3_server: MotoServer) -> Any:
    """A boto3 client for the test server."""
    return s3_server.client()


@pytest.fixture
def s3_remote(s3_server: MotoServer, s3_client: Any) -> Iterator[RemoteSpec]:
    """A fresh, empty, uniquely named bucket as a remote spec; removed afterwards."""
    s3_server.start()  # restart or thaw if an earlier test left it stopped or frozen
    spec = new_bucket_remote(s3_server, "s3test", client=s3_client)
    yield spec
    s3_server.thaw()
    if s3_server.running():
        with contextlib.suppress(Exception):
            empty_bucket(s3_client, spec.config["bucket"])
