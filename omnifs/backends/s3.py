"""An S3 (or S3-compatible) bucket as a backend.

Mapping (see ``docs/backends-s3.md``):

* backend path ``a/b`` is the key ``<prefix>/a/b``;
* a directory is either a marker object ``a/`` (what ``mkdir`` writes) or an
  implicit prefix (any key below ``a/``); both list and stat as directories;
* POSIX attributes and xattrs live in user metadata (``x-amz-meta-omnifs-*``);
* a symlink is a small object whose body is the target, flagged by the metadata
  ``omnifs-symlink: 1`` and uploaded as a *single-part multipart upload* so its
  ETag ends in ``-1``.  ListObjectsV2 returns no metadata, so ``list`` fetches
  only objects that look like that (size <= 4096 and ETag ``…-1``) to confirm
  them and learn their target; every other listed file costs nothing extra.

Blocking boto3 calls run in worker threads under the backend's limiter; one
client (thread-safe) is shared by all of them.  Every error leaves this module
as an ``omnifs.errors`` domain error.
"""

from __future__ import annotations

import base64
import binascii
import collections
import concurrent.futures
import datetime
import errno
import hashlib
import logging
import mimetypes
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, Literal, NoReturn, TypeVar
from urllib.parse import urlsplit

import trio

from omnifs.backends.base import (
    Backend,
    Capabilities,
    ObjectInfo,
    Option,
    SetAttrs,
    check_path,
    join,
    parent_of,
)
from omnifs.errors import (
    AlreadyExists,
    BackendUnavailable,
    ConfigError,
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
    PermissionDenied,
    TransientError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

MIN_PART_SIZE = 5 * MiB  # S3: every part but the last
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
MAX_COPY_SIZE = 5 * GiB  # S3: largest single CopyObject
SYMLINK_MAX = 4096  # PATH_MAX: longest symlink target we store
METADATA_LIMIT = 2 * KiB  # S3: user metadata, keys + values, in bytes
_READ_PIECE = 1 * MiB  # largest single read() from a source stream
_DELETE_BATCH = 1000  # S3: keys per DeleteObjects

# User-metadata keys (S3 lowercases them; all of ours are lowercase).
META_PREFIX = "omnifs-"
M_MODE = "omnifs-mode"  # permission bits, octal digits
M_UID = "omnifs-uid"
M_GID = "omnifs-gid"
M_MTIME = "omnifs-mtime"  # nanoseconds since the epoch, decimal
M_SYMLINK = "omnifs-symlink"  # "1" on symlink objects
M_XATTR = "omnifs-x-"  # + encoded xattr name; value base64
M_RENAME = "omnifs-rename-from"  # on a directory marker while a directory rename is in progress

SYMLINK_CONTENT_TYPE = "application/x-omnifs-symlink"
DIR_CONTENT_TYPE = "application/x-directory"
DEFAULT_CONTENT_TYPE = "application/octet-stream"

# Headers a metadata-only CopyObject must carry over (HeadObject name == CopyObject parameter).
_PRESERVED = (
    "CacheControl",
    "ContentDisposition",
    "ContentEncoding",
    "ContentLanguage",
    "StorageClass",
    "ServerSideEncryption",
    "SSEKMSKeyId",
)

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchVersion"})
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "AccountProblem",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "PriorRequestNotComplete",
    }
)

AddressingStyle = Literal["auto", "path", "virtual"]
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


# --- small pure helpers ------------------------------------------------------------


def _ns(dt: datetime.datetime | None) -> int:
    """Return a timestamp as integer nanoseconds since the epoch (0 for None)."""
    if dt is None:
        return 0
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return (dt - _EPOCH) // datetime.timedelta(microseconds=1) * 1000


def _strip_etag(etag: str | None) -> str | None:
    return etag.strip('"') if etag else None


def _error_code(exc: BaseException) -> str | None:
    """Return the S3 error code behind a (translated) exception, if there is one."""
    for e in (exc, exc.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, Mapping):
            code = (response.get("Error") or {}).get("Code")
            return str(code) if code is not None else None
    return None


def _is_symlink_candidate(size: int, etag: str | None) -> bool:
    """True when a listed object may be one of our symlinks (single-part multipart, small)."""
    return size <= SYMLINK_MAX and etag is not None and etag.endswith("-1")


def encode_xattr_name(name: str) -> str:
    """Encode an xattr name into a case-insensitive, header-safe metadata key suffix.

    Lowercase letters, digits, ``.`` and ``-`` stay; every other byte of the
    UTF-8 name becomes ``_xx`` (lowercase hex).  The mapping is reversible.
    """
    out = []
    for byte in name.encode("utf-8", "surrogateescape"):
        ch = chr(byte)
        if ch.isascii() and (ch.islower() or ch.isdigit() or ch in ".-"):
            out.append(ch)
        else:
            out.append(f"_{byte:02x}")
    return "".join(out)


def decode_xattr_name(encoded: str) -> str:
    """Invert :func:`encode_xattr_name`; ValueError on malformed input."""
    raw = bytearray()
    i = 0
    while i < len(encoded):
        if encoded[i] == "_":
            raw.append(int(encoded[i + 1 : i + 3], 16))
            i += 3
        else:
            raw += encoded[i].encode("ascii")
            i += 1
    return raw.decode("utf-8", "surrogateescape")


def metadata_size(meta: Mapping[str, str]) -> int:
    """Return the size S3 counts against its 2 KiB user-metadata limit."""
    return sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in meta.items())


def _check_metadata_size(meta: Mapping[str, str], what: str) -> None:
    size = metadata_size(meta)
    if size > METADATA_LIMIT:
        raise OmniError(f"{what}: metadata would be {size} bytes, S3 allows {METADATA_LIMIT}", errno=errno.E2BIG)


def _parse_int(meta: Mapping[str, str], key: str, base: int = 10) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    try:
        return int(value, base)
    except ValueError:
        log.debug("ignoring malformed metadata %s=%r", key, value)
        return None


def _mtime_from(meta: Mapping[str, str]) -> int | None:
    """Return the stored mtime in ns: ours, else the ``mtime`` (seconds) other tools write."""
    ours = _parse_int(meta, M_MTIME)
    if ours is not None:
        return ours
    theirs = meta.get("mtime")
    if theirs:
        try:
            return int(float(theirs) * 1e9)
        except ValueError:
            return None
    return None


def _apply_attrs(meta: Mapping[str, str], attrs: SetAttrs | None) -> dict[str, str]:
    """Return ``meta`` with the attributes named in ``attrs`` set (atime is not stored)."""
    out = dict(meta)
    if attrs is None:
        return out
    if attrs.mode is not None:
        out[M_MODE] = format(attrs.mode & 0o7777, "o")
    if attrs.uid is not None:
        out[M_UID] = str(attrs.uid)
    if attrs.gid is not None:
        out[M_GID] = str(attrs.gid)
    if attrs.mtime_ns is not None:
        out[M_MTIME] = str(attrs.mtime_ns)
    return out


def _user_metadata(meta: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in meta.items() if not k.startswith(META_PREFIX)}


def _read_exact(src: BinaryIO, n: int) -> bytes:
    """Read up to ``n`` bytes from ``src`` in pieces of at most 1 MiB; short only at EOF."""
    buf = bytearray()
    while len(buf) < n:
        piece = src.read(min(_READ_PIECE, n - len(buf)))
        if not piece:
            break
        buf += piece
    return bytes(buf)


def _stream_size(src: BinaryIO) -> int | None:
    """Return how many bytes remain in a seekable stream, or None when unknown."""
    try:
        if not src.seekable():
            return None
        pos = src.tell()
        end = src.seek(0, 2)
        src.seek(pos)
        return max(0, end - pos)
    except (AttributeError, OSError, ValueError):
        return None


def _symlink_body(target: str) -> bytes:
    """Return the stored form of a symlink target; InvalidArgument/NameTooLong if unusable."""
    body = target.encode("utf-8", "surrogateescape")
    if not body:
        raise InvalidArgument("empty symlink target")
    if len(body) > SYMLINK_MAX:
        raise NameTooLong(f"symlink target longer than {SYMLINK_MAX} bytes")
    return body


def _valid_name(name: str) -> bool:
    """True when a listed key component can be a file name."""
    return name not in ("", ".", "..") and "\x00" not in name and len(name.encode("utf-8", "surrogateescape")) <= 255


@dataclass(frozen=True, slots=True)
class _Obj:
    """What HeadObject/GetObject told us about one key."""

    key: str
    size: int
    etag: str | None
    last_modified_ns: int
    content_type: str | None
    metadata: dict[str, str]
    extra: dict[str, str] = field(default_factory=dict)
    epoch: int = -1  # _AttrCache.epoch when the request was sent (-1: unknown, never cached)

    @property
    def is_symlink(self) -> bool:
        return self.metadata.get(M_SYMLINK) == "1"

    @classmethod
    def from_response(cls, key: str, resp: Mapping[str, Any]) -> _Obj:
        return cls(
            key=key,
            size=int(resp.get("ContentLength", 0)),
            etag=_strip_etag(resp.get("ETag")),
            last_modified_ns=_ns(resp.get("LastModified")),
            content_type=resp.get("ContentType"),
            metadata={k.lower(): v for k, v in (resp.get("Metadata") or {}).items()},
            extra={k: resp[k] for k in _PRESERVED if resp.get(k)},
        )


@dataclass(frozen=True, slots=True)
class _Listed:
    """One key from ListObjectsV2."""

    key: str
    size: int
    etag: str | None
    last_modified_ns: int


class _AttrCache:
    """A thread-safe LRU of what HEAD/GET revealed per key, valid for one object version.

    A version is (ETag, LastModified in whole seconds): HEAD reports seconds,
    LIST milliseconds.  Lets ``list`` report mode/uid/gid/mtime and symlink
    targets of objects seen before without a request per object.  Two
    metadata changes within one second leave the version unchanged, so an
    answer to a request sent before any change (``drop``) is not stored: it
    could be older than the change.
    """

    def __init__(self, size: int = 16384) -> None:
        self._size = size
        self._data: collections.OrderedDict[str, tuple[tuple[str | None, int], ObjectInfo]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.epoch = 0  # counts drops: a request remembers it when sent

    @staticmethod
    def version(etag: str | None, last_modified_ns: int) -> tuple[str | None, int]:
        return (etag, last_modified_ns // 1_000_000_000)

    def get(self, key: str, version: tuple[str | None, int]) -> ObjectInfo | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is None or hit[0] != version:
                return None
            self._data.move_to_end(key)
            return hit[1]

    def put(self, key: str, version: tuple[str | None, int], info: ObjectInfo, epoch: int) -> None:
        """Remember ``info``, learnt by a request sent at ``epoch``, unless something changed since."""
        with self._lock:
            if epoch != self.epoch:
                self._data.pop(key, None)
                return
            self._data[key] = (version, info)
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)

    def drop(self, key: str) -> None:
        with self._lock:
            self.epoch += 1
            self._data.pop(key, None)


class _Conflict(Exception):
    """The object changed between HEAD and a conditional copy."""


class S3Backend(Backend):
    """Objects in one S3 bucket, optionally below a key prefix."""

    type_name = "s3"
    options = {
        "bucket": Option(str, required=True, help="bucket name"),
        "prefix": Option(str, default="", help="key prefix to serve (no leading or trailing slash)"),
        "endpoint_url": Option(
            str, help="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (default: AWS or $AWS_ENDPOINT_URL)"
        ),
        "region": Option(str, help="region name (default: from the AWS profile/environment)"),
        "addressing_style": Option(str, default="auto", help='"auto", "path" or "virtual"'),
        "profile": Option(str, help="AWS shared-config profile for credentials"),
        # Secrets: never in the config file; from the keyring or the environment.
        "access_key_id": Option(str, secret=True, help="access key id (default: boto3's credential chain)"),
        "secret_access_key": Option(str, secret=True, help="secret access key"),
        "session_token": Option(str, secret=True, help="session token for temporary credentials"),
    }
    capabilities = Capabilities(
        rename=True,
        rename_dir_atomic=False,
        symlinks=True,
        xattrs=True,
        posix_attrs=True,
        statfs=False,
        native_metadata=True,
    )

    def __init__(
        self,
        name: str,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: AddressingStyle | str = "auto",
        profile: str | None = None,
        *,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        max_threads: int = 16,
        multipart_threshold: int = 8 * MiB,
        part_size: int = 8 * MiB,
        parts_in_flight: int = 4,
        copy_threshold: int = MAX_COPY_SIZE,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 3,
    ) -> None:
        super().__init__(name, max_threads=max_threads)
        if not bucket or "/" in bucket:
            raise ConfigError(f"remote {name!r}: invalid S3 bucket name {bucket!r}", key="bucket")
        if addressing_style not in ("auto", "path", "virtual"):
            raise ConfigError(
                f"remote {name!r}: addressing_style must be auto, path or virtual, not {addressing_style!r}",
                key="addressing_style",
            )
        prefix = (prefix or "").strip("/")
        if prefix:
            try:
                prefix = check_path(prefix)
            except OmniError as exc:
                raise ConfigError(f"remote {name!r}: invalid prefix {prefix!r}: {exc}", key="prefix") from None
        if part_size < MIN_PART_SIZE or part_size > MAX_PART_SIZE:
            raise ConfigError(f"part_size must be between 5 MiB and 5 GiB, not {part_size}")
        if multipart_threshold < MIN_PART_SIZE:
            raise ConfigError(f"multipart_threshold must be at least 5 MiB, not {multipart_threshold}")
        if not MIN_PART_SIZE <= copy_threshold <= MAX_COPY_SIZE:
            raise ConfigError(f"copy_threshold must be between 5 MiB and 5 GiB, not {copy_threshold}")
        if parts_in_flight < 1 or max_attempts < 1:
            raise ConfigError("parts_in_flight and max_attempts must be at least 1")
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.addressing_style = addressing_style
        self.profile = profile or None
        self._root = f"{prefix}/" if prefix else ""
        self._credentials = (access_key_id, secret_access_key, session_token)
        self._multipart_threshold = multipart_threshold
        self._part_size = part_size
        self._parts_in_flight = parts_in_flight
        self._copy_threshold = copy_threshold
        self._copy_part_size = max(MIN_PART_SIZE, min(512 * MiB, copy_threshold))
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_attempts = max_attempts
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._part_budget: trio.Semaphore | None = None
        self._cache = _AttrCache()
        self._warned: set[str] = set()

    @classmethod
    def from_url(cls, name: str, url: str) -> S3Backend:
        """Build from the inline form ``s3://bucket/prefix`` (credentials from the environment)."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ConfigError(f"not an S3 URL (expected s3://bucket/prefix): {url!r}")
        return cls(name, parts.netloc, parts.path.strip("/"))

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    # --- client and error translation ------------------------------------------------
    def _s3(self) -> Any:
        """Return the shared boto3 client, creating it on first use (thread-safe)."""
        client = self._client
        if client is not None:
            return client
        with self._client_lock:
            if self._client is None:
                import boto3
                import botocore.exceptions
                from botocore.config import Config

                key_id, secret, token = self._credentials
                try:
                    session = boto3.session.Session(
                        profile_name=self.profile,
                        aws_access_key_id=key_id,
                        aws_secret_access_key=secret,
                        aws_session_token=token,
                    )
                except botocore.exceptions.ProfileNotFound as exc:
                    raise ConfigError(f"remote {self.name!r}: {exc}", key="profile") from None
                config = Config(
                    region_name=self.region,
                    connect_timeout=self._connect_timeout,
                    read_timeout=self._read_timeout,
                    retries={"mode": "standard", "max_attempts": self._max_attempts},
                    max_pool_connections=self._max_threads + self._parts_in_flight + 4,
                    s3={"addressing_style": self.addressing_style},
                    tcp_keepalive=True,
                )
                self._client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
            return self._client

    def _endpoint(self) -> str:
        client = self._client
        return str(client.meta.endpoint_url) if client is not None else (self.endpoint_url or "AWS S3")

    def _translate(self, exc: BaseException, what: str) -> OmniError | None:
        """Map a boto3/botocore exception to a domain error (None: not one of theirs)."""
        if isinstance(exc, OmniError):
            return exc
        import botocore.exceptions as bex

        if isinstance(exc, bex.ClientError):
            err = exc.response.get("Error", {}) or {}
            code = str(err.get("Code", ""))
            status = int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            message = f"{what}: {code} {err.get('Message', '')}".rstrip()
            if code == "NoSuchBucket":
                return BackendUnavailable(f"S3 bucket {self.bucket!r} does not exist at {self._endpoint()} ({what})")
            if code in _NOT_FOUND_CODES or status == 404:
                return NotFound(what)
            if code in _DENIED_CODES or status == 403:
                return PermissionDenied(message)
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return TransientError(message)
            if code in ("MetadataTooLarge", "RequestHeaderSectionTooLarge"):
                return OmniError(message, errno=errno.E2BIG)
            if code == "EntityTooLarge":
                return OmniError(message, errno=errno.EFBIG)
            if code == "InvalidBucketName":
                return BackendUnavailable(f"invalid S3 bucket name {self.bucket!r}: {message}")
            return OmniError(message)
        if isinstance(exc, bex.EndpointConnectionError):  # includes connect timeouts
            return BackendUnavailable(f"cannot reach S3 endpoint {self._endpoint()} ({what}): {exc}")
        if isinstance(
            exc,
            bex.ReadTimeoutError
            | bex.ConnectionClosedError
            | bex.ResponseStreamingError
            | bex.IncompleteReadError
            | bex.HTTPClientError,
        ):
            return TransientError(f"{what}: {exc}")
        if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError):
            return PermissionDenied(f"no usable S3 credentials for {self.describe()}: {exc}")
        if isinstance(exc, bex.BotoCoreError):
            return OmniError(f"{what}: {exc}")
        if isinstance(exc, UnicodeEncodeError):
            return InvalidPath(f"{what}: not valid UTF-8")
        return None

    def _call(self, op: str, what: str, **kwargs: Any) -> Any:
        """Call client method ``op`` on this bucket; raise only domain errors."""
        try:
            return getattr(self._s3(), op)(Bucket=self.bucket, **kwargs)
        except (OmniError, ConfigError):
            raise
        except Exception as exc:
            translated = self._translate(exc, what)
            if translated is None:
                raise
            raise translated from exc

    def is_temp_failure(self, exc: BaseException) -> bool:
        """True when ``exc`` is worth retrying later (throttling, 5xx, timeouts, endpoint down).

        A missing bucket, denied access or a missing object are permanent.
        """
        if not isinstance(exc, OmniError):
            translated = self._translate(exc, "")
            if translated is None:
                return False
            translated.__cause__ = exc
            exc = translated
        if isinstance(exc, TransientError):
            return True
        if isinstance(exc, BackendUnavailable):
            return _error_code(exc) not in ("NoSuchBucket", "InvalidBucketName")
        return False

    # --- key mapping --------------------------------------------------------------------
    def _key(self, path: str) -> str:
        """Return the object key of a (non-root) backend path; InvalidPath if unusable."""
        path = check_path(path)
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidPath(f"path is not valid UTF-8: {path!r}") from None
        return self._root + path

    def _dir_prefix(self, path: str) -> str:
        """Return the key prefix of everything below directory ``path`` (its marker key)."""
        return self._key(path) + "/" if check_path(path) else self._root

    def _what(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    # --- blocking primitives (run in worker threads) ----------------------------------------
    def _head(self, key: str) -> _Obj | None:
        """HEAD ``key``; None when it does not exist."""
        epoch = self._cache.epoch
        try:
            resp = self._call("head_object", self._what(key), Key=key)
        except NotFound:
            return None
        return replace(_Obj.from_response(key, resp), epoch=epoch)

    def _get(self, key: str) -> tuple[_Obj, bytes]:
        """GET a whole (small) object: its metadata and body."""
        epoch = self._cache.epoch
        resp = self._call("get_object", self._what(key), Key=key)
        body = resp["Body"]
        try:
            data = body.read()
        except Exception as exc:
            raise self._translate(exc, self._what(key)) or exc from exc
        finally:
            body.close()
        return replace(_Obj.from_response(key, resp), epoch=epoch), data

    def _below(self, prefix: str, n: int = 1) -> list[str]:
        """Return up to ``n`` keys starting with ``prefix`` (at any depth)."""
        resp = self._call("list_objects_v2", self._what(prefix), Prefix=prefix, MaxKeys=n)
        return [o["Key"] for o in resp.get("Contents", [])]

    def _list_all(self, prefix: str) -> list[_Listed]:
        """Return every key below ``prefix`` (recursive, all pages)."""
        out: list[_Listed] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list_objects_v2", self._what(prefix), **kwargs)
            for o in resp.get("Contents", []):
                out.append(
                    _Listed(o["Key"], int(o.get("Size", 0)), _strip_etag(o.get("ETag")), _ns(o.get("LastModified")))
                )
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                return out

    def _dir_exists(self, path: str) -> bool:
        return not path or bool(self._below(self._dir_prefix(path)))

    def _check_parent(self, path: str) -> None:
        """Raise NotFound/NotADirectory unless the parent of ``path`` is a directory."""
        parent = parent_of(path)
        if self._dir_exists(parent):
            return
        if self._head(self._key(parent)) is not None:
            raise NotADirectory(parent)
        raise NotFound(f"parent directory of {path!r} does not exist")

    def _keep_parent(self, path: str) -> None:
        """Write a marker for the parent of ``path`` if removing ``path`` emptied an implicit directory.

        Without it the directory would vanish with its last object.
        """
        parent = parent_of(path)
        if parent and not self._below(self._dir_prefix(parent)):
            log.debug("keeping emptied implicit directory %r with a marker", parent)
            self._put_marker(self._dir_prefix(parent), {M_MTIME: str(time.time_ns())})

    def _put_marker(self, prefix: str, meta: Mapping[str, str]) -> str | None:
        _check_metadata_size(meta, self._what(prefix))
        resp = self._call(
            "put_object", self._what(prefix), Key=prefix, Body=b"", Metadata=dict(meta), ContentType=DIR_CONTENT_TYPE
        )
        return _strip_etag(resp.get("ETag"))

    def _put_symlink(self, key: str, body: bytes, meta: Mapping[str, str], extra: Mapping[str, str]) -> str | None:
        """Store a symlink object as a single-part multipart upload (ETag ``…-1``)."""
        meta = {**meta, M_SYMLINK: "1"}
        _check_metadata_size(meta, self._what(key))
        what = self._what(key)
        resp = self._call(
            "create_multipart_upload", what, Key=key, Metadata=meta, ContentType=SYMLINK_CONTENT_TYPE, **extra
        )
        upload_id = resp["UploadId"]
        try:
            part = self._call("upload_part", what, Key=key, UploadId=upload_id, PartNumber=1, Body=body)
            done = self._call(
                "complete_multipart_upload",
                what,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
            )
        except BaseException:
            self._abort(key, upload_id)
            raise
        return _strip_etag(done.get("ETag"))

    def _abort(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload, logging (not raising) failures."""
        try:
            self._call("abort_multipart_upload", self._what(key), Key=key, UploadId=upload_id)
        except OmniError as exc:
            if not isinstance(exc, NotFound):
                log.warning("could not abort multipart upload %s of %s: %s", upload_id, self._what(key), exc)

    def _delete_keys(self, keys: Sequence[str]) -> None:
        """Delete ``keys`` in batches; missing keys are fine, any other failure raises."""
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i : i + _DELETE_BATCH]
            resp = self._call(
                "delete_objects",
                self._what(batch[0]),
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            for err in resp.get("Errors", []):
                if err.get("Code") == "NoSuchKey":
                    continue
                code = err.get("Code", "")
                what = f"delete {self._what(err.get('Key', ''))}: {code} {err.get('Message', '')}"
                if code in _DENIED_CODES:
                    raise PermissionDenied(what)
                if code in _TRANSIENT_CODES:
                    raise TransientError(what)
                raise OmniError(what)

    def _object_info(self, path: str, obj: _Obj, body: bytes | None = None) -> ObjectInfo:
        """Build the ObjectInfo of a file or symlink object (GETs a symlink's target if needed)."""
        meta = obj.metadata
        version = _AttrCache.version(obj.etag, obj.last_modified_ns)
        target = None
        if obj.is_symlink:
            cached = self._cache.get(obj.key, version)
            if cached is not None and cached.target is not None:
                target = cached.target
            else:
                if body is None:
                    obj2, body = self._get(obj.key)
                    if obj2.etag != obj.etag:  # replaced meanwhile: describe what we read
                        return self._object_info(path, obj2, body)
                target = body.decode("utf-8", "surrogateescape")
        info = ObjectInfo(
            path=path,
            kind="symlink" if obj.is_symlink else "file",
            size=obj.size,
            mtime_ns=_mtime_from(meta) or obj.last_modified_ns,
            ctime_ns=obj.last_modified_ns,
            mode=0o777 if obj.is_symlink else _parse_int(meta, M_MODE, 8),
            uid=_parse_int(meta, M_UID),
            gid=_parse_int(meta, M_GID),
            etag=obj.etag,
            content_type=obj.content_type,
            metadata=_user_metadata(meta),
            target=target,
        )
        self._cache.put(obj.key, version, info, obj.epoch)
        return info

    @staticmethod
    def _dir_info(path: str, marker: _Obj | None) -> ObjectInfo:
        if marker is None:
            return ObjectInfo(path=path, kind="dir")
        meta = marker.metadata
        return ObjectInfo(
            path=path,
            kind="dir",
            mtime_ns=_mtime_from(meta) or marker.last_modified_ns,
            ctime_ns=marker.last_modified_ns,
            mode=_parse_int(meta, M_MODE, 8),
            uid=_parse_int(meta, M_UID),
            gid=_parse_int(meta, M_GID),
            etag=marker.etag,
            metadata=_user_metadata(meta),
        )

    # --- stat / list / read -----------------------------------------------------------------
    def _stat(self, path: str) -> ObjectInfo:
        path = check_path(path)
        if not path:
            keys = self._below(self._root)  # also proves the bucket is there
            marker = self._head(self._root) if self._root and keys and keys[0] == self._root else None
            return self._dir_info("", marker)
        key = self._key(path)
        obj = self._head(key)
        if obj is not None:
            return self._object_info(path, obj)
        marker = self._head(key + "/")
        if marker is not None:
            return self._dir_info(path, marker)
        if self._below(key + "/"):
            return self._dir_info(path, None)
        raise NotFound(path)

    def _list_sync(self, path: str) -> tuple[dict[str, ObjectInfo], list[tuple[str, _Listed]]]:
        """List one directory level: infos by name and the symlink candidates to fetch."""
        path = check_path(path)
        prefix = self._dir_prefix(path)
        entries: dict[str, ObjectInfo] = {}
        candidates: dict[str, _Listed] = {}
        seen_any = False
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": prefix, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list_objects_v2", self._what(prefix), **kwargs)
            for cp in resp.get("CommonPrefixes", []):
                seen_any = True
                name = cp["Prefix"][len(prefix) : -1]
                if not self._usable(cp["Prefix"], name):
                    continue
                if name in entries:
                    self._warn_once(cp["Prefix"], "S3 key %r is both a file and a directory; showing the file")
                    continue
                entries[name] = ObjectInfo(path=join(path, name), kind="dir")
            for o in resp.get("Contents", []):
                seen_any = True
                key = o["Key"]
                if key == prefix:
                    continue  # this directory's own marker
                name = key[len(prefix) :]
                if not self._usable(key, name):
                    continue
                if entries.get(name, None) is not None and entries[name].kind == "dir":
                    self._warn_once(key, "S3 key %r is both a file and a directory; showing the file")
                item = _Listed(key, int(o.get("Size", 0)), _strip_etag(o.get("ETag")), _ns(o.get("LastModified")))
                cached = self._cache.get(key, _AttrCache.version(item.etag, item.last_modified_ns))
                if cached is not None:
                    entries[name] = replace(cached, path=join(path, name))
                    continue
                entries[name] = ObjectInfo(
                    path=join(path, name),
                    kind="file",
                    size=item.size,
                    mtime_ns=item.last_modified_ns,
                    ctime_ns=item.last_modified_ns,
                    etag=item.etag,
                )
                if _is_symlink_candidate(item.size, item.etag):
                    candidates[name] = item
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                break
        if not seen_any and path:
            if self._head(self._key(path)) is not None:
                raise NotADirectory(path)
            raise NotFound(path)
        return entries, [(n, c) for n, c in candidates.items() if entries[n].kind == "file"]

    def _usable(self, key: str, name: str) -> bool:
        if _valid_name(name):
            return True
        self._warn_once(key, "skipping S3 key %r: it cannot be shown as a file name")
        return False

    def _warn_once(self, key: str, fmt: str) -> None:
        if key in self._warned:
            return
        if len(self._warned) < 10_000:
            self._warned.add(key)
        log.warning(fmt, self._what(key))

    def _fetch_listed(self, path: str, item: _Listed) -> ObjectInfo | None:
        """GET a symlink candidate found by list; None if it vanished meanwhile."""
        try:
            obj, body = self._get(item.key)
        except NotFound:
            return None
        return self._object_info(path, obj, body)

    def _read(self, path: str, offset: int, size: int) -> bytes:
        return self._read_versioned(path, offset, size)[0]

    def _read_versioned(self, path: str, offset: int, size: int) -> tuple[bytes, str]:
        """Ranged GET returning the data and the ETag of the object it came from."""
        if not check_path(path):
            raise IsADirectory("the root is a directory")
        key = self._key(path)
        if size <= 0:
            head = self._head(key)
            if head is None:
                self._missing(path)
            return b"", head.etag or ""
        what = self._what(key)
        try:
            resp = self._call("get_object", what, Key=key, Range=f"bytes={offset}-{offset + size - 1}")
        except NotFound:
            self._missing(path)
        except OmniError as exc:
            if _error_code(exc) == "InvalidRange":  # at or after EOF (or an empty object)
                head = self._head(key)
                if head is None:
                    self._missing(path)
                return b"", head.etag or ""
            raise
        body = resp["Body"]
        try:
            data: bytes = body.read()
        except Exception as exc:
            raise self._translate(exc, what) or exc from exc
        finally:
            body.close()
        return data[:size], _strip_etag(resp.get("ETag")) or ""

    def _missing(self, path: str) -> NoReturn:
        """Raise IsADirectory if ``path`` is a directory, else NotFound."""
        if self._dir_exists(path):
            raise IsADirectory(path)
        raise NotFound(path)

    # --- write -------------------------------------------------------------------------------
    def _put(self, key: str, data: bytes, meta: Mapping[str, str], content_type: str) -> str | None:
        resp = self._call(
            "put_object", self._what(key), Key=key, Body=data, Metadata=dict(meta), ContentType=content_type
        )
        return _strip_etag(resp.get("ETag"))

    def _part_size_for(self, number: int, total: int | None) -> int:
        """Return the size of part ``number`` so that any object up to 5 TiB fits in 10,000 parts."""
        if number > MAX_PARTS:
            raise OmniError(f"object needs more than {MAX_PARTS} parts", errno=errno.EFBIG)
        if total is not None:
            needed = -(-total // (MAX_PARTS - 1))
            return min(MAX_PART_SIZE, max(self._part_size, -(-needed // MiB) * MiB))
        return min(MAX_PART_SIZE, self._part_size << ((number - 1) // 1000))

    def _create_mpu(self, key: str, meta: Mapping[str, str], content_type: str) -> str:
        resp = self._call(
            "create_multipart_upload", self._what(key), Key=key, Metadata=dict(meta), ContentType=content_type
        )
        return str(resp["UploadId"])

    def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        resp = self._call("upload_part", self._what(key), Key=key, UploadId=upload_id, PartNumber=number, Body=data)
        return str(resp["ETag"])

    def _complete_mpu(self, key: str, upload_id: str, parts: Mapping[int, str]) -> str | None:
        resp = self._call(
            "complete_multipart_upload",
            self._what(key),
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": parts[n]} for n in sorted(parts)]},
        )
        return _strip_etag(resp.get("ETag"))

    async def _upload_multipart(
        self, key: str, first: bytes, src: BinaryIO, meta: Mapping[str, str], content_type: str, total: int | None
    ) -> tuple[str | None, int]:
        """Upload ``first`` + the rest of ``src`` as a multipart upload; return (ETag, size).

        Up to ``parts_in_flight`` parts upload at once; the parts buffered by all
        uploads of this backend are bounded by a shared budget.  Any failure or
        cancellation aborts the upload, so no parts are left behind.
        """
        if self._part_budget is None:
            self._part_budget = trio.Semaphore(2 * (self._parts_in_flight + 1))
        budget = self._part_budget
        upload_id = await self.run_sync(self._create_mpu, key, meta, content_type)
        parts: dict[int, str] = {}
        errors: list[BaseException] = []
        size = 0
        try:
            send, recv = trio.open_memory_channel[tuple[int, bytes]](0)
            async with trio.open_nursery() as nursery:

                async def uploader(chan: trio.MemoryReceiveChannel[tuple[int, bytes]]) -> None:
                    async with chan:
                        async for number, data in chan:
                            try:
                                parts[number] = await self.run_sync(self._upload_part, key, upload_id, number, data)
                            except Exception as exc:
                                errors.append(exc)
                                nursery.cancel_scope.cancel()
                                return
                            finally:
                                budget.release()

                async with recv:
                    for _ in range(self._parts_in_flight):
                        nursery.start_soon(uploader, recv.clone())
                async with send:
                    pending = first
                    number = 0
                    eof = False
                    while not eof or pending:
                        number += 1
                        try:
                            want = self._part_size_for(number, total)
                        except OmniError as exc:
                            errors.append(exc)
                            nursery.cancel_scope.cancel()
                            break
                        await budget.acquire()
                        handed_over = False
                        try:
                            if len(pending) < want and not eof:
                                need = want - len(pending)
                                more = await self.run_sync(_read_exact, src, need)
                                eof = len(more) < need
                                pending += more
                            data, pending = pending[:want], pending[want:]
                            if not data:
                                break
                            size += len(data)
                            await send.send((number, data))
                            handed_over = True
                        except Exception as exc:
                            errors.append(exc)
                            nursery.cancel_scope.cancel()
                            break
                        finally:
                            if not handed_over:
                                budget.release()
            if errors:
                raise errors[0]
            etag = await self.run_sync(self._complete_mpu, key, upload_id, parts)
        except BaseException:
            with trio.move_on_after(60, shield=True):
                await self.run_sync(self._abort, key, upload_id)
            raise
        return etag, size

    async def _probe(self, path: str) -> tuple[_Obj | None, bool]:
        """Check the parent of ``path`` is a directory; return (object at ``path``, is a directory).

        The three requests run concurrently (one round trip of latency).
        """
        key = self._key(path)
        checks: list[Callable[[], Any]] = [
            lambda: self._check_parent(path),
            lambda: self._head(key),
            lambda: bool(self._below(key + "/")),
        ]
        _, obj, is_dir = await self._parallel(lambda check: check(), checks, len(checks))
        return obj, is_dir

    async def write(self, path: str, src: BinaryIO, attrs: SetAttrs | None = None) -> ObjectInfo:
        """Replace ``path`` with the stream ``src``; readers see the old or the new object.

        Small streams (<= ``multipart_threshold``) are one PutObject; larger ones a
        multipart upload.  Mode/uid/gid, xattrs and user metadata of a replaced
        file are kept unless ``attrs`` names new values.
        """
        path = check_path(path)
        if not path:
            raise IsADirectory("cannot write the root")
        key = self._key(path)
        old, is_dir = await self._probe(path)
        if is_dir and old is None:
            raise IsADirectory(path)
        if old is not None and not old.is_symlink:
            meta = dict(old.metadata)
            content_type = old.content_type or DEFAULT_CONTENT_TYPE
        else:
            meta = {}
            content_type = mimetypes.guess_type(path)[0] or DEFAULT_CONTENT_TYPE
        meta[M_MTIME] = str(time.time_ns())
        meta = _apply_attrs(meta, attrs)
        _check_metadata_size(meta, self._what(key))
        total = await self.run_sync(_stream_size, src)
        first = await self.run_sync(_read_exact, src, self._multipart_threshold + 1)
        if len(first) <= self._multipart_threshold:
            etag = await self.run_sync(self._put, key, first, meta, content_type)
            size = len(first)
        else:
            etag, size = await self._upload_multipart(key, first, src, meta, content_type, total)
        self._cache.drop(key)
        return ObjectInfo(
            path=path,
            kind="file",
            size=size,
            mtime_ns=int(meta[M_MTIME]),
            ctime_ns=time.time_ns(),
            mode=_parse_int(meta, M_MODE, 8),
            uid=_parse_int(meta, M_UID),
            gid=_parse_int(meta, M_GID),
            etag=etag,
            content_type=content_type,
            metadata=_user_metadata(meta),
        )

    # --- delete / mkdir / rmdir ---------------------------------------------------------------
    def _delete(self, path: str) -> None:
        path = check_path(path)
        if not path:
            raise IsADirectory("cannot delete the root")
        key = self._key(path)
        if self._head(key) is None:
            self._missing(path)
        self._call("delete_object", self._what(key), Key=key)
        self._cache.drop(key)
        self._keep_parent(path)

    def _mkdir(self, path: str, attrs: SetAttrs | None) -> ObjectInfo:
        key = self._key(path)
        meta = _apply_attrs({M_MTIME: str(time.time_ns())}, attrs)
        etag = self._put_marker(key + "/", meta)
        return replace(
            self._dir_info(path, _Obj(key + "/", 0, etag, int(meta[M_MTIME]), DIR_CONTENT_TYPE, meta)),
            ctime_ns=time.time_ns(),
        )

    def _rmdir(self, path: str) -> None:
        path = check_path(path)
        if not path:
            raise InvalidPath("cannot remove the root")
        prefix = self._dir_prefix(path)
        keys = self._below(prefix, 2)
        if not keys:
            if self._head(self._key(path)) is not None:
                raise NotADirectory(path)
            raise NotFound(path)
        if any(k != prefix for k in keys):
            raise NotEmpty(path)
        self._call("delete_object", self._what(prefix), Key=prefix)
        self._keep_parent(path)

    # --- copies and metadata updates -------------------------------------------------------------
    def _copy_key(self, src_key: str, dst_key: str, size: int, etag: str | None) -> None:
        """Copy one object with its metadata; symlinks are re-uploaded to keep their marker ETag."""
        what = self._what(src_key)
        if _is_symlink_candidate(size, etag):
            obj, body = self._get(src_key)
            if obj.is_symlink:
                self._put_symlink(dst_key, body, obj.metadata, obj.extra)
                return
        if size > self._copy_threshold:
            obj2 = self._head(src_key)
            if obj2 is None:
                raise NotFound(what)
            try:
                self._multipart_copy(src_key, dst_key, obj2, obj2.metadata)
            except _Conflict:
                raise TransientError(f"{what} changed while being copied") from None
            return
        self._call("copy_object", what, Key=dst_key, CopySource={"Bucket": self.bucket, "Key": src_key})

    def _multipart_copy(self, src_key: str, dst_key: str, obj: _Obj, meta: Mapping[str, str]) -> str | None:
        """Copy ``obj`` to ``dst_key`` part by part (UploadPartCopy), setting ``meta``.

        Raises _Conflict when the source changed since ``obj`` was read.
        """
        what = self._what(dst_key)
        part = max(self._copy_part_size, -(-obj.size // MAX_PARTS))
        upload_id = self._call(
            "create_multipart_upload",
            what,
            Key=dst_key,
            Metadata=dict(meta),
            ContentType=obj.content_type or DEFAULT_CONTENT_TYPE,
            **obj.extra,
        )["UploadId"]
        condition = {"CopySourceIfMatch": f'"{obj.etag}"'} if obj.etag else {}

        def copy_part(numbered: tuple[int, int]) -> tuple[int, str]:
            number, start = numbered
            end = min(start + part, obj.size) - 1
            resp = self._call(
                "upload_part_copy",
                what,
                Key=dst_key,
                UploadId=upload_id,
                PartNumber=number,
                CopySource={"Bucket": self.bucket, "Key": src_key},
                CopySourceRange=f"bytes={start}-{end}",
                **condition,
            )
            return number, str(resp["CopyPartResult"]["ETag"])

        try:
            with concurrent.futures.ThreadPoolExecutor(self._parts_in_flight) as pool:
                parts = dict(pool.map(copy_part, enumerate(range(0, obj.size, part), start=1)))
            return self._complete_mpu(dst_key, upload_id, parts)
        except OmniError as exc:
            self._abort(dst_key, upload_id)
            if _error_code(exc) == "PreconditionFailed":
                raise _Conflict() from exc
            raise
        except BaseException:
            self._abort(dst_key, upload_id)
            raise

    def _replace_metadata(self, obj: _Obj, meta: Mapping[str, str]) -> None:
        """Rewrite the metadata of ``obj`` in place (content untouched); _Conflict if it changed."""
        key = obj.key
        what = self._what(key)
        _check_metadata_size(meta, what)
        if key.endswith("/"):  # a directory marker: nothing to preserve but metadata
            self._put_marker(key, meta)
        elif obj.is_symlink:
            fresh, body = self._get(key)
            if fresh.etag != obj.etag:
                raise _Conflict()
            self._put_symlink(key, body, meta, obj.extra)
        elif obj.size > self._copy_threshold:
            self._multipart_copy(key, key, obj, meta)
        else:
            try:
                self._call(
                    "copy_object",
                    what,
                    Key=key,
                    CopySource={"Bucket": self.bucket, "Key": key},
                    CopySourceIfMatch=f'"{obj.etag}"',
                    MetadataDirective="REPLACE",
                    Metadata=dict(meta),
                    ContentType=obj.content_type or DEFAULT_CONTENT_TYPE,
                    **obj.extra,
                )
            except OmniError as exc:
                if _error_code(exc) == "PreconditionFailed":
                    raise _Conflict() from exc
                raise
        self._cache.drop(key)

    def _target(self, path: str) -> tuple[str, _Obj | None, bool]:
        """Return (key, existing object, is_dir) whose metadata holds the attributes of ``path``."""
        path = check_path(path)
        if not path and not self._root:
            raise NotSupported("the bucket root has no object to store attributes in")
        if path:
            obj = self._head(self._key(path))
            if obj is not None:
                return obj.key, obj, False
        prefix = self._dir_prefix(path)
        marker = self._head(prefix)
        if marker is not None:
            return prefix, marker, True
        if path and not self._below(prefix):
            raise NotFound(path)
        return prefix, None, True

    def _update_metadata(self, path: str, change: Callable[[dict[str, str]], dict[str, str]]) -> None:
        """Apply ``change`` to the metadata of ``path`` (file, symlink or directory).

        Retries when a concurrent writer replaces the object between HEAD and copy.
        """
        for _ in range(5):
            key, obj, _is_dir = self._target(path)
            meta = change(dict(obj.metadata) if obj is not None else {})
            if obj is None:  # implicit directory: materialise a marker
                self._put_marker(key, meta)
                return
            try:
                self._replace_metadata(obj, meta)
                return
            except _Conflict:
                log.debug("%s changed during a metadata update; retrying", self._what(key))
        raise TransientError(f"{path!r} keeps changing; metadata update abandoned")

    def _set_attrs(self, path: str, attrs: SetAttrs) -> ObjectInfo:
        if attrs.mode is not None or attrs.uid is not None or attrs.gid is not None or attrs.mtime_ns is not None:
            self._update_metadata(path, lambda meta: _apply_attrs(meta, attrs))
        return self._stat(path)

    def _get_xattrs(self, path: str) -> dict[str, bytes]:
        path = check_path(path)
        if not path and not self._root:
            return {}
        _key, obj, _is_dir = self._target(path)
        out: dict[str, bytes] = {}
        for k, v in (obj.metadata if obj is not None else {}).items():
            if k.startswith(M_XATTR):
                try:
                    out[decode_xattr_name(k[len(M_XATTR) :])] = base64.b64decode(v)
                except (ValueError, binascii.Error):
                    log.warning("ignoring malformed xattr metadata %r on %s", k, self._what(_key))
        return out

    def _set_xattr(self, path: str, name: str, value: bytes | None) -> None:
        if not name:
            raise InvalidArgument("empty xattr name")
        meta_key = M_XATTR + encode_xattr_name(name)

        def change(meta: dict[str, str]) -> dict[str, str]:
            if value is None:
                if meta.pop(meta_key, None) is None:
                    raise NoSuchAttribute(name)
            else:
                meta[meta_key] = base64.b64encode(value).decode("ascii")
            return meta

        self._update_metadata(path, change)

    def _set_metadata(
        self, path: str, content_type: str, updates: Mapping[str, str | None], check_only: bool
    ) -> ObjectInfo | None:
        """Companion metadata (omnifs/meta.py): user metadata and content type of a file, in place."""
        path = check_path(path)
        key = self._key(path)
        for _ in range(5):
            obj = self._head(key)
            if obj is None or obj.is_symlink:
                raise NotFound(path)
            meta = dict(obj.metadata)
            for k, v in updates.items():
                if k.startswith(META_PREFIX):
                    raise InvalidArgument(f"metadata key {k!r} is reserved")
                if v is None:
                    meta.pop(k, None)
                else:
                    meta[k] = v
            _check_metadata_size(meta, self._what(key))
            if check_only:
                return None
            try:
                self._replace_metadata(replace(obj, content_type=content_type), meta)
            except _Conflict:
                log.debug("%s changed during a metadata update; retrying", self._what(key))
                continue
            return self._stat(path)
        raise TransientError(f"{path!r} keeps changing; metadata update abandoned")

    # --- symlinks ----------------------------------------------------------------------------------
    def _symlink(self, path: str, target: str, attrs: SetAttrs | None) -> ObjectInfo:
        path = check_path(path)
        if not path:
            raise AlreadyExists("the root always exists")
        body = _symlink_body(target)
        key = self._key(path)
        meta = _apply_attrs({M_MTIME: str(time.time_ns())}, SetAttrs(uid=attrs.uid, gid=attrs.gid) if attrs else None)
        if attrs is not None and attrs.mtime_ns is not None:
            meta[M_MTIME] = str(attrs.mtime_ns)
        etag = self._put_symlink(key, body, meta, {})
        return ObjectInfo(
            path=path,
            kind="symlink",
            size=len(body),
            mtime_ns=int(meta[M_MTIME]),
            ctime_ns=time.time_ns(),
            mode=0o777,
            uid=_parse_int(meta, M_UID),
            gid=_parse_int(meta, M_GID),
            etag=etag,
            content_type=SYMLINK_CONTENT_TYPE,
            target=target,
        )

    # --- parallel helper -----------------------------------------------------------------------------
    async def _parallel(self, fn: Callable[[T], U], items: Iterable[T], limit: int) -> list[U]:
        """Run blocking ``fn`` over ``items`` with at most ``limit`` in flight; results in order.

        The first failure stops new work and is re-raised as is (not as a group).
        """
        it = enumerate(items)
        results: dict[int, U] = {}
        errors: list[tuple[int, Exception]] = []

        async def worker() -> None:
            for i, item in it:
                if errors:
                    return
                try:
                    results[i] = await self.run_sync(fn, item)
                except Exception as exc:
                    errors.append((i, exc))
                    return

        async with trio.open_nursery() as nursery:
            for _ in range(max(1, limit)):
                nursery.start_soon(worker)
        if errors:
            raise min(errors, key=lambda e: e[0])[1]
        return [results[i] for i in sorted(results)]

    # --- rename ----------------------------------------------------------------------------------------
    async def rename(self, src: str, dst: str) -> None:
        """Move ``src`` to ``dst`` by copy-then-delete.

        A file moves atomically for readers of ``dst``.  A directory moves key by
        key: every key is copied before any is deleted, and the destination marker
        records the move, so repeating an interrupted rename completes it.
        """
        src, dst = check_path(src), check_path(dst)
        if not src or not dst:
            raise InvalidPath("cannot rename the root")
        if dst.startswith(src + "/"):
            raise InvalidArgument(f"cannot move {src!r} into itself")
        info = await self.stat(src)
        if src == dst:
            return
        dst_key, dst_prefix = self._key(dst), self._dir_prefix(dst)
        checks: list[Callable[[], Any]] = [
            lambda: self._check_parent(dst),
            lambda: self._head(dst_key),
            lambda: self._below(dst_prefix, 2),
        ]
        _, dst_obj, dst_keys = await self._parallel(lambda check: check(), checks, len(checks))
        if info.kind == "dir":
            await self._rename_dir(src, dst, dst_obj, dst_keys)
            return
        if dst_obj is None and dst_keys:
            raise IsADirectory(dst)
        await self.run_sync(self._move_key, src, dst, info)

    def _move_key(self, src: str, dst: str, info: ObjectInfo) -> None:
        src_key, dst_key = self._key(src), self._key(dst)
        self._copy_key(src_key, dst_key, info.size, info.etag)
        self._call("delete_object", self._what(src_key), Key=src_key)
        self._cache.drop(src_key)
        self._cache.drop(dst_key)
        self._keep_parent(src)

    async def _rename_dir(self, src: str, dst: str, dst_obj: _Obj | None, dst_keys: list[str]) -> None:
        if dst_obj is not None:
            raise NotADirectory(dst)
        src_prefix, dst_prefix = self._dir_prefix(src), self._dir_prefix(dst)
        token = hashlib.sha256(src_prefix.encode("utf-8")).hexdigest()[:32]
        dst_marker = await self.run_sync(self._head, dst_prefix) if dst_keys else None
        resuming = dst_marker is not None and dst_marker.metadata.get(M_RENAME) == token
        if any(k != dst_prefix for k in dst_keys) and not resuming:
            raise NotEmpty(dst)
        if resuming and dst_marker is not None:
            log.info("resuming interrupted rename of %s to %s", self._what(src_prefix), self._what(dst_prefix))
            meta = {k: v for k, v in dst_marker.metadata.items() if k != M_RENAME}
        else:
            src_marker = await self.run_sync(self._head, src_prefix)
            meta = dict(src_marker.metadata) if src_marker is not None else {}
        await self.run_sync(self._put_marker, dst_prefix, {**meta, M_RENAME: token})
        listed = await self.run_sync(self._list_all, src_prefix)
        moving = [item for item in listed if item.key != src_prefix]

        def copy(item: _Listed) -> None:
            self._copy_key(item.key, dst_prefix + item.key[len(src_prefix) :], item.size, item.etag)

        await self._parallel(copy, moving, self._max_threads)
        # Every key now exists at the destination: only now delete the originals.
        await self.run_sync(self._delete_keys, [item.key for item in moving])
        if len(moving) != len(listed):
            await self.run_sync(self._delete_keys, [src_prefix])
        await self.run_sync(self._put_marker, dst_prefix, meta)
        for item in moving:
            self._cache.drop(item.key)
        await self.run_sync(self._keep_parent, src)

    # --- async API ----------------------------------------------------------------------------------------
    async def stat(self, path: str) -> ObjectInfo:
        return await self.run_sync(self._stat, path)

    async def list(self, path: str) -> list[ObjectInfo]:
        """List a directory (all pages).

        Files carry size, ETag and LastModified as mtime; ``mode``/``uid``/``gid``
        are None unless this backend HEADed that object version before.  Objects
        that may be symlinks (see the module docstring) are fetched to confirm.
        Keys that cannot be file names are skipped with a warning.
        """
        entries, candidates = await self.run_sync(self._list_sync, path)
        if candidates:
            fetched = await self._parallel(
                lambda c: (c[0], self._fetch_listed(entries[c[0]].path, c[1])), candidates, self._max_threads
            )
            for name, info in fetched:
                if info is None:
                    del entries[name]
                else:
                    entries[name] = info
        return [entries[name] for name in sorted(entries)]

    async def read_versioned(self, path: str, offset: int, size: int) -> tuple[bytes, str]:
        return await self.run_sync(self._read_versioned, path, offset, size)

    async def read(self, path: str, offset: int, size: int) -> bytes:
        """Return up to ``size`` bytes at ``offset`` with one ranged GET (b"" at or after EOF)."""
        return await self.run_sync(self._read, path, offset, size)

    async def delete(self, path: str) -> None:
        await self.run_sync(self._delete, path)

    async def mkdir(self, path: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        path = check_path(path)
        if not path:
            raise AlreadyExists("the root always exists")
        obj, is_dir = await self._probe(path)
        if obj is not None or is_dir:
            raise AlreadyExists(path)
        return await self.run_sync(self._mkdir, path, attrs)

    async def rmdir(self, path: str) -> None:
        await self.run_sync(self._rmdir, path)

    async def symlink(self, path: str, target: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        path = check_path(path)
        if not path:
            raise AlreadyExists("the root always exists")
        _symlink_body(target)
        obj, is_dir = await self._probe(path)
        if obj is not None or is_dir:
            raise AlreadyExists(path)
        return await self.run_sync(self._symlink, path, target, attrs)

    async def set_attrs(self, path: str, attrs: SetAttrs) -> ObjectInfo:
        """Store mode/uid/gid/mtime (atime is not kept) by rewriting metadata in place."""
        return await self.run_sync(self._set_attrs, path, attrs)

    async def get_xattrs(self, path: str) -> dict[str, bytes]:
        return await self.run_sync(self._get_xattrs, path)

    async def set_xattr(self, path: str, name: str, value: bytes | None) -> None:
        """Set or remove one xattr; E2BIG when all metadata would exceed S3's 2 KiB."""
        await self.run_sync(self._set_xattr, path, name, value)

    async def set_metadata(
        self, path: str, content_type: str, updates: Mapping[str, str | None], *, check_only: bool = False
    ) -> ObjectInfo | None:
        """Set the content type and user metadata of a file by a metadata-only copy (REPLACE)."""
        return await self.run_sync(self._set_metadata, path, content_type, updates, check_only)

    async def statfs(self) -> None:
        return None

    async def aclose(self) -> None:
        """Close the client's connections; idempotent (a later call opens a new client)."""
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
