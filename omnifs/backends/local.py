"""A backend over a local directory.

Writes land in a hidden temp file beside the target, are fsynced and renamed
into place, and the directory is fsynced, so a crash leaves either the old or
the new content.  No path can escape the root: components are validated by
``check_path``, the parent directory must resolve inside the root, and the
final component is never followed when it is a symlink.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat as stat_mod
import uuid
from collections.abc import Iterator
from typing import BinaryIO

from omnifs.backends.base import Backend, Capabilities, ObjectInfo, Option, SetAttrs, StatFs, check_path, join
from omnifs.errors import (
    InvalidPath,
    IsADirectory,
    NoSuchAttribute,
    NotSupported,
    OmniError,
    from_oserror,
)

TEMP_PREFIX = ".omnifs-tmp."
_CHUNK = 1 << 20


@contextlib.contextmanager
def _translated(path: str) -> Iterator[None]:
    try:
        yield
    except OmniError:
        raise
    except OSError as exc:
        raise from_oserror(exc, path) from exc


def _etag(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


def _info_from_stat(path: str, st: os.stat_result, target: str | None = None) -> ObjectInfo:
    if stat_mod.S_ISDIR(st.st_mode):
        kind = "dir"
    elif stat_mod.S_ISLNK(st.st_mode):
        kind = "symlink"
    else:
        kind = "file"
    return ObjectInfo(
        path=path,
        kind=kind,  # type: ignore[arg-type]
        size=st.st_size if kind != "dir" else 0,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        atime_ns=st.st_atime_ns,
        mode=stat_mod.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        nlink=st.st_nlink,
        etag=_etag(st),
        target=target,
    )


class LocalBackend(Backend):
    """Objects are files in a directory tree on this machine."""

    type_name = "local"
    options = {"path": Option(str, required=True, help="absolute path of the directory to serve")}
    capabilities = Capabilities()

    def __init__(self, name: str, path: str, *, max_threads: int = 16) -> None:
        super().__init__(name, max_threads=max_threads)
        if not os.path.isabs(path):
            raise InvalidPath(f"local path must be absolute: {path!r}")
        self.root = os.path.realpath(path)

    def describe(self) -> str:
        return f"local:{self.root}"

    def _full(self, path: str) -> str:
        """Map a backend path to an absolute local path that stays under the root."""
        path = check_path(path)
        if not path:
            return self.root
        full = os.path.join(self.root, path)
        parent = os.path.realpath(os.path.dirname(full))
        if parent != self.root and not parent.startswith(self.root + os.sep):
            raise InvalidPath(f"path escapes the backend root: {path!r}")
        return full

    def _full_dir(self, path: str) -> str:
        """Like ``_full`` for a path that is traversed as a directory (itself resolved)."""
        full = self._full(path)
        real = os.path.realpath(full)
        if real != self.root and not real.startswith(self.root + os.sep):
            raise InvalidPath(f"path escapes the backend root: {path!r}")
        return full

    # --- sync implementations (run in threads) --------------------------------
    def _stat(self, path: str) -> ObjectInfo:
        full = self._full(path)
        with _translated(path):
            st = os.lstat(full)
            target = os.readlink(full) if stat_mod.S_ISLNK(st.st_mode) else None
        return _info_from_stat(path, st, target)

    def _list(self, path: str) -> list[ObjectInfo]:
        full = self._full_dir(path)
        out = []
        with _translated(path):
            with os.scandir(full) as it:
                entries = list(it)
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX):
                continue
            child = join(path, os.fsdecode(entry.name))
            try:
                st = entry.stat(follow_symlinks=False)
                target = os.readlink(entry.path) if stat_mod.S_ISLNK(st.st_mode) else None
            except FileNotFoundError:
                continue  # removed while listing
            out.append(_info_from_stat(child, st, target))
        out.sort(key=lambda i: i.path)
        return out

    def _read(self, path: str, offset: int, size: int) -> bytes:
        full = self._full(path)
        with _translated(path):
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)

    def _read_versioned(self, path: str, offset: int, size: int) -> tuple[bytes, str]:
        full = self._full(path)
        with _translated(path):
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                data = os.pread(fd, size, offset)
                st = os.fstat(fd)
            finally:
                os.close(fd)
        return data, _etag(st)

    def _apply(self, full: str, attrs: SetAttrs | None, *, is_link: bool = False) -> None:
        if attrs is None:
            return
        if attrs.mode is not None and not is_link:
            os.chmod(full, attrs.mode & 0o7777)
        if attrs.uid is not None or attrs.gid is not None:
            uid = -1 if attrs.uid is None else attrs.uid
            gid = -1 if attrs.gid is None else attrs.gid
            st = os.lstat(full)
            if (uid, gid) != (st.st_uid, st.st_gid):
                os.lchown(full, uid, gid)
                if attrs.mode is not None and not is_link and attrs.mode & 0o6000:
                    os.chmod(full, attrs.mode & 0o7777)  # chown clears setuid/setgid
        if attrs.mtime_ns is not None or attrs.atime_ns is not None:
            st = os.lstat(full)
            atime = st.st_atime_ns if attrs.atime_ns is None else attrs.atime_ns
            mtime = st.st_mtime_ns if attrs.mtime_ns is None else attrs.mtime_ns
            os.utime(full, ns=(atime, mtime), follow_symlinks=False)

    def _fsync_dir(self, full_dir: str) -> None:
        fd = os.open(full_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write(self, path: str, src: BinaryIO, attrs: SetAttrs | None) -> ObjectInfo:
        full = self._full(path)
        if not path:
            raise IsADirectory("cannot write the root")
        tmp = os.path.join(os.path.dirname(full), f"{TEMP_PREFIX}{uuid.uuid4().hex}")
        with _translated(path):
            try:
                old = os.lstat(full)
            except FileNotFoundError:
                old = None
            if old is not None and stat_mod.S_ISDIR(old.st_mode):
                raise IsADirectory(path)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                with open(fd, "wb", closefd=False) as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                if old is not None and stat_mod.S_ISREG(old.st_mode):
                    self._copy_xattrs(full, fd)
                    os.fchmod(fd, stat_mod.S_IMODE(old.st_mode))
                    with contextlib.suppress(PermissionError):
                        os.fchown(fd, old.st_uid, old.st_gid)
                else:
                    os.fchmod(fd, 0o644)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            os.close(fd)
            try:
                self._apply(tmp, attrs)
                os.rename(tmp, full)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._fsync_dir(os.path.dirname(full))
            return _info_from_stat(path, os.lstat(full))

    @staticmethod
    def _copy_xattrs(src: str, dst_fd: int) -> None:
        try:
            names = os.listxattr(src, follow_symlinks=False)
        except OSError:
            return
        for name in names:
            if name.startswith("user."):
                with contextlib.suppress(OSError):
                    os.setxattr(dst_fd, name, os.getxattr(src, name, follow_symlinks=False))

    def _delete(self, path: str) -> None:
        full = self._full(path)
        with _translated(path):
            if stat_mod.S_ISDIR(os.lstat(full).st_mode):
                raise IsADirectory(path)
            os.unlink(full)

    def _mkdir(self, path: str, attrs: SetAttrs | None) -> ObjectInfo:
        full = self._full(path)
        with _translated(path):
            os.mkdir(full, 0o700)
            self._apply(full, attrs if attrs and attrs.mode is not None else SetAttrs(mode=0o755))
            if attrs is not None:
                self._apply(full, SetAttrs(uid=attrs.uid, gid=attrs.gid, mtime_ns=attrs.mtime_ns))
            return _info_from_stat(path, os.lstat(full))

    def _rmdir(self, path: str) -> None:
        full = self._full(path)
        if not path:
            raise InvalidPath("cannot remove the root")
        with _translated(path):
            os.rmdir(full)

    def _rename(self, src: str, dst: str) -> None:
        fsrc, fdst = self._full(src), self._full(dst)
        if not src or not dst:
            raise InvalidPath("cannot rename the root")
        with _translated(src):
            os.rename(fsrc, fdst)

    def _symlink(self, path: str, target: str, attrs: SetAttrs | None) -> ObjectInfo:
        full = self._full(path)
        with _translated(path):
            os.symlink(target, full)
            if attrs is not None:
                self._apply(full, SetAttrs(uid=attrs.uid, gid=attrs.gid), is_link=True)
            return _info_from_stat(path, os.lstat(full), target)

    def _set_attrs(self, path: str, attrs: SetAttrs) -> ObjectInfo:
        full = self._full(path)
        with _translated(path):
            st = os.lstat(full)
            self._apply(full, attrs, is_link=stat_mod.S_ISLNK(st.st_mode))
        return self._stat(path)

    def _get_xattrs(self, path: str) -> dict[str, bytes]:
        full = self._full(path)
        with _translated(path):
            try:
                names = os.listxattr(full, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.ENOTSUP, errno.EPERM):
                    return {}
                raise
            out = {}
            for name in names:
                if name.startswith("user."):
                    with contextlib.suppress(OSError):
                        out[name] = os.getxattr(full, name, follow_symlinks=False)
            return out

    def _set_xattr(self, path: str, name: str, value: bytes | None) -> None:
        full = self._full(path)
        if not name.startswith("user."):
            raise NotSupported(f"only user.* attributes are stored: {name}")
        with _translated(path):
            if value is None:
                try:
                    os.removexattr(full, name, follow_symlinks=False)
                except OSError as exc:
                    if exc.errno == errno.ENODATA:
                        raise NoSuchAttribute(name) from None
                    raise
            else:
                os.setxattr(full, name, value, follow_symlinks=False)

    def _statfs(self) -> StatFs:
        st = os.statvfs(self.root)
        return StatFs(st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree)

    # --- async API --------------------------------------------------------------
    async def stat(self, path: str) -> ObjectInfo:
        return await self.run_sync(self._stat, path)

    async def list(self, path: str) -> list[ObjectInfo]:
        return await self.run_sync(self._list, path)

    async def read(self, path: str, offset: int, size: int) -> bytes:
        return await self.run_sync(self._read, path, offset, size)

    async def read_versioned(self, path: str, offset: int, size: int) -> tuple[bytes, str]:
        return await self.run_sync(self._read_versioned, path, offset, size)

    async def write(self, path: str, src: BinaryIO, attrs: SetAttrs | None = None) -> ObjectInfo:
        return await self.run_sync(self._write, path, src, attrs)

    async def delete(self, path: str) -> None:
        await self.run_sync(self._delete, path)

    async def mkdir(self, path: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        return await self.run_sync(self._mkdir, path, attrs)

    async def rmdir(self, path: str) -> None:
        await self.run_sync(self._rmdir, path)

    async def rename(self, src: str, dst: str) -> None:
        await self.run_sync(self._rename, src, dst)

    async def symlink(self, path: str, target: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        return await self.run_sync(self._symlink, path, target, attrs)

    async def set_attrs(self, path: str, attrs: SetAttrs) -> ObjectInfo:
        return await self.run_sync(self._set_attrs, path, attrs)

    async def get_xattrs(self, path: str) -> dict[str, bytes]:
        return await self.run_sync(self._get_xattrs, path)

    async def set_xattr(self, path: str, name: str, value: bytes | None) -> None:
        await self.run_sync(self._set_xattr, path, name, value)

    async def statfs(self) -> StatFs:
        return await self.run_sync(self._statfs)
