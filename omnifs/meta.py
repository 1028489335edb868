"""Companion ``.meta.json`` files: naming rules and the versioned schema (pure functions).

Every regular file ``workflow-1.blueprint.yaml`` has a companion
``workflow-1.blueprint.meta.json`` holding its metadata as JSON (see
``docs/metadata.md``).  This module holds only pure logic:

- naming: which name is the companion of which file in one directory
  (:func:`companion_map`), including the collision rule;
- the schema: :func:`render` produces the document, :func:`parse` checks a
  written one and returns the writable fields (:class:`UserMeta`);
- the encodings of the writable fields as S3 user metadata and as xattrs.

Storage (the wrapper backend that presents companions) lives in
``omnifs/backends/metafiles.py``; the search index in ``omnifs/metaindex.py``.
"""

from __future__ import annotations

import datetime
import json
import mimetypes
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SCHEMA = 1
SUFFIX = ".meta.json"
NAME_MAX = 255
MAX_DOCUMENT = 64 << 10  # a companion larger than this is refused (E2BIG)

KEYS = (
    "schema",
    "name",
    "size",
    "modified",
    "created",
    "etag",
    "content_type",
    "tags",
    "author",
    "description",
    "custom",
)
READ_ONLY = ("name", "size", "modified", "created", "etag")
WRITABLE = ("content_type", "tags", "author", "description", "custom")
# Read-only fields that identify the content: a written document must agree with them.
IDENTITY = ("name", "size", "modified")

XATTR_PREFIX = "user.omnifs."
# user.omnifs.pin / flush / pending are control attributes of the VFS; field names never collide with them.
XATTR_FIELDS = tuple(k for k in KEYS if k != "schema")

# S3 user-metadata keys (x-amz-meta-<key>) holding the writable fields; content type is native.
S3_KEYS = {"tags": "tags", "author": "author", "description": "description", "custom": "custom"}


class MetaError(ValueError):
    """A companion document or metadata value that cannot be accepted; the message says why."""


# --- naming ---------------------------------------------------------------------------


def is_companion_name(name: str) -> bool:
    """True for names of the companion form (``*.meta.json``); such files never get companions."""
    return name.endswith(SUFFIX) and len(name) > len(SUFFIX)


def has_companion(name: str) -> bool:
    """True when a regular file called ``name`` gets a companion.

    Dot files (``.gitignore``, editor swap files) and companions themselves do not.
    """
    return bool(name) and not name.startswith(".") and not is_companion_name(name)


def dir_has_companions(path: str) -> bool:
    """False inside hidden directories (``.git/``, ``.cache/``): no companions there at all."""
    return not any(part.startswith(".") for part in path.split("/") if part)


def short_name(name: str) -> str:
    """``a.b.yaml`` -> ``a.b.meta.json``; a name without extension gets the suffix appended."""
    stem, dot, _ext = name.rpartition(".")
    if not dot or not stem:
        return name + SUFFIX
    return stem + SUFFIX


def full_name(name: str) -> str:
    """The unambiguous form: ``a.yaml`` -> ``a.yaml.meta.json``."""
    return name + SUFFIX


def _fits(name: str) -> bool:
    return len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX


def companion_map(files: Iterable[str]) -> dict[str, str]:
    """Map companion name -> file name for the regular files ``files`` of one directory.

    A file uses its short companion name unless another file of the directory
    would get the same name; then every file involved uses ``<full name>.meta.json``.
    The result never maps two files to one name and never uses the name of one
    of ``files`` (a real file wins over a companion).
    """
    files = list(files)
    names = sorted({f for f in files if has_companion(f)})
    real = {f for f in files if not is_companion_name(f)}
    full: set[str] = set()
    while True:
        chosen: dict[str, list[str]] = {}
        for n in names:
            c = full_name(n) if n in full else short_name(n)
            chosen.setdefault(c, []).append(n)
        clash = {n for group in chosen.values() if len(group) > 1 for n in group if n not in full}
        if not clash:
            break
        full |= clash
    return {c: group[0] for c, group in chosen.items() if c not in real and _fits(c)}


def alternate_names(name: str) -> tuple[str, ...]:
    """Both possible companion names of a file (short first); used to find a stored companion."""
    s, f = short_name(name), full_name(name)
    return (s,) if s == f else (s, f)


# --- the writable fields ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserMeta:
    """The writable fields of one file's metadata (``None``: not set)."""

    content_type: str | None = None
    tags: tuple[str, ...] = ()
    author: str | None = None
    description: str | None = None
    custom: Mapping[str, Any] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return (
            self.content_type is None
            and not self.tags
            and self.author is None
            and self.description is None
            and not self.custom
        )

    def without_content_type(self) -> UserMeta:
        return UserMeta(None, self.tags, self.author, self.description, self.custom)

    def with_field(self, key: str, value: Any) -> UserMeta:
        """Return a copy with one writable field set (``None`` resets it); MetaError if invalid."""
        values = {k: getattr(self, k) for k in WRITABLE}
        values[key] = _check_field(key, value)
        return UserMeta(
            content_type=values["content_type"],
            tags=tuple(values["tags"] or ()),
            author=values["author"],
            description=values["description"],
            custom=dict(values["custom"] or {}),
        )


@dataclass(frozen=True, slots=True)
class SystemFields:
    """The read-only fields, always taken live from the file itself."""

    name: str
    size: int
    modified_ns: int
    created_ns: int | None
    etag: str | None


def iso(ns: int | None) -> str | None:
    """Nanoseconds since the epoch as ISO 8601 UTC with whole seconds (``2026-01-02T03:04:05Z``)."""
    if ns is None or ns <= 0:
        return None
    dt = datetime.datetime.fromtimestamp(ns // 1_000_000_000, tz=datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def guess_content_type(name: str) -> str:
    return mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"


def document(system: SystemFields, user: UserMeta, default_content_type: str | None = None) -> dict[str, Any]:
    """The companion document as a dict, keys in schema order."""
    return {
        "schema": SCHEMA,
        "name": system.name,
        "size": system.size,
        "modified": iso(system.modified_ns),
        "created": iso(system.created_ns),
        "etag": system.etag,
        "content_type": user.content_type or default_content_type or guess_content_type(system.name),
        "tags": list(user.tags),
        "author": user.author,
        "description": user.description,
        "custom": dict(user.custom),
    }


def render(system: SystemFields, user: UserMeta, default_content_type: str | None = None) -> bytes:
    """The companion's bytes: pretty-printed JSON in schema order, UTF-8, ending in a newline."""
    doc = document(system, user, default_content_type)
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _check_field(key: str, value: Any) -> Any:
    if key == "tags":
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
            raise MetaError("tags must be a list of non-empty strings")
        out: list[str] = []
        for t in value:
            if t not in out:
                out.append(t)
        return tuple(out)
    if key == "custom":
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise MetaError("custom must be a JSON object")
        return value
    if key in ("author", "description", "content_type"):
        if value is not None and not isinstance(value, str):
            raise MetaError(f"{key} must be a string or null")
        if key == "content_type" and value is not None and ("/" not in value or any(c.isspace() for c in value)):
            raise MetaError(f"content_type {value!r} is not a media type like text/plain")
        return value or None
    raise MetaError(f"{key} is not a writable field")


def parse(
    data: bytes,
    live: SystemFields | None = None,
    *,
    default_content_type: str | None = None,
) -> UserMeta:
    """Check a written companion document and return its writable fields.

    Raises MetaError (with the reason) for invalid JSON, a value that is not an
    object, an unknown top-level key, a wrong ``schema`` or field type, and --
    when ``live`` is given -- a read-only field that disagrees with the file:
    ``name``, ``size`` and ``modified`` (whole seconds) must match when present.
    ``created`` and ``etag`` identify one stored copy; a document copied from
    another store (``cp -a``) carries other values, so they are not compared.
    Missing writable fields are reset; a ``content_type`` equal to the default
    is not stored.
    """
    if len(data) > MAX_DOCUMENT:
        raise MetaError(f"document is {len(data)} bytes; at most {MAX_DOCUMENT} are accepted")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MetaError(f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MetaError("the document must be a JSON object")
    unknown = sorted(set(doc) - set(KEYS))
    if unknown:
        raise MetaError(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(KEYS)}")
    if "schema" in doc and doc["schema"] != SCHEMA:
        raise MetaError(f"schema {doc['schema']!r} is not supported (this omnifs writes schema {SCHEMA})")
    if live is not None:
        expected = {"name": live.name, "size": live.size, "modified": iso(live.modified_ns)}
        for key in IDENTITY:
            if key in doc and doc[key] != expected[key]:
                raise MetaError(f"{key} is read-only: {doc[key]!r} differs from the file's {expected[key]!r}")
    meta = UserMeta()
    for key in WRITABLE:
        meta = meta.with_field(key, doc.get(key))
    if meta.content_type is not None and live is not None:
        default = default_content_type or guess_content_type(live.name)
        if meta.content_type == default:
            meta = meta.without_content_type()
    return meta


def looks_like_companion(data: bytes) -> bool:
    """True when ``data`` is a JSON object using only schema keys (safe to replace or delete)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return not data.strip()
    return isinstance(doc, dict) and set(doc) <= set(KEYS)


def parse_stored(data: bytes) -> UserMeta:
    """Read the writable fields of a companion file found on the backend (lenient: bad fields are dropped)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return UserMeta()
    if not isinstance(doc, dict):
        return UserMeta()
    meta = UserMeta()
    for key in WRITABLE:
        try:
            meta = meta.with_field(key, doc.get(key))
        except MetaError:
            continue
    return meta


# --- S3 user metadata -----------------------------------------------------------------------


def _header_value(text: str) -> str:
    """Plain printable ASCII as is; anything else (or a leading quote) as a JSON string literal."""
    if text and text.isascii() and text.isprintable() and not text.startswith('"') and text == text.strip():
        return text
    return json.dumps(text, ensure_ascii=True)


def _from_header(value: str) -> str:
    if value.startswith('"'):
        try:
            out = json.loads(value)
            if isinstance(out, str):
                return out
        except ValueError:
            pass
    return value


def to_s3(user: UserMeta) -> dict[str, str | None]:
    """User-metadata updates for S3 (``None`` removes a key); content type is set natively."""
    return {
        S3_KEYS["tags"]: json.dumps(list(user.tags), ensure_ascii=True, separators=(",", ":")) if user.tags else None,
        S3_KEYS["author"]: _header_value(user.author) if user.author is not None else None,
        S3_KEYS["description"]: _header_value(user.description) if user.description is not None else None,
        S3_KEYS["custom"]: json.dumps(dict(user.custom), ensure_ascii=True, separators=(",", ":"))
        if user.custom
        else None,
    }


def from_s3(metadata: Mapping[str, str], content_type: str | None, name: str) -> UserMeta:
    """Writable fields from S3 user metadata; a content type equal to the guess counts as unset."""
    meta = UserMeta()
    raw_tags = metadata.get(S3_KEYS["tags"])
    raw_custom = metadata.get(S3_KEYS["custom"])
    values: dict[str, Any] = {
        "tags": _loads(raw_tags) if raw_tags else None,
        "author": _from_header(metadata[S3_KEYS["author"]]) if S3_KEYS["author"] in metadata else None,
        "description": _from_header(metadata[S3_KEYS["description"]]) if S3_KEYS["description"] in metadata else None,
        "custom": _loads(raw_custom) if raw_custom else None,
        "content_type": content_type if content_type and content_type != guess_content_type(name) else None,
    }
    for key, value in values.items():
        try:
            meta = meta.with_field(key, value)
        except MetaError:
            continue
    return meta


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


# --- xattrs ------------------------------------------------------------------------------------


def to_xattrs(doc: Mapping[str, Any]) -> dict[str, bytes]:
    """``user.omnifs.<field>`` values of a document (strings raw, tags/custom as JSON); unset fields absent."""
    out: dict[str, bytes] = {}
    for key in XATTR_FIELDS:
        value = doc.get(key)
        if value is None or (key == "custom" and not value):
            continue
        if key in ("tags", "custom"):
            out[XATTR_PREFIX + key] = json.dumps(value, ensure_ascii=False).encode("utf-8")
        else:
            out[XATTR_PREFIX + key] = str(value).encode("utf-8")
    return out


def field_from_xattr(key: str, raw: bytes) -> Any:
    """Decode an xattr value written for writable field ``key``; MetaError if malformed."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MetaError(f"{XATTR_PREFIX}{key} must be UTF-8") from None
    if key in ("tags", "custom"):
        try:
            value = json.loads(text) if text.strip() else None
        except ValueError:
            kind = "a list" if key == "tags" else "an object"
            raise MetaError(f"{XATTR_PREFIX}{key} must be JSON ({kind})") from None
        _check_field(key, value)
        return value
    return _check_field(key, text)
