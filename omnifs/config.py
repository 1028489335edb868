"""Configuration: XDG locations, the TOML remotes file, and remote specs.

Every validation failure raises ``ConfigError`` naming the file, line and key;
the CLI turns it into exit code 2.  The config never holds secrets.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnifs.backends import backend_class, backend_types
from omnifs.backends.base import Backend
from omnifs.errors import ConfigError

DEFAULT_REMOTE = "default"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def config_home() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "omnifs"


def data_home() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "omnifs"


def cache_home() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / "omnifs"


def state_home() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / "omnifs"


def default_config_path() -> Path:
    env = os.environ.get("OMNIFS_CONFIG")
    return Path(env) if env else config_home() / "config.toml"


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    name: str
    type: str
    options: Mapping[str, Any]
    file: str | None = None
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    remotes: Mapping[str, RemoteConfig] = field(default_factory=dict)


_HEADER = re.compile(r'^\s*\[\s*remotes\s*\.\s*"?([^"\]]+?)"?\s*\]\s*(#.*)?$')
_KEY = re.compile(r'^\s*"?([A-Za-z0-9_.-]+)"?\s*=')


def _locate(text: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Find the line of each ``[remotes.NAME]`` header and of each key inside it."""
    headers: dict[str, int] = {}
    keys: dict[tuple[str, str], int] = {}
    current: str | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        m = _HEADER.match(line)
        if m:
            current = m.group(1)
            headers.setdefault(current, lineno)
            continue
        if line.lstrip().startswith("["):
            current = None
            continue
        m = _KEY.match(line)
        if m and current is not None:
            keys.setdefault((current, m.group(1)), lineno)
    return headers, keys


def load_config(path: Path | None = None, *, must_exist: bool = False) -> Config:
    """Parse and validate the config file; a missing default file is an empty config."""
    path = path or default_config_path()
    if not path.exists():
        if must_exist:
            raise ConfigError("config file does not exist", file=str(path))
        return Config(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", file=str(path)) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(f"invalid TOML: {exc}", file=str(path), line=int(m.group(1)) if m else None) from exc
    headers, key_lines = _locate(text)
    for key in data:
        if key != "remotes":
            raise ConfigError(
                f"unknown top-level key {key!r} (expected [remotes.NAME] tables)", file=str(path), key=key
            )
    remotes_raw = data.get("remotes", {})
    if not isinstance(remotes_raw, dict):
        raise ConfigError("'remotes' must be a table", file=str(path), key="remotes")
    remotes: dict[str, RemoteConfig] = {}
    for name, table in remotes_raw.items():
        line = headers.get(name)
        if not isinstance(table, dict):
            raise ConfigError(f"remote {name!r} must be a table", file=str(path), line=line, key=name)
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise ConfigError(f"invalid remote name {name!r}", file=str(path), line=line, key=name)
        rtype = table.get("type")
        if rtype is None:
            raise ConfigError(f"remote {name!r}: missing required key 'type'", file=str(path), line=line, key="type")
        if rtype not in backend_types():
            raise ConfigError(
                f"remote {name!r}: unknown type {rtype!r} (known: {', '.join(backend_types())})",
                file=str(path),
                line=key_lines.get((name, "type"), line),
                key="type",
            )
        opts = {k: v for k, v in table.items() if k != "type"}
        _validate(name, rtype, opts, str(path), line, key_lines)
        remotes[name] = RemoteConfig(name, rtype, opts, str(path), line)
    return Config(path, remotes)


def _validate(
    name: str,
    rtype: str,
    opts: Mapping[str, Any],
    file: str | None,
    line: int | None,
    key_lines: Mapping[tuple[str, str], int],
) -> None:
    declared = backend_class(rtype).options
    for key, value in opts.items():
        kline = key_lines.get((name, key), line)
        option = declared.get(key)
        if option is None:
            known = ", ".join(sorted(declared)) or "none"
            raise ConfigError(
                f"remote {name!r}: unknown key {key!r} for type {rtype!r} (known: {known})",
                file=file,
                line=kline,
                key=key,
            )
        if option.secret:
            raise ConfigError(
                f"remote {name!r}: {key!r} is a secret and must not be stored in the config file; "
                f"use the keyring or OMNIFS_{name.upper()}_{key.upper()}",
                file=file,
                line=kline,
                key=key,
            )
        ok = isinstance(value, option.type) and not (option.type is int and isinstance(value, bool))
        if option.type is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(
                f"remote {name!r}: key {key!r} must be {option.type.__name__}, got {type(value).__name__}",
                file=file,
                line=kline,
                key=key,
            )
    for key, option in declared.items():
        if option.required and key not in opts:
            raise ConfigError(f"remote {name!r}: missing required key {key!r}", file=file, line=line, key=key)


@dataclass(frozen=True, slots=True)
class ResolvedRemote:
    """A remote spec resolved to a config entry (or an inline definition) and a sub-path."""

    name: str  # used for cache/staging directories and logs
    remote: RemoteConfig
    subdir: str = ""


def resolve_remote(spec: str | None, config: Config) -> ResolvedRemote:
    """Turn ``NAME:``, ``NAME:sub/dir``, ``local:/abs``, ``memory:``, ``s3://b/p`` or None into a remote."""
    if spec is None:
        return ResolvedRemote(
            DEFAULT_REMOTE, RemoteConfig(DEFAULT_REMOTE, "local", {"path": str(data_home() / DEFAULT_REMOTE)})
        )
    if spec.startswith("s3://"):
        bucket, _, prefix = spec[5:].partition("/")
        if not bucket:
            raise ConfigError(f"invalid S3 URL {spec!r}: no bucket", key="REMOTE")
        opts: dict[str, Any] = {"bucket": bucket}
        if prefix.strip("/"):
            opts["prefix"] = prefix.strip("/")
        return ResolvedRemote(f"s3-{bucket}", RemoteConfig(f"s3-{bucket}", "s3", opts))
    if ":" not in spec:
        raise ConfigError(f"invalid remote {spec!r}: expected NAME: or NAME:path (e.g. local:/data, memory:)")
    name, _, rest = spec.partition(":")
    if name in config.remotes:
        sub = rest.strip("/")
        return ResolvedRemote(name, config.remotes[name], sub)
    if name == "local":
        if not os.path.isabs(rest):
            raise ConfigError(f"inline local remote needs an absolute path: {spec!r}", key="REMOTE")
        path = os.path.abspath(rest)
        ident = "local" + re.sub(r"[^A-Za-z0-9]+", "-", path).rstrip("-")
        return ResolvedRemote(ident[:100], RemoteConfig(ident[:100], "local", {"path": path}))
    if name == "memory":
        return ResolvedRemote("memory", RemoteConfig("memory", "memory", {}), rest.strip("/"))
    known = ", ".join(sorted(config.remotes)) or "none configured"
    raise ConfigError(f"unknown remote {name!r} (known: {known}; inline forms: local:/path, memory:, s3://bucket)")


def build_backend(resolved: ResolvedRemote, secrets: Mapping[str, Any] | None = None) -> Backend:
    """Instantiate the backend for a resolved remote (wrapped for a sub-directory)."""
    rc = resolved.remote
    cls = backend_class(rc.type)
    opts = dict(rc.options)
    for key, option in cls.options.items():
        if key not in opts and option.default is not None:
            opts[key] = option.default
    opts.update(secrets or {})
    backend = cls.from_options(rc.name, opts)
    if resolved.subdir:
        from omnifs.backends.subdir import SubdirBackend

        backend = SubdirBackend(backend, resolved.subdir)
    return backend
