"""The backend contract: a small async interface every storage service implements.

Paths are backend-relative POSIX strings without a leading slash; ``""`` is the
root.  Every path handed to a backend has passed :func:`check_path`, so a backend
never sees ``.``/``..`` components, empty components or absolute paths.

Every operation is idempotent in effect: repeating a completed ``write``,
``delete``, ``mkdir`` or ``set_attrs`` leaves the same state (``delete`` and
``rmdir`` of a missing object raise ``NotFound``, which callers replaying work
treat as done).
"""

from __future__ import annotations

import abc
import stat as stat_mod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, ClassVar, Literal, TypeVar

import trio

from omnifs.errors import InvalidPath, NameTooLong, NotSupported, TransientError

T = TypeVar("T")

NAME_MAX = 255
Kind = Literal["file", "dir", "symlink"]


def check_path(path: str) -> str:
    """Return ``path`` normalised (no leading/trailing slash) or raise.

    Raises ``InvalidPath`` for absolute paths, ``.``/``..``/empty components and
    NUL bytes, and ``NameTooLong`` for a component over 255 bytes.
    """
    if path in ("", "/"):
        return ""
    if "\x00" in path:
        raise InvalidPath(f"NUL byte in path {path!r}")
    if path.startswith("/"):
        raise InvalidPath(f"absolute path {path!r}")
    parts = path.rstrip("/").split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidPath(f"invalid component in path {path!r}")
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise NameTooLong(f"component longer than {NAME_MAX} bytes in {path!r}")
    return "/".join(parts)


def join(parent: str, name: str) -> str:
    """Join a backend directory path and a child name."""
    return f"{parent}/{name}" if parent else name


def parent_of(path: str) -> str:
    """Return the parent directory of a backend path (``""`` for top level)."""
    return path.rpartition("/")[0]


def basename(path: str) -> str:
    return path.rpartition("/")[2]


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a backend knows about one object.

    ``mode`` holds permission bits only (``0o7777``); ``None`` fields mean the
    backend does not store that attribute and the VFS supplies a default.
    """

    path: str
    kind: Kind
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int | None = None
    atime_ns: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    nlink: int | None = None
    etag: str | None = None
    content_type: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None  # symlink target

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    @property
    def name(self) -> str:
        return basename(self.path)

    def type_bits(self) -> int:
        return {"file": stat_mod.S_IFREG, "dir": stat_mod.S_IFDIR, "symlink": stat_mod.S_IFLNK}[self.kind]


def version_key(info: ObjectInfo) -> str:
    """The version of an object's content: its etag, else its size and mtime."""
    return info.etag or f"{info.size}:{info.mtime_ns}"


@dataclass(frozen=True, slots=True)
class SetAttrs:
    """Attributes to change; ``None`` leaves an attribute as it is."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    atime_ns: int | None = None

    def is_empty(self) -> bool:
        return all(v is None for v in (self.mode, self.uid, self.gid, self.mtime_ns, self.atime_ns))


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do natively; the VFS branches on these and nothing else."""

    rename: bool = True  # rename of files and whole directories (replacing the target)
    rename_dir_atomic: bool = True  # a directory rename is one atomic step
    symlinks: bool = True
    xattrs: bool = True
    posix_attrs: bool = True  # stores mode/uid/gid/mtime
    statfs: bool = True
    # Stores user metadata and a content type per file (set_metadata).  Its listings may leave
    # both out; an info whose content_type is None then lacks them (a stat has them).
    native_metadata: bool = False


@dataclass(frozen=True, slots=True)
class StatFs:
    block_size: int
    blocks: int
    blocks_free: int
    blocks_avail: int
    files: int
    files_free: int


@dataclass(frozen=True, slots=True)
class Option:
    """A configuration option a backend declares."""

    type: type
    required: bool = False
    default: Any = None
    help: str = ""
    secret: bool = False


class Backend(abc.ABC):
    """Abstract storage backend.

    Implementations run blocking work through :meth:`run_sync`, which uses a
    per-backend ``trio.CapacityLimiter``.  Methods raise ``omnifs.errors``
    domain errors; anything else is treated as EIO by the filesystem.
    """

    type_name: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Option]] = {}
    capabilities: Capabilities = Capabilities()

    def __init__(self, name: str, *, max_threads: int = 8) -> None:
        self.name = name
        self._max_threads = max_threads
        self._limiter: trio.CapacityLimiter | None = None

    @classmethod
    def from_options(cls, name: str, opts: Mapping[str, Any]) -> Backend:
        """Build from validated config options (see ``options``)."""
        return cls(name, **opts)

    def describe(self) -> str:
        """A human description used as the mount source (no secrets)."""
        return f"{self.type_name}:"

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking ``fn`` in a worker thread under this backend's limiter.

        If the caller is cancelled (a timeout), the thread is abandoned: the
        call returns at once and the thread's eventual result is discarded.
        """
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self._max_threads)
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter, abandon_on_cancel=True)

    # --- required -----------------------------------------------------------
    @abc.abstractmethod
    async def stat(self, path: str) -> ObjectInfo:
        """Return info for ``path`` (not following a final symlink); NotFound if absent."""

    @abc.abstractmethod
    async def list(self, path: str) -> list[ObjectInfo]:
        """Return the immediate children of directory ``path`` (pagination handled inside).

        Raises NotFound or NotADirectory.
        """

    @abc.abstractmethod
    async def read(self, path: str, offset: int, size: int) -> bytes:
        """Return up to ``size`` bytes at ``offset`` (short only at end of object)."""

    @abc.abstractmethod
    async def write(self, path: str, src: BinaryIO, attrs: SetAttrs | None = None) -> ObjectInfo:
        """Replace ``path`` atomically with the stream ``src`` (read to EOF in chunks).

        Readers see either the old or the new content, never a mix.  The parent
        must exist (NotFound otherwise); a directory at ``path`` is IsADirectory.
        """

    @abc.abstractmethod
    async def delete(self, path: str) -> None:
        """Delete a file or symlink; NotFound if absent, IsADirectory for a directory."""

    @abc.abstractmethod
    async def mkdir(self, path: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        """Create directory ``path``; AlreadyExists if anything is there."""

    @abc.abstractmethod
    async def rmdir(self, path: str) -> None:
        """Remove an empty directory; NotEmpty, NotFound or NotADirectory otherwise."""

    async def read_versioned(self, path: str, offset: int, size: int) -> tuple[bytes, str]:
        """Read a range and return it with the version it came from (see ``version_key``).

        The default stats before and after reading and retries once if the
        object changed in between; backends that learn the version from the
        read itself (S3's ETag header, an fstat of the open file) override it.
        """
        for _ in range(3):
            before = version_key(await self.stat(path))
            data = await self.read(path, offset, size)
            if version_key(await self.stat(path)) == before:
                return data, before
        raise TransientError(f"{path} keeps changing while being read")

    # --- optional (declared in ``capabilities``) -----------------------------
    async def rename(self, src: str, dst: str) -> None:
        """Move file or directory ``src`` to ``dst``, replacing a file or empty directory there.

        Files move atomically.  A directory moves with everything below it; where
        ``capabilities.rename_dir_atomic`` is false this is done object by object
        and is safe to repeat after a failure part-way (no object is ever lost).
        """
        raise NotSupported(f"{self.type_name} cannot rename")

    async def symlink(self, path: str, target: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        raise NotSupported(f"{self.type_name} has no symlinks")

    async def set_attrs(self, path: str, attrs: SetAttrs) -> ObjectInfo:
        raise NotSupported(f"{self.type_name} cannot store attributes")

    async def get_xattrs(self, path: str) -> dict[str, bytes]:
        raise NotSupported(f"{self.type_name} has no xattrs")

    async def set_xattr(self, path: str, name: str, value: bytes | None) -> None:
        """Set (or with ``None`` remove) an extended attribute."""
        raise NotSupported(f"{self.type_name} has no xattrs")

    async def set_metadata(
        self, path: str, content_type: str, updates: Mapping[str, str | None], *, check_only: bool = False
    ) -> ObjectInfo | None:
        """Change a file's content type and user metadata in place (``None`` removes a key).

        Keys not named in ``updates`` are kept.  With ``check_only`` nothing is
        changed; only the limits are checked.  Declared by
        ``capabilities.native_metadata``; E2BIG when the metadata would not fit.
        """
        raise NotSupported(f"{self.type_name} has no native metadata")

    async def statfs(self) -> StatFs | None:
        return None

    async def aclose(self) -> None:
        """Release connections and threads; idempotent."""
        return None
