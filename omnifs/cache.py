"""Persistent disk cache: metadata (stat results, listings) and file data by chunk.

Layout under ``~/.cache/omnifs/<remote>/`` (mode 0700), each a ``diskcache``
(SQLite-backed, transactional, safe across processes and crashes):

- ``metadata.sqlite``: stat results and listings, one row per entry (``metacache.py``);
- ``meta/``: ``P\\0<path>`` -> pinned marker.
- ``data/``: ``<version>\\0<path>\\0<chunk>`` -> bytes, evicted least-recently-used
  once the size cap is reached.
- ``pinned/``: the same keys for pinned files, never evicted.

Chunks are keyed by the object's *version* (etag, or size+mtime where a backend
has no etag), so a changed object can never be served from old chunks, and one
read never mixes chunks of two versions.  All methods block (SQLite and file
I/O): callers run them in worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import diskcache

from omnifs.backends.base import ObjectInfo, version_key
from omnifs.metacache import MetadataStore

log = logging.getLogger(__name__)

CacheMode = Literal["off", "writes", "full"]
CHUNK_SIZE = 1 << 20
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse ``10G``, ``512M``, ``4096`` (binary units) into bytes; ValueError if malformed."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS else ""
    number = t[: len(t) - len(unit)] if unit else t
    value = float(number)
    if value < 0:
        raise ValueError(text)
    return int(value * _SIZE_UNITS[unit])


version_of = version_key


@dataclass(frozen=True, slots=True)
class CacheSettings:
    mode: CacheMode = "full"
    max_size: int = 10 << 30
    min_free: int = 1 << 30  # stop caching data when the disk has less free space
    dir_cache_time: float = 300.0
    chunk_size: int = CHUNK_SIZE


class DiskCache:
    """The persistent cache of one remote."""

    def __init__(self, directory: Path, settings: CacheSettings) -> None:
        self.directory = directory
        self.settings = settings
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        common: dict[str, Any] = {"statistics": False, "sqlite_mmap_size": 0}
        self.meta = diskcache.Cache(str(directory / "meta"), eviction_policy="none", size_limit=1 << 62, **common)
        self.metadata = MetadataStore(directory / "metadata.sqlite")
        self.data = diskcache.Cache(
            str(directory / "data"),
            eviction_policy="least-recently-used",
            size_limit=max(settings.max_size, 1),
            cull_limit=16,
            **common,
        )
        self.pinned = diskcache.Cache(str(directory / "pinned"), eviction_policy="none", size_limit=1 << 62, **common)

    def close(self) -> None:
        for c in (self.meta, self.data, self.pinned):
            c.close()
        self.metadata.close()

    # --- metadata (one SQLite row per entry: see metacache.py) ------------------------
    def get_stat(self, path: str) -> tuple[float, ObjectInfo | None] | None:
        """Return (fetched_at, info-or-None-if-absent), derived from the parent listing if needed."""
        return self.metadata.get_stat(path)

    def put_stat(self, path: str, info: ObjectInfo | None, fetched_at: float | None = None) -> None:
        """Store a stat observed at ``fetched_at``; a newer entry (our own change) is kept."""
        self.metadata.put_stat(path, info, fetched_at)

    def get_listing(self, path: str) -> tuple[float, dict[str, ObjectInfo]] | None:
        return self.metadata.get_listing(path)

    def put_listing(self, path: str, infos: list[ObjectInfo], fetched_at: float | None = None) -> list[ObjectInfo]:
        """Store a listing; return it with entries replaced by richer cached stats of the same version."""
        return self.metadata.put_listing(path, infos, fetched_at)

    def record(self, path: str, info: ObjectInfo | None) -> None:
        """Write-through of a change made by this mount: update the stat and the parent listing."""
        self.metadata.record(path, info)

    def has_metadata(self) -> bool:
        """True when anything was ever listed or looked up (a mount can start offline)."""
        return self.metadata.has_any()

    def move_tree(self, old: str, new: str) -> None:
        """Re-key cached metadata at and below ``old`` to ``new`` (a rename made while offline).

        Parent listings are not touched: the caller records ``old`` as gone and
        ``new`` as present.  Cached data and pins move along, so what was
        readable offline stays readable under the new name.
        """

        def moved(path: str) -> str | None:
            return new + path[len(old) :] if path == old or path.startswith(old + "/") else None

        for store in (self.data, self.pinned):
            for key in list(store.iterkeys()):
                version, _, rest = key.partition("\0")
                path, _, index = rest.rpartition("\0")
                target = moved(path)
                if target is not None:
                    value = store.get(key)
                    if value is not None:
                        store.set(f"{version}\0{target}\0{index}", value)
                    store.delete(key)
        for pinned in self.pinned_paths():
            target = moved(pinned)
            if target is not None:
                self.meta.set("P\0" + target, self.meta.get("P\0" + pinned))
                self.meta.delete("P\0" + pinned)
        self.metadata.move_tree(old, new)

    def forget_stat(self, path: str) -> None:
        """Drop the cached stat of one path (its parent's listing is left alone)."""
        self.metadata.forget_stat(path)

    def stale_listing(self, path: str) -> None:
        """Mark a cached listing as outdated: listed again when online, still used while offline."""
        self.metadata.stale_listing(path)

    def forget_listing(self, path: str) -> None:
        self.metadata.forget_listing(path)

    def forget_tree(self, path: str) -> None:
        """Drop cached metadata for ``path`` and everything below it."""
        self.metadata.forget_tree(path)

    # --- pins --------------------------------------------------------------------------
    def pin(self, path: str) -> None:
        self.meta.set("P\0" + path, time.time())

    def unpin(self, path: str) -> list[str]:
        """Remove pins at or below ``path`` and make their data evictable again; return the pins removed."""

        def below(p: str) -> bool:
            return not path or p == path or p.startswith(path + "/")

        removed = [p for p in self.pinned_paths() if below(p)]
        for p in removed:
            self.meta.delete("P\0" + p)
        for key in list(self.pinned.iterkeys()):
            if isinstance(key, str) and below(key.split("\0")[1]) and not self.is_pinned(key.split("\0")[1]):
                data = self.pinned.get(key)
                if data is not None:
                    self.data.set(key, data)
                self.pinned.delete(key)
        return removed

    def pinned_paths(self) -> list[str]:
        return sorted(k[2:] for k in self.meta.iterkeys() if isinstance(k, str) and k.startswith("P\0"))

    def is_pinned(self, path: str) -> bool:
        parts = path.split("/") if path else []
        for i in range(len(parts), -1, -1):
            if "P\0" + "/".join(parts[:i]) in self.meta:
                return True
        return False

    # --- data ----------------------------------------------------------------------------
    @staticmethod
    def chunk_key(path: str, version: str, index: int) -> str:
        return f"{version}\0{path}\0{index}"

    def get_chunk(self, path: str, version: str, index: int, protect: bool = False) -> bytes | None:
        """A cached chunk, or None; with ``protect`` it is moved out of reach of eviction."""
        key = self.chunk_key(path, version, index)
        data = self.pinned.get(key)
        if data is None:
            data = self.data.get(key)
            if data is not None and protect:
                self.pinned.set(key, data)
                self.data.delete(key)
        return data  # type: ignore[no-any-return]

    def release_chunks(self, path: str, version: str, size: int) -> None:
        """Make the protected chunks of one version evictable again (unless the path is pinned)."""
        if self.is_pinned(path):
            return
        for index in range((size + self.settings.chunk_size - 1) // self.settings.chunk_size):
            key = self.chunk_key(path, version, index)
            data = self.pinned.get(key)
            if data is not None:
                self.data.set(key, data)
                self.pinned.delete(key)

    def has_chunk(self, path: str, version: str, index: int) -> bool:
        key = self.chunk_key(path, version, index)
        return key in self.pinned or key in self.data

    def enough_space(self) -> bool:
        try:
            return shutil.disk_usage(self.directory).free > self.settings.min_free
        except OSError:
            return False

    def put_chunk(self, path: str, version: str, index: int, data: bytes, pinned: bool = False) -> bool:
        """Store a chunk; returns False (and stores nothing) when the disk is too full."""
        if not self.enough_space():
            return False
        key = self.chunk_key(path, version, index)
        try:
            if pinned:
                self.pinned.set(key, data)
                self.data.delete(key)
            else:
                self.data.set(key, data)
        except OSError as exc:  # ENOSPC and friends: the cache stays consistent, just smaller
            log.warning("not caching %s: %s", path, exc)
            return False
        return True

    def put_file(self, path: str, version: str, src: Path, pinned: bool = False) -> None:
        """Cache a whole local file as chunks of ``version`` (write-through after upload)."""
        size = self.settings.chunk_size
        with open(src, "rb") as f:
            index = 0
            while chunk := f.read(size):
                if not self.put_chunk(path, version, index, chunk, pinned=pinned):
                    return
                index += 1

    def drop_version(self, path: str, version: str, size: int) -> None:
        """Remove the cached chunks of one version of ``path`` (pinned ones too)."""
        for index in range((size + self.settings.chunk_size - 1) // self.settings.chunk_size):
            key = self.chunk_key(path, version, index)
            self.data.delete(key)
            self.pinned.delete(key)

    def stats(self) -> dict[str, int]:
        return {
            "data_bytes": int(self.data.volume()),
            "data_chunks": len(self.data),
            "pinned_bytes": int(self.pinned.volume()),
            "pinned_chunks": len(self.pinned),
            "meta_entries": self.metadata.count(),
            "max_size": self.settings.max_size,
        }



@contextlib.contextmanager
def _stores(directory: Path) -> Iterator[tuple[diskcache.Cache, diskcache.Cache, diskcache.Cache]]:
    """Open an existing cache's stores without changing their stored settings (size cap...)."""
    stores = [diskcache.Cache(str(directory / name)) for name in ("meta", "data", "pinned")]
    try:
        yield stores[0], stores[1], stores[2]
    finally:
        for s in stores:
            s.close()


def _metadata_count(directory: Path) -> int:
    store = MetadataStore(directory / "metadata.sqlite")
    try:
        return store.count()
    finally:
        store.close()


def cache_report(directory: Path) -> dict[str, object]:
    """Usage of the cache in ``directory`` (safe while a mount uses it)."""
    with _stores(directory) as (meta, data, pinned):
        pins = sorted(k[2:] for k in meta.iterkeys() if isinstance(k, str) and k.startswith("P\0"))
        return {
            "remote": directory.name,
            "dir": str(directory),
            "used_bytes": int(data.volume()),
            "chunks": len(data),
            "max_bytes": int(data.size_limit),
            "pinned_bytes": int(pinned.volume()),
            "pinned_paths": pins,
            "metadata_entries": _metadata_count(directory),
        }


def clear_cache(directory: Path, *, include_pinned: bool = False) -> None:
    """Drop cached data and metadata (pinned data and pins too with ``include_pinned``)."""
    with _stores(directory) as (meta, data, pinned):
        data.clear()
        store = MetadataStore(directory / "metadata.sqlite")
        try:
            store.clear()
        finally:
            store.close()
        for key in list(meta.iterkeys()):
            if include_pinned or not (isinstance(key, str) and key.startswith("P\0")):
                meta.delete(key)
        if include_pinned:
            pinned.clear()
