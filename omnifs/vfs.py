"""POSIX semantics over a backend: the filesystem logic, testable without a kernel.

The VFS speaks in inodes, names (``str``) and domain errors; ``fuse_ops`` is the
thin adapter that turns kernel requests into these calls and errors into errno.
Everything here runs on the trio thread; blocking work happens inside the
backend, the cache and the staging area, in worker threads.

Data path: a file opened for writing gets a *staged* local copy holding its
whole content (streamed in unless truncated).  Reads of a staged file come from
the copy; writes land in it.  ``flush``/``fsync``/``release`` upload the copy
with the file's attributes in one atomic backend write.  Files not open for
writing are read by range through ``Remote`` (the disk cache).

When the backend is offline, metadata and data come from the disk cache, and
an upload that cannot happen is deferred: the staged copy and its record are
fsynced, ``close``/``fsync`` succeed, and the upload is retried in the
background until it succeeds (also after a restart: see ``staging.recover``).
Namespace changes (mkdir, rename, unlink, ...) made while the backend is away
are checked against the cached view, applied to it, and appended to the
durable namespace journal (``journal.py``); the journal is replayed in order
before the backend is treated as online again, so uploads always follow the
namespace changes that preceded them.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import socket
import stat as stat_mod
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import trio

from omnifs.backends.base import NAME_MAX, Backend, ObjectInfo, SetAttrs, StatFs, join, parent_of, version_key
from omnifs.errors import (
    AlreadyExists,
    BackendUnavailable,
    InvalidArgument,
    InvalidPath,
    IsADirectory,
    NameTooLong,
    NoSuchAttribute,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotSupported,
    OmniError,
    PathUnavailable,
)
from omnifs.inodes import Attr, InodeTable, Node
from omnifs.journal import Journal, OpKind, attrs_dict
from omnifs.remote import Remote, VersionChanged, is_unavailable
from omnifs.staging import StagedFile, StagingArea

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_NAMESPACE = "user."
# Control attribute: "1" pins (prefetches and keeps) a file or tree, "0" unpins, "prefetch" only fetches.
PIN_XATTR = "user.omnifs.pin"
FLUSH_XATTR = "user.omnifs.flush"  # control attribute: setting it makes every queued upload due now
PENDING_XATTR = "user.omnifs.pending"  # read-only: number of uploads still queued

WRITE_CACHE_MAX = 256 << 20  # larger uploads are not copied into the data cache
ABSENT = ""  # base version of a file created here: it did not exist on the backend
EXCLUSIVE_GRACE = 30.0  # seconds the companion of a file created with O_EXCL stays hidden (_companion_deferred)

T = TypeVar("T")


class KernelNotifier(Protocol):
    """Tells the kernel to drop what it cached about an inode or a name."""

    async def invalidate_inode(self, inode: int) -> None: ...

    def invalidate_entry(self, parent_inode: int, name: str) -> None: ...


class NoKernel:
    """The notifier used where there is no kernel (unit tests)."""

    async def invalidate_inode(self, inode: int) -> None:
        return None

    def invalidate_entry(self, parent_inode: int, name: str) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Ctx:
    """Who is asking: the caller's uid, gid and umask."""

    uid: int
    gid: int
    umask: int = 0o022


@dataclass(frozen=True, slots=True)
class VfsOptions:
    attr_ttl: float = 1.0  # seconds node attributes are trusted before asking the Remote again
    uid: int = os.getuid()  # owner shown when the backend stores none
    gid: int = os.getgid()
    poll_interval: float = 60.0  # re-list directories the kernel knows, to see others' changes
    retry_interval: float = 5.0  # first retry delay of a failed upload (doubles up to retry_max)
    retry_max: float = 300.0
    write_back: float = 5.0  # seconds after close before uploading (0: upload at close)
    sync_upload: bool = False  # fsync waits for the backend instead of local durability
    cache_writes: bool = True  # put uploaded content into the data cache (cache_mode writes/full)


@dataclass(eq=False, slots=True)
class Handle:
    fh: int
    node: Node
    flags: int
    info: ObjectInfo | None = None  # the version this handle reads when the file is not staged
    next_chunk: int = -1  # sequential-read detection for read-ahead
    served: bool = False  # data of ``info`` was returned to the reader
    protected: ObjectInfo | None = None  # the version whose cached chunks this handle keeps from eviction


@dataclass(eq=False, slots=True)
class DirHandle:
    fh: int
    node: Node
    entries: list[ObjectInfo] | None = None


async def _applied(fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
    """Call ``fn`` and answer True: tells an applied change from a journaled one (None)."""
    await fn(*args)
    return True


def _now() -> int:
    return time.time_ns()


def conflict_name(path: str, when: float | None = None) -> str:
    """``dir/NAME.conflict-<host>-<UTC time>.EXT`` for ``dir/NAME.EXT`` (kept within 255 bytes)."""
    parent, _, name = path.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    if not stem:  # no extension, or a dot file
        stem, dot, ext = name, "", ""
    host = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:40] or "host"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    suffix = f".conflict-{host}-{stamp}" + (dot + ext)
    while len((stem + suffix).encode("utf-8", "surrogateescape")) > NAME_MAX:
        stem = stem[:-1]
    return join(parent, stem + suffix)


def _record(path: str, attr: Attr, base_version: str | None) -> dict[str, Any]:
    """The staging record naming a pending file's backend path and attributes (staging.py)."""
    return {
        "path": path,
        "mode": attr.mode & 0o7777,
        "uid": attr.uid,
        "gid": attr.gid,
        "mtime_ns": attr.mtime_ns,
        "base_version": base_version,
    }


VALIDATE_LIMIT = 1 << 20  # bytes of a companion read for checking (documents are far smaller)


class _CachedView:
    """The mount's cached view of the backend (metafiles.CachedView), for checks while it is away."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    async def listing(self, path: str) -> list[ObjectInfo] | None:
        got = await self.remote.cached_listing(path)
        return None if got is None else list(got.values())

    async def stat(self, path: str) -> ObjectInfo | None:
        cache = self.remote.cache
        got = None if cache is None else await self.remote.in_cache(cache.get_stat, path)
        return None if got is None else got[1]


class VFS:
    """The filesystem: an inode table, open handles and the staged-data path."""

    def __init__(
        self,
        remote: Remote,
        staging: StagingArea,
        options: VfsOptions | None = None,
        kernel: KernelNotifier | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.remote = remote
        self.backend: Backend = remote.backend
        self.staging = staging
        self.journal = journal or Journal(staging.directory.parent / "journal")
        self._calls_in_flight = 0  # backend changes still running after their caller stopped waiting
        self._calls_idle = trio.Event()
        self.opts = options or VfsOptions()
        self.kernel: KernelNotifier = kernel or NoKernel()
        now = _now()
        root_attr = Attr(stat_mod.S_IFDIR | 0o755, self.opts.uid, self.opts.gid, 0, now, now, now, nlink=2)
        self.table = InodeTable(root_attr)
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._fh = itertools.count(1)
        self._recovered: dict[str, tuple[StagedFile, dict[str, Any]]] = {}
        for staged, record in staging.recover():
            self._recovered[record["path"]] = (staged, record)
        if self._recovered:
            log.warning("%d file(s) with pending uploads recovered from %s", len(self._recovered), staging.directory)
        self._due: dict[Node, float] = {}  # pending uploads: node -> monotonic time to try
        self._failures: dict[Node, int] = {}
        self._queued_at: dict[Node, float] = {}
        self.conflicts: list[dict[str, Any]] = []
        self._wakeup = trio.Event()
        # Files this mount created with O_EXCL (cp into a new folder), for _companion_deferred.
        self._exclusive: dict[str, float] = {}

    # --- helpers --------------------------------------------------------------------
    def node(self, inode: int) -> Node:
        node = self.table.get(inode)
        if node is None:
            raise NotFound(f"stale inode {inode}")
        return node

    def handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise OmniError(f"bad file handle {fh}", errno=errno.EBADF) from None

    @staticmethod
    def _child_path(parent: Node, name: str) -> str:
        if parent.kind != "dir":
            raise NotADirectory(parent.path)
        if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise NameTooLong(name[:40] + "...")
        if not name or name in (".", "..") or "/" in name:
            raise InvalidPath(f"invalid name {name!r}")
        return join(parent.path, name)

    def _ingest(self, info: ObjectInfo, *, full: bool = False) -> Node:
        """Record backend info in the table; keep known mode/owner when info lacks them.

        ``full``: ``info`` is the backend's answer to a stat, so a missing mode
        means the object has none (an S3 object written by another tool, an
        implicit S3 directory), not that a listing left it out: the node is
        complete, and cached for ``attr_ttl`` like any other.

        A file whose content changed on the backend gets a new inode: with the
        writeback cache the kernel trusts its own size and pages for an inode it
        knows, so a changed object must look like a replaced one (as it is).
        """
        existing = self.table.by_path(info.path)
        if (
            existing is not None
            and existing.kind == "file"
            and info.kind == "file"
            and not existing.authoritative
            and existing.info is not None
            and version_key(existing.info) != version_key(info)
            and not self._derived(info.path)  # a companion keeps its inode: direct_io, nothing cached
        ):
            self._replaced(existing)
            existing = None
        attr = Attr.from_info(info, self.opts.uid, self.opts.gid)
        partial = not full and info.mode is None and info.kind != "symlink"
        if partial and existing is not None and existing.kind == info.kind and not existing.partial:
            attr.mode, attr.uid, attr.gid = existing.attr.mode, existing.attr.uid, existing.attr.gid
            partial = False
        node = self.table.ensure(info, attr, time.monotonic())
        if not node.authoritative:
            node.partial = partial
            recovered = self._recovered.pop(info.path, None) if info.kind == "file" else None
            if recovered is not None:
                self._adopt(node, *recovered)
        return node

    def _replaced(self, node: Node) -> None:
        """Detach a node whose object changed elsewhere and make the kernel look its name up again."""
        parent = self.table.by_path(parent_of(node.path))
        name = node.path.rpartition("/")[2]
        self.table.detach(node)
        if parent is not None:
            self.kernel.invalidate_entry(parent.inode, name)

    def _adopt(self, node: Node, staged: StagedFile, record: dict[str, Any]) -> None:
        """Attach a staged file recovered from an earlier run: its content is the truth."""
        node.staged = staged
        a = node.attr
        a.size = staged.size
        for key in ("mode", "uid", "gid", "mtime_ns"):
            if isinstance(record.get(key), int):
                setattr(a, key, (stat_mod.S_IFMT(a.mode) | record[key]) if key == "mode" else record[key])
        node.partial = False
        self._schedule(node, 0.0)

    def _fresh(self, node: Node) -> bool:
        return (
            node.authoritative
            or node.unlinked
            or node.inode == 1
            or (not node.partial and time.monotonic() - node.refreshed < self.opts.attr_ttl)
        ) and (node.authoritative or not self._derived(node.path))  # companions: always asked (metafiles.py)

    async def _refresh(self, node: Node, *, force: bool = False) -> Node:
        """Re-read ``node`` through the Remote unless its attributes are fresh or local."""
        if not force and self._fresh(node):
            return node
        if node.authoritative or node.unlinked or node.inode == 1:
            return node
        await self._settle_sources(node.path)
        allow_cached = not (force or node.partial or self._derived(node.path))
        try:
            info = await self.remote.stat(node.path, allow_cached=allow_cached)
        except NotFound:
            self.table.detach(node)
            raise
        # A replaced object gets a new inode (see _ingest); this one keeps its
        # last attributes until the kernel looks the name up again.
        self._ingest(info, full=not allow_cached and self.remote.health.online)
        return node

    def _direct(self) -> bool:
        """True when changes go straight to the backend: it is online and nothing is journaled ahead."""
        return self.remote.health.online and not self.journal.pending

    async def _change(
        self,
        kind: OpKind,
        path: str,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        check: Callable[[], Awaitable[None]] | None = None,
        **fields: Any,
    ) -> T | None:
        """Apply a namespace change on the backend, or journal it while the backend is away.

        Returns the backend's answer, or None when the change was journaled:
        ``check`` first validated it against the cached view (raising what the
        backend would have), and the caller must then apply it to that view.
        The journal entry is on disk before this returns.
        """
        if self._direct():
            try:
                return await self._direct_call(fn, *args, slow=kind == "rename")
            except OmniError as exc:
                if not is_unavailable(exc) or isinstance(exc, PathUnavailable):
                    raise  # PathUnavailable: the backend answers, only this path cannot be served now
                log.warning("%s %s: backend unavailable (%s); journaling the change", kind, path, exc)
        if check is not None:
            await check()
        await self.journal.append(kind, path, **fields)
        if self.remote.health.online:
            self.remote.mark_offline("changes are journaled until the backend takes them")
        self.remote.probe_soon()
        return None

    async def _direct_call(self, fn: Callable[..., Awaitable[T]], *args: Any, slow: bool = False) -> T:
        """Make a backend change, waiting at most the mount's timeout for the answer.

        The call itself is never abandoned: it runs to its end in the
        background, and the journal is not replayed before every such call has
        ended, so a late answer can never overtake a replayed change.  Past the
        timeout this raises BackendUnavailable and the caller journals the change
        (replaying it is harmless: changes are idempotent).
        """
        outcome: dict[str, Any] = {}
        finished = trio.Event()

        async def call() -> None:
            self._calls_in_flight += 1
            try:
                outcome["value"] = await self.remote.guarded(fn, *args)
            except Exception as exc:
                outcome["error"] = exc
            finally:
                self._calls_in_flight -= 1
                finished.set()
                if not self._calls_in_flight:
                    self._calls_idle.set()

        if not self.remote.start_soon(call):  # no background nursery (unit tests): just wait
            return await self.remote.guarded(fn, *args)
        self._calls_idle = trio.Event() if self._calls_in_flight == 0 else self._calls_idle
        limit = self.remote.settings.timeout * (6 if slow else 1)
        with trio.move_on_after(limit):
            await finished.wait()
        if not finished.is_set():
            self.remote.mark_offline(f"no answer within {limit:g} s")
            raise BackendUnavailable(f"{self.backend.name}: no answer within {limit:g} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]  # type: ignore[no-any-return]

    async def _replay_journal(self) -> bool:
        """Replay journaled changes (the backend answered again); True once none is left."""
        if not self.journal.pending:
            return True
        if self._calls_in_flight:
            log.info("waiting for %d unanswered backend call(s) before replaying the journal", self._calls_in_flight)
            with trio.move_on_after(600):
                await self._calls_idle.wait()
            if self._calls_in_flight:
                log.error("%d backend call(s) still unanswered after 600 s; replaying anyway", self._calls_in_flight)
        count = len(self.journal)
        done = await self.journal.replay(self.backend, self.remote.guarded, self._upload_before_attrs)
        if done:
            log.warning("replayed %d journaled change(s) on %s", count, self.backend.name)
        return done

    async def _upload_before_attrs(self, op: Any) -> None:
        """Replay: upload pending data of the file a journaled attribute change applies to, and of its companion.

        A file created offline reaches the backend with its upload, so an
        xattr or chmod journaled after the create must follow that upload; a
        companion written offline holds the whole document, so a metadata
        xattr journaled after it must land after it too.  Raises
        BackendUnavailable when the backend goes away again.
        """
        derived_paths = getattr(self.backend, "derived_paths", None)
        paths = [op.path, *(derived_paths(op.path) if derived_paths is not None else [])]
        for path in paths:
            node = self.table.by_path(path)
            if node is not None and node.open_count == 0:
                if node.staged is not None and node.staged.dirty and not node.staged.broken:
                    try:
                        await self._sync(node, defer=False, replaying=True)
                    except OmniError as exc:
                        if is_unavailable(exc):
                            raise BackendUnavailable(f"{path}: {exc}") from exc
                        log.warning("upload of %s before a journaled change failed: %s", path, exc)
                    await self._drop_clean_copy(node)  # a companion's copy would go stale at once
            elif node is None and path in self._recovered and not await self._upload_recovered_path(path):
                raise BackendUnavailable(f"{path}: upload before a journaled change did not go through")

    async def _require_absent(self, path: str, *, cached_ok: bool = False) -> None:
        """AlreadyExists if ``path`` exists (``cached_ok``: a fresh cached answer will do)."""
        node = self.table.by_path(path)
        if cached_ok and node is None:
            try:
                await self.remote.stat(path)
            except NotFound:
                return
            raise AlreadyExists(path)
        if await self._kind_at(path) is not None:
            raise AlreadyExists(path)

    async def _require_empty_dir(self, path: str) -> None:
        """Raise what rmdir would for ``path``, judged from the cached view."""
        kind = await self._kind_at(path)
        if kind is None:
            raise NotFound(path)
        if kind != "dir":
            raise NotADirectory(path)
        listing = await self.remote.cached_listing(path)
        if listing is None:
            raise BackendUnavailable(f"{path}: backend {self.backend.name} is offline and this is not cached")
        if listing or self._pending_children(path):
            raise NotEmpty(path)

    def _pending_children(self, path: str) -> list[ObjectInfo]:
        """Files in directory ``path`` whose content exists only here (not uploaded yet)."""
        out = {}
        for node in self.table.children(path):
            if node.authoritative and not node.unlinked:
                a = node.attr
                out[node.path] = ObjectInfo(
                    node.path, "file", a.size, a.mtime_ns, mode=a.mode & 0o7777, uid=a.uid, gid=a.gid
                )
        for rpath, (staged, record) in self._recovered.items():
            if parent_of(rpath) == path and rpath not in out:
                out[rpath] = ObjectInfo(
                    rpath,
                    "file",
                    staged.size,
                    record.get("mtime_ns") or 0,
                    mode=record.get("mode"),
                    uid=record.get("uid"),
                    gid=record.get("gid"),
                )
        return list(out.values())

    def _queued_in(self, directory: str) -> list[Node]:
        """Closed files in ``directory`` waiting for write-back (their upload is queued)."""
        return [n for n in self._due if parent_of(n.path) == directory]

    def _touch_dir(self, path: str) -> None:
        """Mark a directory's attributes stale after a change inside it."""
        node = self.table.by_path(path)
        if node is not None:
            now = _now()
            node.attr.mtime_ns = node.attr.ctime_ns = now
            node.refreshed = 0.0

    def _upload_attrs(self, node: Node) -> SetAttrs:
        a = node.attr
        return SetAttrs(mode=a.mode & 0o7777, uid=a.uid, gid=a.gid, mtime_ns=a.mtime_ns)

    def _record_of(self, node: Node) -> dict[str, Any]:
        return _record(node.path, node.attr, node.staged.base_version if node.staged is not None else None)

    async def _read_version(
        self, node: Node, info: ObjectInfo, offset: int, size: int, *, served: bool = False
    ) -> tuple[bytes, ObjectInfo]:
        """Read through the cache; if the object changed, switch to the new version.

        A reader that was already served data of the old version gets ESTALE
        instead, so no reader ever sees a mix of two versions.
        """
        try:
            return await self.remote.read(info, offset, size), info
        except VersionChanged:
            log.info("%s changed on the backend while open", info.path)
        await self._refresh(node, force=True)
        if served:
            await self.kernel.invalidate_inode(node.inode)
            raise OmniError(f"{node.path} changed on the backend while being read", errno=errno.ESTALE)
        await self.kernel.invalidate_inode(node.inode)
        if node.info is None:
            raise NotFound(node.path)
        return await self.remote.read(node.info, offset, size), node.info

    async def _ensure_staged(self, node: Node, *, truncate: bool) -> StagedFile:
        """Give ``node`` a staged local copy (streamed in unless truncating)."""
        async with node.stage_lock:
            staged = node.staged
            if staged is None:
                staged = await self.staging.create()
                staged.base_version = version_key(node.info) if node.info is not None else None
                try:
                    if not truncate and node.attr.size > 0:
                        info = node.info

                        async def read(offset: int, size: int) -> bytes:
                            nonlocal info
                            if info is None:
                                return await self.backend.read(node.path, offset, size)
                            data, info = await self._read_version(node, info, offset, size, served=offset > 0)
                            return data

                        await staged.fill_from(read, node.attr.size)
                        if info is not None:
                            staged.base_version = version_key(info)  # the version actually read
                except BaseException:
                    await staged.close()
                    raise
                node.staged = staged
            if truncate and staged.size:
                async with staged.lock:
                    await staged.truncate(0)
            if truncate:
                await self._dirtied(node, staged)
                now = _now()
                node.attr.size = 0
                node.attr.mtime_ns = node.attr.ctime_ns = now
            return staged

    async def _dirtied(self, node: Node, staged: StagedFile) -> None:
        """Mark staged data dirty; the first time, record its path so a crash cannot orphan it."""
        staged.dirty = True
        if not staged.recorded and not node.unlinked:
            await staged.write_record(self._record_of(node), durable=False)

    def _schedule(self, node: Node, delay: float) -> None:
        """Queue an upload of ``node`` in ``delay`` seconds (a newer request replaces an older one)."""
        now = time.monotonic()
        self._due[node] = now + delay
        self._queued_at.setdefault(node, now)
        self._wakeup.set()

    def _unschedule(self, node: Node) -> None:
        self._due.pop(node, None)
        self._failures.pop(node, None)
        self._queued_at.pop(node, None)

    def _backoff(self, node: Node) -> float:
        """Exponential backoff with jitter for the next retry of ``node``."""
        import random

        n = self._failures[node] = self._failures.get(node, 0) + 1
        delay = min(self.opts.retry_max, self.opts.retry_interval * 2 ** (n - 1))
        return delay * random.uniform(0.8, 1.2)

    async def _write_back(self, node: Node) -> None:
        """Make dirty data durable locally and queue its upload (or upload now with write_back=0)."""
        staged = node.staged
        if staged is None or not staged.dirty or node.unlinked:
            return
        if staged.broken:
            raise OmniError(f"{node.path}: an earlier write failed; the file was not changed", errno=errno.EIO)
        verdict = await self._validate_staged(node, staged)
        if verdict is False:
            return
        if verdict or self.opts.write_back <= 0:
            await self._sync(node)
            return
        async with staged.lock:
            if not staged.dirty:
                return  # uploaded while we waited for the lock
            await staged.write_record(self._record_of(node), durable=True)
            staged.closed_dirty = True
        self._schedule(node, self.opts.write_back)

    # --- companion .meta.json files (omnifs/backends/metafiles.py) ------------------------------------
    def _derived(self, path: str) -> bool:
        """True for content the backend renders from another file (a companion): never trusted from caches."""
        is_companion = getattr(self.backend, "is_companion", None)
        return bool(is_companion is not None and is_companion(path))

    async def _validate_staged(self, node: Node, staged: StagedFile) -> bool | None:
        """Let the backend check a companion at close.

        None: not a companion.  True: accepted (store it at once).  False: it was
        written again while being checked (that content is checked at its own
        close; nothing to do now).  Invalid content raises (the writer sees
        EINVAL) and is never uploaded: the content accepted before it comes
        back (if its upload is still pending), else the backend keeps the
        metadata it had.  A companion is stored at close rather than after
        ``write_back`` so that a later invalid write can never take an accepted
        one down with it; offline it is checked against the cached view and
        deferred through the staging journal like any upload.
        """
        validate = getattr(self.backend, "validate_staged", None)
        if validate is None or node.unlinked or not self._derived(node.path):
            return None
        if staged.generation == staged.accepted_generation:
            return True  # checked and accepted already (a second flush, a reader's close)
        await self._settle_sources(node.path)
        async with staged.lock:
            generation = staged.generation
            data = await staged.pread(0, min(staged.size, VALIDATE_LIMIT))
        try:
            try:
                if not self.remote.health.online:
                    raise BackendUnavailable(f"backend {self.backend.name} is offline")
                await self.remote.guarded(
                    validate, node.path, data, self._pending_attrs, timeout=self.remote.settings.timeout
                )
            except OmniError as exc:
                if not is_unavailable(exc):
                    raise
                # Away: checked against the cached view; stored when the backend is back.
                await validate(node.path, data, self._pending_attrs, _CachedView(self.remote))
        except OmniError:
            async with staged.lock:
                if staged.generation == generation:
                    if await staged.restore_accepted():  # an accepted document still waits for its upload
                        node.attr.size = staged.size
                    else:
                        staged.broken = True
            raise
        staged.base_version = None  # rendered content changes with its file: no conflict copies
        async with staged.lock:
            if staged.generation != generation:
                return False
            if not data:  # truncation changes nothing: a document still waiting for its upload stays
                if await staged.restore_accepted():
                    node.attr.size = staged.size
                staged.accepted_generation = staged.generation
            else:
                await staged.keep_accepted(data)
        return True

    async def _settle_sources(self, path: str) -> None:
        """Upload pending data of the file a companion at ``path`` is rendered from, so it shows live values.

        Only closed files waiting for write-back: a file still open for writing is not uploaded half-written.
        """
        derived_paths = getattr(self.backend, "derived_paths", None)
        if derived_paths is None or not self._derived(path):
            return
        parent = parent_of(path)
        for node in self._queued_in(parent):
            staged = node.staged
            if (
                staged is not None
                and staged.dirty
                and node.open_count == 0
                and not node.unlinked
                and not staged.broken
                and path in derived_paths(node.path)
            ):
                await self._sync(node)

    def _note_created(self, path: str, flags: int) -> None:
        """Remember files created with O_EXCL; creating a companion ends its deferral."""
        now = time.monotonic()
        self._exclusive = {p: t for p, t in self._exclusive.items() if now - t < EXCLUSIVE_GRACE}
        derived_paths = getattr(self.backend, "derived_paths", None)
        if derived_paths is None:
            return
        if self._derived(path):
            for p in [p for p in self._exclusive if path in derived_paths(p)]:
                del self._exclusive[p]
        elif flags & os.O_EXCL and derived_paths(path):
            present = [p for p in derived_paths(path) if (n := self.table.by_path(p)) is not None and not n.unlinked]
            if not present:  # a companion copied in before its file is the file's metadata already
                self._exclusive[path] = now

    def _companion_deferred(self, path: str) -> bool:
        """True for the companion of a file created with O_EXCL moments ago (until it is written).

        ``cp -a`` into a new folder creates every file with O_EXCL, the
        companion it copies too; a companion that already "exists" would make
        that fail with EEXIST.  So such a file's companion stays out of sight
        for EXCLUSIVE_GRACE seconds after its last close, or until written.
        """
        if not self._exclusive or not self._derived(path):
            return False
        derived_paths = getattr(self.backend, "derived_paths", None)
        now = time.monotonic()
        return derived_paths is not None and any(
            now - t < EXCLUSIVE_GRACE and path in derived_paths(p) for p, t in self._exclusive.items()
        )

    def _pending_attrs(self, path: str) -> tuple[int, int] | None:
        """Size and mtime of ``path`` while its newest data is only local (not uploaded yet)."""
        node = self.table.by_path(path)
        if node is None or not node.authoritative:
            return None
        return node.attr.size, node.attr.mtime_ns

    # --- end of companion hooks ------------------------------------------------------------------

    async def _sync(self, node: Node, *, defer: bool = True, replaying: bool = False) -> None:
        """Upload dirty staged data of ``node`` now.

        When the backend is unavailable and ``defer`` is true, the data and its
        record are made durable locally and the upload is queued for retry.
        ``replaying``: called from the journal replay, while the backend still
        counts as offline.
        """
        staged = node.staged
        if staged is None or not staged.dirty or node.unlinked:
            return
        if staged.broken:
            raise OmniError(f"{node.path}: an earlier write failed; the file was not changed", errno=errno.EIO)
        async with staged.lock:
            if not staged.dirty or node.unlinked:
                return
            try:
                if not (self.remote.health.online or replaying):
                    raise BackendUnavailable(f"backend {self.backend.name} is offline")
                theirs = await self._changed_elsewhere(node.path, staged.base_version)
                if theirs is not None:
                    await self._keep_both(node, staged, theirs)
                    return
                info = await self.remote.guarded(staged.upload, self.backend, node.path, self._upload_attrs(node))
            except OmniError as exc:
                if not (defer and is_unavailable(exc)):
                    raise
                await staged.write_record(self._record_of(node), durable=True)
                staged.closed_dirty = True
                if node not in self._failures:
                    log.warning("upload of %s deferred (%s); data is safe in %s", node.path, exc, staged.path)
                self._schedule(node, self._backoff(node))
                return
            # The cache learns the new version before the copy stops being the truth.
            node.info = info
            node.attr.etag = info.etag
            node.refreshed = time.monotonic()
            node.kernel_cache_key = (info.etag, node.attr.size, node.attr.mtime_ns)
            await self.remote.record(node.path, info)
            if self.opts.cache_writes and self.remote.cache is not None:
                await self._cache_content(node.path, info, staged)
            staged.base_version = version_key(info)
            await staged.uploaded()
            self._unschedule(node)

    async def _changed_elsewhere(self, path: str, base: str | None) -> ObjectInfo | None:
        """The remote object if it is no longer the version our content was based on, else None."""
        if base is None:
            return None
        try:
            current = await self.remote.guarded(self.backend.stat, path, timeout=self.remote.settings.timeout)
        except NotFound:
            return None  # deleted elsewhere (or still absent): our upload (re)creates it
        if version_key(current) == base:
            return None
        log.info("%s: remote version %s, ours was based on %s", path, version_key(current), base)
        return current

    async def _keep_both(self, node: Node, staged: StagedFile, theirs: ObjectInfo) -> None:
        """Another writer changed the file since we read it: upload ours beside theirs.

        Ours goes to ``NAME.conflict-<host>-<UTC time>.EXT`` and this node (with
        any open handles) follows it there; theirs stays under the original name.
        Called with ``staged.lock`` held.
        """
        original = node.path
        copy = conflict_name(original)
        info = await self.remote.guarded(staged.upload, self.backend, copy, self._upload_attrs(node))
        staged.base_version = version_key(info)
        log.warning("conflict: %s was changed elsewhere; kept theirs, uploaded ours as %s", original, copy)
        self.conflicts.append({"path": original, "copy": copy, "time": time.time()})
        del self.conflicts[:-50]
        await self.remote.record(copy, info)
        await self.remote.record(original, theirs)
        parent = self.table.by_path(parent_of(original))
        self.table.move(original, copy)
        node.info = info
        node.attr.etag = info.etag
        await staged.uploaded()
        self._unschedule(node)
        if parent is not None:
            self.kernel.invalidate_entry(parent.inode, original.rpartition("/")[2])

    async def _cache_content(self, path: str, info: ObjectInfo, staged: StagedFile) -> None:
        cache = self.remote.cache
        assert cache is not None
        pinned = await self.remote.in_cache(cache.is_pinned, path)
        if not pinned and info.size > min(cache.settings.max_size // 4, WRITE_CACHE_MAX):
            return
        try:
            await self.remote.in_cache(cache.put_file, path, version_key(info), staged.path, pinned)
        except Exception as exc:  # caching is an optimisation: never fail the upload for it
            log.warning("could not cache %s: %s", path, exc)

    async def _release_staged(self, node: Node) -> None:
        """Upload and drop the staged copy once no handle needs it (kept while the upload is pending)."""
        if node.staged is None or node.open_count > 0:
            return
        if node.staged.broken:
            log.warning("not uploading %s: a write to it failed; the backend keeps the old content", node.path)
            staged, node.staged = node.staged, None
            await staged.close()
            node.refreshed = 0.0
            node.kernel_cache_key = None
            self._unschedule(node)
            await self.kernel.invalidate_inode(node.inode)
            return
        await self._write_back(node)
        if node.open_count > 0:
            return  # reopened while we waited: the new handles use the copy
        if node.staged is not None and node.staged.dirty and not node.unlinked:
            node.staged.release_fd()  # queued: the upload loop owns it now, and needs no descriptor
            return
        staged, node.staged = node.staged, None
        self._unschedule(node)
        if staged is not None:
            await staged.close()

    # --- lookup and attributes -----------------------------------------------------
    async def lookup(self, parent_inode: int, name: str) -> Node:
        """Resolve ``name`` in a directory and take one kernel lookup reference."""
        parent = self.node(parent_inode)
        if name == ".":
            node = parent
        elif name == "..":
            node = self.table.by_path(parent_of(parent.path)) or self.table.root
        else:
            path = self._child_path(parent, name)
            if self._companion_deferred(path):
                raise NotFound(path)
            node = self.table.by_path(path)
            if node is None or not self._fresh(node):
                await self._settle_sources(path)
                allow_cached = (node is None or not node.partial) and not self._derived(path)
                try:
                    info = await self.remote.stat(path, allow_cached=allow_cached)
                except NotFound:
                    if node is not None and not node.authoritative:
                        self.table.detach(node)
                    raise
                node = self._ingest(info, full=not allow_cached and self.remote.health.online)
        node.lookups += 1
        return node

    def forget(self, inode: int, count: int) -> None:
        self.table.forget(inode, count)

    async def getattr(self, inode: int) -> Node:
        return await self._refresh(self.node(inode))

    async def setattr(
        self,
        inode: int,
        *,
        size: int | None = None,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> Node:
        """Apply attribute changes; a truncate is uploaded at once unless the file is open for writing."""
        node = self.node(inode)
        now = _now()
        if size is not None:
            if node.kind == "dir":
                raise IsADirectory(node.path)
            await self._truncate(node, size)
        change = SetAttrs(
            mode=None if mode is None else mode & 0o7777, uid=uid, gid=gid, mtime_ns=mtime_ns, atime_ns=atime_ns
        )
        if not change.is_empty():
            if not node.authoritative and not node.unlinked and self.backend.capabilities.posix_attrs:
                info = await self._change(
                    "set_attrs", node.path, self.backend.set_attrs, node.path, change, attrs=attrs_dict(change)
                )
                if info is None:  # journaled: the cached view gets the new attributes
                    info = self._info_of(node, change)
                node.attr.etag = info.etag
                node.info = info
                if node.staged is not None:
                    node.staged.base_version = version_key(info)
                await self.remote.record(node.path, info)
            elif node.staged is not None and node.staged.recorded:
                await node.staged.write_record(self._record_of(node), durable=False)
            a = node.attr
            if change.mode is not None:
                a.mode = stat_mod.S_IFMT(a.mode) | change.mode
            if uid is not None:
                a.uid = uid
            if gid is not None:
                a.gid = gid
            if mtime_ns is not None:
                a.mtime_ns = mtime_ns
            if atime_ns is not None:
                a.atime_ns = atime_ns
            a.ctime_ns = now
            node.refreshed = time.monotonic()
        return node

    async def _truncate(self, node: Node, size: int) -> None:
        had_copy = node.staged is not None
        if not had_copy:
            await self._refresh(node)
        staged = await self._ensure_staged(node, truncate=size == 0)
        try:
            if staged.size != size or size != 0:
                async with staged.lock:
                    await staged.truncate(size)
                await self._dirtied(node, staged)
            now = _now()
            node.attr.size = size
            node.attr.mtime_ns = node.attr.ctime_ns = now
        finally:
            if not had_copy:
                await self._release_staged(node)

    async def readlink(self, inode: int) -> str:
        node = await self._refresh(self.node(inode))
        if node.kind != "symlink" or node.attr.target is None:
            raise InvalidArgument(f"{node.path} is not a symlink")
        return node.attr.target

    # --- namespace -------------------------------------------------------------------
    async def mkdir(self, parent_inode: int, name: str, mode: int, ctx: Ctx) -> Node:
        parent = self.node(parent_inode)
        path = self._child_path(parent, name)
        perms = mode & ~ctx.umask & 0o7777
        attrs = SetAttrs(mode=perms, uid=ctx.uid, gid=ctx.gid)

        async def check() -> None:
            await self._require_absent(path)

        info = await self._change(
            "mkdir", path, self.backend.mkdir, path, attrs, check=check, attrs=attrs_dict(attrs)
        ) or ObjectInfo(path, "dir", 0, _now(), mode=perms, uid=ctx.uid, gid=ctx.gid)
        await self.remote.record(path, info)
        await self.remote.record_listing(path, [])
        node = self._ingest(info)
        node.lookups += 1
        self._touch_dir(parent.path)
        return node

    async def symlink(self, parent_inode: int, name: str, target: str, ctx: Ctx) -> Node:
        parent = self.node(parent_inode)
        path = self._child_path(parent, name)
        if not self.backend.capabilities.symlinks:
            raise NotSupported(f"{self.backend.type_name} has no symlinks")
        attrs = SetAttrs(uid=ctx.uid, gid=ctx.gid)

        async def check() -> None:
            await self._require_absent(path)

        info = await self._change(
            "symlink",
            path,
            self.backend.symlink,
            path,
            target,
            attrs,
            check=check,
            target=target,
            attrs=attrs_dict(attrs),
        ) or ObjectInfo(path, "symlink", len(target.encode()), _now(), uid=ctx.uid, gid=ctx.gid, target=target)
        await self.remote.record(path, info)
        node = self._ingest(info)
        node.lookups += 1
        self._touch_dir(parent.path)
        return node

    async def unlink(self, parent_inode: int, name: str) -> None:
        """Remove a file; handles still open on it keep working on a local copy."""
        parent = self.node(parent_inode)
        path = self._child_path(parent, name)
        node = self.table.by_path(path)
        if node is not None and node.kind == "dir":
            raise IsADirectory(path)
        if node is not None and node.open_count > 0 and node.kind == "file":
            await self._ensure_staged(node, truncate=False)

        async def check() -> None:
            kind = await self._kind_at(path)
            if kind is None and (node is None or not node.authoritative):
                raise NotFound(path)
            if kind == "dir":
                raise IsADirectory(path)

        try:
            await self._change("delete", path, self.backend.delete, path, check=check)
        except NotFound:
            if node is None or not node.authoritative:
                raise
        await self.remote.record(path, None)
        if node is not None:
            node.attr.nlink = 0
            node.attr.ctime_ns = _now()
            self.table.detach(node)
            self._unschedule(node)
            if node.staged is not None and node.open_count == 0:
                staged, node.staged = node.staged, None
                await staged.close()
                self.table.maybe_drop(node)
        self._touch_dir(parent.path)

    async def rmdir(self, parent_inode: int, name: str) -> None:
        parent = self.node(parent_inode)
        path = self._child_path(parent, name)

        async def check() -> None:
            await self._require_empty_dir(path)

        if self._pending_children(path):
            raise NotEmpty(path)  # files not uploaded yet: the backend would not know
        if await self._change("rmdir", path, _applied, self.backend.rmdir, path, check=check):
            await self.remote.forget_tree(path)
        elif self.remote.cache is not None:  # journaled: keep the parent's cached listing (the offline view)
            await self.remote.in_cache(self.remote.cache.forget_tree, path)
        await self.remote.record(path, None)
        node = self.table.by_path(path)
        if node is not None:
            self.table.detach(node)
        self._touch_dir(parent.path)

    async def _kind_at(self, path: str) -> str | None:
        node = self.table.by_path(path)
        if node is not None and self._fresh(node):
            return node.kind
        try:
            return self._ingest(await self.remote.stat(path, allow_cached=False)).kind
        except NotFound:
            if node is not None and not node.authoritative:
                self.table.detach(node)
            return None

    async def rename(self, old_parent: int, old_name: str, new_parent: int, new_name: str, flags: int = 0) -> None:
        """Move a file or a whole directory, replacing the target as POSIX ``rename`` does."""
        if flags & RENAME_EXCHANGE or flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise InvalidArgument("RENAME_EXCHANGE is not supported")
        if not self.backend.capabilities.rename:
            raise NotSupported(f"{self.backend.type_name} cannot rename")
        pold, pnew = self.node(old_parent), self.node(new_parent)
        old, new = self._child_path(pold, old_name), self._child_path(pnew, new_name)
        if old == new:
            return
        src_kind = await self._kind_at(old)
        if src_kind is None:
            raise NotFound(old)
        if src_kind == "dir" and (new + "/").startswith(old + "/"):
            raise InvalidArgument("cannot move a directory into itself")
        dst_kind = await self._kind_at(new)
        if dst_kind is not None:
            if flags & RENAME_NOREPLACE:
                raise AlreadyExists(new)
            if src_kind == "dir" and dst_kind != "dir":
                raise NotADirectory(new)
            if src_kind != "dir" and dst_kind == "dir":
                raise IsADirectory(new)
            if dst_kind == "dir" and self._pending_children(new):
                raise NotEmpty(new)  # holds files not uploaded yet
            if dst_kind == "dir" and not self._direct():
                await self._require_empty_dir(new)  # the backend would refuse a non-empty one
            victim = self.table.by_path(new)
            if victim is not None and victim.open_count > 0 and victim.kind == "file":
                await self._ensure_staged(victim, truncate=False)
        journaled = not await self._rename_on_backend(old, new)
        if journaled:
            await self._move_cached(old, new)
        else:
            await self.remote.forget_tree(old)
            await self.remote.forget_tree(new)
        victim = self.table.by_path(new)
        if victim is not None:
            self._unschedule(victim)
        self.table.move(old, new)
        for node in self.table.nodes():
            if node.staged is not None and (node.path == new or node.path.startswith(new + "/")):
                node.staged.base_version = None  # a server-side copy may have changed the etag
                if journaled and node.staged.recorded:
                    # Pending data now belongs under the new name, also after a crash.
                    await node.staged.write_record(self._record_of(node), durable=True)
        if journaled:
            await self._move_recovered(old, new)
            self._follow_cached_data(new)
        moved = self.table.by_path(new)
        if moved is not None and self._derived(new) and moved.staged is not None and not moved.staged.dirty:
            # Renamed onto a companion: the backend imported the content; the name shows the rendering now.
            staged, moved.staged = moved.staged, None
            await staged.close()
        if moved is not None:
            moved.attr.ctime_ns = _now()
            moved.refreshed = 0.0
        self._touch_dir(pold.path)
        self._touch_dir(pnew.path)

    async def _rename_on_backend(self, old: str, new: str) -> bool:
        """Rename on the backend (True), or journal the rename while it is away (False).

        Pending data under ``old`` is uploaded first, so the backend moves the
        latest content; if that cannot happen the rename is journaled instead
        and the pending data follows the new name.
        """
        if self._direct():
            try:
                for node in self.table.subtree(old):
                    await self._sync(node, defer=False)
            except OmniError as exc:
                if not is_unavailable(exc):
                    raise
                log.warning("rename %s: pending data could not be uploaded (%s); journaling the rename", old, exc)
                self.remote.mark_offline(exc)
        return bool(await self._change("rename", old, _applied, self.backend.rename, old, new, dst=new))

    async def _move_cached(self, old: str, new: str) -> None:
        """Apply a journaled rename to the cached view (listings and stats)."""
        try:
            info = await self.remote.stat(old)
        except OmniError:
            info = None
        cache = self.remote.cache
        if cache is not None:
            await self.remote.in_cache(cache.move_tree, old, new)
        await self.remote.record(old, None)
        if info is not None:
            await self.remote.record(new, replace(info, path=new))

    async def _move_recovered(self, old: str, new: str) -> None:
        """Re-key files recovered from an earlier run (not yet looked up) that a journaled rename moved."""
        for path in [p for p in self._recovered if p == old or p.startswith(old + "/")]:
            staged, record = self._recovered.pop(path)
            record = {**record, "path": new + path[len(old) :], "base_version": None}
            staged.base_version = None
            await staged.write_record(record, durable=True)
            self._recovered[record["path"]] = (staged, record)

    def _follow_cached_data(self, new: str) -> None:
        """After a journaled rename, nodes and handles below ``new`` read cached data under their new path."""

        def under(path: str) -> bool:
            return path == new or path.startswith(new + "/")

        for node in self.table.nodes():
            if node.info is not None and under(node.path):
                node.info = replace(node.info, path=node.path)
        for h in self._handles.values():
            if h.info is not None and under(h.node.path):
                h.info = replace(h.info, path=h.node.path)

    def _info_of(self, node: Node, change: SetAttrs) -> ObjectInfo:
        """``node``'s backend info with ``change`` applied (for a journaled attribute change)."""

        a = node.attr
        base = node.info or ObjectInfo(node.path, node.kind, a.size, a.mtime_ns)  # type: ignore[arg-type]
        return replace(
            base,
            path=node.path,
            mode=change.mode if change.mode is not None else a.mode & 0o7777,
            uid=change.uid if change.uid is not None else a.uid,
            gid=change.gid if change.gid is not None else a.gid,
            mtime_ns=change.mtime_ns if change.mtime_ns is not None else a.mtime_ns,
        )

    # --- files -------------------------------------------------------------------------
    async def create(self, parent_inode: int, name: str, mode: int, flags: int, ctx: Ctx) -> tuple[Handle, Node]:
        """Create an empty file and open it, at local speed (no backend call).

        The file exists here at once (listed from staging) and on the backend
        after its first upload, like any write (``write_back`` after close).
        If another client creates the same name meanwhile, both versions are
        kept (the upload finds the name taken: a conflict copy).
        """
        parent = self.node(parent_inode)
        path = self._child_path(parent, name)
        await self._require_absent(path, cached_ok=True)
        self._note_created(path, flags)
        return await self._create_pending(parent, path, mode & ~ctx.umask & 0o7777, flags, ctx)

    async def _create_pending(self, parent: Node, path: str, perms: int, flags: int, ctx: Ctx) -> tuple[Handle, Node]:
        """Create a file that exists only here until its first upload."""
        now = _now()
        info = ObjectInfo(path, "file", 0, now, mode=perms, uid=ctx.uid, gid=ctx.gid)
        attr = Attr.from_info(info, ctx.uid, ctx.gid)
        # Created with its record: a crash now still leaves the (empty) file pending.
        staged = await self.staging.create(_record(path, attr, ABSENT))
        staged.base_version = ABSENT  # the upload checks that nobody else created the name meanwhile
        staged.dirty = True
        node = self.table.ensure(info, attr, time.monotonic())
        node.info = None  # nothing on the backend yet: reads come from the staged copy
        node.partial = False
        node.staged = staged
        await self.remote.record(path, info)
        node.lookups += 1
        node.open_count += 1
        self._touch_dir(parent.path)
        return self._new_handle(node, flags), node

    async def mknod(self, parent_inode: int, name: str, mode: int, ctx: Ctx) -> Node:
        if not stat_mod.S_ISREG(mode):
            raise NotSupported("only regular files can be created with mknod")
        handle, node = await self.create(parent_inode, name, mode, os.O_WRONLY, ctx)
        await self.release(handle.fh)
        return node

    def _new_handle(self, node: Node, flags: int) -> Handle:
        h = Handle(next(self._fh), node, flags, node.info)
        self._handles[h.fh] = h
        return h

    async def open(self, inode: int, flags: int) -> tuple[Handle, bool]:
        """Open a file; returns the handle and whether the kernel may keep its page cache."""
        node = self.node(inode)
        if node.kind == "dir":
            raise IsADirectory(node.path)
        if node.kind == "symlink":
            raise OmniError("cannot open a symlink", errno=errno.ELOOP)
        # Counted before any await, so a concurrent release or unlink never drops the copy under us.
        node.open_count += 1
        try:
            await self._refresh(node)
            acc = flags & os.O_ACCMODE
            truncate = bool(flags & os.O_TRUNC) and acc != os.O_RDONLY
            if acc != os.O_RDONLY or truncate:
                await self._ensure_staged(node, truncate=truncate)
        except BaseException:
            node.open_count -= 1
            self.table.maybe_drop(node)
            raise
        key = (node.attr.etag, node.attr.size, node.attr.mtime_ns)
        keep_cache = node.kernel_cache_key == key and not truncate
        node.kernel_cache_key = key
        handle = self._new_handle(node, flags)
        if node.staged is None and node.info is not None:
            self.remote.protect(node.info.path)
            handle.protected = node.info
        return handle, keep_cache

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        h = self.handle(fh)
        node = h.node
        staged = node.staged
        if staged is not None:
            return await staged.pread(offset, size)
        info = h.info or node.info
        if info is None:
            info = (await self._refresh(node, force=True)).info
            if info is None:
                raise NotFound(node.path)
        if offset >= info.size:
            return b""
        data, h.info = await self._read_version(node, info, offset, size, served=h.served)
        h.served = True
        chunk = self.remote.chunk_size
        first = offset // chunk
        if first == h.next_chunk or first == h.next_chunk - 1 or offset == 0:
            self.remote.prefetch(h.info, (offset + len(data) - 1) // chunk + 1)
        h.next_chunk = (offset + len(data)) // chunk
        return data

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        node = self.handle(fh).node
        staged = node.staged or await self._ensure_staged(node, truncate=False)
        async with staged.lock:
            try:
                written = await staged.pwrite(offset, data)
            except OmniError:
                staged.mark_failed()
                raise
        if not staged.recorded:
            await self._dirtied(node, staged)
        now = _now()
        node.attr.size = staged.size
        node.attr.mtime_ns = node.attr.ctime_ns = now
        return written

    async def flush(self, fh: int) -> None:
        await self._write_back(self.handle(fh).node)

    async def fsync(self, fh: int) -> None:
        """Durable on local disk (queued for upload); on the backend with ``sync_upload``."""
        node = self.handle(fh).node
        if self.opts.sync_upload:
            await self._sync(node, defer=False)
        else:
            await self._write_back(node)

    async def release(self, fh: int) -> None:
        """Close a handle; the last close uploads pending data (deferred if the backend is offline)."""
        h = self._handles.pop(fh, None)
        if h is None:
            return
        node = h.node
        node.open_count -= 1
        if node.path in self._exclusive:
            self._exclusive[node.path] = time.monotonic()
        try:
            if h.protected is not None:
                await self.remote.unprotect(h.protected, also=h.info)
            await self._release_staged(node)
        finally:
            self.table.maybe_drop(node)

    # --- directories ---------------------------------------------------------------------
    async def opendir(self, inode: int) -> int:
        node = self.node(inode)
        if node.kind != "dir":
            raise NotADirectory(node.path)
        dh = DirHandle(next(self._fh), node)
        self._dirs[dh.fh] = dh
        return dh.fh

    async def readdir(self, fh: int, start: int, reply: Callable[[str, Node, int], bool]) -> None:
        """Feed entries from ``start`` to ``reply`` until it returns False.

        Offsets index a snapshot taken when the listing starts, so they stay
        stable while the directory changes.  Each accepted entry takes one
        kernel lookup reference (readdirplus).
        """
        dh = self._dirs.get(fh)
        if dh is None:
            raise OmniError(f"bad directory handle {fh}", errno=errno.EBADF)
        if start == 0 or dh.entries is None:
            if getattr(self.backend, "lists_derived", False):
                # Companions are rendered from what the backend has: closed files are uploaded first.
                for node in self._queued_in(dh.node.path):
                    if node.open_count == 0:
                        await self._settle(node)
            entries = await self.remote.list(dh.node.path)
            listed = {info.path for info in entries}
            # Files whose first upload is still pending are not on the backend yet.
            extra = [i for i in self._pending_children(dh.node.path) if i.path not in listed]
            dh.entries = sorted(entries + extra, key=lambda i: i.name) if extra else entries
        for index in range(start, len(dh.entries)):
            info = dh.entries[index]
            if self._companion_deferred(info.path):
                continue
            node = self._ingest(info)
            if not reply(info.name, node, index + 1):
                self.table.maybe_drop(node)
                break
            node.lookups += 1

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def statfs(self) -> StatFs:
        st = None
        if self.backend.capabilities.statfs and self.remote.health.online:
            try:
                st = await self.remote.guarded(self.backend.statfs, timeout=self.remote.settings.timeout)
            except OmniError as exc:
                if not is_unavailable(exc):
                    raise
        if st is None:
            big = 1 << 40
            st = StatFs(4096, big // 4096, big // 4096, big // 4096, 1 << 32, 1 << 32)
        return st

    # --- extended attributes ---------------------------------------------------------------
    def _check_xattr(self, name: str) -> None:
        if not self.backend.capabilities.xattrs:
            raise NotSupported(f"{self.backend.type_name} has no extended attributes")
        if not name.startswith(XATTR_NAMESPACE) or len(name) == len(XATTR_NAMESPACE):
            raise NotSupported(f"only {XATTR_NAMESPACE}* attributes are supported")

    async def getxattr(self, inode: int, name: str) -> bytes:
        if name == PENDING_XATTR:
            return str(self.pending_uploads()).encode()
        if name == PIN_XATTR:
            node = self.node(inode)
            cache = self.remote.cache
            pinned = cache is not None and await self.remote.in_cache(cache.is_pinned, node.path)
            return b"1" if pinned else b"0"
        if not name.startswith(XATTR_NAMESPACE) or not self.backend.capabilities.xattrs:
            raise NoSuchAttribute(name)  # security.capability etc.: answered without I/O
        node = self.node(inode)
        await self._settle(node)  # system fields (size, etag) must describe the data just written
        get_one = getattr(self.backend, "get_xattr", None)  # metafiles.py: user.omnifs.<field>, also unlisted ones
        if get_one is not None:
            return await self.remote.guarded(get_one, node.path, name, timeout=self.remote.settings.timeout)
        values = await self.remote.guarded(self.backend.get_xattrs, node.path, timeout=self.remote.settings.timeout)
        try:
            return values[name]
        except KeyError:
            raise NoSuchAttribute(name) from None

    async def listxattr(self, inode: int) -> list[str]:
        if not self.backend.capabilities.xattrs:
            return []
        node = self.node(inode)
        await self._settle(node)
        return sorted(
            await self.remote.guarded(self.backend.get_xattrs, node.path, timeout=self.remote.settings.timeout)
        )

    async def setxattr(self, inode: int, name: str, value: bytes) -> None:
        if name == FLUSH_XATTR:
            await self.retry_deferred()
            return
        if name == PIN_XATTR:
            value = value.strip()
            if value == b"prefetch":  # fetch into the pinned store; the caller pins a parent afterwards
                node = self.node(inode)
                await self._settle_tree(node.path)
                await self._pin_tree(node.path, node.kind)
                return
            await self._set_pin(self.node(inode), value not in (b"", b"0"))
            return
        self._check_xattr(name)
        node = self.node(inode)
        await self._settle(node)
        await self._change(
            "set_xattr", node.path, self.backend.set_xattr, node.path, name, value, name=name, value=value
        )
        node.attr.ctime_ns = _now()

    async def removexattr(self, inode: int, name: str) -> None:
        if name == PIN_XATTR:
            await self._set_pin(self.node(inode), False)
            return
        self._check_xattr(name)
        node = self.node(inode)
        await self._settle(node)
        await self._change("set_xattr", node.path, self.backend.set_xattr, node.path, name, None, name=name)
        node.attr.ctime_ns = _now()

    # --- pinning ---------------------------------------------------------------------------------
    async def _set_pin(self, node: Node, pinned: bool) -> None:
        """Pin (fetch every chunk into the never-evicted store) or unpin a file or tree."""
        cache = self.remote.cache
        if cache is None:
            raise NotSupported("pinning needs the disk cache")
        if not pinned:
            await self.remote.in_cache(cache.unpin, node.path)
            return
        await self._settle_tree(node.path)  # files not uploaded yet are pinned as uploaded
        await self._pin_tree(node.path, node.kind)
        await self.remote.in_cache(cache.pin, node.path)

    async def _settle(self, node: Node) -> None:
        """Upload pending data of ``node`` now (deferred if the backend is away), so the backend knows it."""
        staged = node.staged
        if staged is not None and staged.dirty and not staged.broken and not node.unlinked:
            await self._sync(node)

    async def _settle_tree(self, path: str) -> None:
        for node in self.table.nodes():
            if node.path == path or node.path.startswith(path + "/") or not path:
                await self._settle(node)

    async def _pin_tree(self, path: str, kind: str) -> None:
        if kind == "dir":
            for info in await self.remote.list(path, allow_cached=False):
                await self._pin_tree(info.path, info.kind)
            return
        if kind != "file":
            return
        cache = self.remote.cache
        assert cache is not None
        info = await self.remote.stat(path, allow_cached=False)
        version = version_key(info)
        chunk = self.remote.chunk_size
        for index in range((info.size + chunk - 1) // chunk):
            data = await self.remote.in_cache(cache.get_chunk, path, version, index)
            if data is None:
                data = (await self.remote.guarded(self.backend.read_versioned, path, index * chunk, chunk))[0]
            await self.remote.in_cache(cache.put_chunk, path, version, index, data, True)

    # --- background work ---------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the background tasks (probe, read-ahead, polling, upload retries) until cancelled."""
        async with trio.open_nursery() as nursery:
            self.remote.set_online_gate(self._replay_journal)
            if self.journal.pending and self.remote.health.online:
                # Nothing is served from the backend before these changes reach it.
                self.remote.mark_offline(f"{len(self.journal)} journaled change(s) to replay first")
            await nursery.start(self.remote.run)
            self.remote.on_online(self.retry_deferred)
            if self.journal.pending:
                self.remote.probe_soon()
            nursery.start_soon(self._upload_loop)
            if self.opts.poll_interval > 0:
                nursery.start_soon(self._poll_loop)
            task_status.started()

    async def _upload_loop(self) -> None:
        """Upload queued files when due, a few at a time; failures back off exponentially."""
        limiter = trio.CapacityLimiter(4)

        async def one(node: Node) -> None:
            async with limiter:
                await self._upload_due(node)

        while True:
            now = time.monotonic()
            if self.remote.health.online:
                if self._recovered:
                    await self._upload_recovered()
                due = [n for n, t in self._due.items() if t <= now]
                if due:
                    async with trio.open_nursery() as nursery:
                        for node in due:
                            nursery.start_soon(one, node)
                    continue
            wait = min(self._due.values(), default=now + self.opts.retry_interval) - now
            self._wakeup = trio.Event()
            with trio.move_on_after(max(0.05, min(wait, self.opts.retry_interval))):
                await self._wakeup.wait()

    async def _upload_due(self, node: Node) -> None:
        staged = node.staged
        if staged is None or not staged.dirty or node.unlinked or staged.broken:
            self._unschedule(node)
            if not node.unlinked:
                await self._drop_clean_copy(node)  # uploaded elsewhere (a recovered copy): nothing left to keep
            return
        try:
            await self._sync(node)
        except OmniError as exc:
            log.error("upload of %s failed (%s); will retry", node.path, exc)
            self._schedule(node, self._backoff(node))
            return
        await self._drop_clean_copy(node)

    async def _drop_clean_copy(self, node: Node) -> None:
        """Close ``node``'s staged copy once it is uploaded and no handle uses it."""
        staged = node.staged
        if staged is not None and not staged.dirty:
            self._unschedule(node)
            if node.open_count == 0:
                node.staged = None
                await staged.close()
                self.table.maybe_drop(node)

    async def retry_deferred(self) -> None:
        """Make every queued upload due now (called when the backend comes back)."""
        for node in self._due:
            self._due[node] = 0.0
        self._wakeup.set()

    async def _upload_recovered(self) -> None:
        """Upload files recovered from an earlier run that no lookup has adopted yet."""
        for path in list(self._recovered):
            if self.table.by_path(path) is None and not await self._upload_recovered_path(path):
                return

    async def _upload_recovered_path(self, path: str) -> bool:
        """Upload the recovered copy of ``path`` (if still pending); False when the backend is unavailable."""
        entry = self._recovered.get(path)
        if entry is None:
            return True
        staged, record = entry
        attrs = SetAttrs(
            mode=record.get("mode"), uid=record.get("uid"), gid=record.get("gid"), mtime_ns=record.get("mtime_ns")
        )
        # The lock holds off writers of a node that adopts this copy meanwhile (a lookup).
        async with staged.lock:
            if not staged.dirty:
                return True  # uploaded by the node that adopted it
            try:
                target = path
                if await self._changed_elsewhere(path, staged.base_version) is not None:
                    target = conflict_name(path)
                    log.warning("conflict: %s was changed elsewhere; uploading ours as %s", path, target)
                    self.conflicts.append({"path": path, "copy": target, "time": time.time()})
                info = await self.remote.guarded(staged.upload, self.backend, target, attrs)
            except OmniError as exc:
                log.info("recovered upload of %s still pending: %s", path, exc)
                return not is_unavailable(exc)
            await self.remote.record(target, info)  # before it stops being listed from staging
            await staged.uploaded()
        log.warning("uploaded %s, recovered from an earlier run", path)
        if self._recovered.get(path, (None,))[0] is staged:
            del self._recovered[path]
            await staged.close()
        # else: adopted by a node meanwhile, which drops the clean copy (_upload_due)
        return True

    async def _poll_loop(self) -> None:
        while True:
            await trio.sleep(self.opts.poll_interval)
            if self.remote.health.online:
                await self.poll_once()

    async def poll_once(self) -> None:
        """Re-list directories the kernel knows; tell the kernel about what changed elsewhere."""
        dirs = [n for n in self.table.nodes() if n.kind == "dir" and not n.unlinked and (n.lookups > 0)]
        for node in dirs:
            old = await self.remote.cached_listing(node.path)
            try:
                infos = await self.remote.list(node.path, allow_cached=False)
            except OmniError as exc:
                if is_unavailable(exc):
                    return
                continue
            new = {i.name: i for i in infos}
            for info in infos:
                child = self.table.by_path(info.path)
                if child is not None and not child.authoritative:
                    self._ingest(info)  # a changed file is replaced by a new inode
            for name in set(old or {}) - set(new):
                child = self.table.by_path(join(node.path, name))
                if child is not None and child.authoritative:
                    continue
                self.kernel.invalidate_entry(node.inode, name)
                if child is not None:
                    self.table.detach(child)

    # --- lifetime ------------------------------------------------------------------------------
    async def drain(self) -> list[str]:
        """Replay the journal and upload every pending file now; return what is still pending.

        What is left stays on disk (journal and staging) and resumes at the next mount.
        """
        pending = []
        if not self.remote.health.online or self.journal.pending:
            await self.remote.reconnect()
        for node in self.table.nodes():
            staged = node.staged
            if staged is None or not staged.dirty or node.unlinked or staged.broken:
                continue
            try:
                await self._sync(node, defer=False)
            except Exception as exc:
                log.error("could not upload %s (%s); its data stays in %s", node.path, exc, staged.path)
                try:
                    await staged.write_record(self._record_of(node), durable=True)
                except OmniError:
                    log.exception("could not record pending data of %s", node.path)
                pending.append(node.path)
        if self.remote.health.online:
            await self._upload_recovered()
        pending.extend(self._recovered)
        if self.journal.pending:
            pending.append(f"({len(self.journal)} journaled change(s))")
        return sorted(set(pending))

    def pending_uploads(self) -> int:
        return len(self._due) + len(self._recovered) + len(self.journal)

    def queue_stats(self) -> dict[str, Any]:
        """Upload queue figures for ``omnifs status``."""
        now = time.monotonic()
        staged = [n.staged for n in self._due if n.staged is not None] + [s for s, _ in self._recovered.values()]
        return {
            "pending": self.pending_uploads(),
            "pending_bytes": sum(s.size for s in staged),
            "oldest_age_s": round(max((now - t for t in self._queued_at.values()), default=0.0), 1),
            "retrying": len(self._failures),
            "journaled": len(self.journal),
            "journal_refused": self.journal.failures[-20:],
            "conflicts": self.conflicts[-20:],
        }
