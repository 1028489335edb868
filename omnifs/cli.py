"""The ``omnifs`` command line: the only place that turns exceptions into exit codes.

Exit codes: 0 success, 1 runtime failure, 2 bad input (config, options, mountpoint).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from omnifs import __version__
from omnifs.config import (
    ResolvedRemote,
    build_backend,
    cache_home,
    load_config,
    resolve_remote,
    state_home,
)
from omnifs.errors import ConfigError, OmniError

log = logging.getLogger("omnifs")

EXIT_RUNTIME = 1
EXIT_USAGE = 2


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # paramiko logs dropped connections as tracebacks; omnifs reports them itself.
    logging.getLogger("paramiko").setLevel(logging.DEBUG if verbose >= 3 else logging.CRITICAL)


def _fail(message: str, code: int) -> None:
    click.echo(f"omnifs: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="omnifs")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Mount any storage backend as an ordinary folder."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    _setup_logging(verbose)


def _split_mount_args(args: tuple[str, ...]) -> tuple[str | None, str]:
    if len(args) == 1:
        return None, args[0]
    if len(args) == 2:
        return args[0], args[1]
    raise ConfigError("usage: omnifs mount [REMOTE] MOUNTPOINT")


def _staging_dir(resolved: ResolvedRemote) -> Path:
    return cache_home() / resolved.name / "staging"


@main.command()
@click.argument("args", nargs=-1, required=True)
@click.option("-f", "--foreground", is_flag=True, help="Stay attached (used by systemd, tests and benchmarks).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help="Config file.")
@click.option("-o", "options", multiple=True, help="Mount option KEY[=VALUE] (repeatable, comma-separated).")
@click.pass_context
def mount(
    ctx: click.Context, args: tuple[str, ...], foreground: bool, config_file: Path | None, options: tuple[str, ...]
) -> None:
    """Mount REMOTE (NAME:[path], local:/abs/path, memory:, s3://bucket/prefix) on MOUNTPOINT.

    Without REMOTE the embedded default store (~/.local/share/omnifs/default) is mounted.
    """
    from omnifs.mount import check_mountpoint, is_omnifs_mount, parse_mount_options

    try:
        spec, mountpoint = _split_mount_args(args)
        config = load_config(config_file, must_exist=config_file is not None)
        resolved = resolve_remote(spec, config)
        mount_opts = parse_mount_options(options)
        check_mountpoint(mountpoint)
        if resolved.remote.type == "local" and spec is None:
            Path(resolved.remote.options["path"]).mkdir(parents=True, exist_ok=True, mode=0o700)
        backend = build_backend(resolved)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    except OmniError as exc:
        _fail(str(exc), EXIT_USAGE)

    if not foreground:
        _mount_background(ctx, args, config_file, options, mountpoint, resolved)
        return

    from omnifs.mount import RemoteUnreachable, serve

    source = spec or f"{resolved.name}:"
    try:
        serve(backend, mountpoint, mount_opts, _staging_dir(resolved), source)
    except RemoteUnreachable as exc:
        _fail(f"remote {resolved.name!r} ({backend.describe()}): {exc}", EXIT_RUNTIME)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    except OmniError as exc:
        _fail(str(exc), EXIT_RUNTIME)
    except RuntimeError as exc:
        _fail(f"mount failed: {exc}", EXIT_RUNTIME)
    if is_omnifs_mount(mountpoint):
        sys.exit(EXIT_RUNTIME)


def _mount_background(
    ctx: click.Context,
    args: tuple[str, ...],
    config_file: Path | None,
    options: tuple[str, ...],
    mountpoint: str,
    resolved: ResolvedRemote,
) -> None:
    """Start a detached foreground mount and return once the mount answers."""
    from omnifs.mount import is_omnifs_mount

    log_dir = state_home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"{resolved.name}.log"
    cmd = [sys.executable, "-m", "omnifs"]
    cmd += ["-v"] * max(1, ctx.obj["verbose"])
    cmd += ["mount", "--foreground", *args]
    if config_file is not None:
        cmd += ["--config", str(config_file)]
    for opt in options:
        cmd += ["-o", opt]
    with open(log_file, "ab") as logf:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True, close_fds=True
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if is_omnifs_mount(mountpoint):
            try:
                os.stat(mountpoint)
            except OSError:
                pass
            else:
                click.echo(f"mounted {resolved.name} on {mountpoint} (pid {proc.pid}, log {log_file})")
                return
        code = proc.poll()
        if code is not None:
            tail = log_file.read_text(errors="replace").splitlines()[-5:]
            for line in tail:
                click.echo(line, err=True)
            _fail(f"mount process exited with code {code}", code or EXIT_RUNTIME)
        time.sleep(0.05)
    proc.terminate()
    _fail(f"mount did not come up within 60 s; see {log_file}", EXIT_RUNTIME)


@main.command()
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=str))
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for pending uploads.")
@click.option("-z", "--lazy", is_flag=True, help="Detach even if busy (fusermount3 -u -z).")
def unmount(mountpoint: str, timeout: float, lazy: bool) -> None:
    """Unmount MOUNTPOINT, letting pending uploads finish first."""
    from omnifs.mount import is_omnifs_mount, read_mount_record

    real = os.path.realpath(mountpoint)
    record = read_mount_record(real)
    pid = int(record["pid"]) if record and isinstance(record.get("pid"), int) else None  # type: ignore[arg-type]
    if not is_omnifs_mount(real):
        try:
            os.stat(real)
        except OSError:
            subprocess.run(["fusermount3", "-u", "-z", real], check=False, capture_output=True)
            click.echo(f"cleaned stale mount {real}")
            return
        _fail(f"{mountpoint} is not an omnifs mount", EXIT_USAGE)
    if pid is not None and not lazy:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pid = None
    if pid is None or lazy:
        cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), real]
        res = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if res.returncode != 0:
            _fail(res.stderr.strip() or "fusermount3 failed", EXIT_RUNTIME)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = pid is not None and _alive(pid)
        if not alive and not is_omnifs_mount(real):
            click.echo(f"unmounted {real}")
            return
        time.sleep(0.05)
    _fail(f"{real} did not unmount within {timeout:g} s", EXIT_RUNTIME)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    main()
