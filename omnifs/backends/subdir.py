"""A wrapper that serves one sub-directory of another backend (``NAME:sub/dir``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import BinaryIO

from omnifs.backends.base import Backend, ObjectInfo, SetAttrs, StatFs, check_path, join


class SubdirBackend(Backend):
    """Every path is resolved below ``root`` of the inner backend."""

    type_name = "subdir"

    def __init__(self, inner: Backend, root: str) -> None:
        super().__init__(inner.name)
        self.inner = inner
        self.root = check_path(root)
        self.capabilities = inner.capabilities

    def describe(self) -> str:
        return f"{self.inner.describe().rstrip('/')}/{self.root}"

    def _in(self, path: str) -> str:
        return join(self.root, check_path(path)) if path else self.root

    def _out(self, info: ObjectInfo) -> ObjectInfo:
        from dataclasses import replace

        rel = info.path[len(self.root) :].lstrip("/")
        return replace(info, path=rel)

    async def stat(self, path: str) -> ObjectInfo:
        return self._out(await self.inner.stat(self._in(path)))

    async def list(self, path: str) -> list[ObjectInfo]:
        return [self._out(i) for i in await self.inner.list(self._in(path))]

    async def read(self, path: str, offset: int, size: int) -> bytes:
        return await self.inner.read(self._in(path), offset, size)

    async def write(self, path: str, src: BinaryIO, attrs: SetAttrs | None = None) -> ObjectInfo:
        return self._out(await self.inner.write(self._in(path), src, attrs))

    async def delete(self, path: str) -> None:
        await self.inner.delete(self._in(path))

    async def mkdir(self, path: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        return self._out(await self.inner.mkdir(self._in(path), attrs))

    async def rmdir(self, path: str) -> None:
        await self.inner.rmdir(self._in(path))

    async def rename(self, src: str, dst: str) -> None:
        await self.inner.rename(self._in(src), self._in(dst))

    async def symlink(self, path: str, target: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        return self._out(await self.inner.symlink(self._in(path), target, attrs))

    async def set_attrs(self, path: str, attrs: SetAttrs) -> ObjectInfo:
        return self._out(await self.inner.set_attrs(self._in(path), attrs))

    async def get_xattrs(self, path: str) -> dict[str, bytes]:
        return await self.inner.get_xattrs(self._in(path))

    async def set_xattr(self, path: str, name: str, value: bytes | None) -> None:
        await self.inner.set_xattr(self._in(path), name, value)

    async def set_metadata(
        self, path: str, content_type: str, updates: Mapping[str, str | None], *, check_only: bool = False
    ) -> ObjectInfo | None:
        info = await self.inner.set_metadata(self._in(path), content_type, updates, check_only=check_only)
        return None if info is None else self._out(info)

    async def statfs(self) -> StatFs | None:
        return await self.inner.statfs()

    async def aclose(self) -> None:
        await self.inner.aclose()
