"""Backend access through the persistent cache, with health tracking and offline fallback.

``Remote`` sits between the VFS and a backend:

- metadata (``stat``, ``list``) is answered from the disk cache while it is
  younger than ``dir_cache_time``, and from the cache at any age while the
  backend is offline;
- file data is read by chunk through the data cache (``cache_mode=full``),
  keyed by the object's version, with parallel read-ahead for sequential reads;
- read-path calls are bounded by ``timeout``: a backend that does not answer
  makes the call fail with EIO and marks the backend offline;
- a probe notices on its own when an offline backend answers again, after
  which everything cached before is revalidated.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from omnifs.backends.base import Backend, ObjectInfo, parent_of, version_key
from omnifs.cache import DiskCache
from omnifs.errors import BackendUnavailable, NotADirectory, NotFound, OmniError, PathUnavailable, TransientError

log = logging.getLogger(__name__)

HOT_CHUNKS = 16

T = TypeVar("T")


class VersionChanged(OmniError):
    """The object changed on the backend while it was being read."""

    def __init__(self, path: str, version: str) -> None:
        super().__init__(f"{path} changed on the backend")
        self.version = version


@dataclass(frozen=True, slots=True)
class RemoteSettings:
    timeout: float = 10.0  # bound on read-path calls (stat, list, read)
    probe_interval: float = 2.0  # how often an offline backend is probed
    readahead_chunks: int = 4
    cache_reads: bool = True  # cache_mode=full


@dataclass(slots=True)
class Health:
    online: bool = True
    last_error: str | None = None
    last_change: float = 0.0
    revalidate_after: float = 0.0  # cached entries older than this are stale while online


def is_unavailable(exc: BaseException) -> bool:
    """True for errors that mean "the backend cannot be reached right now"."""
    return isinstance(exc, (BackendUnavailable, TransientError))


class Remote:
    """A backend seen through the disk cache; every method runs on the trio thread."""

    def __init__(self, backend: Backend, cache: DiskCache | None, settings: RemoteSettings | None = None) -> None:
        self.backend = backend
        self.cache = cache
        self.settings = settings or RemoteSettings()
        # Metadata cached by an earlier run is revalidated on first use while online
        # (and used as it is while offline).
        self.health = Health(revalidate_after=time.time())
        self._cache_limiter = trio.CapacityLimiter(4)
        self._inflight: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self._prefetch_slots = trio.Semaphore(max(1, self.settings.readahead_chunks))
        self._online_waiters: list[Callable[[], Awaitable[None]]] = []
        # Paths open for reading: their chunks are kept out of reach of eviction until closed.
        self._open: dict[str, int] = {}
        # The last few chunks, in memory: sequential kernel reads (128 KiB) hit a chunk many times.
        self._hot: OrderedDict[str, bytes] = OrderedDict()
        self._gate: Callable[[], Awaitable[bool]] | None = None
        self._probe_now = trio.Event()

    # --- plumbing ---------------------------------------------------------------------
    async def in_cache(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking cache operation in a worker thread."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._cache_limiter)

    def mark_offline(self, exc: BaseException | str) -> None:
        reason = str(exc) or type(exc).__name__
        self.health.last_error = reason
        if self.health.online:
            self.health.online = False
            self.health.last_change = time.time()
            log.warning("backend %s is offline: %s", self.backend.name, reason)

    def mark_online(self) -> None:
        if not self.health.online:
            now = time.time()
            self.health.online = True
            self.health.last_change = now
            self.health.revalidate_after = now
            log.warning("backend %s is back online; revalidating cached metadata", self.backend.name)
            if self._nursery is not None:
                for callback in self._online_waiters:
                    self._nursery.start_soon(callback)

    def on_online(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` in the background each time the backend comes back."""
        self._online_waiters.append(callback)

    async def guarded(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float | None = None) -> T:
        """Call the backend; unavailability or silence past ``timeout`` marks it offline."""
        try:
            if timeout is None:
                return await fn(*args)
            with trio.move_on_after(timeout) as scope:
                return await fn(*args)
        except OmniError as exc:
            if is_unavailable(exc) and not isinstance(exc, PathUnavailable):
                self.mark_offline(exc)
            raise
        assert scope.cancelled_caught
        self.mark_offline(f"no answer within {timeout:g} s")
        raise BackendUnavailable(f"{self.backend.name}: no answer within {timeout:g} s")

    def _offline_error(self, what: str) -> BackendUnavailable:
        return BackendUnavailable(f"{what}: backend {self.backend.name} is offline and this is not cached")

    def _fresh(self, fetched_at: float) -> bool:
        if self.cache is None:
            return False
        return (
            fetched_at >= self.health.revalidate_after and time.time() - fetched_at < self.cache.settings.dir_cache_time
        )

    # --- metadata -------------------------------------------------------------------------
    async def stat(self, path: str, *, allow_cached: bool = True) -> ObjectInfo:
        """Info for ``path``; NotFound if absent.  Cached answers are used while fresh (or offline)."""
        cached = await self.in_cache(self.cache.get_stat, path) if self.cache is not None else None
        if cached is not None and (not self.health.online or (allow_cached and self._fresh(cached[0]))):
            if cached[1] is None:
                raise NotFound(path)
            return cached[1]
        if not self.health.online:
            raise self._offline_error(path or "/")
        started = time.time()  # cache entries are stamped with when they were observed
        try:
            info = await self.guarded(self.backend.stat, path, timeout=self.settings.timeout)
        except NotFound:
            if self.cache is not None:
                await self.in_cache(self.cache.put_stat, path, None, started)
            raise
        except OmniError as exc:
            if is_unavailable(exc) and cached is not None:
                if cached[1] is None:
                    raise NotFound(path) from None
                return cached[1]
            raise
        if self.cache is not None:
            await self.in_cache(self.cache.put_stat, path, info, started)
        return info

    async def list(self, path: str, *, allow_cached: bool = True) -> list[ObjectInfo]:
        """Children of ``path``; the cached listing is used while fresh (or offline)."""
        cached = await self.in_cache(self.cache.get_listing, path) if self.cache is not None else None
        if cached is not None and (not self.health.online or (allow_cached and self._fresh(cached[0]))):
            return sorted(cached[1].values(), key=lambda i: i.name)
        if not self.health.online:
            raise self._offline_error(path or "/")
        started = time.time()
        try:
            infos = await self.guarded(self.backend.list, path, timeout=self.settings.timeout * 6)
        except OmniError as exc:
            if is_unavailable(exc) and cached is not None:
                return sorted(cached[1].values(), key=lambda i: i.name)
            if isinstance(exc, (NotFound, NotADirectory)) and self.cache is not None:
                await self.in_cache(self.cache.forget_tree, path)
            raise
        if self.cache is not None:
            infos = await self.in_cache(self.cache.put_listing, path, infos, started)
        return infos

    async def cached_listing(self, path: str) -> dict[str, ObjectInfo] | None:
        if self.cache is None:
            return None
        got = await self.in_cache(self.cache.get_listing, path)
        return None if got is None else got[1]

    async def record(self, path: str, info: ObjectInfo | None) -> None:
        """Write-through: remember the result of a change this mount made."""
        if self.cache is not None:
            derived, stale = self._derived_of(path)
            await self.in_cache(_record_change, self.cache, path, info, derived, stale)

    async def record_listing(self, path: str, infos: list[ObjectInfo]) -> None:
        """Write-through of a listing this mount knows completely (a directory it just created)."""
        if self.cache is not None:
            await self.in_cache(self.cache.put_listing, path, infos)

    async def forget_tree(self, path: str) -> None:
        """Drop cached metadata at and below ``path`` and the parent's cached listing."""
        if self.cache is not None:
            await self.in_cache(self.cache.forget_tree, path)
            await self.in_cache(self.cache.forget_listing, parent_of(path))
            await self._forget_derived(path)

    async def _forget_derived(self, path: str) -> None:
        """Drop cached entries rendered from ``path`` (its companion .meta.json, backends/metafiles.py)."""
        derived, stale = self._derived_of(path)
        if derived and self.cache is not None:
            await self.in_cache(_record_change, self.cache, None, None, derived, stale)

    def _derived_of(self, path: str) -> tuple[list[str], str | None]:
        """(cached paths rendered from ``path``, the listing that shows them, to mark stale) -- no I/O."""
        derived = getattr(self.backend, "derived_paths", None)
        paths = derived(path) if derived is not None else []
        # The listing shows the companion too: list again when online, keep it for offline use.
        stale = parent_of(path) if paths and getattr(self.backend, "lists_derived", False) else None
        return paths, stale

    # --- data -------------------------------------------------------------------------------
    @property
    def chunk_size(self) -> int:
        return self.cache.settings.chunk_size if self.cache is not None else 1 << 20

    async def read(self, info: ObjectInfo, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``offset`` of version ``info``; VersionChanged if it moved on."""
        end = min(offset + size, info.size)
        if end <= offset:
            return b""
        if self.cache is None or not self.settings.cache_reads:
            if not self.health.online:
                raise self._offline_error(info.path)
            return await self.guarded(self.backend.read, info.path, offset, end - offset, timeout=self.settings.timeout)
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        version = version_key(info)
        parts = [await self._chunk(info, version, index) for index in range(first, last + 1)]
        data = b"".join(parts)
        start = offset - first * cs
        return data[start : start + (end - offset)]

    def prefetch(self, info: ObjectInfo, from_index: int) -> None:
        """Start background fetches of the next read-ahead chunks (no-op when offline or uncached)."""
        if self._nursery is None or self.cache is None or not self.settings.cache_reads or not self.health.online:
            return
        count = math.ceil(info.size / self.chunk_size)
        version = version_key(info)
        for index in range(from_index, min(count, from_index + self.settings.readahead_chunks)):
            key = DiskCache.chunk_key(info.path, version, index)
            if key not in self._inflight:
                self._nursery.start_soon(self._prefetch_one, info, version, index)

    async def _prefetch_one(self, info: ObjectInfo, version: str, index: int) -> None:
        async with self._prefetch_slots:
            try:
                await self._chunk(info, version, index)
            except OmniError as exc:
                log.debug("read-ahead of %s chunk %d failed: %s", info.path, index, exc)

    def _remember(self, key: str, data: bytes) -> None:
        self._hot[key] = data
        self._hot.move_to_end(key)
        while len(self._hot) > HOT_CHUNKS:
            self._hot.popitem(last=False)

    async def _chunk(self, info: ObjectInfo, version: str, index: int) -> bytes:
        assert self.cache is not None
        key = DiskCache.chunk_key(info.path, version, index)
        hot = self._hot.get(key)
        if hot is not None:
            self._hot.move_to_end(key)
            return hot
        protect = info.path in self._open
        while True:
            data = await self.in_cache(self.cache.get_chunk, info.path, version, index, protect)
            if data is not None:
                self._remember(key, data)
                return data
            pending = self._inflight.get(key)
            if pending is None:
                break
            await pending.wait()
        if not self.health.online:
            raise self._offline_error(info.path)
        event = self._inflight[key] = trio.Event()
        try:
            cs = self.chunk_size
            data, got = await self.guarded(
                self.backend.read_versioned, info.path, index * cs, cs, timeout=self.settings.timeout
            )
            if got != version:
                raise VersionChanged(info.path, got)
            self._remember(key, data)
            pinned = protect or await self.in_cache(self.cache.is_pinned, info.path)
            await self.in_cache(self.cache.put_chunk, info.path, version, index, data, pinned)
            return data
        finally:
            del self._inflight[key]
            event.set()

    def protect(self, path: str) -> None:
        """A reader opened ``path``: keep its chunks from being evicted while it is open."""
        self._open[path] = self._open.get(path, 0) + 1

    async def unprotect(self, info: ObjectInfo, also: ObjectInfo | None = None) -> None:
        """The last reader of ``info.path`` closed: its chunks (of ``info`` and ``also``) may be evicted again."""
        count = self._open.get(info.path, 0) - 1
        if count > 0:
            self._open[info.path] = count
            return
        self._open.pop(info.path, None)
        if self.cache is not None and self.settings.cache_reads:
            versions = [info] if also is None or version_key(also) == version_key(info) else [info, also]
            for v in versions:
                await self.in_cache(self.cache.release_chunks, v.path, version_key(v), v.size)

    # --- background -------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve background work (probe, read-ahead) until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._probe_loop)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def set_online_gate(self, gate: Callable[[], Awaitable[bool]]) -> None:
        """Run ``gate`` when an offline backend answers again; it comes online only if it returns True.

        The VFS replays its namespace journal here, so nothing is served from
        the backend before the changes made while it was away have reached it.
        """
        self._gate = gate

    def probe_soon(self) -> None:
        """Probe an offline backend now instead of at the next interval."""
        self._probe_now.set()

    async def reconnect(self) -> bool:
        """Probe the backend once; if it answers (and the gate passes), mark it online.  True when online."""
        if self.health.online:
            return True
        try:
            await self.guarded(self.backend.stat, "", timeout=self.settings.timeout)
        except OmniError as exc:
            self.health.last_error = str(exc)
            return False
        if self._gate is not None and not await self._gate():
            return False
        self.mark_online()
        return True

    async def _probe_loop(self) -> None:
        while True:
            with trio.move_on_after(self.settings.probe_interval):
                await self._probe_now.wait()
            self._probe_now = trio.Event()
            await self.reconnect()

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Run ``fn`` in the background nursery; False when not running."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args)
        return True


def _record_change(
    cache: DiskCache, path: str | None, info: ObjectInfo | None, derived: list[str], stale: str | None
) -> None:
    """One worker-thread trip: record a change at ``path`` and forget what is rendered from it."""
    if path is not None:
        cache.record(path, info)
    for p in derived:
        cache.forget_stat(p)
    if stale is not None:
        cache.stale_listing(stale)
