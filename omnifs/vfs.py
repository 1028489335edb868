"""POSIX semantics over a backend: the filesystem logic, testable without a kernel.

The VFS speaks in inodes, names (``str``) and domain errors; ``fuse_ops`` is the
thin adapter that turns kernel requests into these calls and errors into errno.
Everything here runs on the trio thread; blocking work happens inside the
backend and the staging area, in worker threads.

Data path: a file opened for writing gets a *staged* local copy holding its
whole content (streamed from the backend unless truncated).  Reads of a staged
file come from the copy; writes land in it.  ``flush``/``fsync``/``release``
upload the copy with the file's attributes in one atomic backend write.  Files
not open for writing are read straight from the backend by range.
"""

from __future__ import annotations

import errno
import io
import itertools
import logging
import os
import stat as stat_mod
import time
from collections.abc import Callable
from dataclasses import dataclass

from omnifs.backends.base import NAME_MAX, Backend, ObjectInfo, SetAttrs, StatFs, join, parent_of
from omnifs.errors import (
    AlreadyExists,
    InvalidArgument,
    InvalidPath,
    IsADirectory,
    NameTooLong,
    NoSuchAttribute,
    NotADirectory,
    NotFound,
    NotSupported,
    OmniError,
)
from omnifs.inodes import Attr, InodeTable, Node
from omnifs.staging import StagedFile, StagingArea

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_NAMESPACE = "user."


@dataclass(frozen=True, slots=True)
class Ctx:
    """Who is asking: the caller's uid, gid and umask."""

    uid: int
    gid: int
    umask: int = 0o022


@dataclass(frozen=True, slots=True)
class VfsOptions:
    attr_ttl: float = 1.0  # seconds backend attributes are trusted before re-reading
    uid: int = os.getuid()  # owner shown when the backend stores none
    gid: int = os.getgid()


@dataclass(eq=False, slots=True)
class Handle:
    fh: int
    node: Node
    flags: int


@dataclass(eq=False, slots=True)
class DirHandle:
    fh: int
    node: Node
    entries: list[ObjectInfo] | None = None


def _now() -> int:
    return time.time_ns()


class VFS:
    """The filesystem: an inode table, open handles and the staged-data path."""

    def __init__(self, backend: Backend, staging: StagingArea, options: VfsOptions | None = None) -> None:
        self.backend = backend
        self.staging = staging
        self.opts = options or VfsOptions()
        now = _now()
        root_attr = Attr(stat_mod.S_IFDIR | 0o755, self.opts.uid, self.opts.gid, 0, now, now, now, nlink=2)
        self.table = InodeTable(root_attr)
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._fh = itertools.count(1)

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

    def _ingest(self, info: ObjectInfo) -> Node:
        """Record backend info in the table; keep known mode/owner when info lacks them."""
        existing = self.table.by_path(info.path)
        attr = Attr.from_info(info, self.opts.uid, self.opts.gid)
        partial = info.mode is None and info.kind != "symlink"
        if partial and existing is not None and existing.kind == info.kind and not existing.partial:
            attr.mode, attr.uid, attr.gid = existing.attr.mode, existing.attr.uid, existing.attr.gid
            partial = False
        node = self.table.ensure(info, attr, time.monotonic())
        if not node.authoritative:
            node.partial = partial
        return node

    def _fresh(self, node: Node) -> bool:
        return (
            node.authoritative
            or node.unlinked
            or node.inode == 1
            or (not node.partial and time.monotonic() - node.refreshed < self.opts.attr_ttl)
        )

    async def _refresh(self, node: Node) -> Node:
        """Re-read ``node`` from the backend unless its attributes are fresh or local."""
        if self._fresh(node):
            return node
        try:
            info = await self.backend.stat(node.path)
        except NotFound:
            self.table.detach(node)
            raise
        fresh = self._ingest(info)
        if fresh is not node:
            raise NotFound(f"{node.path} was replaced on the backend")
        return node

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

    async def _ensure_staged(self, node: Node, *, truncate: bool) -> StagedFile:
        """Give ``node`` a staged local copy (streamed from the backend unless truncating)."""
        async with node.stage_lock:
            staged = node.staged
            if staged is None:
                staged = await self.staging.create()
                try:
                    if not truncate and node.attr.size > 0:
                        await staged.fill_from(self.backend, node.path, node.attr.size)
                except BaseException:
                    await staged.close()
                    raise
                node.staged = staged
            if truncate and staged.size:
                async with staged.lock:
                    await staged.truncate(0)
            if truncate:
                staged.dirty = True
                now = _now()
                node.attr.size = 0
                node.attr.mtime_ns = node.attr.ctime_ns = now
            return staged

    async def _sync(self, node: Node) -> None:
        """Upload dirty staged data of ``node``; a no-op when clean or unlinked."""
        staged = node.staged
        if staged is None or not staged.dirty or node.unlinked:
            return
        async with staged.lock:
            if not staged.dirty or node.unlinked:
                return
            info = await staged.upload(self.backend, node.path, self._upload_attrs(node))
        node.attr.etag = info.etag
        node.refreshed = time.monotonic()
        node.kernel_cache_key = (info.etag, node.attr.size, node.attr.mtime_ns)

    async def _release_staged(self, node: Node) -> None:
        """Upload and drop the staged copy once no handle needs it (kept if upload fails)."""
        if node.staged is None or node.open_count > 0:
            return
        await self._sync(node)
        staged, node.staged = node.staged, None
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
            node = self.table.by_path(path)
            if node is None or not self._fresh(node):
                try:
                    info = await self.backend.stat(path)
                except NotFound:
                    if node is not None:
                        self.table.detach(node)
                    raise
                node = self._ingest(info)
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
            if not node.authoritative and self.backend.capabilities.posix_attrs:
                info = await self.backend.set_attrs(node.path, change)
                node.attr.etag = info.etag
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
        info = await self.backend.mkdir(path, SetAttrs(mode=perms, uid=ctx.uid, gid=ctx.gid))
        node = self._ingest(info)
        node.lookups += 1
        self._touch_dir(parent.path)
        return node

    async def symlink(self, parent_inode: int, name: str, target: str, ctx: Ctx) -> Node:
        parent = self.node(parent_inode)
        path = self._child_path(parent, name)
        if not self.backend.capabilities.symlinks:
            raise NotSupported(f"{self.backend.type_name} has no symlinks")
        info = await self.backend.symlink(path, target, SetAttrs(uid=ctx.uid, gid=ctx.gid))
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
        await self.backend.delete(path)
        if node is not None:
            node.attr.nlink = 0
            node.attr.ctime_ns = _now()
            self.table.detach(node)
        self._touch_dir(parent.path)

    async def rmdir(self, parent_inode: int, name: str) -> None:
        parent = self.node(parent_inode)
        path = self._child_path(parent, name)
        await self.backend.rmdir(path)
        node = self.table.by_path(path)
        if node is not None:
            self.table.detach(node)
        self._touch_dir(parent.path)

    async def _kind_at(self, path: str) -> str | None:
        node = self.table.by_path(path)
        if node is not None and self._fresh(node):
            return node.kind
        try:
            return self._ingest(await self.backend.stat(path)).kind
        except NotFound:
            if node is not None:
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
            victim = self.table.by_path(new)
            if victim is not None and victim.open_count > 0 and victim.kind == "file":
                await self._ensure_staged(victim, truncate=False)
        # Pending data must reach the backend under the old name before it moves.
        for node in self.table.nodes():
            if node.path == old or node.path.startswith(old + "/"):
                await self._sync(node)
        await self.backend.rename(old, new)
        self.table.move(old, new)
        moved = self.table.by_path(new)
        if moved is not None:
            moved.attr.ctime_ns = _now()
        self._touch_dir(pold.path)
        self._touch_dir(pnew.path)

    # --- files -------------------------------------------------------------------------
    async def create(self, parent_inode: int, name: str, mode: int, flags: int, ctx: Ctx) -> tuple[Handle, Node]:
        """Create an empty file and open it; the file exists on the backend at once."""
        parent = self.node(parent_inode)
        path = self._child_path(parent, name)
        perms = mode & ~ctx.umask & 0o7777
        info = await self.backend.write(path, io.BytesIO(b""), SetAttrs(mode=perms, uid=ctx.uid, gid=ctx.gid))
        node = self._ingest(info)
        if node.attr.mode & 0o7777 != perms or node.attr.uid != ctx.uid or node.attr.gid != ctx.gid:
            # The backend keeps no POSIX attributes: show what the caller asked for.
            node.attr.mode = stat_mod.S_IFREG | perms
            node.attr.uid, node.attr.gid = ctx.uid, ctx.gid
        node.partial = False
        staged = await self._ensure_staged(node, truncate=True)
        staged.dirty = False
        node.lookups += 1
        node.open_count += 1
        node.kernel_cache_key = (info.etag, 0, node.attr.mtime_ns)
        self._touch_dir(parent.path)
        return self._new_handle(node, flags), node

    async def mknod(self, parent_inode: int, name: str, mode: int, ctx: Ctx) -> Node:
        if not stat_mod.S_ISREG(mode):
            raise NotSupported("only regular files can be created with mknod")
        handle, node = await self.create(parent_inode, name, mode, os.O_WRONLY, ctx)
        await self.release(handle.fh)
        return node

    def _new_handle(self, node: Node, flags: int) -> Handle:
        h = Handle(next(self._fh), node, flags)
        self._handles[h.fh] = h
        return h

    async def open(self, inode: int, flags: int) -> tuple[Handle, bool]:
        """Open a file; returns the handle and whether the kernel may keep its page cache."""
        node = self.node(inode)
        if node.kind == "dir":
            raise IsADirectory(node.path)
        if node.kind == "symlink":
            raise OmniError("cannot open a symlink", errno=errno.ELOOP)
        await self._refresh(node)
        acc = flags & os.O_ACCMODE
        truncate = bool(flags & os.O_TRUNC) and acc != os.O_RDONLY
        if acc != os.O_RDONLY or truncate:
            await self._ensure_staged(node, truncate=truncate)
        node.open_count += 1
        key = (node.attr.etag, node.attr.size, node.attr.mtime_ns)
        keep_cache = node.kernel_cache_key == key and not truncate
        node.kernel_cache_key = key
        return self._new_handle(node, flags), keep_cache

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        node = self.handle(fh).node
        staged = node.staged
        if staged is not None:
            return await staged.pread(offset, size)
        if offset >= node.attr.size:
            return b""
        return await self.backend.read(node.path, offset, size)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        node = self.handle(fh).node
        staged = node.staged or await self._ensure_staged(node, truncate=False)
        async with staged.lock:
            written = await staged.pwrite(offset, data)
        now = _now()
        node.attr.size = staged.size
        node.attr.mtime_ns = node.attr.ctime_ns = now
        return written

    async def flush(self, fh: int) -> None:
        await self._sync(self.handle(fh).node)

    async def fsync(self, fh: int) -> None:
        await self._sync(self.handle(fh).node)

    async def release(self, fh: int) -> None:
        """Close a handle; the last close uploads pending data (kept locally if that fails)."""
        h = self._handles.pop(fh, None)
        if h is None:
            return
        node = h.node
        node.open_count -= 1
        try:
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
            dh.entries = await self.backend.list(dh.node.path)
        for index in range(start, len(dh.entries)):
            info = dh.entries[index]
            node = self._ingest(info)
            if not reply(info.name, node, index + 1):
                self.table.maybe_drop(node)
                break
            node.lookups += 1

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def statfs(self) -> StatFs:
        st = await self.backend.statfs() if self.backend.capabilities.statfs else None
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
        if not name.startswith(XATTR_NAMESPACE) or not self.backend.capabilities.xattrs:
            raise NoSuchAttribute(name)  # security.capability etc.: answered without I/O
        node = self.node(inode)
        values = await self.backend.get_xattrs(node.path)
        try:
            return values[name]
        except KeyError:
            raise NoSuchAttribute(name) from None

    async def listxattr(self, inode: int) -> list[str]:
        if not self.backend.capabilities.xattrs:
            return []
        node = self.node(inode)
        return sorted(await self.backend.get_xattrs(node.path))

    async def setxattr(self, inode: int, name: str, value: bytes) -> None:
        self._check_xattr(name)
        node = self.node(inode)
        await self.backend.set_xattr(node.path, name, value)
        node.attr.ctime_ns = _now()

    async def removexattr(self, inode: int, name: str) -> None:
        self._check_xattr(name)
        node = self.node(inode)
        await self.backend.set_xattr(node.path, name, None)
        node.attr.ctime_ns = _now()

    # --- lifetime ------------------------------------------------------------------------------
    async def drain(self) -> list[str]:
        """Upload every dirty staged file; return the paths that could not be uploaded."""
        failed = []
        for node in self.table.nodes():
            try:
                await self._sync(node)
            except Exception:
                log.exception("could not upload %s; its data stays in %s", node.path, node.staged and node.staged.path)
                failed.append(node.path)
        return failed
