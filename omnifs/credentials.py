"""Secrets of remotes: the OS keyring first-class, environment variables as the headless fallback.

A secret is a backend option declared with ``Option(secret=True)`` (S3
``access_key_id``/``secret_access_key``/``session_token``, SFTP
``password``/``passphrase``).  Secrets are never written to the config file:

* keyring entry: service ``omnifs``, username ``<remote>.<field>``
  (via the ``keyring`` package, i.e. the Secret Service on Linux);
* environment variable ``OMNIFS_<REMOTE>_<FIELD>``: upper case, every
  character other than a letter or digit becomes ``_``
  (remote ``my-s3``, field ``secret_access_key`` -> ``OMNIFS_MY_S3_SECRET_ACCESS_KEY``).

Precedence: a non-empty environment variable wins over the keyring, so a
service or a script can override a stored secret without touching the keyring,
and the keyring is not even contacted for that field.  The keyring is read only
for fields the config file lists in the remote's ``secrets`` key (written by
``omnifs config add``), so a remote that needs no secret never waits on D-Bus.

Every value obtained here is registered with :func:`redact`, which the CLI's log
formatter and exception hook use, so a secret never reaches a log line or a
traceback.  Nothing in this module logs or returns a value except the lookup
functions themselves.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from omnifs.backends.base import Option

log = logging.getLogger(__name__)

SERVICE = "omnifs"
MASK = "********"
_MIN_REDACT = 4  # shorter values would mangle ordinary log text


class CredentialError(Exception):
    """A secret could not be stored or obtained; the message is one line and names the fix."""

    exit_code = 1


class KeyringUnavailable(CredentialError):
    """No usable keyring (none installed, no D-Bus session, or locked): exit code 1."""

    exit_code = 1


class MissingSecret(CredentialError):
    """The keyring works but holds no entry the config says exists: exit code 2."""

    exit_code = 2


# --- redaction -----------------------------------------------------------------------

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Remember ``value`` so that :func:`redact` masks it (thread-safe)."""
    if value and len(value) >= _MIN_REDACT:
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """Return ``text`` with every registered secret replaced by ``********``."""
    with _secrets_lock:
        values = sorted(_secrets, key=len, reverse=True)
    for value in values:
        if value in text:
            text = text.replace(value, MASK)
    return text


# --- naming --------------------------------------------------------------------------


def username(remote: str, field: str) -> str:
    """The keyring username of a secret: ``<remote>.<field>``."""
    return f"{remote}.{field}"


def env_var(remote: str, field: str) -> str:
    """The fallback environment variable of a secret, e.g. ``OMNIFS_MY_S3_SECRET_ACCESS_KEY``."""
    return "OMNIFS_" + re.sub(r"[^A-Za-z0-9]", "_", f"{remote}_{field}").upper()


def secret_fields(options: Mapping[str, Option]) -> list[str]:
    """The declared secret options of a backend, in declaration order."""
    return [key for key, opt in options.items() if opt.secret]


# --- keyring access ------------------------------------------------------------------


def _hint(exc: BaseException) -> str:
    """How to make the keyring usable, judged from the error it gave."""
    name = type(exc).__name__
    text = str(exc).lower()
    if name == "KeyringLocked" or "locked" in text or "prompt" in text:
        return "unlock the keyring (log in to the desktop session, or run: gnome-keyring-daemon --unlock)"
    if not os.environ.get("DBUS_SESSION_BUS_ADDRESS") and not os.environ.get("XDG_RUNTIME_DIR"):
        return "run inside a D-Bus session with a Secret Service such as gnome-keyring-daemon"
    return "start and unlock a Secret Service such as gnome-keyring-daemon in this session"


def _reason(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _backend() -> Any:
    """Return the active keyring backend; KeyringUnavailable for none or an insecure one."""
    try:
        import keyring
        from keyring.backends import fail
    except ImportError as exc:
        raise KeyringUnavailable(f"the keyring package is not installed ({exc})") from None
    kr = keyring.get_keyring()
    if isinstance(kr, fail.Keyring):
        raise KeyringUnavailable("no keyring backend is available (no Secret Service found)")
    if type(kr).__module__.startswith("keyrings.alt") and "Plaintext" in type(kr).__name__:
        raise KeyringUnavailable(f"refusing the plaintext keyring {type(kr).__name__}")
    return kr


def _unavailable(remote: str, field: str, what: str, exc: BaseException) -> KeyringUnavailable:
    if isinstance(exc, KeyringUnavailable):
        reason = str(exc)
        hint = _hint(exc.__cause__ or exc)
    else:
        reason = _reason(exc)
        hint = _hint(exc)
    where = "in" if what == "store" else "from"
    return KeyringUnavailable(
        f"remote {remote!r}: cannot {what} secret {field!r} {where} the keyring ({reason}); "
        f"set {env_var(remote, field)} or {hint}"
    )


def keyring_get(remote: str, field: str) -> str | None:
    """Return the stored secret or None when absent; KeyringUnavailable when the keyring is unusable."""
    try:
        value = _backend().get_password(SERVICE, username(remote, field))
    except Exception as exc:
        raise _unavailable(remote, field, "read", exc) from None
    if value:
        register_secret(value)
    return value or None


def keyring_set(remote: str, field: str, value: str) -> None:
    """Store (or replace) a secret; KeyringUnavailable when the keyring is unusable."""
    register_secret(value)
    try:
        _backend().set_password(SERVICE, username(remote, field), value)
    except Exception as exc:
        raise _unavailable(remote, field, "store", exc) from None


def keyring_delete(remote: str, field: str) -> bool:
    """Delete a secret; True if one was deleted, False if there was none. Idempotent."""
    try:
        from keyring.errors import PasswordDeleteError
    except ImportError as exc:
        raise _unavailable(remote, field, "delete", exc) from None
    try:
        kr = _backend()
        if kr.get_password(SERVICE, username(remote, field)) is None:
            return False
        kr.delete_password(SERVICE, username(remote, field))
    except PasswordDeleteError:
        return False
    except Exception as exc:
        raise _unavailable(remote, field, "delete", exc) from None
    return True


# --- resolution ----------------------------------------------------------------------


def from_env(remote: str, field: str) -> str | None:
    """The secret from its environment variable (None when unset or empty)."""
    value = os.environ.get(env_var(remote, field)) or None
    if value:
        register_secret(value)
    return value


def source_of(remote: str, field: str, stored: Collection[str]) -> str | None:
    """Where a secret would come from: "env", "keyring" or None (not configured). No keyring access."""
    if os.environ.get(env_var(remote, field)):
        return "env"
    return "keyring" if field in stored else None


def resolve(remote: str, options: Mapping[str, Option], stored: Iterable[str] = ()) -> dict[str, str]:
    """Return the secret options of a remote: environment first, then the keyring.

    ``stored`` names the fields the config says are in the keyring; only those
    (and required secrets) are looked up there.  A missing optional secret is
    simply left out (e.g. S3 then uses boto3's own credential chain).  Raises
    KeyringUnavailable or MissingSecret with a one-line message naming the
    environment variable to set.
    """
    stored = set(stored)
    out: dict[str, str] = {}
    for field in secret_fields(options):
        value = from_env(remote, field)
        if value is not None:
            log.debug("remote %r: %s from $%s", remote, field, env_var(remote, field))
            out[field] = value
            continue
        if field not in stored and not options[field].required:
            continue
        value = keyring_get(remote, field)
        if value is None:
            raise MissingSecret(
                f"remote {remote!r}: secret {field!r} is not in the keyring; store it with "
                f"'omnifs config add {remote} --secret-from-stdin {field}' or set {env_var(remote, field)}"
            )
        log.debug("remote %r: %s from the keyring", remote, field)
        out[field] = value
    return out
