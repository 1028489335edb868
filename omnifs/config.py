"""Configuration: XDG locations, the TOML remotes file, and remote specs.

Every validation failure raises ``ConfigError`` naming the file, line and key;
the CLI turns it into exit code 2.  The config never holds secrets: a remote's
``secrets`` key only lists which secret options are stored in the keyring
(see ``omnifs.credentials``).  Writes (``save_remote``, ``delete_remote``)
keep other remotes and comments, validate the result like ``load_config``, and
replace the file atomically with mode 0600.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omnifs.backends import backend_class, backend_types
from omnifs.backends.base import Backend
from omnifs.errors import ConfigError

DEFAULT_REMOTE = "default"
SECRETS_KEY = "secrets"  # per-remote list of secret options kept in the keyring
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


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
    secrets: tuple[str, ...] = ()  # secret options stored in the keyring (names only)
    children: tuple[RemoteConfig, ...] = ()  # wrapper types (failover, mirror): the remotes they use, resolved


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
    return parse_config(text, path)


def parse_config(text: str, path: Path) -> Config:
    """Parse and validate config ``text`` (errors name ``path``, line and key)."""
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
        if not NAME_RE.fullmatch(name):
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
        opts = {k: v for k, v in table.items() if k not in ("type", SECRETS_KEY)}
        _validate(name, rtype, opts, str(path), line, key_lines)
        stored = _stored_secrets(name, rtype, table.get(SECRETS_KEY, []), str(path), line, key_lines)
        remotes[name] = RemoteConfig(name, rtype, opts, str(path), line, stored)
    return Config(path, _link_wrappers(remotes, str(path), key_lines))


def validate_remote(name: str, rtype: str, options: Mapping[str, Any], file: str | None = None) -> None:
    """Validate one remote's options against its backend's declaration; ConfigError otherwise."""
    if rtype not in backend_types():
        raise ConfigError(f"remote {name!r}: unknown type {rtype!r} (known: {', '.join(backend_types())})", key="type")
    _validate(name, rtype, options, file, None, {})


def _stored_secrets(
    name: str, rtype: str, value: object, file: str, line: int | None, key_lines: Mapping[tuple[str, str], int]
) -> tuple[str, ...]:
    """Validate the ``secrets`` list: names of declared secret options of ``rtype``."""
    kline = key_lines.get((name, SECRETS_KEY), line)
    declared = [k for k, o in backend_class(rtype).options.items() if o.secret]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"remote {name!r}: key {SECRETS_KEY!r} must be a list of secret option names",
            file=file,
            line=kline,
            key=SECRETS_KEY,
        )
    for field_name in value:
        if field_name not in declared:
            known = ", ".join(declared) or "none"
            raise ConfigError(
                f"remote {name!r}: {SECRETS_KEY!r} names {field_name!r}, which is not a secret of type {rtype!r} "
                f"(secrets: {known})",
                file=file,
                line=kline,
                key=SECRETS_KEY,
            )
    return tuple(dict.fromkeys(value))


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
            from omnifs.credentials import env_var

            raise ConfigError(
                f"remote {name!r}: {key!r} is a secret and must not be stored in the config file; "
                f"store it with 'omnifs config add {name} --secret-from-stdin {key}' or set {env_var(name, key)}",
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


# --- wrapper remotes (failover, mirror) ------------------------------------------------------


def _link_wrappers(
    remotes: Mapping[str, RemoteConfig], file: str, key_lines: Mapping[tuple[str, str], int]
) -> dict[str, RemoteConfig]:
    """Resolve the ``remotes = [...]`` of wrapper types into child configs, recursively.

    An unknown name, a cycle, or an option the wrapper rejects (``check_options``:
    policy, quorum ...) is a ConfigError naming the file, line and key.
    """
    done: dict[str, RemoteConfig] = {}

    def where(name: str, key: str) -> dict[str, Any]:
        return {"file": file, "line": key_lines.get((name, key), remotes[name].line), "key": key}

    def link(name: str, chain: tuple[str, ...]) -> RemoteConfig:
        if name in done:
            return done[name]
        rc = remotes[name]
        cls = backend_class(rc.type)
        key = getattr(cls, "children_option", None)
        if key is None:
            done[name] = rc
            return rc
        problem = cls.check_options(rc.options)  # type: ignore[attr-defined]
        if problem is not None:
            raise ConfigError(f"remote {name!r}: {problem.message}", **where(name, problem.key))
        children = []
        for child in rc.options[key]:
            if child not in remotes:
                known = ", ".join(sorted(n for n in remotes if n != name)) or "none"
                raise ConfigError(
                    f"remote {name!r}: unknown remote {child!r} in {key!r} (known: {known})", **where(name, key)
                )
            if child in chain or child == name:
                cycle = " -> ".join((*chain, name, child)[(*chain, name).index(child) :])
                raise ConfigError(f"remote {name!r}: {key!r} makes a cycle ({cycle})", **where(name, key))
            children.append(link(child, (*chain, name)))
        seen: dict[str, str] = {}
        for ch in children:
            for used in _tree_names(ch):
                if used in seen:
                    via = f"'{seen[used]}' and '{ch.name}'" if seen[used] != ch.name else f"'{ch.name}'"
                    raise ConfigError(
                        f"remote {name!r}: remote {used!r} would be used twice (through {via})", **where(name, key)
                    )
                seen[used] = ch.name
        done[name] = replace(rc, children=tuple(children))
        return done[name]

    return {name: link(name, ()) for name in remotes}


def _tree_names(rc: RemoteConfig) -> list[str]:
    """``rc`` and every remote below it."""
    return [rc.name, *(n for ch in rc.children for n in _tree_names(ch))]


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
    """Instantiate the backend for a resolved remote (wrapped for a sub-directory).

    Without ``secrets`` the backend's declared secret options come from
    ``omnifs.credentials.resolve`` (environment, then keyring), which raises
    ``CredentialError`` when a secret the config lists cannot be obtained.
    """
    rc = resolved.remote
    cls = backend_class(rc.type)
    opts = dict(rc.options)
    for key, option in cls.options.items():
        if key not in opts and option.default is not None:
            opts[key] = option.default
    if secrets is None:
        from omnifs.credentials import resolve

        secrets = resolve(rc.name, cls.options, rc.secrets)
    opts.update(secrets)
    if rc.children:
        opts["children"] = [build_backend(ResolvedRemote(ch.name, ch)) for ch in rc.children]
    backend = cls.from_options(rc.name, opts)
    if resolved.subdir:
        from omnifs.backends.subdir import SubdirBackend

        backend = SubdirBackend(backend, resolved.subdir)
    return backend


# --- writing ---------------------------------------------------------------------------


def coerce_option(name: str, rtype: str, key: str, raw: str) -> Any:
    """Convert a command-line string to the declared type of option ``key``; ConfigError if it cannot."""
    declared = backend_class(rtype).options
    option = declared.get(key)
    if option is None:
        known = ", ".join(sorted(k for k, o in declared.items() if not o.secret)) or "none"
        raise ConfigError(f"remote {name!r}: unknown option {key!r} for type {rtype!r} (known: {known})", key=key)
    try:
        if option.type is bool:
            low = raw.lower()
            if low not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(raw)
            return low in ("1", "true", "yes", "on")
        if option.type in (int, float):
            return option.type(raw)
        if option.type is list:
            return [part.strip() for part in raw.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"remote {name!r}: option {key!r} must be {option.type.__name__}, got {raw!r}", key=key
        ) from None
    return raw


def _atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text``: temp file in the same directory, fsync, rename, fsync dir."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _load_document(path: Path) -> Any:
    import tomlkit

    if not path.exists():
        return tomlkit.document()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", file=str(path)) from exc
    parse_config(text, path)  # refuse to rewrite a file that is already invalid
    return tomlkit.parse(text)


def save_remote(path: Path, name: str, rtype: str, options: Mapping[str, Any], secrets: Iterable[str] = ()) -> Config:
    """Create or replace remote ``name`` in the config file and return the new config.

    Other remotes, comments and the order of keys already present are kept.
    The result is validated like ``load_config`` before the file is replaced
    (atomically, mode 0600); on ConfigError the file is left untouched.
    """
    import tomlkit

    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"invalid remote name {name!r} (letters, digits, '_', '.', '-')", key="NAME")
    doc = _load_document(path)
    if "remotes" not in doc:
        doc["remotes"] = tomlkit.table(is_super_table=True)
    remotes = doc["remotes"]
    wanted: dict[str, Any] = {"type": rtype, **options}
    stored = list(dict.fromkeys(secrets))
    if stored:
        wanted[SECRETS_KEY] = stored
    if name in remotes:
        table = remotes[name]
        for key in [k for k in table if k not in wanted]:
            del table[key]
        for key, value in wanted.items():
            if key not in table or table[key] != value:
                table[key] = value
    else:
        table = tomlkit.table()
        for key, value in wanted.items():
            table[key] = value
        remotes[name] = table
    text = tomlkit.dumps(doc)
    config = parse_config(text, path)
    _atomic_write(path, text)
    return config


def delete_remote(path: Path, name: str) -> bool:
    """Remove remote ``name`` from the config file (atomically); False if it was not there."""
    import tomlkit

    if not path.exists():
        return False
    doc = _load_document(path)
    remotes = doc.get("remotes")
    if remotes is None or name not in remotes:
        return False
    del remotes[name]
    text = tomlkit.dumps(doc)
    parse_config(text, path)
    _atomic_write(path, text)
    return True
