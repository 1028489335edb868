"""The namespace journal: an ordered, durable log of changes made while the backend was away.

File content goes through the staging area (``staging.py``); everything else a
user can change — mkdir, rmdir, delete, rename, symlink, attributes, xattrs —
is appended here when the backend cannot take it at once, and replayed in
order when it answers again.

On disk (``<state>/<remote>/journal/``):

- ``ops.log``: one JSON object per line, ``{"seq": N, "op": ..., ...}``,
  appended and fsynced before the operation is acknowledged to the caller;
- ``applied``: the sequence number of the last operation replayed, replaced
  atomically after each replay step.

Every replayed operation is idempotent (see ``backends/base.py``), so a crash
between applying an operation and recording it only repeats it.  A torn last
line (a crash in the middle of an append) is ignored: its operation was never
acknowledged.  Once every entry is applied the log is truncated.

Invariant the VFS relies on: while the journal holds entries, the backend is
treated as offline (served from the cache) and no staged upload runs, so
uploads always land after the namespace changes that preceded them.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

from omnifs.backends.base import Backend, SetAttrs
from omnifs.errors import (
    AlreadyExists,
    BackendUnavailable,
    NotFound,
    OmniError,
    TransientError,
    from_oserror,
)

log = logging.getLogger(__name__)

OpKind = Literal["mkdir", "rmdir", "delete", "rename", "symlink", "set_attrs", "set_xattr"]


@dataclass(frozen=True, slots=True)
class Op:
    """One journaled namespace change."""

    seq: int
    op: OpKind
    path: str
    dst: str | None = None  # rename target
    target: str | None = None  # symlink target
    attrs: dict[str, int] = field(default_factory=dict)  # SetAttrs fields that are set
    name: str | None = None  # xattr name
    value: str | None = None  # xattr value, base64 (None: remove)

    def set_attrs(self) -> SetAttrs:
        return SetAttrs(**self.attrs)

    def describe(self) -> str:
        return f"{self.op} {self.path}" + (f" -> {self.dst}" if self.dst else "")


def attrs_dict(attrs: SetAttrs | None) -> dict[str, int]:
    """The fields of ``attrs`` that are set, for the log."""
    if attrs is None:
        return {}
    fields = ("mode", "uid", "gid", "mtime_ns", "atime_ns")
    return {k: getattr(attrs, k) for k in fields if getattr(attrs, k) is not None}


class Journal:
    """The durable operation log of one remote.  Used only from the trio thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log_path = directory / "ops.log"
        self.cursor_path = directory / "applied"
        self.applied = self._read_cursor()
        self.pending: list[Op] = [op for op in self._read_log() if op.seq > self.applied]
        self._next = max([self.applied, *(op.seq for op in self.pending)]) + 1
        self.failures: list[dict[str, Any]] = []  # operations the backend refused for good
        self._lock = trio.Lock()  # one replay at a time
        self._limiter = trio.CapacityLimiter(1)  # appends keep their order on disk
        if self.pending:
            log.warning("%d journaled change(s) from an earlier run wait for the backend", len(self.pending))

    def __len__(self) -> int:
        return len(self.pending)

    # --- disk ---------------------------------------------------------------------------
    def _read_cursor(self) -> int:
        try:
            return int(self.cursor_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError:
            log.error("unreadable journal cursor %s; replaying the whole log (it is idempotent)", self.cursor_path)
            return 0

    def _read_log(self) -> list[Op]:
        try:
            lines = self.log_path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        ops = []
        for number, line in enumerate(lines, start=1):
            try:
                ops.append(Op(**json.loads(line)))
            except (ValueError, TypeError) as exc:
                # Only a crash mid-append leaves a bad line, and only the last one.
                level = logging.INFO if number == len(lines) else logging.ERROR
                log.log(level, "skipping unreadable journal line %d of %s (%s)", number, self.log_path, exc)
        return ops

    def _append_sync(self, line: bytes) -> None:
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_cursor_sync(self, seq: int, truncate: bool) -> None:
        tmp = self.cursor_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(str(seq))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.cursor_path)
        if truncate:  # everything applied: start an empty log (the cursor keeps numbering going)
            with open(self.log_path, "wb") as f:
                os.fsync(f.fileno())

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except OSError as exc:
            raise from_oserror(exc, f"journal {self.directory}") from exc

    # --- appending ------------------------------------------------------------------------
    async def append(self, kind: OpKind, path: str, **fields: Any) -> Op:
        """Durably log one operation; returns once it is on disk (fsynced)."""
        if "value" in fields and isinstance(fields["value"], bytes):
            fields["value"] = base64.b64encode(fields["value"]).decode()
        op = Op(self._next, kind, path, **fields)
        self._next += 1
        line = json.dumps({k: v for k, v in asdict(op).items() if v not in (None, {})}).encode() + b"\n"
        await self._io(self._append_sync, line)
        self.pending.append(op)
        log.info("journaled %s (backend away)", op.describe())
        return op

    # --- replay ----------------------------------------------------------------------------
    async def replay(
        self,
        backend: Backend,
        call: Callable[..., Awaitable[Any]],
        before_attrs: Callable[[Op], Awaitable[None]] | None = None,
    ) -> bool:
        """Apply pending operations in order through ``call(fn, *args)``; True once none is left.

        ``before_attrs(op)`` runs before an attribute or xattr change is applied
        (the caller uploads data of that file still pending, so the change
        lands on it rather than before it).  Stops at the first operation that
        fails because the backend is unavailable (it stays pending).  An
        operation the backend refuses for any other reason is logged, listed in
        ``failures`` and skipped: it can never succeed by repeating it, and it
        must not hold up the rest.
        """
        async with self._lock:
            while self.pending:
                op = self.pending[0]
                try:
                    if before_attrs is not None and op.op in ("set_attrs", "set_xattr"):
                        await before_attrs(op)
                    await self._apply(backend, op, call)
                except OmniError as exc:
                    if isinstance(exc, (BackendUnavailable, TransientError)):
                        return False
                    log.error("journaled %s was refused by the backend (%s); skipped", op.describe(), exc)
                    self.failures.append({"op": op.describe(), "error": str(exc)})
                    del self.failures[:-50]
                self.pending.pop(0)
                self.applied = op.seq
                await self._io(self._write_cursor_sync, op.seq, not self.pending)
            return True

    @staticmethod
    async def _apply(backend: Backend, op: Op, call: Callable[..., Awaitable[Any]]) -> None:
        """Apply one operation; an effect that is already there counts as done."""
        try:
            if op.op == "mkdir":
                await call(backend.mkdir, op.path, op.set_attrs())
            elif op.op == "rmdir":
                await call(backend.rmdir, op.path)
            elif op.op == "delete":
                await call(backend.delete, op.path)
            elif op.op == "rename":
                assert op.dst is not None
                await call(backend.rename, op.path, op.dst)
            elif op.op == "symlink":
                assert op.target is not None
                await call(backend.symlink, op.path, op.target, op.set_attrs())
            elif op.op == "set_attrs":
                await call(backend.set_attrs, op.path, op.set_attrs())
            elif op.op == "set_xattr":
                assert op.name is not None
                value = None if op.value is None else base64.b64decode(op.value)
                await call(backend.set_xattr, op.path, op.name, value)
        except AlreadyExists:
            if op.op not in ("mkdir", "symlink"):
                raise
            log.info("journaled %s: already done", op.describe())
        except NotFound:
            if op.op == "mkdir":
                raise  # the parent is gone: refused
            if op.op == "rename":
                try:
                    await call(backend.stat, op.path)
                except NotFound:
                    pass  # moved already (or deleted since): nothing to move
                else:
                    raise  # the source is there but the target's directory is not: refused
            log.info("journaled %s: nothing left to do (not found)", op.describe())
