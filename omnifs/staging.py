"""Staged files: a local, complete copy of a file's content while it is open for writing.

A staged file lives in the staging directory (mode 0700) on local disk, so the
memory used never grows with file size.  Writes land here at local speed and are
uploaded to the backend on flush/fsync/release.  All disk I/O runs in worker
threads under one ``trio.CapacityLimiter``.

Durability: once a staged file holds data the backend does not have, a small
record ``<id>.json`` beside it names the backend path and attributes.  When an
upload has to wait (backend offline), data and record are fsynced.  At start-up
:meth:`StagingArea.recover` returns every recorded file, so pending data
survives a crash or ``kill -9`` and is uploaded later; unrecorded files are
clean copies and are removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from omnifs.backends.base import Backend, ObjectInfo, SetAttrs
from omnifs.errors import from_oserror

log = logging.getLogger(__name__)

FILL_CHUNK = 4 << 20
ACCEPTED = ".accepted"  # suffix of a staged file's last accepted content (StagedFile.keep_accepted)


class StagingArea:
    """Owns the staging directory and creates staged files in it."""

    def __init__(self, directory: Path, *, max_threads: int = 8) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        self.limiter = trio.CapacityLimiter(max_threads)

    def check_writable(self) -> None:
        """Prove that pending data can be made durable here: write, fsync and remove a probe file.

        Raises a domain error naming the directory (EROFS, ENOSPC, EACCES, ...).
        """
        probe = self.directory / f".probe-{uuid.uuid4().hex[:8]}.tmp"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"omnifs")
                os.fsync(fd)
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
        except OSError as exc:
            raise from_oserror(exc, f"cannot keep pending writes in {self.directory}") from exc

    def recover(self) -> list[tuple[StagedFile, dict[str, Any]]]:
        """Reopen staged files left with pending data by an earlier run; drop clean leftovers."""
        out = []
        for data_path in sorted(self.directory.iterdir()):
            if data_path.suffix or not data_path.is_file():
                continue
            record_path = data_path.with_suffix(".json")
            try:
                record = json.loads(record_path.read_text())
                if not isinstance(record.get("path"), str):
                    raise ValueError("record without a path")
            except FileNotFoundError:
                data_path.unlink(missing_ok=True)  # a clean copy: nothing pending
                continue
            except (OSError, ValueError) as exc:
                log.error("unreadable staging record %s (%s); data kept in %s", record_path, exc, data_path)
                continue
            accepted = data_path.with_suffix(ACCEPTED)
            if accepted.exists():  # a later write was not accepted (refused, or cut short by the crash)
                shutil.copyfile(accepted, data_path)
            # Opened lazily: thousands of pending files must not hold thousands of descriptors.
            staged = StagedFile(self, data_path, None)
            staged.size = data_path.stat().st_size
            staged.dirty = True
            staged.recorded = True
            base = record.get("base_version")
            staged.base_version = base if isinstance(base, str) else None
            out.append((staged, record))
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        for record_path in [*self.directory.glob("*.json"), *self.directory.glob("*" + ACCEPTED)]:
            if not record_path.with_suffix("").exists():
                record_path.unlink(missing_ok=True)
        return out

    async def run(self, fn, *args):  # type: ignore[no-untyped-def]
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        except OSError as exc:
            raise from_oserror(exc, "staging") from exc

    async def create(self, record: dict[str, Any] | None = None) -> StagedFile:
        """A new empty staged file; with ``record`` its (not yet durable) record too, in one worker-thread trip."""
        path = self.directory / uuid.uuid4().hex

        def _create() -> int:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            if record is not None:
                _write_record_file(path.with_suffix(".json"), record, durable=False)
            return fd

        staged = StagedFile(self, path, await self.run(_create))
        staged.recorded = record is not None
        return staged


class StagedFile:
    """A local copy of one file.  ``lock`` serialises writers against uploads."""

    def __init__(self, area: StagingArea, path: Path, fd: int | None) -> None:
        self.area = area
        self.path = path
        self._fd = fd
        self.size = 0
        self.dirty = False
        self.lock = trio.Lock()
        self.closed = False
        self.recorded = False
        self.broken = False  # a write failed: this content must never be uploaded
        self.closed_dirty = False  # holds data a close() already accepted, not yet uploaded
        self.base_version: str | None = None  # remote version this content was based on (None: unknown)
        self.has_accepted = path.with_suffix(ACCEPTED).exists() if fd is None else False
        self.generation = 0  # counts changes of the content
        self.accepted_generation = -1  # the generation keep_accepted last saw

    @property
    def fd(self) -> int:
        """The open descriptor of the local copy (opened on first use)."""
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDWR)
            except OSError as exc:
                raise from_oserror(exc, "staging") from exc
        return self._fd

    def release_fd(self) -> None:
        """Close the descriptor while no handle uses the copy (it reopens on demand).

        Only call this with no handle open and no I/O in flight on the copy.
        """
        if self._fd is not None and not self.closed and not self.lock.locked():
            os.close(self._fd)
            self._fd = None

    @property
    def record_path(self) -> Path:
        return self.path.with_suffix(".json")

    async def fill_from(self, read: Callable[[int, int], Awaitable[bytes]], size: int) -> None:
        """Copy ``size`` bytes obtained from ``read(offset, size)`` into this file, chunk by chunk."""
        offset = 0
        while offset < size:
            data = await read(offset, min(FILL_CHUNK, size - offset))
            if not data:
                break
            await self.area.run(os.pwrite, self.fd, data, offset)
            offset += len(data)
        self.size = offset

    async def write_record(self, record: dict[str, Any], *, durable: bool) -> None:
        """Atomically (re)write the record naming this file's backend path; fsync when ``durable``."""

        def _write() -> None:
            _write_record_file(self.record_path, record, durable=durable)
            if durable:
                os.fsync(self.fd)
                _fsync_dir(self.area.directory)

        self.recorded = True  # claimed before the write so concurrent writers do not repeat it
        await self.area.run(_write)

    async def pread(self, offset: int, size: int) -> bytes:
        return await self.area.run(os.pread, self.fd, size, offset)

    async def pwrite(self, offset: int, data: bytes) -> int:
        self.generation += 1
        written = await self.area.run(os.pwrite, self.fd, data, offset)
        self.size = max(self.size, offset + written)
        self.dirty = True
        return written

    def mark_failed(self) -> None:
        """A write or truncate failed.

        Content that no close() accepted yet is then never uploaded (the remote
        keeps its last good version); content holding accepted data is still
        uploaded as it is, as a local filesystem would keep it.
        """
        if not self.closed_dirty:
            self.broken = True

    async def truncate(self, size: int) -> None:
        self.generation += 1
        try:
            await self.area.run(os.ftruncate, self.fd, size)
        except BaseException:
            self.mark_failed()
            raise
        self.size = size
        self.dirty = True

    async def upload(self, backend: Backend, path: str, attrs: SetAttrs | None) -> ObjectInfo:
        """Write the whole content to ``path`` on the backend.

        The copy stays dirty (and its record stays) until :meth:`uploaded`:
        the caller first records the new version in the cache, so no moment
        exists where neither the copy nor the cache shows the file.
        """
        fd = await self.area.run(os.open, self.path, os.O_RDONLY)
        with open(fd, "rb", buffering=0) as src:
            return await backend.write(path, src, attrs)

    async def uploaded(self) -> None:
        """The content is on the backend and recorded: clear ``dirty`` and drop the crash record."""
        self.dirty = False
        self.closed_dirty = False
        if self.recorded:
            self.recorded = False
            await self.area.run(lambda: self.record_path.unlink(missing_ok=True))
        if self.has_accepted:
            self.has_accepted = False
            await self.area.run(lambda: self.accepted_path.unlink(missing_ok=True))

    @property
    def accepted_path(self) -> Path:
        return self.path.with_suffix(ACCEPTED)

    async def keep_accepted(self, data: bytes) -> None:
        """Durably keep ``data`` (the current content, checked) as accepted, until it is uploaded.

        For content checked at close (a companion document): a later write that
        is refused, or cut short by a crash, can then never replace it --
        :meth:`restore_accepted` puts it back, and recovery prefers it.  Call
        with ``lock`` held.
        """

        def _copy() -> None:
            tmp = self.accepted_path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.accepted_path)
            _fsync_dir(self.area.directory)

        await self.area.run(_copy)
        self.has_accepted = True
        self.accepted_generation = self.generation

    async def restore_accepted(self) -> bool:
        """Make the content the last accepted one again (False: nothing accepted is pending)."""
        if not self.has_accepted:
            return False

        def _restore() -> int:
            data = self.accepted_path.read_bytes()
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
            os.fsync(self.fd)
            return len(data)

        self.size = await self.area.run(_restore)
        self.broken = False
        self.dirty = True
        self.generation += 1
        self.accepted_generation = self.generation
        return True

    async def close(self) -> None:
        """Close and delete the local copy (idempotent)."""
        if self.closed:
            return
        self.closed = True

        fd, self._fd = self._fd, None

        def _close() -> None:
            if fd is not None:
                os.close(fd)
            self.path.unlink(missing_ok=True)
            self.record_path.unlink(missing_ok=True)
            self.accepted_path.unlink(missing_ok=True)

        await self.area.run(_close)


def _fsync_dir(directory: Path) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_record_file(record_path: Path, record: dict[str, Any], *, durable: bool) -> None:
    """Atomically replace ``record_path`` with ``record`` as JSON (fsynced when ``durable``)."""
    tmp = record_path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, record_path)
