"""An in-memory backend: fast, volatile, and the reference for the contract."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import BinaryIO

from omnifs.backends.base import (
    Backend,
    Capabilities,
    ObjectInfo,
    SetAttrs,
    StatFs,
    basename,
    check_path,
    join,
    parent_of,
)
from omnifs.errors import AlreadyExists, IsADirectory, NoSuchAttribute, NotADirectory, NotEmpty, NotFound

_CHUNK = 1 << 20


@dataclass
class _Entry:
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    data: bytearray = field(default_factory=bytearray)
    target: str | None = None
    children: set[str] = field(default_factory=set)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    version: int = 0


class MemoryBackend(Backend):
    """Objects kept in a dict.  Runs inline on the trio thread (never blocks)."""

    type_name = "memory"
    capabilities = Capabilities()

    def __init__(self, name: str = "memory") -> None:
        super().__init__(name)
        now = time.time_ns()
        self._entries: dict[str, _Entry] = {"": _Entry("dir", 0o755, 0, 0, now, now)}
        self._versions = itertools.count(1)

    def _get(self, path: str) -> _Entry:
        check_path(path)
        try:
            return self._entries[path]
        except KeyError:
            raise NotFound(path) from None

    def _parent(self, path: str) -> _Entry:
        check_path(path)
        parent = self._get(parent_of(path))
        if parent.kind != "dir":
            raise NotADirectory(parent_of(path))
        return parent

    def _info(self, path: str, e: _Entry) -> ObjectInfo:
        size = len(e.data) if e.kind == "file" else len(e.target or "") if e.kind == "symlink" else 0
        return ObjectInfo(
            path=path,
            kind=e.kind,  # type: ignore[arg-type]
            size=size,
            mtime_ns=e.mtime_ns,
            ctime_ns=e.ctime_ns,
            mode=e.mode,
            uid=e.uid,
            gid=e.gid,
            etag=f"v{e.version}",
            target=e.target,
        )

    def _touch_parent(self, path: str) -> None:
        now = time.time_ns()
        parent = self._entries[parent_of(path)]
        parent.mtime_ns = parent.ctime_ns = now

    def _apply(self, e: _Entry, attrs: SetAttrs | None) -> None:
        if attrs is None:
            return
        if attrs.mode is not None:
            e.mode = attrs.mode & 0o7777
        if attrs.uid is not None:
            e.uid = attrs.uid
        if attrs.gid is not None:
            e.gid = attrs.gid
        if attrs.mtime_ns is not None:
            e.mtime_ns = attrs.mtime_ns

    def _new(self, path: str, kind: str, attrs: SetAttrs | None) -> _Entry:
        now = time.time_ns()
        e = _Entry(kind, 0o755 if kind == "dir" else 0o644, 0, 0, now, now, version=next(self._versions))
        self._apply(e, attrs)
        self._entries[path] = e
        self._entries[parent_of(path)].children.add(basename(path))
        self._touch_parent(path)
        return e

    async def stat(self, path: str) -> ObjectInfo:
        return self._info(path, self._get(path))

    async def list(self, path: str) -> list[ObjectInfo]:
        e = self._get(path)
        if e.kind != "dir":
            raise NotADirectory(path)
        return [self._info(join(path, n), self._entries[join(path, n)]) for n in sorted(e.children)]

    async def read(self, path: str, offset: int, size: int) -> bytes:
        e = self._get(path)
        if e.kind == "dir":
            raise IsADirectory(path)
        return bytes(e.data[offset : offset + size])

    async def read_versioned(self, path: str, offset: int, size: int) -> tuple[bytes, str]:
        e = self._get(path)
        if e.kind == "dir":
            raise IsADirectory(path)
        return bytes(e.data[offset : offset + size]), f"v{e.version}"

    async def write(self, path: str, src: BinaryIO, attrs: SetAttrs | None = None) -> ObjectInfo:
        self._parent(path)
        old = self._entries.get(path)
        if old is not None and old.kind == "dir":
            raise IsADirectory(path)
        data = bytearray()
        while chunk := src.read(_CHUNK):
            data += chunk
        if old is None or old.kind != "file":
            e = self._new(path, "file", None)
        else:
            e = old
        e.data = data
        now = time.time_ns()
        e.mtime_ns = e.ctime_ns = now
        e.version = next(self._versions)
        self._apply(e, attrs)
        return self._info(path, e)

    async def delete(self, path: str) -> None:
        e = self._get(path)
        if e.kind == "dir":
            raise IsADirectory(path)
        self._remove(path)

    def _remove(self, path: str) -> None:
        del self._entries[path]
        self._entries[parent_of(path)].children.discard(basename(path))
        self._touch_parent(path)

    async def mkdir(self, path: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        self._parent(path)
        if path in self._entries:
            raise AlreadyExists(path)
        return self._info(path, self._new(path, "dir", attrs))

    async def rmdir(self, path: str) -> None:
        e = self._get(path)
        if e.kind != "dir":
            raise NotADirectory(path)
        if e.children:
            raise NotEmpty(path)
        self._remove(path)

    async def rename(self, src: str, dst: str) -> None:
        e = self._get(src)
        self._parent(dst)
        if src == dst:
            return
        if (dst + "/").startswith(src + "/"):
            raise NotEmpty(f"cannot move {src!r} into itself")
        target = self._entries.get(dst)
        if target is not None:
            if target.kind == "dir":
                if e.kind != "dir":
                    raise IsADirectory(dst)
                if target.children:
                    raise NotEmpty(dst)
            elif e.kind == "dir":
                raise NotADirectory(dst)
            self._remove(dst)
        moved = [p for p in self._entries if p == src or p.startswith(src + "/")]
        for p in moved:
            self._entries[dst + p[len(src) :]] = self._entries.pop(p)
        self._entries[parent_of(src)].children.discard(basename(src))
        self._touch_parent(src)
        self._entries[parent_of(dst)].children.add(basename(dst))
        self._touch_parent(dst)
        e.ctime_ns = time.time_ns()

    async def symlink(self, path: str, target: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        self._parent(path)
        if path in self._entries:
            raise AlreadyExists(path)
        e = self._new(path, "symlink", attrs)
        e.mode = 0o777
        e.target = target
        return self._info(path, e)

    async def set_attrs(self, path: str, attrs: SetAttrs) -> ObjectInfo:
        e = self._get(path)
        self._apply(e, attrs)
        e.ctime_ns = time.time_ns()
        return self._info(path, e)

    async def get_xattrs(self, path: str) -> dict[str, bytes]:
        return dict(self._get(path).xattrs)

    async def set_xattr(self, path: str, name: str, value: bytes | None) -> None:
        e = self._get(path)
        if value is None:
            if name not in e.xattrs:
                raise NoSuchAttribute(name)
            del e.xattrs[name]
        else:
            e.xattrs[name] = bytes(value)
        e.ctime_ns = time.time_ns()

    async def statfs(self) -> StatFs:
        used = sum(len(e.data) for e in self._entries.values()) // 4096
        total = max(1 << 20, used * 2)
        return StatFs(4096, total, total - used, total - used, 1 << 20, (1 << 20) - len(self._entries))
