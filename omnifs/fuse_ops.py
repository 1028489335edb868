"""The pyfuse3 adapter: kernel requests in, VFS calls, errno out.

This is the only place that knows about pyfuse3 types.  Every handler goes
through :func:`_fuse_errors`, the one translation boundary: domain errors and
``OSError`` become their errno, anything unexpected becomes EIO with a logged
traceback.  No exception other than ``FUSEError`` can reach pyfuse3, so no
request can kill the mount.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from omnifs.errors import OmniError, errno_for
from omnifs.inodes import Node
from omnifs.vfs import VFS, Ctx

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# Errors that are a normal answer, not a problem worth a warning.
_QUIET = {
    errno.ENOENT,
    errno.EEXIST,
    errno.ENOTEMPTY,
    errno.ENODATA,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EACCES,
    errno.EPERM,
    errno.ENAMETOOLONG,
    errno.ENOTSUP,
    errno.EINVAL,
    errno.ELOOP,
}


def _fuse_errors(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            code = errno_for(exc)
            if not isinstance(exc, (OmniError, OSError)):
                log.error("%s failed unexpectedly: %r", fn.__name__, exc, exc_info=True)
            elif code not in _QUIET:
                log.warning("%s failed: %s (%s)", fn.__name__, exc, errno.errorcode.get(code, code))
            else:
                log.debug("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(code) from None

    return wrapper  # type: ignore[return-value]


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


def _ctx(ctx: pyfuse3.RequestContext) -> Ctx:
    return Ctx(uid=ctx.uid, gid=ctx.gid, umask=ctx.umask)


class FuseOperations(pyfuse3.Operations):
    """pyfuse3 operations delegating to a :class:`VFS`."""

    supports_dot_lookup = True

    def __init__(
        self,
        vfs: VFS,
        *,
        entry_timeout: float = 1.0,
        attr_timeout: float = 1.0,
        writeback_cache: bool = True,
    ) -> None:
        super().__init__()
        self.vfs = vfs
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.enable_writeback_cache = writeback_cache

    def entry(self, node: Node) -> pyfuse3.EntryAttributes:
        a = node.attr
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.inode
        e.generation = 0
        e.entry_timeout = self.entry_timeout
        e.attr_timeout = 0 if node.partial or self._derived(node.path) else self.attr_timeout
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = 0
        e.st_size = a.size
        e.st_blksize = 65536
        e.st_blocks = (a.size + 511) // 512
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e

    def _derived(self, path: str) -> bool:
        """Content rendered from another file (a companion .meta.json): never served from the page cache."""
        is_companion = getattr(self.vfs.backend, "is_companion", None)
        return bool(is_companion is not None and is_companion(path))

    @_fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.entry(await self.vfs.lookup(parent_inode, _name(name)))

    async def forget(self, inode_list: Any) -> None:
        for inode, count in inode_list:
            self.vfs.forget(inode, count)

    @_fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.entry(await self.vfs.getattr(inode))

    @_fuse_errors
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        node = await self.vfs.setattr(
            inode,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self.entry(node)

    @_fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(await self.vfs.readlink(inode))

    @_fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self.entry(await self.vfs.mknod(parent_inode, _name(name), mode, _ctx(ctx)))

    @_fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self.entry(await self.vfs.mkdir(parent_inode, _name(name), mode, _ctx(ctx)))

    @_fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.vfs.unlink(parent_inode, _name(name))

    @_fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.vfs.rmdir(parent_inode, _name(name))

    @_fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self.entry(await self.vfs.symlink(parent_inode, _name(name), os.fsdecode(target), _ctx(ctx)))

    @_fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self.vfs.rename(parent_inode_old, _name(name_old), parent_inode_new, _name(name_new), flags)

    @_fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)  # hard links are not supported

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        handle, keep_cache = await self.vfs.open(inode, flags)
        direct = bool(flags & os.O_DIRECT) or self._derived(handle.node.path)
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=keep_cache and not direct, direct_io=direct)

    @_fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        handle, node = await self.vfs.create(parent_inode, _name(name), mode, flags, _ctx(ctx))
        direct = bool(flags & os.O_DIRECT) or self._derived(node.path)
        info = pyfuse3.FileInfo(fh=handle.fh, keep_cache=not direct, direct_io=direct)
        return info, self.entry(node)

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.vfs.read(fh, off, size)

    @_fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.vfs.write(fh, off, buf)

    @_fuse_errors
    async def flush(self, fh: int) -> None:
        await self.vfs.flush(fh)

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.vfs.fsync(fh)

    @_fuse_errors
    async def release(self, fh: int) -> None:
        await self.vfs.release(fh)

    @_fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return await self.vfs.opendir(inode)

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        def reply(name: str, node: Node, next_id: int) -> bool:
            return pyfuse3.readdir_reply(token, os.fsencode(name), self.entry(node), next_id)

        await self.vfs.readdir(fh, start_id, reply)

    @_fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.vfs.releasedir(fh)

    @_fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = await self.vfs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.block_size
        out.f_frsize = st.block_size
        out.f_blocks = st.blocks
        out.f_bfree = st.blocks_free
        out.f_bavail = st.blocks_avail
        out.f_files = st.files
        out.f_ffree = st.files_free
        out.f_favail = st.files_free
        out.f_namemax = 255
        return out

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.vfs.getxattr(inode, _name(name))

    @_fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.vfs.setxattr(inode, _name(name), value)

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in await self.vfs.listxattr(inode)]

    @_fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.vfs.removexattr(inode, _name(name))


class PyfuseNotifier:
    """Kernel cache invalidation through pyfuse3 (safe to call from request handlers)."""

    async def invalidate_inode(self, inode: int) -> None:
        """Drop the kernel's cached attributes and data of ``inode`` (unknown inodes are ignored)."""
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False)
        except OSError as exc:
            log.debug("invalidate_inode(%d): %s", inode, exc)

    def invalidate_entry(self, parent_inode: int, name: str) -> None:
        """Ask the kernel to forget ``name`` in a directory (asynchronously, never blocking)."""
        try:
            pyfuse3.invalidate_entry_async(parent_inode, os.fsencode(name))
        except OSError as exc:
            log.debug("invalidate_entry(%d, %s): %s", parent_inode, name, exc)
