"""Direct access to each backend, bypassing every mount.

Used to create the 10,000-entry directory "directly on the backend", to see
when a written file has fully arrived there, and to clean up between runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol


def syncfs(path: Path) -> None:
    """Flush the filesystem holding ``path`` (not every filesystem: a hung FUSE mount elsewhere must not block)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        libc.syncfs(fd)
    finally:
        os.close(fd)


class Store(Protocol):
    """What the benchmark needs from a backend, seen from outside any mount."""

    kind: str
    disk: Path  # a path on the local disk holding the backend's data (flushed before dropping caches)

    def populate(self, rel_dir: str, files: Iterable[tuple[str, bytes]]) -> None:
        """Create ``rel_dir`` holding the given (name, content) files."""

    def put_file(self, rel: str, data: bytes) -> None:
        """Create the file ``rel`` (and its directory) holding ``data``."""

    def size(self, rel: str) -> int | None:
        """Size of the file at ``rel`` on the backend, or None if it is not there (yet)."""

    def remove_tree(self, rel_dir: str) -> None:
        """Delete ``rel_dir`` and everything below it; missing is fine."""


class LocalStore:
    """A directory on this machine: the local backend, and the directory sshd serves."""

    def __init__(self, root: Path, kind: str = "local") -> None:
        self.root = root
        self.kind = kind
        self.disk = root
        root.mkdir(parents=True, exist_ok=True)

    def populate(self, rel_dir: str, files: Iterable[tuple[str, bytes]]) -> None:
        d = self.root / rel_dir
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files:
            (d / name).write_bytes(data)
        syncfs(d)

    def put_file(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        syncfs(path.parent)

    def size(self, rel: str) -> int | None:
        try:
            return (self.root / rel).stat().st_size
        except FileNotFoundError:
            return None

    def remove_tree(self, rel_dir: str) -> None:
        shutil.rmtree(self.root / rel_dir, ignore_errors=True)


class S3Store:
    """One bucket on the loopback S3 server, reached with boto3."""

    kind = "s3"

    def __init__(self, client: Any, bucket: str, disk: Path) -> None:
        self.client = client
        self.disk = disk
        self.bucket = bucket
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)

    def populate(self, rel_dir: str, files: Iterable[tuple[str, bytes]]) -> None:
        # A marker object too, so tools that need one (s3fs) see the directory.
        self.client.put_object(Bucket=self.bucket, Key=f"{rel_dir}/", Body=b"")

        def put(item: tuple[str, bytes]) -> None:
            self.client.put_object(Bucket=self.bucket, Key=f"{rel_dir}/{item[0]}", Body=item[1])

        with ThreadPoolExecutor(16) as pool:
            for _ in pool.map(put, files):
                pass

    def put_file(self, rel: str, data: bytes) -> None:
        parent = rel.rpartition("/")[0]
        if parent:
            self.client.put_object(Bucket=self.bucket, Key=f"{parent}/", Body=b"")
        self.client.upload_fileobj(io.BytesIO(data), self.bucket, rel)  # multipart, 8 MiB parts

    def size(self, rel: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=rel)["ContentLength"])
        except self.client.exceptions.ClientError:
            return None

    def remove_tree(self, rel_dir: str) -> None:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{rel_dir}/")
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
