"""Domain errors and the single place that maps them to errno values."""

from __future__ import annotations

import errno as _errno


class OmniError(Exception):
    """Base of every omnifs domain error; ``errno`` is what FUSE callers see."""

    errno: int = _errno.EIO

    def __init__(self, message: str = "", *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class NotFound(OmniError):
    errno = _errno.ENOENT


class AlreadyExists(OmniError):
    errno = _errno.EEXIST


class NotEmpty(OmniError):
    errno = _errno.ENOTEMPTY


class NotADirectory(OmniError):
    errno = _errno.ENOTDIR


class IsADirectory(OmniError):
    errno = _errno.EISDIR


class PermissionDenied(OmniError):
    errno = _errno.EACCES


class InvalidPath(OmniError):
    """A path that is malformed or would escape the backend root."""

    errno = _errno.EINVAL


class NameTooLong(OmniError):
    errno = _errno.ENAMETOOLONG


class NotSupported(OmniError):
    errno = _errno.ENOTSUP


class InvalidArgument(OmniError):
    errno = _errno.EINVAL


class NoSpace(OmniError):
    errno = _errno.ENOSPC


class ReadOnly(OmniError):
    errno = _errno.EROFS


class BackendUnavailable(OmniError):
    """The backend cannot be reached (network down, server stopped)."""

    errno = _errno.EIO


class PathUnavailable(BackendUnavailable):
    """Some paths cannot be served now, but the backend as a whole answers.

    A replica wrapper raises it when the only up-to-date copy of a path is on
    a remote that is down; the mount must not go offline for it.
    """


class TransientError(OmniError):
    """A failure worth retrying (throttling, 5xx, timeouts)."""

    errno = _errno.EIO


class ConfigError(Exception):
    """Invalid configuration; the CLI turns it into exit code 2.

    The message names the file, line (when known) and key at fault.
    """

    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None, key: str | None = None
    ) -> None:
        self.file = file
        self.line = line
        self.key = key
        where = ""
        if file:
            where = file + (f":{line}" if line else "") + ": "
        super().__init__(where + message)


def errno_for(exc: BaseException) -> int:
    """Return the errno a FUSE caller should see for ``exc`` (EIO when unknown)."""
    if isinstance(exc, OmniError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return _errno.EIO


class NoSuchAttribute(OmniError):
    """An extended attribute that is not set."""

    errno = _errno.ENODATA


_OSERROR_MAP: dict[int, type[OmniError]] = {
    _errno.ENOENT: NotFound,
    _errno.EEXIST: AlreadyExists,
    _errno.ENOTEMPTY: NotEmpty,
    _errno.ENOTDIR: NotADirectory,
    _errno.EISDIR: IsADirectory,
    _errno.EACCES: PermissionDenied,
    _errno.EPERM: PermissionDenied,
    _errno.ENAMETOOLONG: NameTooLong,
    _errno.ENOSPC: NoSpace,
    _errno.EDQUOT: NoSpace,
    _errno.EROFS: ReadOnly,
    _errno.ENODATA: NoSuchAttribute,
    _errno.ENOTSUP: NotSupported,
}


def from_oserror(exc: OSError, context: str = "") -> OmniError:
    """Translate an ``OSError`` into the matching domain error, keeping its errno."""
    cls = _OSERROR_MAP.get(exc.errno or 0, OmniError)
    return cls(f"{context}: {exc.strerror or exc}" if context else str(exc), errno=exc.errno or _errno.EIO)
