"""Mount lifetime: options, stale-mount cleanup, serving, signals and drain.

``serve`` runs in the process that owns the FUSE session (the foreground mount).
It never touches its own mountpoint from the serving thread.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from omnifs.backends.base import Backend
from omnifs.backends.metafiles import MetaBackend
from omnifs.cache import CacheMode, CacheSettings, DiskCache, parse_size
from omnifs.errors import ConfigError, OmniError, from_oserror
from omnifs.fuse_ops import FuseOperations, PyfuseNotifier
from omnifs.journal import Journal
from omnifs.metaindex import INDEX_FILE, MetaIndex
from omnifs.remote import Remote, RemoteSettings
from omnifs.staging import StagingArea
from omnifs.vfs import VFS, VfsOptions

log = logging.getLogger(__name__)

# FUSE options passed straight to the kernel/libfuse.
FUSE_FLAGS = {
    "allow_other",
    "allow_root",
    "default_permissions",
    "ro",
    "noatime",
    "noexec",
    "nosuid",
    "nodev",
    "sync",
    "dirsync",
    "debug",
}


def _parse_bool(key: str, value: str) -> bool:
    v = value.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"option {key}: expected true/false, got {value!r}", key=key)


def _parse_float(key: str, value: str) -> float:
    """Parse a number of seconds; ``5s``, ``2m``, ``1h`` and ``250ms`` are accepted too."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    scale = 1.0
    for suffix in ("ms", "s", "m", "h"):
        if value.endswith(suffix) and value[: -len(suffix)].replace(".", "", 1).isdigit():
            value, scale = value[: -len(suffix)], units[suffix]
            break
    try:
        out = float(value) * scale
    except ValueError:
        raise ConfigError(f"option {key}: expected a number, got {value!r}", key=key) from None
    if out < 0:
        raise ConfigError(f"option {key}: must not be negative", key=key)
    return out


@dataclass(frozen=True, slots=True)
class MountOptions:
    """Options from ``-o``: kernel flags plus omnifs settings."""

    fuse_flags: frozenset[str] = frozenset({"default_permissions"})
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    writeback_cache: bool = True
    probe_timeout: float = 30.0
    cache_mode: CacheMode = "full"
    cache_max_size: int = 10 << 30
    cache_min_free: int = 1 << 30
    dir_cache_time: float = 300.0
    poll_interval: float = 60.0
    timeout: float = 10.0
    write_back: float = 5.0
    sync_upload: bool = False
    drain_timeout: float = 120.0
    meta_files: str = "show"  # companion .meta.json files in listings: show | hide (docs/metadata.md)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def read_only(self) -> bool:
        return "ro" in self.fuse_flags


_FLOAT_OPTIONS = (
    "attr_timeout",
    "entry_timeout",
    "probe_timeout",
    "dir_cache_time",
    "poll_interval",
    "timeout",
    "write_back",
    "drain_timeout",
)


def parse_mount_options(items: Iterable[str]) -> MountOptions:
    """Parse ``-o`` values (each may hold comma-separated ``key`` or ``key=value``)."""
    flags = {"default_permissions"}
    kw: dict[str, object] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            key, has_value, value = part.partition("=")
            if key in FUSE_FLAGS and not has_value:
                flags.add(key)
            elif key == "default_permissions" and has_value:
                if not _parse_bool(key, value):
                    flags.discard(key)
            elif key in _FLOAT_OPTIONS and has_value:
                kw[key] = _parse_float(key, value)
            elif key in ("cache_max_size", "cache_min_free") and has_value:
                try:
                    kw[key] = parse_size(value)
                except ValueError:
                    raise ConfigError(f"option {key}: expected a size like 10G, got {value!r}", key=key) from None
            elif key == "cache_mode" and has_value:
                if value not in ("off", "writes", "full"):
                    raise ConfigError(f"option cache_mode: expected off, writes or full, got {value!r}", key=key)
                kw[key] = value
            elif key in ("writeback_cache", "sync_upload"):
                kw[key] = _parse_bool(key, value) if has_value else True
            elif key == "meta_files" and has_value:
                if value not in ("show", "hide"):
                    raise ConfigError(f"option meta_files: expected show or hide, got {value!r}", key=key)
                kw[key] = value
            elif key == "rw" and not has_value:
                flags.discard("ro")
            else:
                raise ConfigError(f"unknown mount option {part!r}", key=key)
    return MountOptions(fuse_flags=frozenset(flags), **kw)  # type: ignore[arg-type]


def mount_table() -> dict[str, str]:
    """Map each mountpoint in this namespace to its filesystem type."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = fields[4].encode().decode("unicode_escape")
            out[point] = fields[sep + 1]
    return out


def raise_readahead(mountpoint: str, kib: int = 1024) -> None:
    """Let the kernel read ahead ``kib`` per request on this mount (root only; best effort).

    ``mountpoint`` must already be resolved: this reads /proc/self/mountinfo and
    never touches the mountpoint itself, so it is safe in the serving process.
    """
    real = mountpoint
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == real:
                try:
                    Path(f"/sys/class/bdi/{fields[2]}/read_ahead_kb").write_text(str(kib))
                except OSError as exc:
                    log.debug("cannot raise read-ahead for %s: %s", real, exc)
                return


def is_omnifs_mount(mountpoint: str) -> bool:
    return mount_table().get(os.path.realpath(mountpoint)) == "fuse.omnifs"


def clean_stale_mount(mountpoint: str) -> None:
    """Lazily unmount a mountpoint left behind by a dead process (ENOTCONN)."""
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        log.warning("cleaning stale mount at %s (Transport endpoint is not connected)", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False, capture_output=True)
        os.stat(mountpoint)


def check_mountpoint(mountpoint: str) -> str:
    """Validate the mountpoint (cleaning a stale mount first); ConfigError when unusable."""
    try:
        clean_stale_mount(mountpoint)
    except FileNotFoundError:
        raise ConfigError(f"mountpoint {mountpoint} does not exist", key="MOUNTPOINT") from None
    except OSError as exc:
        raise ConfigError(f"mountpoint {mountpoint}: {exc.strerror}", key="MOUNTPOINT") from None
    if not os.path.isdir(mountpoint):
        raise ConfigError(f"mountpoint {mountpoint} is not a directory", key="MOUNTPOINT")
    real = os.path.realpath(mountpoint)
    if real in mount_table() and is_omnifs_mount(real):
        raise ConfigError(f"{mountpoint} is already an omnifs mount", key="MOUNTPOINT")
    return real


def sd_notify(message: str) -> None:
    """Send a systemd notification if ``NOTIFY_SOCKET`` is set (no-op otherwise)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("could not notify systemd: %s", exc)


@dataclass(frozen=True, slots=True)
class MountRecord:
    """The JSON file describing a running mount (read by ``omnifs status`` and ``unmount``)."""

    path: Path
    mountpoint: str
    source: str
    remote: str

    def write(self, data: dict[str, object]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)


def runtime_dir() -> Path:
    from omnifs.config import state_home

    return state_home() / "mounts"


def mount_record_path(mountpoint: str) -> Path:
    import hashlib

    return runtime_dir() / (hashlib.sha256(mountpoint.encode()).hexdigest()[:16] + ".json")


def read_mount_record(mountpoint: str) -> dict[str, object] | None:
    try:
        return json.loads(mount_record_path(os.path.realpath(mountpoint)).read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


class RemoteUnreachable(Exception):
    """The backend failed its start-up probe."""


async def probe(backend: Backend, timeout: float) -> None:
    """Check that the backend answers and its root is a directory; RemoteUnreachable otherwise."""
    try:
        with trio.fail_after(timeout):
            info = await backend.stat("")
    except trio.TooSlowError:
        raise RemoteUnreachable(f"no answer within {timeout:g} s") from None
    except OmniError as exc:
        raise RemoteUnreachable(str(exc) or type(exc).__name__) from exc
    if not info.is_dir:
        raise RemoteUnreachable("the remote root is not a directory")


def status_record(vfs: VFS, record: MountRecord) -> dict[str, object]:
    """What ``omnifs status`` shows for this mount (never secrets)."""
    remote = vfs.remote
    cache = remote.cache
    out: dict[str, object] = {
        "pid": os.getpid(),
        "mountpoint": record.mountpoint,
        "source": record.source,
        "remote": record.remote,
        "backends": [
            {
                "name": vfs.backend.name,
                "type": vfs.backend.type_name,
                "online": remote.health.online,
                "last_error": remote.health.last_error,
            }
        ],
        "journal": vfs.queue_stats(),
        "updated": time.time(),
    }
    # Wrapper backends (failover, mirror) report each child: name, online, last_error, pending_repairs.
    children = getattr(getattr(vfs.backend, "inner", vfs.backend), "replica_status", None)
    if children is not None:
        out["backends"] += children()  # type: ignore[operator]
    if cache is not None:
        out["cache"] = {"mode": cache.settings.mode, "dir": str(cache.directory), "max_bytes": cache.settings.max_size}
    return out


async def _publish_status(vfs: VFS, record: MountRecord) -> None:
    """Keep the mount record current (atomically replaced) for ``omnifs status``."""
    while True:
        data = status_record(vfs, record)
        cache = vfs.remote.cache
        if cache is not None:
            stats = await vfs.remote.in_cache(cache.stats)
            data["cache"] = {**data["cache"], "used_bytes": stats["data_bytes"], "pinned_bytes": stats["pinned_bytes"]}  # type: ignore[dict-item]
        await trio.to_thread.run_sync(record.write, data)
        await trio.sleep(2)


async def _serve(vfs: VFS, backend: Backend, drain_timeout: float, record: MountRecord) -> None:
    async with trio.open_nursery() as nursery:

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    log.info("received %s: unmounting", signal.Signals(signum).name)
                    sd_notify("STOPPING=1")
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signals)
        await nursery.start(vfs.run)
        nursery.start_soon(_publish_status, vfs, record)
        sd_notify("READY=1")
        log.info("mounted; serving requests")
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    pending = vfs.pending_uploads()
    if pending:
        log.warning("unmounting: uploading %d pending file(s) first (up to %g s)", pending, drain_timeout)
    failed: list[str] | None = None
    with trio.move_on_after(drain_timeout):
        failed = await vfs.drain()
    if failed is None:
        log.error(
            "pending uploads did not finish within %g s; they are kept in %s and resume at the next mount",
            drain_timeout,
            vfs.staging.directory,
        )
    elif failed:
        log.error(
            "%d file(s) could not be uploaded; they are kept in %s and resume at the next mount: %s",
            len(failed),
            vfs.staging.directory,
            ", ".join(failed[:10]),
        )
    with trio.move_on_after(10):
        await backend.aclose()


def raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one (systemd's default soft limit is 1024)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def open_state(staging_dir: Path) -> tuple[StagingArea, Journal]:
    """Open the staging area and the journal, proving they can keep data durably.

    Raises OmniError naming the directory and the cause (EROFS, ENOSPC, EACCES,
    ...): a mount whose writes could not be kept safe is refused, not started.
    """
    try:
        try:
            staging = StagingArea(staging_dir)
            staging.check_writable()
            return staging, Journal(staging_dir.parent / "journal")
        except OSError as exc:
            raise from_oserror(exc, f"cannot keep pending writes in {exc.filename or staging_dir.parent}") from exc
    except OmniError as exc:
        raise OmniError(f"{exc}; not mounting, since writes could not be kept safe", errno=exc.errno) from exc


def serve(
    backend: Backend,
    mountpoint: str,
    options: MountOptions,
    staging_dir: Path,
    source: str,
    *,
    cache_dir: Path,
) -> None:
    """Mount ``backend`` on ``mountpoint`` and serve until unmounted or signalled."""
    mountpoint = check_mountpoint(mountpoint)
    raise_fd_limit()
    staging, journal = open_state(staging_dir)
    backend = MetaBackend(
        backend, show=options.meta_files == "show", index=MetaIndex(cache_dir / INDEX_FILE)
    )  # companion .meta.json files and user.omnifs.* xattrs over every backend
    cache = DiskCache(
        cache_dir,
        CacheSettings(
            mode=options.cache_mode,
            max_size=options.cache_max_size,
            min_free=options.cache_min_free,
            dir_cache_time=options.dir_cache_time,
        ),
    )
    remote = Remote(
        backend,
        cache,
        RemoteSettings(timeout=options.timeout, cache_reads=options.cache_mode == "full"),
    )
    vfs = VFS(
        remote,
        staging,
        VfsOptions(
            attr_ttl=options.attr_timeout,
            poll_interval=options.poll_interval,
            cache_writes=options.cache_mode != "off",
            write_back=options.write_back,
            sync_upload=options.sync_upload,
        ),
        kernel=PyfuseNotifier(),
        journal=journal,
    )
    ops = FuseOperations(
        vfs,
        entry_timeout=options.entry_timeout,
        attr_timeout=options.attr_timeout,
        writeback_cache=options.writeback_cache and not options.read_only,
    )
    fuse_options = {f"fsname={source.replace(',', '_')}", "subtype=omnifs", *options.fuse_flags}
    if os.geteuid() == 0 or "allow_other" in options.fuse_flags:
        fuse_options.add("auto_unmount")
    record = MountRecord(mount_record_path(mountpoint), mountpoint, source, cache_dir.name)

    async def main() -> None:
        try:
            await probe(backend, options.probe_timeout)
        except RemoteUnreachable as exc:
            if not cache.has_metadata():
                raise
            log.warning("remote %s is unreachable (%s); starting offline from the cache", source, exc)
            remote.mark_offline(str(exc))
        pyfuse3.init(ops, mountpoint, fuse_options)
        raise_readahead(mountpoint)
        try:
            record.write(status_record(vfs, record))
            await _serve(vfs, backend, options.drain_timeout, record)
        finally:
            with contextlib.suppress(OSError):
                record.path.unlink()
            pyfuse3.close(unmount=True)

    try:
        trio.run(main)
    finally:
        cache.close()
