"""Staged files: a local, complete copy of a file's content while it is open for writing.

A staged file lives in the staging directory (mode 0700) on local disk, so the
memory used never grows with file size.  Writes land here at local speed and are
uploaded to the backend on flush/fsync/release.  All disk I/O runs in worker
threads under one ``trio.CapacityLimiter``.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import trio

from omnifs.backends.base import Backend, ObjectInfo, SetAttrs
from omnifs.errors import from_oserror

log = logging.getLogger(__name__)

FILL_CHUNK = 4 << 20


class StagingArea:
    """Owns the staging directory and creates staged files in it."""

    def __init__(self, directory: Path, *, max_threads: int = 8) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        self.limiter = trio.CapacityLimiter(max_threads)

    def leftovers(self) -> list[Path]:
        """Staged files left by a process that did not shut down cleanly."""
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    async def run(self, fn, *args):  # type: ignore[no-untyped-def]
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        except OSError as exc:
            raise from_oserror(exc, "staging") from exc

    async def create(self) -> StagedFile:
        path = self.directory / uuid.uuid4().hex
        fd = await self.run(lambda: os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        return StagedFile(self, path, fd)


class StagedFile:
    """A local copy of one file.  ``lock`` serialises writers against uploads."""

    def __init__(self, area: StagingArea, path: Path, fd: int) -> None:
        self.area = area
        self.path = path
        self.fd = fd
        self.size = 0
        self.dirty = False
        self.lock = trio.Lock()
        self.closed = False

    async def fill_from(self, backend: Backend, path: str, size: int) -> None:
        """Copy ``size`` bytes of backend object ``path`` into this file, chunk by chunk."""
        offset = 0
        while offset < size:
            data = await backend.read(path, offset, min(FILL_CHUNK, size - offset))
            if not data:
                break
            await self.area.run(os.pwrite, self.fd, data, offset)
            offset += len(data)
        self.size = offset

    async def pread(self, offset: int, size: int) -> bytes:
        return await self.area.run(os.pread, self.fd, size, offset)

    async def pwrite(self, offset: int, data: bytes) -> int:
        written = await self.area.run(os.pwrite, self.fd, data, offset)
        self.size = max(self.size, offset + written)
        self.dirty = True
        return written

    async def truncate(self, size: int) -> None:
        await self.area.run(os.ftruncate, self.fd, size)
        self.size = size
        self.dirty = True

    async def upload(self, backend: Backend, path: str, attrs: SetAttrs | None) -> ObjectInfo:
        """Write the whole content to ``path`` on the backend; clears ``dirty`` on success."""
        fd = await self.area.run(os.open, self.path, os.O_RDONLY)
        with open(fd, "rb", buffering=0) as src:
            info = await backend.write(path, src, attrs)
        self.dirty = False
        return info

    async def close(self) -> None:
        """Close and delete the local copy (idempotent)."""
        if self.closed:
            return
        self.closed = True

        def _close() -> None:
            os.close(self.fd)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

        await self.area.run(_close)
