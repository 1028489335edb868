"""A child backend with a fault switch, for contract tests of the replica wrappers.

``FaultyBackend`` forwards everything to a real backend; ``mode`` switches it
to ``"down"`` (every call raises BackendUnavailable at once) or ``"frozen"``
(every call sleeps until the mode changes back, like a SIGSTOPped server).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, BinaryIO, Literal

import trio

from omnifs.backends.base import Backend, ObjectInfo, SetAttrs, StatFs
from omnifs.errors import BackendUnavailable

Mode = Literal["up", "down", "frozen"]


class FaultyBackend(Backend):
    type_name = "faulty"

    def __init__(self, inner: Backend, name: str | None = None) -> None:
        super().__init__(name or inner.name)
        self.inner = inner
        self.capabilities = inner.capabilities
        self.mode: Mode = "up"
        self.calls = 0

    async def _gate(self) -> None:
        self.calls += 1
        while self.mode == "frozen":
            await trio.sleep(0.02)
        if self.mode == "down":
            raise BackendUnavailable(f"{self.name} is down (test switch)")

    async def _do(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        await self._gate()
        return await fn(*args)

    async def stat(self, path: str) -> ObjectInfo:
        return await self._do(self.inner.stat, path)  # type: ignore[no-any-return]

    async def list(self, path: str) -> list[ObjectInfo]:
        return await self._do(self.inner.list, path)  # type: ignore[no-any-return]

    async def read(self, path: str, offset: int, size: int) -> bytes:
        return await self._do(self.inner.read, path, offset, size)  # type: ignore[no-any-return]

    async def read_versioned(self, path: str, offset: int, size: int) -> tuple[bytes, str]:
        return await self._do(self.inner.read_versioned, path, offset, size)  # type: ignore[no-any-return]

    async def write(self, path: str, src: BinaryIO, attrs: SetAttrs | None = None) -> ObjectInfo:
        return await self._do(self.inner.write, path, src, attrs)  # type: ignore[no-any-return]

    async def delete(self, path: str) -> None:
        await self._do(self.inner.delete, path)

    async def mkdir(self, path: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        return await self._do(self.inner.mkdir, path, attrs)  # type: ignore[no-any-return]

    async def rmdir(self, path: str) -> None:
        await self._do(self.inner.rmdir, path)

    async def rename(self, src: str, dst: str) -> None:
        await self._do(self.inner.rename, src, dst)

    async def symlink(self, path: str, target: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        return await self._do(self.inner.symlink, path, target, attrs)  # type: ignore[no-any-return]

    async def set_attrs(self, path: str, attrs: SetAttrs) -> ObjectInfo:
        return await self._do(self.inner.set_attrs, path, attrs)  # type: ignore[no-any-return]

    async def get_xattrs(self, path: str) -> dict[str, bytes]:
        return await self._do(self.inner.get_xattrs, path)  # type: ignore[no-any-return]

    async def set_xattr(self, path: str, name: str, value: bytes | None) -> None:
        await self._do(self.inner.set_xattr, path, name, value)

    async def statfs(self) -> StatFs | None:
        return await self._do(self.inner.statfs)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        await self.inner.aclose()


async def tree(b: Backend, path: str = "") -> dict[str, Any]:
    """Everything below ``path`` of a backend: files as bytes, symlinks as ("->", target), dirs as None."""
    out: dict[str, Any] = {}
    for info in await b.list(path):
        if info.kind == "dir":
            out[info.path] = None
            out.update(await tree(b, info.path))
        elif info.kind == "symlink":
            out[info.path] = ("->", info.target)
        else:
            out[info.path] = await b.read(info.path, 0, info.size + 1)
    return out


async def wait_until(cond: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``cond`` (inside trio) until true; AssertionError after ``timeout``."""
    with trio.move_on_after(timeout):
        while not await cond():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def bucket_digests(client: Any, bucket: str) -> dict[str, str]:
    """Key -> sha256 of every object in a bucket (directory markers included)."""
    import hashlib

    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            try:
                body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            except client.exceptions.NoSuchKey:
                continue  # deleted since the listing (a repair at work)
            out[obj["Key"]] = hashlib.sha256(body).hexdigest()
    return out


def dir_digests(root: Any) -> dict[str, str]:
    """Relative path -> sha256 of every file below ``root`` (a local directory)."""
    import hashlib
    from pathlib import Path

    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".omnifs-tmp")
    }
