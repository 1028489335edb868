"""The ``omnifs`` command line: the only place that turns exceptions into exit codes.

Exit codes: 0 success, 1 runtime failure, 2 bad input (config, options, mountpoint).
Every message and log line passes through ``credentials.redact``, so a secret
never reaches the terminal, a log file or the journal.  Shell completion is
click's: ``eval "$(_OMNIFS_COMPLETE=bash_source omnifs)"`` (or zsh_source,
fish_source).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from omnifs import __version__
from omnifs.errors import ConfigError, OmniError

if TYPE_CHECKING:
    from types import TracebackType

    from omnifs.config import RemoteConfig, ResolvedRemote

# Light on purpose: `omnifs find` and `omnifs status` must start fast, so this module imports
# neither omnifs.config nor omnifs.credentials (both pull in the backends and trio) nor
# omnifs.mount (pyfuse3); commands import what they need.

log = logging.getLogger("omnifs")

EXIT_RUNTIME = 1
EXIT_USAGE = 2

# Loggers that print request details at DEBUG; only -vvv shows them.
_CHATTY = ("botocore", "boto3", "s3transfer", "urllib3")
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def redact(text: str) -> str:
    """``credentials.redact``; until omnifs.credentials is imported no secret can be registered, so ``text``."""
    credentials = sys.modules.get("omnifs.credentials")
    return text if credentials is None else credentials.redact(text)  # type: ignore[no-any-return]


def _xdg(var: str, fallback: str) -> Path:
    """Same rule as ``config._xdg`` (a test keeps them equal), without importing omnifs.config."""
    value = os.environ.get(var)
    return (Path(value) if value and os.path.isabs(value) else Path.home() / fallback) / "omnifs"


def _cache_home() -> Path:
    """``config.cache_home()``: one directory per remote, each holding its ``meta-index.sqlite``."""
    return _xdg("XDG_CACHE_HOME", ".cache")


def _state_home() -> Path:
    """``config.state_home()``: staging, logs and mount records."""
    return _xdg("XDG_STATE_HOME", ".local/state")


def _omnifs_mountpoints() -> set[str]:
    """Mountpoints of type fuse.omnifs in this namespace (what ``mount.is_omnifs_mount`` checks)."""
    out = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "fuse.omnifs":
                out.add(fields[4].encode().decode("unicode_escape"))
    return out


def _stderr_is_journal() -> bool:
    """True when stderr is connected to the systemd journal ($JOURNAL_STREAM names its device:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return bool(dev and ino) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


class LogFormatter(logging.Formatter):
    """Redact secrets; under the journal, drop timestamps and prefix each line with ``<priority>``."""

    def __init__(self, journal: bool) -> None:
        fmt = "%(name)s: %(message)s" if journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = redact(super().format(record))
        if not self.journal:
            return text
        prio = _SYSLOG_PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def _setup_logging(verbose: int) -> None:
    level = max(logging.WARNING - 10 * verbose, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter(_stderr_is_journal()))
    logging.basicConfig(level=level, handlers=[handler])
    # paramiko logs dropped connections as tracebacks; omnifs reports them itself.
    logging.getLogger("paramiko").setLevel(logging.DEBUG if verbose >= 3 else logging.CRITICAL)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 3 else max(level, logging.INFO))


def _excepthook(tp: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    """Print an uncaught exception like Python does, with secrets redacted."""
    import traceback

    sys.stderr.write(redact("".join(traceback.format_exception(tp, value, tb))))


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"omnifs: error: {redact(message)}", err=True)
    sys.exit(code)


def _complete_remotes(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of remote names from the config file."""
    from click.shell_completion import CompletionItem

    from omnifs.config import load_config

    try:
        config = load_config(ctx.params.get("config_file"))
    except Exception:
        return []
    return [CompletionItem(n) for n in sorted(config.remotes) if n.startswith(incomplete)]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="omnifs")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug, -vvv SDK requests too).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Mount any storage backend as an ordinary folder.

    Shell completion (bash): eval "$(_OMNIFS_COMPLETE=bash_source omnifs)"
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    sys.excepthook = _excepthook
    _setup_logging(verbose)


def _split_mount_args(args: tuple[str, ...]) -> tuple[str | None, str]:
    if len(args) == 1:
        return None, args[0]
    if len(args) == 2:
        return args[0], args[1]
    raise ConfigError("usage: omnifs mount [REMOTE] MOUNTPOINT")


def _staging_dir(resolved: ResolvedRemote) -> Path:
    """Pending (not yet uploaded) data: state, not cache, so clearing caches never loses it."""
    return _state_home() / resolved.name / "staging"


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
    from omnifs.config import build_backend, load_config, resolve_remote
    from omnifs.credentials import CredentialError
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
    except CredentialError as exc:
        _fail(str(exc), exc.exit_code)
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
        serve(backend, mountpoint, mount_opts, _staging_dir(resolved), source, cache_dir=_cache_home() / resolved.name)
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
    import subprocess

    from omnifs.mount import is_omnifs_mount

    log_dir = _state_home() / "logs"
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
    import signal
    import subprocess

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


# --- config ------------------------------------------------------------------------------

_config_file_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Config file (default: $OMNIFS_CONFIG or $XDG_CONFIG_HOME/omnifs/config.toml).",
)


def _config_path(config_file: Path | None) -> Path:
    from omnifs.config import default_config_path

    return config_file or default_config_path()


def _echo_json(data: object) -> None:
    click.echo(redact(json.dumps(data, indent=2, sort_keys=False, default=str)))


_SCALARS = (str, int, float, bool, type(None))
# Encodes a list of scalars with a separator that never occurs unescaped in JSON text (ensure_ascii).
_COLUMN = json.JSONEncoder(separators=("\x00", ": "))
_COMPACT = json.JSONEncoder(default=str)


def _rows_json(key: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """Return ``json.dumps({key: rows}, indent=2, default=str)``, faster for thousands of rows.

    json's indenting encoder is pure Python (50 ms for 3,000 ``find`` results).
    When every row has the same keys in the same order, scalars are encoded a
    column at a time by the C encoder and each distinct container value once;
    anything else takes ``json.dumps`` itself.  The output is identical.
    """
    keys = tuple(rows[0]) if rows else ()
    if not keys or not all(type(k) is str for k in keys) or any(tuple(r) != keys for r in rows):
        return json.dumps({key: rows}, indent=2, default=str)
    pad = "\n      "
    columns: list[list[str]] = []
    for k in keys:
        values = [r[k] for r in rows]
        if all(type(v) in _SCALARS for v in values):
            columns.append(_COLUMN.encode(values)[1:-1].split("\x00"))
            continue
        texts: dict[str, str] = {}  # compact encoding -> indented one (one is a function of the other)
        column = []
        for v in values:
            compact = _COMPACT.encode(v)
            text = texts.get(compact)
            if text is None:
                text = texts[compact] = json.dumps(v, indent=2, default=str).replace("\n", pad)
            column.append(text)
        columns.append(column)
    template = "    {" + ",".join(pad + json.dumps(k).replace("%", "%%") + ": %s" for k in keys) + "\n    }"
    items = ",\n".join([template % row for row in zip(*columns, strict=True)])
    return f"{{\n  {json.dumps(key)}: [\n{items}\n  ]\n}}"


@main.group("config")
def config_group() -> None:
    """Add, list, show, check and remove remotes (secrets go to the OS keyring)."""


class _AddCommand(click.Command):
    """``config add``: lists every backend type's options after the usual help."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from omnifs.backends import backend_class, backend_types

        for rtype in backend_types():
            try:
                declared = backend_class(rtype).options
            except ImportError:
                continue
            rows = []
            for key, opt in declared.items():
                if opt.secret:
                    flag = f"--secret-from-stdin {key}"
                else:
                    flag = f"--{key.replace('_', '-')} {opt.type.__name__.upper()}"
                extra = " (required)" if opt.required else ""
                if opt.default is not None:
                    extra = f" (default {opt.default!r})"
                rows.append((flag, (opt.help or "") + extra))
            with formatter.section(f"Options of type {rtype}"):
                formatter.write_dl(rows or [("(none)", "")])


def _parse_option_args(tokens: Sequence[str]) -> list[tuple[str, str | None]]:
    """Split ``--key value`` / ``--key=value`` / bare ``--flag`` tokens (dashes become underscores)."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected argument {tok!r} (options are --KEY VALUE)", key=tok)
        key, eq, value = tok[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            out.append((key, value))
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            out.append((key, tokens[i + 1]))
            i += 2
        else:
            out.append((key, None))
            i += 1
    return out


def _read_secrets(fields: Sequence[str], interactive: bool) -> dict[str, str]:
    """Read one secret per field: hidden prompts on a TTY, else one line of standard input each."""
    if interactive:
        values = {f: click.prompt(f"{f} (hidden)", hide_input=True, confirmation_prompt=False) for f in fields}
    else:
        lines = sys.stdin.read().splitlines()
        if len(lines) < len(fields):
            raise ConfigError(
                f"expected {len(fields)} line(s) on standard input (one per --secret-from-stdin), got {len(lines)}",
                key="--secret-from-stdin",
            )
        values = dict(zip(fields, lines, strict=False))
    for f, v in values.items():
        if not v:
            raise ConfigError(f"empty value for secret {f!r}", key=f)
    return values


@config_group.command(
    "add", cls=_AddCommand, context_settings={"ignore_unknown_options": True, "allow_interspersed_args": True}
)
@click.argument("name", shell_complete=_complete_remotes)
@click.option("--type", "rtype", help="Backend type (required for a new remote).")
@click.option(
    "--secret-from-stdin",
    "secret_fields",
    multiple=True,
    metavar="FIELD",
    help="Store secret FIELD in the keyring, read as one line of stdin (repeatable, in order; hidden prompt on a TTY).",
)
@click.option("--unset", "unset", multiple=True, metavar="KEY", help="Remove option or secret KEY (repeatable).")
@_config_file_option
@click.argument("option_args", nargs=-1, type=click.UNPROCESSED)
def config_add(
    name: str,
    rtype: str | None,
    secret_fields: tuple[str, ...],
    unset: tuple[str, ...],
    config_file: Path | None,
    option_args: tuple[str, ...],
) -> None:
    """Add remote NAME, or update it: omnifs config add NAME --type TYPE --OPTION VALUE ...

    Options are the backend's (listed below); secrets are never accepted as
    arguments: --secret-from-stdin FIELD stores them in the OS keyring
    (service "omnifs", user "NAME.FIELD").  On a terminal, missing values are
    prompted for; "omnifs config add NAME" alone asks for everything.
    Running it again for an existing remote changes only what is given, e.g.
    to rotate a secret.
    """
    from omnifs.credentials import CredentialError

    try:
        _config_add(name, rtype, secret_fields, unset, config_file, option_args)
    except CredentialError as exc:
        _fail(str(exc), exc.exit_code)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)


def _config_add(
    name: str,
    rtype: str | None,
    secret_fields: tuple[str, ...],
    unset: tuple[str, ...],
    config_file: Path | None,
    option_args: tuple[str, ...],
) -> None:
    from omnifs import credentials
    from omnifs.backends import backend_class, backend_types
    from omnifs.config import NAME_RE, coerce_option, load_config, save_remote, validate_remote

    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"invalid remote name {name!r} (letters, digits, '_', '.', '-')", key="NAME")
    path = _config_path(config_file)
    config = load_config(path)
    existing = config.remotes.get(name)
    interactive = sys.stdin.isatty()
    if existing is not None and rtype is not None and rtype != existing.type:
        raise ConfigError(
            f"remote {name!r} exists with type {existing.type!r}; remove it first to change its type",
            file=str(path),
            line=existing.line,
            key="type",
        )
    if rtype is None:
        if existing is not None:
            rtype = existing.type
        elif interactive:
            rtype = click.prompt("type", type=click.Choice(backend_types()))
        else:
            raise ConfigError(f"--type is required for a new remote (one of {', '.join(backend_types())})", key="type")
    if rtype not in backend_types():
        raise ConfigError(f"unknown type {rtype!r} (known: {', '.join(backend_types())})", key="type")
    declared = backend_class(rtype).options
    secrets = credentials.secret_fields(declared)
    options: dict[str, Any] = dict(existing.options) if existing else {}
    stored: list[str] = list(existing.secrets) if existing else []
    given = _parse_option_args(option_args)
    for key, raw in given:
        if key in secrets:
            raise ConfigError(
                f"secret {key!r} is not accepted as an argument (it would show in ps and shell history); "
                f"use --secret-from-stdin {key}",
                key=key,
            )
        options[key] = coerce_option(name, rtype, key, "true" if raw is None else raw)
    forget: list[str] = []
    for key in unset:
        if key in secrets:
            forget.append(key)
            stored = [f for f in stored if f != key]
        elif key in options:
            del options[key]
        elif key not in declared:
            raise ConfigError(f"remote {name!r}: unknown option {key!r} for type {rtype!r}", key=key)
    for field in secret_fields:
        if field not in secrets:
            raise ConfigError(
                f"{field!r} is not a secret of type {rtype!r} (secrets: {', '.join(secrets) or 'none'})",
                key="--secret-from-stdin",
            )
    wizard = interactive and existing is None and not given and not secret_fields
    if interactive:
        for key, opt in declared.items():
            if opt.secret or key in options or not (opt.required or wizard):
                continue
            label = f"{key} ({opt.help})" if opt.help else key
            if opt.required and opt.default is None:
                options[key] = coerce_option(name, rtype, key, click.prompt(label))  # asks until non-empty
                continue
            default = "" if opt.default is None else str(opt.default)
            raw = click.prompt(label, default=default, show_default=bool(default))
            if raw != default:
                options[key] = coerce_option(name, rtype, key, raw)
    validate_remote(name, rtype, options, str(path))
    if secret_fields:
        values = _read_secrets(list(dict.fromkeys(secret_fields)), interactive)
    elif wizard:
        values = {}
        for field in secrets:
            v = click.prompt(f"{field} (hidden, Enter to skip)", hide_input=True, default="", show_default=False)
            if v:
                values[field] = v
    else:
        values = {}
    for field, value in values.items():
        credentials.keyring_set(name, field, value)
        if field not in stored:
            stored.append(field)
    save_remote(path, name, rtype, options, [f for f in secrets if f in stored])
    for field in forget:
        credentials.keyring_delete(name, field)
    verb = "updated" if existing else "added"
    msg = f"{verb} remote {name!r} ({rtype}) in {path}"
    if values:
        msg += f"; stored in the keyring: {', '.join(values)}"
    click.echo(msg)
    click.echo(f"check it with: omnifs config check {name}")


def _where(rtype: str, options: Mapping[str, Any]) -> str:
    """A one-line description of a remote from its options (no backend is built, no secret read)."""
    if rtype == "s3":
        prefix = options.get("prefix") or ""
        where = f"s3://{options.get('bucket', '?')}" + (f"/{prefix}" if prefix else "")
        return where + (f" at {options['endpoint_url']}" if options.get("endpoint_url") else "")
    if rtype == "sftp":
        user = f"{options['user']}@" if options.get("user") else ""
        port = options.get("port", 22)
        return f"sftp://{user}{options.get('host', '?')}:{port}/{options.get('path', '')}".rstrip("/")
    if rtype == "local":
        return str(options.get("path", ""))
    return rtype + ":"


@config_group.command("list")
@_config_file_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def config_list(config_file: Path | None, as_json: bool) -> None:
    """List the configured remotes (secrets are named, never shown)."""
    from omnifs.config import load_config

    try:
        config = load_config(config_file, must_exist=config_file is not None)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    rows = [
        {"name": rc.name, "type": rc.type, "where": _where(rc.type, rc.options), "secrets": list(rc.secrets)}
        for rc in sorted(config.remotes.values(), key=lambda r: r.name)
    ]
    if as_json:
        _echo_json({"config": str(config.path), "remotes": rows})
        return
    if not rows:
        click.echo(f"no remotes in {config.path}; add one with: omnifs config add NAME --type TYPE ...")
        return
    from rich.table import Table

    table = Table(title=str(config.path), title_justify="left")
    for col in ("name", "type", "where", "secrets in keyring"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["type"], r["where"], ", ".join(r["secrets"]) or "-")
    _console().print(table)


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False)


def _get_remote(config_file: Path | None, name: str) -> RemoteConfig:
    from omnifs.config import load_config

    config = load_config(config_file, must_exist=config_file is not None)
    rc = config.remotes.get(name)
    if rc is None:
        known = ", ".join(sorted(config.remotes)) or "none configured"
        raise ConfigError(f"unknown remote {name!r} (known: {known})", file=str(config.path), key="NAME")
    return rc


def _secret_state(name: str, field: str, stored: Sequence[str]) -> dict[str, Any]:
    """Describe one secret without revealing it: where it comes from and whether it is there."""
    from omnifs import credentials
    from omnifs.credentials import CredentialError

    source = credentials.source_of(name, field, stored)
    state: dict[str, Any] = {"source": source, "set": source == "env"}
    if source == "env":
        state["env"] = credentials.env_var(name, field)
    elif source == "keyring":
        try:
            state["set"] = credentials.keyring_get(name, field) is not None
        except CredentialError as exc:
            state["set"] = None
            state["error"] = str(exc)
    if state["set"]:
        state["value"] = credentials.MASK
    return state


@config_group.command("show")
@click.argument("name", shell_complete=_complete_remotes)
@_config_file_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def config_show(name: str, config_file: Path | None, as_json: bool) -> None:
    """Show remote NAME with defaults filled in; secrets are masked."""
    from omnifs.backends import backend_class
    from omnifs.credentials import MASK

    try:
        rc = _get_remote(config_file, name)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    declared = backend_class(rc.type).options
    options: dict[str, Any] = {}
    defaults: list[str] = []
    for key, opt in declared.items():
        if opt.secret:
            continue
        if key in rc.options:
            options[key] = rc.options[key]
        elif opt.default is not None:
            options[key] = opt.default
            defaults.append(key)
    secrets = {f: _secret_state(name, f, rc.secrets) for f, o in declared.items() if o.secret}
    if as_json:
        _echo_json(
            {
                "name": name,
                "type": rc.type,
                "file": rc.file,
                "line": rc.line,
                "options": options,
                "defaults": defaults,
                "secrets": secrets,
            }
        )
        return
    where = f"{rc.file}:{rc.line}" if rc.line else str(rc.file)
    click.echo(f"remote {name} ({rc.type}) in {where}")
    width = max((len(k) for k in declared), default=0)
    for key, value in options.items():
        click.echo(f"  {key:<{width}} = {json.dumps(value)}" + ("  (default)" if key in defaults else ""))
    for field, st in secrets.items():
        if st["source"] == "env":
            text = f"{MASK}  (from ${st['env']})"
        elif st["source"] == "keyring":
            if st["set"]:
                text = f"{MASK}  (keyring)"
            elif st["set"] is None:
                text = f"(keyring unusable: {st['error']})"
            else:
                text = "(missing from the keyring)"
        else:
            text = "(not set)"
        click.echo(redact(f"  {field:<{width}} = {text}"))


@config_group.command("remove")
@click.argument("name", shell_complete=_complete_remotes)
@_config_file_option
@click.option("--force", is_flag=True, help="Remove the config entry even if the keyring cannot be reached.")
def config_remove(name: str, config_file: Path | None, force: bool) -> None:
    """Remove remote NAME from the config file and its secrets from the keyring."""
    from omnifs import credentials
    from omnifs.backends import backend_class
    from omnifs.config import delete_remote
    from omnifs.credentials import CredentialError

    try:
        rc = _get_remote(config_file, name)
        deleted: list[str] = []
        for field in credentials.secret_fields(backend_class(rc.type).options):
            try:
                if credentials.keyring_delete(name, field):
                    deleted.append(field)
            except CredentialError as exc:
                if rc.secrets and not force:
                    raise
                if rc.secrets:
                    click.echo(f"omnifs: warning: {redact(str(exc))}", err=True)
                break
        delete_remote(Path(rc.file) if rc.file else _config_path(config_file), name)
    except CredentialError as exc:
        _fail(f"{exc} (or use --force to remove the config entry anyway)", exc.exit_code)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    msg = f"removed remote {name!r} from {rc.file}"
    if deleted:
        msg += f"; deleted from the keyring: {', '.join(deleted)}"
    click.echo(msg)
    from omnifs.service import env_file

    if env_file(name).exists():
        click.echo(f"note: a systemd service is still installed; remove it with: omnifs service uninstall {name}")


@config_group.command("check")
@click.argument("name", shell_complete=_complete_remotes)
@_config_file_option
@click.option("--write", "write_test", is_flag=True, help="Also write, read back and delete a small test file.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds each step may take.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def config_check(name: str, config_file: Path | None, write_test: bool, timeout: float, as_json: bool) -> None:
    """Connect to remote NAME and report what works (exit 0 only if everything does)."""
    from omnifs import credentials
    from omnifs.backends import backend_class
    from omnifs.config import ResolvedRemote, build_backend
    from omnifs.credentials import CredentialError

    steps: list[dict[str, Any]] = []

    def report(step: str, ok: bool, detail: str) -> None:
        steps.append({"step": step, "ok": ok, "detail": redact(detail)})
        if not as_json:
            click.echo(f"{'ok' if ok else 'FAILED':<7}{step:<9}{redact(detail)}")

    def finish(code: int) -> NoReturn:
        if as_json:
            _echo_json({"remote": name, "ok": code == 0, "steps": steps})
        sys.exit(code)

    try:
        rc = _get_remote(config_file, name)
    except ConfigError as exc:
        report("config", False, str(exc))
        finish(EXIT_USAGE)
    report("config", True, f"{rc.file}:{rc.line} (type {rc.type})")
    declared = backend_class(rc.type).options
    try:
        secrets = credentials.resolve(name, declared, rc.secrets)
    except CredentialError as exc:
        report("secrets", False, str(exc))
        finish(exc.exit_code)
    sources = [f"{f} ({credentials.source_of(name, f, rc.secrets)})" for f in secrets]
    report("secrets", True, ", ".join(sources) if sources else "none configured")
    try:
        backend = build_backend(ResolvedRemote(name, rc), secrets)
    except ConfigError as exc:
        report("backend", False, str(exc))
        finish(EXIT_USAGE)
    except OmniError as exc:
        report("backend", False, str(exc))
        finish(EXIT_RUNTIME)
    import trio

    failed = trio.run(_check_backend, backend, timeout, write_test, report)
    finish(EXIT_RUNTIME if failed else 0)


async def _check_backend(backend: Any, timeout: float, write_test: bool, report: Any) -> bool:
    """Run the connect/list/(write) steps; return True when one failed."""
    import io
    import uuid

    import trio

    step = "connect"
    try:
        t0 = time.monotonic()
        with trio.fail_after(timeout):
            info = await backend.stat("")
        if not info.is_dir:
            report(step, False, f"{backend.describe()}: the root is not a directory")
            return True
        report(step, True, f"{backend.describe()} answered in {time.monotonic() - t0:.2f} s")
        step = "list"
        with trio.fail_after(timeout):
            entries = await backend.list("")
        report(step, True, f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} in the root")
        if write_test:
            step = "write"
            probe = f".omnifs-check-{uuid.uuid4().hex[:12]}"
            data = os.urandom(1024)
            with trio.fail_after(timeout):
                await backend.write(probe, io.BytesIO(data))
                back = await backend.read(probe, 0, len(data))
                await backend.delete(probe)
            if back != data:
                report(step, False, "data read back differs from what was written")
                return True
            report(step, True, "wrote, read back and deleted a 1 KiB test file")
        return False
    except trio.TooSlowError:
        report(step, False, f"no answer within {timeout:g} s")
        return True
    except OmniError as exc:
        report(step, False, str(exc) or type(exc).__name__)
        return True
    except ConfigError as exc:
        report(step, False, str(exc))
        return True
    finally:
        with trio.move_on_after(5) as scope:
            scope.shield = True
            await backend.aclose()


# --- status ------------------------------------------------------------------------------


def active_mounts(records_dir: Path | None = None) -> list[dict[str, Any]]:
    """Read the mount records, keeping those whose process lives and whose mountpoint is mounted."""
    directory = records_dir or _state_home() / "mounts"  # mount.runtime_dir()
    out = []
    mounted: set[str] | None = None  # read once, and only if a record names a live process
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict):
            continue
        pid, mountpoint = record.get("pid"), record.get("mountpoint")
        if not isinstance(pid, int) or not isinstance(mountpoint, str):
            continue
        if not _alive(pid):
            continue
        if mounted is None:
            mounted = _omnifs_mountpoints()
        if os.path.realpath(mountpoint) not in mounted:
            continue
        out.append(record)
    return sorted(out, key=lambda r: str(r["mountpoint"]))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _summary(value: object) -> str:
    """Compact text for a status field of any shape (dicts become ``key value`` pairs)."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            if isinstance(v, dict | list):
                continue
            if isinstance(v, int | float) and not isinstance(v, bool) and "bytes" in str(k):
                v = _human_bytes(v)
            parts.append(f"{str(k).replace('_', ' ')} {v}")
        return ", ".join(parts) or "-"
    if isinstance(value, list):
        return ", ".join(_summary(v) for v in value) or "-"
    return str(value)


def _backend_summary(backends: object) -> str:
    if not isinstance(backends, list):
        return _summary(backends)
    lines = []
    for b in backends:
        if not isinstance(b, dict):
            lines.append(str(b))
            continue
        label = f"{b.get('name', '?')} ({b.get('type', '?')})"
        online = b.get("online")
        state = "online" if online is True else "OFFLINE" if online is False else "?"
        err = b.get("last_error")
        lines.append(f"{label} {state}" + (f": {err}" if err and online is not True else ""))
    return "\n".join(lines) or "-"


def render_status(mounts: Sequence[Mapping[str, Any]]) -> Any:
    """A rich table of active mounts (tolerates records with missing or unknown keys)."""
    from rich.table import Table

    table = Table(title="omnifs mounts", title_justify="left")
    for col in ("mountpoint", "source", "pid", "backends", "cache", "journal"):
        table.add_column(col, overflow="fold")
    for m in mounts:
        table.add_row(
            str(m.get("mountpoint", "?")),
            str(m.get("source", "-")),
            str(m.get("pid", "-")),
            _backend_summary(m.get("backends")),
            _summary(m.get("cache")),
            _summary(m.get("journal")),
        )
    return table


@main.command()
@click.argument("mountpoint", required=False, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-q", "--quiet", is_flag=True, help="No output; only the exit code.")
def status(mountpoint: str | None, as_json: bool, quiet: bool) -> None:
    """Show active mounts: backends' health, cache usage, upload queue.

    With MOUNTPOINT, only that mount; exit code 1 if it is not an active omnifs mount.
    """
    mounts = active_mounts()
    if mountpoint is not None:
        real = os.path.realpath(mountpoint)
        mounts = [m for m in mounts if m.get("mountpoint") == real]
    if as_json:
        _echo_json({"mounts": mounts})
    elif not quiet:
        if mounts:
            console = _console()
            with console.capture() as cap:
                console.print(render_status(mounts))
            click.echo(redact(cap.get()), nl=False)
        else:
            click.echo("no active omnifs mounts" if mountpoint is None else f"{mountpoint} is not an omnifs mount")
    if mountpoint is not None and not mounts:
        sys.exit(EXIT_RUNTIME)


# --- flush -------------------------------------------------------------------------------


def _pending(mountpoint: str) -> int:
    return int(os.getxattr(mountpoint, "user.omnifs.pending"))


@main.command()
@click.argument("mountpoint", required=False)
@click.option("--wait", is_flag=True, help="Wait until every queued upload has reached the remote.")
@click.option("--timeout", default=0.0, help="With --wait: give up after this many seconds (0: never).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def flush(mountpoint: str | None, wait: bool, timeout: float, quiet: bool) -> None:
    """Upload queued writes now (of MOUNTPOINT, or of every active mount)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress

    points = [os.path.realpath(mountpoint)] if mountpoint else [str(m["mountpoint"]) for m in active_mounts()]
    if mountpoint and points[0] not in {m.get("mountpoint") for m in active_mounts()}:
        _fail(f"{mountpoint} is not an active omnifs mount", EXIT_USAGE)
    for point in points:
        try:
            os.setxattr(point, "user.omnifs.flush", b"1")
        except OSError as exc:
            _fail(f"cannot flush {point}: {exc.strerror}", EXIT_RUNTIME)
    if not wait:
        pending = sum(_pending(p) for p in points)
        if not quiet:
            click.echo(f"{pending} upload(s) queued; they are being sent now")
        return
    deadline = time.monotonic() + timeout if timeout > 0 else None
    total = max(1, sum(_pending(p) for p in points))
    with Progress("{task.description}", BarColumn(), MofNCompleteColumn(), disable=quiet) as progress:
        task = progress.add_task("uploading", total=total)
        while True:
            pending = sum(_pending(p) for p in points)
            total = max(total, pending)
            progress.update(task, total=total, completed=total - pending)
            if pending == 0:
                break
            if deadline is not None and time.monotonic() > deadline:
                _fail(f"{pending} upload(s) still pending after {timeout:g} s (they continue in the background)", 1)
            time.sleep(0.2)
    if not quiet:
        click.echo("all uploads done")


# --- cache -------------------------------------------------------------------------------


@main.group("cache")
def cache_group() -> None:
    """Inspect, clear and pin the persistent disk cache."""


def _cache_dirs(target: str | None, config_file: Path | None) -> list[Path]:
    """Cache directories for a mountpoint, a remote spec/name, or (None) every remote."""
    root = _cache_home()
    if target is None:
        return sorted(p for p in root.iterdir() if (p / "data").is_dir()) if root.is_dir() else []
    real = os.path.realpath(target)
    for m in active_mounts():
        if m.get("mountpoint") == real and isinstance(m.get("remote"), str):
            return [root / str(m["remote"])]
    from omnifs.config import load_config, resolve_remote

    spec = target if ":" in target else f"{target}:"
    try:
        resolved = resolve_remote(spec, load_config(config_file))
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    return [root / resolved.name]


@cache_group.command("stats")
@click.argument("target", required=False)
@_config_file_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def cache_stats(target: str | None, config_file: Path | None, as_json: bool) -> None:
    """Show cache usage for MOUNTPOINT or REMOTE (default: every cached remote)."""
    from omnifs.cache import cache_report

    reports = [cache_report(d) for d in _cache_dirs(target, config_file) if (d / "data").is_dir()]
    if as_json:
        _echo_json({"caches": reports})
        return
    if not reports:
        click.echo("no cache" + (f" for {target}" if target else ""))
        return
    from rich.table import Table

    table = Table("remote", "used", "cap", "pinned", "pinned paths", "metadata")
    for r in reports:
        table.add_row(
            str(r["remote"]),
            _human_bytes(float(r["used_bytes"])),  # type: ignore[arg-type]
            _human_bytes(float(r["max_bytes"])),  # type: ignore[arg-type]
            _human_bytes(float(r["pinned_bytes"])),  # type: ignore[arg-type]
            ", ".join(r["pinned_paths"]) or "-",  # type: ignore[arg-type]
            str(r["metadata_entries"]),
        )
    _console().print(table)


@cache_group.command("clear")
@click.argument("target", required=False)
@_config_file_option
@click.option("--all", "include_pinned", is_flag=True, help="Also drop pinned data and pins.")
def cache_clear(target: str | None, config_file: Path | None, include_pinned: bool) -> None:
    """Drop cached data and metadata of MOUNTPOINT or REMOTE (default: every remote).

    Pending uploads are not in the cache and are never touched.
    """
    from omnifs.cache import clear_cache

    for d in _cache_dirs(target, config_file):
        if (d / "data").is_dir():
            clear_cache(d, include_pinned=include_pinned)
            click.echo(f"cleared {d.name}")


def _walk_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [Path(dp) / f for dp, _, files in os.walk(path) for f in files if not os.path.islink(Path(dp) / f)]


@cache_group.command("pin")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def cache_pin(path: Path, quiet: bool) -> None:
    """Fetch PATH (a file or folder inside a mount) into the cache and keep it offline."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    files = _walk_files(path)
    total = sum(f.lstat().st_size for f in files)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        disable=quiet,
    ) as progress:
        task = progress.add_task(f"pinning {path}", total=total)
        try:
            for f in files:
                os.setxattr(f, "user.omnifs.pin", b"prefetch")
                progress.advance(task, f.lstat().st_size)
            os.setxattr(path, "user.omnifs.pin", b"1")
        except OSError as exc:
            _fail(f"cannot pin {path}: {exc.strerror} (is it inside an omnifs mount with a cache?)", EXIT_RUNTIME)
    if not quiet:
        click.echo(f"pinned {path}: {len(files)} file(s), {_human_bytes(total)}")


@cache_group.command("unpin")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def cache_unpin(path: Path) -> None:
    """Let PATH (a file or folder inside a mount) be evicted again."""
    try:
        os.setxattr(path, "user.omnifs.pin", b"0")
    except OSError as exc:
        _fail(f"cannot unpin {path}: {exc.strerror}", EXIT_RUNTIME)
    click.echo(f"unpinned {path}")


# --- service -----------------------------------------------------------------------------


@main.command()
@click.argument("target", required=False)
@click.option("--tag", "tags", multiple=True, help="Has this tag (repeatable: all of them).")
@click.option("--where", "wheres", multiple=True, metavar="FIELD=VALUE", help="Field equals value (repeatable).")
@click.option("--name", "name_glob", help="File name matches this glob ('*.yaml').")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_config_file_option
def find(
    target: str | None,
    tags: tuple[str, ...],
    wheres: tuple[str, ...],
    name_glob: str | None,
    as_json: bool,
    config_file: Path | None,
) -> None:
    """Find files by metadata in REMOTE or MOUNTPOINT (a folder inside a mount narrows the search).

    Answers from the local index of metadata the mount has seen (docs/metadata.md);
    --where takes author, description, content_type, name, size, modified or a
    custom key (custom.KEY or KEY).
    """
    from omnifs.metaindex import INDEX_FILE, MetaIndex

    where: dict[str, str] = {}
    for item in wheres:
        key, eq, value = item.partition("=")
        if not eq or not key:
            _fail(f"--where expects FIELD=VALUE, got {item!r}", EXIT_USAGE)
        where[key.strip()] = value
    searches: list[tuple[Path, str, str]] = []  # (cache dir, folder below the remote root, output prefix)
    real = os.path.realpath(target) if target is not None else None
    mount = None
    if real is not None:
        for m in active_mounts():
            point = str(m.get("mountpoint"))
            if real == point or real.startswith(point.rstrip("/") + "/"):
                mount = m
                break
    if mount is not None and real is not None:
        point = str(mount["mountpoint"])
        under = os.path.relpath(real, point) if real != point else ""
        searches.append((_cache_home() / str(mount["remote"]), under, point.rstrip("/") + "/"))
    elif target is not None and (_cache_home() / target.rstrip(":")).is_dir() and ":" not in target.rstrip(":"):
        searches.append((_cache_home() / target.rstrip(":"), "", target.rstrip(":") + ":"))  # a remote's cache by name
    else:
        for directory in _cache_dirs(target, config_file):
            searches.append((directory, "", f"{directory.name}:"))
    results: list[dict[str, Any]] = []
    for directory, under, prefix in searches:
        db = directory / INDEX_FILE
        if not db.exists():
            continue
        index = MetaIndex(db, readonly=True)
        try:
            found = index.find(tags=tags, where=where, name=name_glob, under=under)
        except Exception as exc:
            _fail(f"cannot search {db}: {exc}", EXIT_RUNTIME)
        finally:
            index.close()
        for item in found:
            item["location"] = prefix + item["path"]
        results.extend(found)
    if as_json:
        click.echo(redact(_rows_json("results", results)))
    elif results:
        click.echo("\n".join(item["location"] for item in results))  # one write, not one per line


@main.group("service")
def service_group() -> None:
    """Install the systemd user service that mounts a remote at login."""


@service_group.command("install")
@click.argument("name", shell_complete=_complete_remotes)
@click.argument("mountpoint", required=False, type=click.Path(path_type=str))
@click.option("--enable", is_flag=True, help="Enable and start it now (systemctl --user enable --now).")
@click.option("-o", "options", multiple=True, help="Mount option for the service (as for omnifs mount -o).")
@_config_file_option
def service_install(
    name: str, mountpoint: str | None, enable: bool, options: tuple[str, ...], config_file: Path | None
) -> None:
    """Install omnifs@NAME.service mounting remote NAME on MOUNTPOINT (default ~/OmniFS-NAME).

    Writes omnifs@.service and omnifs-NAME.env to $XDG_CONFIG_HOME/systemd/user.
    Without a reachable user systemd, prints the systemctl commands to run.
    """
    from omnifs import service
    from omnifs.mount import parse_mount_options

    try:
        parse_mount_options(options)
        mount_args = [a for o in options for a in ("-o", o)]
        result = service.install(name, mountpoint, enable=enable, config_file=config_file, mount_args=mount_args)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    except (RuntimeError, OSError) as exc:
        _fail(str(exc), EXIT_RUNTIME)
    click.echo(f"wrote {result.unit}")
    click.echo(f"wrote {result.env} (mountpoint {result.mountpoint})")
    if result.enabled:
        click.echo(f"enabled and started {service.instance(name)}; it mounts {result.mountpoint} at every login")
    elif result.reachable:
        click.echo("to mount now and at every login, run:")
    else:
        click.echo("no systemd user manager is reachable from here; to mount now and at every login, run:")
    for cmd in result.commands:
        click.echo(f"  {cmd}")


@service_group.command("uninstall")
@click.argument("name", shell_complete=_complete_remotes)
def service_uninstall(name: str) -> None:
    """Stop and disable omnifs@NAME.service and remove its files (the remote's config stays)."""
    from omnifs import service

    try:
        result = service.uninstall(name)
    except (RuntimeError, OSError) as exc:
        _fail(str(exc), EXIT_RUNTIME)
    for path in result.removed:
        click.echo(f"removed {path}")
    if not result.removed:
        click.echo(f"{service.instance(name)} was not installed")
    if result.commands:
        click.echo("no systemd user manager is reachable from here; if one runs elsewhere, run:")
        for cmd in result.commands:
            click.echo(f"  {cmd}")


if __name__ == "__main__":
    main()
