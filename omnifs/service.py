"""The systemd user service: the ``omnifs@.service`` template unit and its installer.

One template unit serves every remote: instance ``omnifs@NAME.service`` mounts
remote ``NAME`` from the config file.  Per-instance settings live in an
environment file next to the unit, ``omnifs-NAME.env``:

* ``OMNIFS_MOUNTPOINT`` — absolute mountpoint (one argument, spaces allowed);
* ``OMNIFS_MOUNT_ARGS`` — extra ``omnifs mount`` arguments, split at whitespace
  (e.g. ``-o ro``);
* ``OMNIFS_CONFIG`` — config file, only when not the default one.

The mount runs in the foreground as ``Type=notify``: it sends ``READY=1`` once
the filesystem answers and ``STOPPING=1`` on SIGTERM, then uploads pending data
and unmounts, so ``systemctl --user stop`` drains (``TimeoutStopSec=300``).

Installing writes files only under ``$XDG_CONFIG_HOME/systemd/user``
(default ``~/.config/systemd/user``) and touches systemd only through
``systemctl --user``, when a user manager is reachable.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omnifs.errors import ConfigError

UNIT_NAME = "omnifs@.service"
SHIPPED_EXEC = ("/usr/bin/env", "omnifs")  # the repository's systemd/omnifs@.service
SHIPPED_ENV_DIR = "%E/systemd/user"  # %E: the user manager's $XDG_CONFIG_HOME
STOP_TIMEOUT_S = 300

_UNIT_TEMPLATE = """\
# omnifs@.service: mount the omnifs remote named by the instance, e.g. omnifs@photos.service.
# Written by `omnifs service install NAME [MOUNTPOINT]`, which also writes the
# environment file omnifs-NAME.env (OMNIFS_MOUNTPOINT, OMNIFS_MOUNT_ARGS) next to it.
# On stop (SIGTERM) omnifs uploads pending data, then unmounts.

[Unit]
Description=omnifs mount of remote %i

[Service]
Type=notify
NotifyAccess=main
EnvironmentFile={env_dir}/omnifs-%i.env
ExecStart={exec} -v mount --foreground $OMNIFS_MOUNT_ARGS %i: ${{OMNIFS_MOUNTPOINT}}
Restart=on-failure
RestartSec=10
TimeoutStartSec=120
TimeoutStopSec={stop_timeout}
KillMode=mixed

[Install]
WantedBy=default.target
"""


def _unit_escape(word: str) -> str:
    """Quote one ExecStart word for a unit file (``%`` and ``$`` escaped, quoted if needed)."""
    word = word.replace("%", "%%").replace("$", "$$")
    if word and all(c.isalnum() or c in "/._-+=:@,%$" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_text(exec_argv: Sequence[str], env_dir: str) -> str:
    """Return the template unit running ``exec_argv`` (the omnifs command) with env files in ``env_dir``.

    ``env_dir`` is written as is (it may hold specifiers such as ``%E``); a
    literal path is expected to have ``%`` already doubled (see ``install``).
    """
    return _UNIT_TEMPLATE.format(
        exec=" ".join(_unit_escape(w) for w in exec_argv), env_dir=env_dir, stop_timeout=STOP_TIMEOUT_S
    )


def unit_dir() -> Path:
    """``$XDG_CONFIG_HOME/systemd/user`` (default ``~/.config/systemd/user``)."""
    value = os.environ.get("XDG_CONFIG_HOME")
    base = Path(value) if value and os.path.isabs(value) else Path.home() / ".config"
    return base / "systemd" / "user"


def env_file(name: str) -> Path:
    return unit_dir() / f"omnifs-{name}.env"


def instance(name: str) -> str:
    return f"omnifs@{name}.service"


def omnifs_command() -> list[str]:
    """The absolute command that runs this omnifs: its console script, else ``python -m omnifs``."""
    beside = Path(sys.executable).parent / "omnifs"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside.absolute())]
    found = shutil.which("omnifs")
    if found:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "omnifs"]


def default_mountpoint(name: str) -> Path:
    return Path.home() / f"OmniFS-{name}"


_ENV_FORBIDDEN = set('"\\$`\n\r')


def _env_value(key: str, value: str) -> str:
    bad = sorted(c for c in set(value) if c in _ENV_FORBIDDEN)
    if bad:
        raise ConfigError(f"{key} must not contain {' '.join(map(repr, bad))}: {value!r}", key=key)
    return f'{key}="{value}"'


def env_text(name: str, mountpoint: str, mount_args: Sequence[str], config_file: str | None) -> str:
    """The environment file of instance ``name``; ConfigError for values systemd cannot carry."""
    lines = [
        f"# {instance(name)}: written by `omnifs service install`",
        _env_value("OMNIFS_MOUNTPOINT", mountpoint),
        _env_value("OMNIFS_MOUNT_ARGS", " ".join(mount_args)),
    ]
    if any(c.isspace() for a in mount_args for c in a):
        raise ConfigError("mount arguments of a service must not contain spaces", key="-o")
    if config_file:
        lines.append(_env_value("OMNIFS_CONFIG", config_file))
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, mode: int) -> None:
    from omnifs.config import _atomic_write

    _atomic_write(path, text, mode)


# --- systemctl ---------------------------------------------------------------------------


def _systemctl() -> str | None:
    return shutil.which("systemctl")


def user_manager_reachable() -> bool:
    """True when ``systemctl --user`` can talk to a running user manager."""
    exe = _systemctl()
    if exe is None:
        return False
    try:
        res = subprocess.run([exe, "--user", "show-environment"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def _run_systemctl(*args: str) -> None:
    """Run ``systemctl --user ARGS``; RuntimeError with its message when it fails."""
    exe = _systemctl() or "systemctl"
    res = subprocess.run([exe, "--user", *args], capture_output=True, text=True, timeout=120, check=False)
    if res.returncode != 0:
        detail = (res.stderr or res.stdout).strip().splitlines()
        raise RuntimeError(f"systemctl --user {' '.join(args)} failed: {detail[-1] if detail else res.returncode}")


@dataclass
class InstallResult:
    unit: Path
    env: Path
    mountpoint: Path
    reachable: bool
    enabled: bool
    commands: list[str] = field(default_factory=list)  # what the user still has to run


def install(
    name: str,
    mountpoint: str | None,
    *,
    enable: bool,
    config_file: Path | None = None,
    mount_args: Sequence[str] = (),
    exec_argv: Sequence[str] | None = None,
) -> InstallResult:
    """Write the unit and the instance's environment file; enable it when a user manager is reachable.

    Idempotent: re-running replaces both files (atomically).  The remote must
    exist in the config (ConfigError otherwise); the mountpoint is created.
    Raises RuntimeError when systemctl refuses.
    """
    from omnifs.config import load_config

    config = load_config(config_file, must_exist=config_file is not None)
    if name not in config.remotes:
        known = ", ".join(sorted(config.remotes)) or "none configured"
        raise ConfigError(f"unknown remote {name!r} (known: {known}); add it with 'omnifs config add'", key="NAME")
    mp = Path(os.path.abspath(os.path.expanduser(mountpoint))) if mountpoint else default_mountpoint(name)
    directory = unit_dir()
    unit = directory / UNIT_NAME
    env = env_file(name)
    env_body = env_text(name, str(mp), mount_args, str(config_file.absolute()) if config_file else None)
    unit_body = unit_text(exec_argv or omnifs_command(), str(directory).replace("%", "%%"))
    try:
        mp.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise ConfigError(f"mountpoint {mp} exists and is not a directory", key="MOUNTPOINT") from None
    except OSError as exc:
        if not mp.is_dir() and not os.path.ismount(mp):
            raise ConfigError(f"cannot create mountpoint {mp}: {exc.strerror}", key="MOUNTPOINT") from None
    _write(unit, unit_body, 0o644)
    _write(env, env_body, 0o600)
    result = InstallResult(unit, env, mp, user_manager_reachable(), False)
    if result.reachable:
        _run_systemctl("daemon-reload")
        if enable:
            _run_systemctl("enable", "--now", instance(name))
            result.enabled = True
        else:
            result.commands = [f"systemctl --user enable --now {instance(name)}"]
    else:
        result.commands = [f"systemctl --user daemon-reload && systemctl --user enable --now {instance(name)}"]
    return result


@dataclass
class UninstallResult:
    removed: list[Path]
    reachable: bool
    commands: list[str] = field(default_factory=list)


def uninstall(name: str) -> UninstallResult:
    """Stop and disable ``omnifs@NAME``, remove its environment file, and the unit when no instance is left.

    Idempotent; the remote's config and secrets are not touched.
    """
    directory = unit_dir()
    reachable = user_manager_reachable()
    result = UninstallResult([], reachable)
    if reachable:
        try:
            _run_systemctl("disable", "--now", instance(name))
        except RuntimeError:
            if env_file(name).exists():
                raise
    wants = directory / "default.target.wants" / instance(name)
    for path in (env_file(name), wants):
        if path.is_symlink() or path.exists():
            path.unlink()
            result.removed.append(path)
    unit = directory / UNIT_NAME
    if unit.exists() and not any(directory.glob("omnifs-*.env")):
        unit.unlink()
        result.removed.append(unit)
    if reachable:
        _run_systemctl("daemon-reload")
    else:
        result.commands = [f"systemctl --user disable --now {instance(name)}; systemctl --user daemon-reload"]
    return result


def shell_join(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
