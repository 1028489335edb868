"""Persistent disk cache: metadata (stat results, listings) and file data by chunk.

Layout under ``~/.cache/omnifs/<remote>/`` (mode 0700), each a ``diskcache``
(SQLite-backed, transactional, safe across processes and crashes):

- ``meta/``: ``S\\0<path>`` -> (fetched_at, ObjectInfo or None for "absent"),
  ``L\\0<dir>`` -> (fetched_at, {name: ObjectInfo}), ``P\\0<path>`` -> pinned marker.
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

from omnifs.backends.base import ObjectInfo, basename, parent_of, version_key

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

    # --- metadata -------------------------------------------------------------------
    def get_stat(self, path: str) -> tuple[float, ObjectInfo | None] | None:
        """Return (fetched_at, info-or-None-if-absent), derived from the parent listing if needed."""
        own = self.meta.get("S\0" + path)
        listing = self.meta.get("L\0" + parent_of(path)) if path else None
        from_listing = None
        if listing is not None:
            fetched, entries = listing
            from_listing = (fetched, entries.get(basename(path)))
        if own is None:
            return from_listing
        if from_listing is not None and from_listing[0] > own[0]:
            # A newer listing wins unless it shows the same version (keep the richer stat).
            info = from_listing[1]
            if info is None or own[1] is None or version_of(info) != version_of(own[1]):
                return from_listing
            return (from_listing[0], own[1])
        return own  # type: ignore[no-any-return]

    def put_stat(self, path: str, info: ObjectInfo | None, fetched_at: float | None = None) -> None:
        """Store a stat observed at ``fetched_at``; a newer entry (our own change) is kept."""
        now = fetched_at or time.time()
        with self.meta.transact():
            old = self.meta.get("S\0" + path)
            if old is None or old[0] <= now:
                self.meta.set("S\0" + path, (now, info))

    def get_listing(self, path: str) -> tuple[float, dict[str, ObjectInfo]] | None:
        return self.meta.get("L\0" + path)  # type: ignore[no-any-return]

    def put_listing(self, path: str, infos: list[ObjectInfo], fetched_at: float | None = None) -> list[ObjectInfo]:
        """Store a listing; return it with entries replaced by richer cached stats of the same version.

        Listings of some backends (S3) lack mode and owner; a stat fetched
        earlier for the same version has them, so it is used instead.
        """
        now = fetched_at or time.time()
        merged: dict[str, ObjectInfo] = {}
        with self.meta.transact():
            for info in infos:
                old = self.meta.get("S\0" + info.path)
                if old is not None and old[0] > now:
                    # Observed after this listing started (a change this mount made): it wins.
                    if old[1] is not None:
                        merged[info.name] = old[1]
                elif old is not None and old[1] is not None and version_of(old[1]) == version_of(info):
                    merged[info.name] = old[1] if info.mode is None else info
                else:
                    merged[info.name] = info
                    if old is not None:
                        self.meta.delete("S\0" + info.path)  # stale
            # Entries this mount created after the listing started are not in it yet.
            previous = self.meta.get("L\0" + path)
            if previous is not None:
                for name, info in previous[1].items():
                    own = self.meta.get("S\0" + info.path)
                    if name not in merged and own is not None and own[0] > now and own[1] is not None:
                        merged[name] = own[1]
            self.meta.set("L\0" + path, (now, merged))
        return sorted(merged.values(), key=lambda i: i.name)

    def record(self, path: str, info: ObjectInfo | None) -> None:
        """Write-through of a change made by this mount: update the stat and the parent listing."""
        now = time.time()
        with self.meta.transact():
            self.meta.set("S\0" + path, (now, info))
            if not path:
                return
            key = "L\0" + parent_of(path)
            listing = self.meta.get(key)
            if listing is not None:
                fetched, entries = listing
                entries = dict(entries)
                if info is None:
                    entries.pop(basename(path), None)
                else:
                    entries[basename(path)] = info
                self.meta.set(key, (fetched, entries))

    def forget_stat(self, path: str) -> None:
        """Drop the cached stat of one path (its parent's listing is left alone)."""
        self.meta.delete("S\0" + path)

    def stale_listing(self, path: str) -> None:
        """Mark a cached listing as outdated: listed again when online, still used while offline."""
        with self.meta.transact():
            listing = self.meta.get("L\0" + path)
            if listing is not None:
                self.meta.set("L\0" + path, (0.0, listing[1]))

    def forget_listing(self, path: str) -> None:
        self.meta.delete("L\0" + path)

    def forget_tree(self, path: str) -> None:
        """Drop cached metadata for ``path`` and everything below it."""
        prefixes = ("S\0" + path, "L\0" + path)
        with self.meta.transact():
            for key in list(self.meta.iterkeys()):
                if isinstance(key, str) and key.startswith(prefixes):
                    rest = key[2 + len(path) :]
                    if rest == "" or rest.startswith("/") or not path:
                        self.meta.delete(key)

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
            "meta_entries": len(self.meta),
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
            "metadata_entries": len(meta),
        }


def clear_cache(directory: Path, *, include_pinned: bool = False) -> None:
    """Drop cached data and metadata (pinned data and pins too with ``include_pinned``)."""
    with _stores(directory) as (meta, data, pinned):
        data.clear()
        for key in list(meta.iterkeys()):
            if include_pinned or not (isinstance(key, str) and key.startswith("P\0")):
                meta.delete(key)
        if include_pinned:
            pinned.clear()
