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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from omnifs.backends.base import Backend
from omnifs.errors import ConfigError, OmniError
from omnifs.fuse_ops import FuseOperations
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
    try:
        out = float(value)
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
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def read_only(self) -> bool:
        return "ro" in self.fuse_flags


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
            elif key in ("attr_timeout", "entry_timeout", "probe_timeout") and has_value:
                kw[key] = _parse_float(key, value)
            elif key == "writeback_cache":
                kw[key] = _parse_bool(key, value) if has_value else True
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


async def _serve(vfs: VFS, backend: Backend) -> None:
    async with trio.open_nursery() as nursery:

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    log.info("received %s: unmounting", signal.Signals(signum).name)
                    sd_notify("STOPPING=1")
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signals)
        sd_notify("READY=1")
        log.info("mounted; serving requests")
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    failed = await vfs.drain()
    if failed:
        log.error("%d file(s) could not be uploaded; their data is kept in %s", len(failed), vfs.staging.directory)
    await backend.aclose()


def serve(
    backend: Backend,
    mountpoint: str,
    options: MountOptions,
    staging_dir: Path,
    source: str,
) -> None:
    """Mount ``backend`` on ``mountpoint`` and serve until unmounted or signalled."""
    mountpoint = check_mountpoint(mountpoint)
    staging = StagingArea(staging_dir)
    leftovers = staging.leftovers()
    if leftovers:
        log.warning("%d staged file(s) from an earlier run are kept in %s", len(leftovers), staging_dir)
    vfs = VFS(backend, staging, VfsOptions(attr_ttl=options.attr_timeout))
    ops = FuseOperations(
        vfs,
        entry_timeout=options.entry_timeout,
        attr_timeout=options.attr_timeout,
        writeback_cache=options.writeback_cache and not options.read_only,
    )
    fuse_options = {f"fsname={source.replace(',', '_')}", "subtype=omnifs", *options.fuse_flags}
    if os.geteuid() == 0 or "allow_other" in options.fuse_flags:
        fuse_options.add("auto_unmount")
    record = mount_record_path(mountpoint)

    async def main() -> None:
        await probe(backend, options.probe_timeout)
        pyfuse3.init(ops, mountpoint, fuse_options)
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"pid": os.getpid(), "mountpoint": mountpoint, "source": source}))
            await _serve(vfs, backend)
        finally:
            with contextlib.suppress(OSError):
                record.unlink()
            pyfuse3.close(unmount=True)

    trio.run(main)
