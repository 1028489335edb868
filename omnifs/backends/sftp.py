"""A backend over SFTP (paramiko), tested against OpenSSH's sftp-server.

Connections.  One paramiko ``SFTPClient`` must not be shared between threads,
so the backend keeps a pool of SFTP channels: each SSH connection (transport)
carries up to ``_SESSIONS_PER_CONN`` channels (OpenSSH allows 10 sessions per
connection by default) and the pool opens more connections as needed, at most
``max_threads`` channels in all (``run_sync`` never runs more operations at
once).  An operation checks a channel out, uses it alone and returns it.  A
connection the server dropped (restart, idle timeout) is noticed at check-out
or by the failing request; the operation then reconnects once and repeats,
and operations that change state are written so that the repeat is safe (a
write is repeated only if nothing was read from its source yet).  A server
that stops answering fails an operation after ``op_timeout`` seconds without
a reply; such an operation is not repeated and its connection is closed.

Host keys are checked against ``known_hosts`` before authenticating.  With
``host_key_policy = "strict"`` an unknown key is refused; ``"accept-new"``
records an unknown key; a changed key is refused under every policy.

Paths.  Every path is ``root/<backend path>`` where ``root`` is the server's
``realpath`` of the configured ``path``.  The final component is never
followed (``lstat``, ``readlink``; a read of a symlink fails with ELOOP).  The
directory an operation works in is resolved on the server (``realpath``) and
must stay below ``root``, else ``InvalidPath``.  Limits: SFTP offers no
``openat``/``O_NOFOLLOW``, so a symlink swapped in between that check and the
operation can still redirect it; results are cached for ``_DIR_CHECK_TTL``
seconds; and SETSTAT follows symlinks, so attributes of symlinks are never set.

Writes stream into a hidden ``.omnifs-tmp.<uuid>`` file beside the target
(pipelined, in 32 KiB requests), set its attributes through the open handle,
and move it over the target with ``posix-rename@openssh.com`` (atomic).  A
failed write removes its temp file; one cut off with its connection is
removed by the next operation that has a working connection.

Three things paramiko has no public call for use its request internals
(``SFTPClient._request``/``_read_response``): the ``statvfs@openssh.com``
extension, collecting the status of pipelined writes, and listing a directory
holding names that are not UTF-8.

SFTP version 3 stores times in whole seconds, and has no inode numbers or
change counters, so ``ObjectInfo.etag`` is ``None``: the pair (size, mtime)
is all a cache can compare.  Extended attributes are not supported.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import getpass
import hashlib
import logging
import os
import socket
import stat as stat_mod
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import BinaryIO, Literal, TypeVar, cast

import paramiko
from paramiko.sftp import CMD_CLOSE, CMD_EXTENDED, CMD_EXTENDED_REPLY, CMD_HANDLE, CMD_NAME, CMD_OPENDIR, CMD_READDIR

from omnifs.backends.base import (
    Backend,
    Capabilities,
    ObjectInfo,
    Option,
    SetAttrs,
    StatFs,
    check_path,
    join,
    parent_of,
)
from omnifs.errors import (
    AlreadyExists,
    BackendUnavailable,
    ConfigError,
    InvalidArgument,
    InvalidPath,
    IsADirectory,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotSupported,
    OmniError,
    PermissionDenied,
    TransientError,
    from_oserror,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
HostKeyPolicy = Literal["strict", "accept-new"]

TEMP_PREFIX = ".omnifs-tmp."
_CHUNK = 1 << 20  # bytes read from a write's source at a time
_PREFETCH = 32  # read requests of 32 KiB in flight per read (stays inside the 2 MiB channel window)
_SESSIONS_PER_CONN = 8  # below OpenSSH's default MaxSessions (10)
_DIR_CHECK_TTL = 1.0  # seconds a directory's "stays under the root" verdict is reused
_DIR_CHECK_MAX = 4096  # verdicts kept at most
_KEEPALIVE = 30  # seconds between SSH keepalive packets on idle connections
_MAX_TIME = 2**32 - 1  # SFTP v3 carries times as unsigned 32-bit seconds
_DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")
_known_hosts_lock = threading.Lock()


class HostKeyError(PermissionDenied):
    """The server's host key could not be verified; nothing was sent to it."""


class UnknownHostKey(HostKeyError):
    """The server's host key is not in known_hosts (and the policy does not accept new keys)."""


class ChangedHostKey(HostKeyError):
    """The server presented a key different from the one recorded in known_hosts."""


class RemoteFailure(OmniError):
    """The server reported a generic failure (SSH_FX_FAILURE) without naming its cause."""


# --- helpers ---------------------------------------------------------------------------


def _fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _status_error(exc: OSError, path: str) -> OmniError:
    """Translate an SFTP status error (an ``IOError`` from paramiko) into a domain error."""
    if exc.errno:
        return from_oserror(exc, path)
    text = str(exc.args[0]) if exc.args else str(exc)
    if "unsupported" in text.lower():
        return NotSupported(f"{path}: the server does not support this operation ({text})")
    return RemoteFailure(f"{path}: the server reported {text!r}")


def _channel_broken(sftp: paramiko.SFTPClient) -> bool:
    chan = sftp.get_channel()
    if chan is None or chan.closed:
        return True
    transport = chan.get_transport()
    return transport is None or not transport.is_active()


def _is_connection_error(sftp: paramiko.SFTPClient, exc: BaseException) -> bool:
    """True if ``exc`` means the channel is unusable (as opposed to an SFTP status answer)."""
    if isinstance(exc, (EOFError, paramiko.SSHException, paramiko.SFTPError, ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, OSError) and _channel_broken(sftp)


@contextlib.contextmanager
def _status(sftp: paramiko.SFTPClient, path: str) -> Iterator[None]:
    """Turn SFTP status errors raised inside the block into domain errors; pass the rest on."""
    try:
        yield
    except OmniError:
        raise
    except OSError as exc:
        if _is_connection_error(sftp, exc):
            raise
        raise _status_error(exc, path) from exc


def _listdir_utf8(sftp: paramiko.SFTPClient, full: str) -> list[paramiko.SFTPAttributes]:
    """List directory ``full`` like ``listdir_attr``, skipping names that are not UTF-8.

    paramiko's own listing fails as a whole on such a name; this one reads the
    raw names (through paramiko's request internals) and logs what it skips.
    """
    kind, msg = sftp._request(CMD_OPENDIR, full)
    if kind != CMD_HANDLE:
        raise paramiko.SFTPError("expected a handle")
    handle = msg.get_binary()
    out: list[paramiko.SFTPAttributes] = []
    while True:
        try:
            kind, msg = sftp._request(CMD_READDIR, handle)
        except EOFError:  # SSH_FX_EOF: the end of the listing (a lost connection is an SSHException)
            break
        if kind != CMD_NAME:
            raise paramiko.SFTPError("expected names")
        for _ in range(msg.get_int()):
            raw = msg.get_string()
            msg.get_string()  # the "ls -l" line
            attrs = paramiko.SFTPAttributes._from_msg(msg)
            try:
                attrs.filename = raw.decode("utf-8")
            except UnicodeDecodeError:
                log.warning("skipping %r in %s: the name is not UTF-8", raw, full)
                continue
            out.append(attrs)
    sftp._request(CMD_CLOSE, handle)
    return out


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _seconds(ns: int, what: str) -> float:
    seconds = ns / 1e9
    if not 0 <= seconds <= _MAX_TIME:
        raise InvalidArgument(f"{what} {ns} ns is outside the range SFTP can store (1970..2106)")
    return seconds


def _info(path: str, a: paramiko.SFTPAttributes, target: str | None = None) -> ObjectInfo:
    mode = a.st_mode or 0
    if stat_mod.S_ISDIR(mode):
        kind = "dir"
    elif stat_mod.S_ISLNK(mode):
        kind = "symlink"
    else:
        kind = "file"
    mtime = a.st_mtime
    atime = a.st_atime
    return ObjectInfo(
        path=path,
        kind=kind,  # type: ignore[arg-type]
        size=(a.st_size or 0) if kind != "dir" else 0,
        mtime_ns=int(mtime) * 1_000_000_000 if mtime is not None else 0,
        atime_ns=int(atime) * 1_000_000_000 if atime is not None else None,
        mode=stat_mod.S_IMODE(mode) if a.st_mode is not None else None,
        uid=a.st_uid,
        gid=a.st_gid,
        target=target,
    )


class _Conn:
    """One SSH connection and the number of SFTP channels it carries."""

    def __init__(self, transport: paramiko.Transport) -> None:
        self.transport = transport
        self.sessions = 0  # channels open or being opened
        self.limit = _SESSIONS_PER_CONN
        self.failed: str | None = None  # why we closed it

    def usable(self) -> bool:
        return self.failed is None and self.transport.is_active()


class _Chan:
    """One SFTP channel of a connection; used by one thread at a time."""

    def __init__(self, conn: _Conn, sftp: paramiko.SFTPClient) -> None:
        self.conn = conn
        self.sftp = sftp

    def usable(self) -> bool:
        return self.conn.usable() and not _channel_broken(self.sftp)


class _Pool:
    """SFTP channels over as few SSH connections as the server allows; thread-safe.

    Channels and connections are closed outside the lock: closing sends a
    message and must not hold up other threads.
    """

    def __init__(self, connect: Callable[[], paramiko.Transport], op_timeout: float, where: str) -> None:
        self._connect = connect
        self._op_timeout = op_timeout
        self._where = where
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._idle: list[_Chan] = []
        self._conns: list[_Conn] = []
        self._closed = False

    def acquire(self) -> _Chan:
        """Return a channel for the caller's exclusive use, connecting if needed.

        Raises BackendUnavailable (server unreachable, not answering, refusing
        sessions) or PermissionDenied (authentication, host key).
        """
        for _ in range(3):
            stale: list[_Chan] = []
            with self._lock:
                if self._closed:
                    raise BackendUnavailable(f"sftp backend for {self._where} is closed")
                chan = None
                while self._idle and chan is None:
                    candidate = self._idle.pop()
                    if candidate.usable():
                        chan = candidate
                    else:
                        stale.append(candidate)
                conn = None if chan is not None else self._reserve_locked()
            self._close_chans(stale)
            if chan is not None:
                return chan
            if conn is None:
                conn = self._new_conn()
            try:
                return _Chan(conn, self._open_sftp(conn))
            except paramiko.ChannelException as exc:
                # The server allows fewer sessions per connection than we assumed.
                with self._lock:
                    conn.sessions -= 1
                    conn.limit = max(1, conn.sessions)
                    last = conn.sessions == 0
                if last:
                    self._kill(conn, "no session allowed")
                    raise BackendUnavailable(f"sftp {self._where} refused an SFTP session: {exc}") from exc
                log.info("%s allows %d sessions per connection", self._where, conn.limit)
            except (TimeoutError, EOFError, paramiko.SSHException, OSError) as exc:
                with self._lock:
                    conn.sessions -= 1
                timeout = isinstance(exc, TimeoutError) or conn.failed == "timeout"
                self._kill(conn, "timeout" if timeout else "lost")
                if timeout:
                    raise BackendUnavailable(f"sftp {self._where}: no reply within {self._op_timeout:g} s") from exc
                log.info("connection to %s lost while opening a channel (%s)", self._where, _describe(exc))
            except BaseException:
                with self._lock:
                    conn.sessions -= 1
                raise
        raise BackendUnavailable(f"sftp {self._where}: cannot open an SFTP channel")

    def release(self, chan: _Chan) -> None:
        """Return a channel after use: kept if healthy, closed otherwise."""
        with self._lock:
            keep = not self._closed and chan.usable()
            if keep:
                self._idle.append(chan)
        if not keep:
            self._close_chans([chan])

    def discard(self, chan: _Chan, reason: str) -> None:
        """Close ``chan`` and its whole connection (it failed in a way that poisons the rest)."""
        self._kill(chan.conn, reason)
        self._close_chans([chan])

    def close(self) -> None:
        """Close every channel and connection; later acquires fail.  Idempotent."""
        with self._lock:
            self._closed = True
            conns, self._conns, self._idle = self._conns, [], []
        for conn in conns:
            conn.failed = conn.failed or "closed"
            with contextlib.suppress(Exception):
                conn.transport.close()

    # --- internals ---------------------------------------------------------------------
    def _reserve_locked(self) -> _Conn | None:
        for conn in self._conns:
            if conn.usable() and conn.sessions < conn.limit:
                conn.sessions += 1
                return conn
        return None

    def _close_chans(self, chans: list[_Chan]) -> None:
        for chan in chans:
            with contextlib.suppress(Exception):
                chan.sftp.close()
            with self._lock:
                chan.conn.sessions -= 1
                dead = not chan.conn.usable()
            if dead:
                self._kill(chan.conn, "dropped")

    def _kill(self, conn: _Conn, reason: str) -> None:
        with self._lock:
            conn.failed = conn.failed or reason
            if conn in self._conns:
                self._conns.remove(conn)
        with contextlib.suppress(Exception):
            conn.transport.close()

    def _new_conn(self) -> _Conn:
        with self._connect_lock:
            with self._lock:
                conn = self._reserve_locked()  # another thread may have connected meanwhile
            if conn is not None:
                return conn
            transport = self._connect()
            conn = _Conn(transport)
            conn.sessions = 1
            with self._lock:
                closed = self._closed
                if not closed:
                    self._conns.append(conn)
            if closed:
                transport.close()
                raise BackendUnavailable(f"sftp backend for {self._where} is closed")
            return conn

    def _open_sftp(self, conn: _Conn) -> paramiko.SFTPClient:
        """Open an SFTP channel; a server that stops answering fails it after op_timeout."""
        t = conn.transport
        chan = t.open_session(timeout=self._op_timeout)
        chan.settimeout(self._op_timeout)
        # invoke_subsystem waits without a timeout: a watchdog closes the connection instead.
        watchdog = threading.Timer(self._op_timeout, self._kill, (conn, "timeout"))
        watchdog.daemon = True
        watchdog.start()
        try:
            chan.invoke_subsystem("sftp")
        finally:
            watchdog.cancel()
        return paramiko.SFTPClient(chan)


# --- the backend ---------------------------------------------------------------------------


class SFTPBackend(Backend):
    """Objects are files below a directory on an SFTP server (OpenSSH's sftp-server)."""

    type_name = "sftp"
    options = {
        "host": Option(str, required=True, help="server name or address"),
        "port": Option(int, default=22, help="SSH port"),
        "user": Option(str, help="login name (default: the current user)"),
        "path": Option(str, default="", help="root directory on the server; relative to the login directory"),
        "key_file": Option(str, help="private key file (default: the SSH agent and ~/.ssh/id_*)"),
        "known_hosts": Option(str, default="~/.ssh/known_hosts", help="OpenSSH known_hosts file"),
        "host_key_policy": Option(str, default="strict", help='"strict" or "accept-new"'),
        "connect_timeout": Option(float, default=10.0, help="seconds to connect, handshake and log in"),
        "op_timeout": Option(float, default=30.0, help="seconds without a reply before an operation fails"),
        "password": Option(str, secret=True, help="login password"),
        "passphrase": Option(str, secret=True, help="passphrase of key_file"),
    }
    capabilities = Capabilities(xattrs=False)

    def __init__(
        self,
        name: str,
        host: str,
        port: int = 22,
        user: str | None = None,
        path: str = "",
        key_file: str | None = None,
        known_hosts: str | None = None,
        host_key_policy: str = "strict",
        connect_timeout: float = 10.0,
        op_timeout: float = 30.0,
        *,
        password: str | None = None,
        passphrase: str | None = None,
        max_threads: int = 8,
    ) -> None:
        super().__init__(name, max_threads=max_threads)
        if not host:
            raise ConfigError(f"remote {name!r}: host must not be empty", key="host")
        if not 0 < port < 65536:
            raise ConfigError(f"remote {name!r}: port {port} is out of range", key="port")
        if host_key_policy not in ("strict", "accept-new"):
            raise ConfigError(
                f"remote {name!r}: host_key_policy must be 'strict' or 'accept-new', not {host_key_policy!r}",
                key="host_key_policy",
            )
        for key, value in (("connect_timeout", connect_timeout), ("op_timeout", op_timeout)):
            if not value > 0:
                raise ConfigError(f"remote {name!r}: {key} must be positive", key=key)
        self.host = host
        self.port = port
        self.user = user or getpass.getuser()
        self.path = path
        self.known_hosts = os.path.expanduser(known_hosts or "~/.ssh/known_hosts")
        self.host_key_policy = cast(HostKeyPolicy, host_key_policy)
        self.connect_timeout = float(connect_timeout)
        self.op_timeout = float(op_timeout)
        self._password = password
        self._passphrase = passphrase
        self._key_file = os.path.expanduser(key_file) if key_file else None
        self._key = self._load_key(self._key_file, passphrase) if self._key_file else None
        self._where = f"{self.host}:{self.port}" if ":" not in host else f"[{self.host}]:{self.port}"
        self._pool = _Pool(self._connect, self.op_timeout, self._where)
        self._root: str | None = None
        self._root_lock = threading.Lock()
        self._dir_ok: dict[str, float] = {}
        self._statvfs = True
        self._orphans: list[str] = []  # temp files of writes cut off with their connection
        self._orphans_lock = threading.Lock()

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.path.startswith("/"):
            where = self.path
        else:
            where = "/~" + (f"/{self.path}" if self.path else "")
        return f"sftp://{self.user}@{host}:{self.port}{where}"

    def is_temp_failure(self, exc: BaseException) -> bool:
        """True for failures worth retrying later (server unreachable or not answering)."""
        if isinstance(exc, (BackendUnavailable, TransientError)):
            return True
        if isinstance(exc, (OmniError, paramiko.AuthenticationException, paramiko.BadHostKeyException)):
            return False
        return isinstance(exc, (TimeoutError, ConnectionError, EOFError, paramiko.SSHException))

    # --- connecting ----------------------------------------------------------------------
    def _pass_bytes(self) -> bytes | None:
        return self._passphrase.encode() if self._passphrase else None

    def _load_key(self, key_file: str, passphrase: str | None) -> paramiko.PKey:
        """Load the configured private key; ConfigError names the file when it cannot."""
        try:
            return paramiko.PKey.from_path(key_file, passphrase.encode() if passphrase else None)
        except paramiko.PasswordRequiredException as exc:
            raise ConfigError(
                f"remote {self.name!r}: key_file {key_file} is encrypted; store its passphrase in the keyring",
                key="key_file",
            ) from exc
        except (OSError, paramiko.SSHException, ValueError) as exc:
            raise ConfigError(f"remote {self.name!r}: cannot load key_file {key_file}: {exc}", key="key_file") from exc

    def _connect(self) -> paramiko.Transport:
        """Open, verify and authenticate one SSH connection."""
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except TimeoutError as exc:
            raise BackendUnavailable(f"sftp {self._where}: connection timed out") from exc
        except OSError as exc:
            raise BackendUnavailable(f"sftp {self._where}: cannot connect: {exc.strerror or exc}") from exc
        # SFTP sends many small pipelined requests: without NODELAY, Nagle and delayed
        # ACKs stall them (measured: reads 4x slower, small operations 2x slower).
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock)
        try:
            transport.banner_timeout = self.connect_timeout
            transport.handshake_timeout = self.connect_timeout
            transport.auth_timeout = self.connect_timeout
            known = self._known_keys()
            self._prefer_key_types(transport, known)
            try:
                # start_client returns quietly when its timeout expires; the key lookup then fails.
                transport.start_client(timeout=self.connect_timeout)
                server_key = transport.get_remote_server_key()
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise BackendUnavailable(
                    f"sftp {self._where}: SSH handshake failed or timed out: {_describe(exc)}"
                ) from exc
            self._verify_host_key(server_key, known)
            self._authenticate(transport)
            transport.set_keepalive(_KEEPALIVE)
        except BaseException:
            transport.close()
            raise
        log.info("connected to %s as %s", self._where, self.user)
        return transport

    def _host_pattern(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def _known_keys(self) -> dict[str, paramiko.PKey]:
        """Return the keys known_hosts records for this server, by key type."""
        hostkeys = paramiko.HostKeys()
        if os.path.exists(self.known_hosts):
            try:
                hostkeys.load(self.known_hosts)
            except Exception as exc:  # paramiko raises several types for malformed lines
                raise HostKeyError(f"cannot read known_hosts file {self.known_hosts}: {exc}") from exc
        entry = hostkeys.lookup(self._host_pattern())
        return dict(entry.items()) if entry is not None else {}

    @staticmethod
    def _prefer_key_types(transport: paramiko.Transport, known: dict[str, paramiko.PKey]) -> None:
        """Ask the server first for a key type we can verify."""
        if not known:
            return
        opts = transport.get_security_options()
        first: list[str] = []
        for keytype in known:
            first.extend(["rsa-sha2-512", "rsa-sha2-256"] if keytype == "ssh-rsa" else [keytype])
        available = list(opts.key_types)
        preferred = [k for k in first if k in available]
        opts.key_types = preferred + [k for k in available if k not in preferred]

    def _verify_host_key(self, key: paramiko.PKey, known: dict[str, paramiko.PKey]) -> None:
        """Accept ``key`` only if known_hosts has it (or the policy adds an unknown one)."""
        pattern = self._host_pattern()
        if known.get(key.get_name()) == key:
            return
        if known:
            raise ChangedHostKey(
                f"HOST KEY CHANGED for {self._where}: the server presented {key.get_name()} {_fingerprint(key)}, "
                f"which does not match {self.known_hosts}; this may be an attack. If the change is expected, "
                f"remove the old entry for {pattern} from {self.known_hosts}"
            )
        if self.host_key_policy != "accept-new":
            raise UnknownHostKey(
                f"unknown host key for {self._where} ({key.get_name()} {_fingerprint(key)}): not in "
                f"{self.known_hosts}. Verify the fingerprint, then add it (ssh-keyscan -p {self.port} {self.host} "
                f'>> {self.known_hosts}) or set host_key_policy = "accept-new"'
            )
        self._record_host_key(pattern, key)

    def _record_host_key(self, pattern: str, key: paramiko.PKey) -> None:
        """Append ``key`` to known_hosts unless another connection just did."""
        with _known_hosts_lock:
            latest = self._known_keys()
            if latest.get(key.get_name()) == key:
                return
            if latest:
                raise ChangedHostKey(f"HOST KEY CHANGED for {self._where} while connecting ({self.known_hosts})")
            directory = os.path.dirname(self.known_hosts) or "."
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                fd = os.open(self.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                with open(fd, "ab") as f:
                    if f.tell() > 0:
                        with open(self.known_hosts, "rb") as r:
                            r.seek(-1, os.SEEK_END)
                            if r.read(1) != b"\n":
                                f.write(b"\n")
                    f.write(f"{pattern} {key.get_name()} {key.get_base64()}\n".encode())
            except OSError as exc:
                raise HostKeyError(f"cannot record the host key of {self._where} in {self.known_hosts}: {exc}") from exc
        log.warning("added host key %s %s for %s to %s", key.get_name(), _fingerprint(key), pattern, self.known_hosts)

    def _authenticate(self, transport: paramiko.Transport) -> None:
        """Log in with the key file, else the agent and default keys, then the password."""
        tried: list[str] = []
        keys: list[tuple[str, paramiko.PKey]] = []
        agent: paramiko.Agent | None = None
        if self._key is not None:
            keys.append((f"key {self._key_file}", self._key))
        else:
            if os.environ.get("SSH_AUTH_SOCK"):
                with contextlib.suppress(Exception):
                    agent = paramiko.Agent()
                    keys.extend((f"agent key {k.get_name()}", k) for k in agent.get_keys())
            for base in _DEFAULT_KEYS:
                fname = os.path.expanduser(f"~/.ssh/{base}")
                if os.path.exists(fname):
                    try:
                        keys.append((f"key {fname}", paramiko.PKey.from_path(fname, self._pass_bytes())))
                    except (OSError, paramiko.SSHException, ValueError) as exc:
                        log.debug("skipping %s: %s", fname, exc)
        try:
            for label, key in keys:
                tried.append(label)
                try:
                    transport.auth_publickey(self.user, key)
                except paramiko.AuthenticationException:
                    continue
                if transport.is_authenticated():
                    return
            if self._password is not None:
                tried.append("password")
                with contextlib.suppress(paramiko.AuthenticationException):
                    transport.auth_password(self.user, self._password)
                if transport.is_authenticated():
                    return
        except paramiko.SSHException as exc:
            raise BackendUnavailable(f"sftp {self._where}: connection failed during login: {exc}") from exc
        finally:
            if agent is not None:
                agent.close()
        raise PermissionDenied(
            f"authentication failed for {self.user}@{self._where} (tried: {', '.join(tried) or 'nothing'})"
        )

    # --- running one operation -----------------------------------------------------------
    def _call(self, fn: Callable[[paramiko.SFTPClient], T], retry: bool | Callable[[], bool] = True) -> T:
        """Run ``fn(sftp)`` on a pooled channel, reconnecting once if the connection dropped."""
        for attempt in range(2):
            chan = self._pool.acquire()
            sftp = chan.sftp
            try:
                if self._root is None:
                    self._resolve_root(sftp)
                if self._orphans:
                    self._remove_orphans(sftp)
                result = fn(sftp)
            except OmniError:
                self._pool.release(chan)
                raise
            except TimeoutError as exc:
                self._pool.discard(chan, "timeout")
                raise BackendUnavailable(f"sftp {self._where}: no reply within {self.op_timeout:g} s") from exc
            except BaseException as exc:
                if not _is_connection_error(sftp, exc):
                    self._pool.release(chan)
                    raise
                reason = chan.conn.failed
                self._pool.discard(chan, "lost")
                may_retry = retry() if callable(retry) else retry
                if attempt == 0 and may_retry and reason != "timeout":
                    log.info("connection to %s lost (%s); reconnecting", self._where, _describe(exc))
                    continue
                raise BackendUnavailable(f"sftp {self._where}: connection lost: {_describe(exc)}") from exc
            else:
                self._pool.release(chan)
                return result
        raise AssertionError("unreachable")

    def _remove_orphans(self, sftp: paramiko.SFTPClient) -> None:
        """Remove temp files of writes whose connection failed (best effort, once each)."""
        with self._orphans_lock:
            orphans, self._orphans = self._orphans, []
        for i, tmp in enumerate(orphans):
            try:
                sftp.remove(tmp)
                log.info("removed %s, left by a write whose connection failed", tmp)
            except OSError as exc:
                if _is_connection_error(sftp, exc):
                    with self._orphans_lock:
                        self._orphans.extend(orphans[i:])
                    raise
                log.debug("cannot remove %s: %s", tmp, exc)

    def _resolve_root(self, sftp: paramiko.SFTPClient) -> None:
        """Find the server's real path of the configured root (once)."""
        with self._root_lock:
            if self._root is not None:
                return
            shown = self.path or "the login directory"
            try:
                root = sftp.normalize(self.path or ".")
                st = sftp.stat(root)
            except OSError as exc:
                if _is_connection_error(sftp, exc):
                    raise
                err = _status_error(exc, shown)
                if isinstance(err, NotFound):
                    raise NotFound(f"root directory {shown!r} does not exist on {self._where}") from exc
                raise err from exc
            if not stat_mod.S_ISDIR(st.st_mode or 0):
                raise NotADirectory(f"root {shown!r} on {self._where} is not a directory")
            self._root = root.rstrip("/") or "/"
            log.debug("root of %s is %s on %s", self.name, self._root, self._where)

    def _full(self, path: str) -> str:
        root = cast(str, self._root)
        if not path:
            return root
        return f"{root}/{path}" if root != "/" else f"/{path}"

    def _check_dir(self, sftp: paramiko.SFTPClient, path: str) -> None:
        """Raise InvalidPath unless directory ``path`` resolves (symlinks followed) below the root.

        A missing final component resolves to itself (OpenSSH's realpath), so the
        operation that follows reports NotFound.
        """
        if not path:
            return
        now = time.monotonic()
        if self._dir_ok.get(path, 0.0) > now:
            return
        root = cast(str, self._root)
        with _status(sftp, path):
            real = sftp.normalize(self._full(path))
        if real != root and not real.startswith(root.rstrip("/") + "/"):
            raise InvalidPath(f"path escapes the backend root through a symlink: {path!r}")
        if len(self._dir_ok) >= _DIR_CHECK_MAX:
            self._dir_ok.clear()
        self._dir_ok[path] = now + _DIR_CHECK_TTL

    def _forget_dirs(self) -> None:
        """Drop cached directory checks (after changes that can put a symlink where a directory was)."""
        self._dir_ok.clear()

    def _lstat(self, sftp: paramiko.SFTPClient, path: str) -> paramiko.SFTPAttributes:
        with _status(sftp, path):
            return sftp.lstat(self._full(path))

    def _lstat_or_none(self, sftp: paramiko.SFTPClient, path: str) -> paramiko.SFTPAttributes | None:
        try:
            return self._lstat(sftp, path)
        except NotFound:
            return None

    def _info_of(self, sftp: paramiko.SFTPClient, path: str, a: paramiko.SFTPAttributes) -> ObjectInfo:
        target = None
        if stat_mod.S_ISLNK(a.st_mode or 0):
            with _status(sftp, path):
                target = sftp.readlink(self._full(path))
        return _info(path, a, target)

    def _why_failed(self, sftp: paramiko.SFTPClient, path: str, exc: OmniError) -> OmniError:
        """Explain a generic failure to create ``path``: existing object, missing or non-directory parent."""
        if self._lstat_or_none(sftp, path) is not None:
            return AlreadyExists(path)
        parent = parent_of(path)
        pst = self._lstat_or_none(sftp, parent)
        if pst is None:
            return NotFound(f"parent directory of {path!r} does not exist")
        if not stat_mod.S_ISDIR(pst.st_mode or 0):
            return NotADirectory(f"parent of {path!r} is not a directory")
        return exc

    def _replace(self, sftp: paramiko.SFTPClient, src_full: str, dst_full: str, path: str) -> None:
        """Move ``src_full`` over ``dst_full`` atomically (posix-rename@openssh.com)."""
        with _status(sftp, path):
            sftp.posix_rename(src_full, dst_full)

    # --- sync operations (run in worker threads) ----------------------------------------------
    def _stat(self, path: str) -> ObjectInfo:
        path = check_path(path)

        def op(sftp: paramiko.SFTPClient) -> ObjectInfo:
            self._check_dir(sftp, parent_of(path))
            return self._info_of(sftp, path, self._lstat(sftp, path))

        return self._call(op)

    def _list(self, path: str) -> list[ObjectInfo]:
        path = check_path(path)

        def op(sftp: paramiko.SFTPClient) -> list[ObjectInfo]:
            self._check_dir(sftp, path)
            try:
                with _status(sftp, path):
                    try:
                        entries = sftp.listdir_attr(self._full(path))
                    except UnicodeDecodeError:
                        entries = _listdir_utf8(sftp, self._full(path))
            except NotFound:
                st = self._lstat(sftp, path)  # NotFound if it really is missing
                if not stat_mod.S_ISDIR(st.st_mode or 0):
                    raise NotADirectory(path) from None
                raise
            out = []
            for a in entries:
                name = a.filename
                if not isinstance(name, str) or name in (".", "..") or name.startswith(TEMP_PREFIX):
                    continue
                child = join(path, name)
                try:
                    out.append(self._info_of(sftp, child, a))
                except NotFound:
                    continue  # removed while listing
            out.sort(key=lambda i: i.path)
            return out

        return self._call(op)

    def _read(self, path: str, offset: int, size: int) -> bytes:
        return self._read_versioned(path, offset, size)[0]

    def _read_versioned(self, path: str, offset: int, size: int) -> tuple[bytes, str]:
        """Read a range; the version is the size and whole-second mtime seen when opening."""
        path = check_path(path)
        if offset < 0 or size < 0:
            raise InvalidArgument(f"negative offset or size reading {path!r}")

        def op(sftp: paramiko.SFTPClient) -> tuple[bytes, str]:
            self._check_dir(sftp, parent_of(path))
            st = self._lstat(sftp, path)
            if stat_mod.S_ISLNK(st.st_mode or 0):
                raise OmniError(f"{path}: is a symbolic link (not followed)", errno=errno.ELOOP)
            if stat_mod.S_ISDIR(st.st_mode or 0):
                raise IsADirectory(path)
            if not stat_mod.S_ISREG(st.st_mode or stat_mod.S_IFREG):
                raise NotSupported(f"{path}: not a regular file (device, FIFO or socket)")
            version = f"{st.st_size or 0}:{int(st.st_mtime or 0) * 1_000_000_000}"
            n = min(size, (st.st_size or 0) - offset)
            if n <= 0:
                return b"", version
            with _status(sftp, path):
                f = sftp.open(self._full(path), "rb")
            try:
                with _status(sftp, path):
                    if n <= paramiko.SFTPFile.MAX_REQUEST_SIZE:
                        f.seek(offset)
                        data = f.read(n)
                    else:
                        data = b"".join(f.readv([(offset, n)], _PREFETCH))
            except BaseException as exc:
                self._abandon(sftp, f, exc)
                raise
            with _status(sftp, path):
                f.close()
            return data, version

        return self._call(op)

    @staticmethod
    def _abandon(sftp: paramiko.SFTPClient, f: paramiko.SFTPFile, exc: BaseException) -> None:
        """Close ``f`` after ``exc`` without waiting on a channel that no longer answers."""
        if isinstance(exc, TimeoutError) or _is_connection_error(sftp, exc):
            with contextlib.suppress(Exception):
                sftp.get_channel().close()  # the reply stream is out of step; never reuse it
        with contextlib.suppress(Exception):
            f.close()  # fails fast on a closed channel, but marks the file closed

    def _write(self, path: str, src: BinaryIO, attrs: SetAttrs | None) -> ObjectInfo:
        path = check_path(path)
        if not path:
            raise IsADirectory("cannot write the root")
        mtime = _seconds(attrs.mtime_ns, "mtime") if attrs and attrs.mtime_ns is not None else None
        atime = _seconds(attrs.atime_ns, "atime") if attrs and attrs.atime_ns is not None else None
        consumed = False

        def op(sftp: paramiko.SFTPClient) -> ObjectInfo:
            nonlocal consumed
            parent = parent_of(path)
            self._check_dir(sftp, parent)
            old = self._lstat_or_none(sftp, path)
            if old is not None and stat_mod.S_ISDIR(old.st_mode or 0):
                raise IsADirectory(path)
            keep_old = old is not None and stat_mod.S_ISREG(old.st_mode or 0)
            if attrs is not None and attrs.mode is not None:
                mode = attrs.mode & 0o7777
            elif old is not None and keep_old:
                mode = stat_mod.S_IMODE(old.st_mode or 0o644)
            else:
                mode = 0o644
            tmp = f"{self._full(parent)}/{TEMP_PREFIX}{uuid.uuid4().hex}"
            try:
                with _status(sftp, path):
                    f = sftp.open(tmp, "wx", bufsize=0)  # O_EXCL; "x" alone gives no write access
            except RemoteFailure as exc:
                raise self._why_failed(sftp, path, exc) from exc
            written = 0
            try:
                with _status(sftp, path):
                    f.set_pipelined(True)
                    f.chmod(mode & 0o777)  # never wider than the final mode, even while streaming
                    uid = attrs.uid if attrs else None
                    gid = attrs.gid if attrs else None
                    if (uid is None or gid is None) and old is not None and keep_old:
                        uid = old.st_uid if uid is None else uid
                        gid = old.st_gid if gid is None else gid
                    consumed = True
                    while True:
                        chunk = src.read(_CHUNK)
                        if chunk is None:
                            raise InvalidArgument(f"write source for {path!r} is non-blocking")
                        if not chunk:
                            break
                        f.write(chunk)
                        written += len(chunk)
                    f.flush()
                    self._collect_writes(f)
                    st = f.stat()
                    if st.st_size != written:
                        raise OmniError(f"{path}: server stored {st.st_size} of {written} bytes")
                    if uid is not None or gid is not None:
                        explicit = attrs is not None and (attrs.uid is not None or attrs.gid is not None)
                        st.st_uid, st.st_gid = self._chown_handle(f, st, uid, gid, path, explicit)
                    if mode & 0o7000:
                        f.chmod(mode)  # after writing and chown, which may clear setuid/setgid
                    st.st_mode = stat_mod.S_IFREG | mode
                    if mtime is not None or atime is not None:
                        now = time.time()
                        st.st_atime = now if atime is None else atime
                        st.st_mtime = (st.st_mtime or now) if mtime is None else mtime
                        f.utime((st.st_atime, st.st_mtime))
                    f.close()
                self._replace(sftp, tmp, self._full(path), path)
            except BaseException as exc:
                self._abandon(sftp, f, exc)
                if isinstance(exc, TimeoutError) or _is_connection_error(sftp, exc):
                    with self._orphans_lock:
                        self._orphans.append(tmp)  # removed once a connection works again
                else:
                    with contextlib.suppress(Exception):
                        sftp.remove(tmp)
                raise
            return _info(path, st)  # what the handle reported, plus the attributes set since

        return self._call(op, retry=lambda: not consumed)

    @staticmethod
    def _collect_writes(f: paramiko.SFTPFile) -> None:
        """Wait for the status of every pipelined write request and raise the first error.

        paramiko drops these statuses when a later request reads past them, so an
        error near the end of the file would otherwise go unnoticed (the size check
        after this is the public-API safety net).
        """
        pending = getattr(f, "_reqs", None)
        while pending:
            f.sftp._read_response(pending.popleft())

    def _chown_handle(
        self,
        f: paramiko.SFTPFile,
        st: paramiko.SFTPAttributes,
        uid: int | None,
        gid: int | None,
        path: str,
        explicit: bool,
    ) -> tuple[int | None, int | None]:
        """Give the open file ``uid``/``gid`` (None: unchanged); return the owner it ends up with.

        An owner carried over from the replaced file (``explicit`` false) is kept
        only where the server lets us, as ``cp`` does.
        """
        new = (st.st_uid if uid is None else uid, st.st_gid if gid is None else gid)
        if new == (st.st_uid, st.st_gid):
            return new
        try:
            f.chown(*new)
        except OSError as exc:
            if explicit or _is_connection_error(f.sftp, exc):
                raise
            log.debug("cannot keep the owner of %s: %s", path, exc)
            return st.st_uid, st.st_gid
        return new

    def _delete(self, path: str) -> None:
        path = check_path(path)
        if not path:
            raise IsADirectory("cannot delete the root")
        sent = False

        def op(sftp: paramiko.SFTPClient) -> None:
            nonlocal sent
            self._check_dir(sftp, parent_of(path))
            try:
                st = self._lstat(sftp, path)
            except NotFound:
                if sent:
                    return  # removed by the attempt whose connection dropped
                raise
            if stat_mod.S_ISDIR(st.st_mode or 0):
                raise IsADirectory(path)
            sent = True
            with _status(sftp, path):
                sftp.remove(self._full(path))
            if stat_mod.S_ISLNK(st.st_mode or 0):
                self._forget_dirs()  # a directory check may have gone through this link

        self._call(op)

    def _mkdir(self, path: str, attrs: SetAttrs | None) -> ObjectInfo:
        path = check_path(path)
        if not path:
            raise AlreadyExists("the root exists")
        sent = False

        def op(sftp: paramiko.SFTPClient) -> ObjectInfo:
            nonlocal sent
            self._check_dir(sftp, parent_of(path))
            full = self._full(path)
            was_sent, sent = sent, True
            try:
                with _status(sftp, path):
                    sftp.mkdir(full, 0o700)
            except RemoteFailure as exc:
                err = self._why_failed(sftp, path, exc)
                st = self._lstat_or_none(sftp, path)
                if not (was_sent and isinstance(err, AlreadyExists) and st and stat_mod.S_ISDIR(st.st_mode or 0)):
                    raise err from exc
            if attrs is None:
                return self._apply(sftp, path, SetAttrs(mode=0o755))
            return self._apply(sftp, path, replace(attrs, mode=0o755 if attrs.mode is None else attrs.mode))

        return self._call(op)

    def _rmdir(self, path: str) -> None:
        path = check_path(path)
        if not path:
            raise InvalidPath("cannot remove the root")
        sent = False

        def op(sftp: paramiko.SFTPClient) -> None:
            nonlocal sent
            self._check_dir(sftp, parent_of(path))
            try:
                st = self._lstat(sftp, path)
            except NotFound:
                if sent:
                    return
                raise
            if not stat_mod.S_ISDIR(st.st_mode or 0):
                raise NotADirectory(path)
            full = self._full(path)
            sent = True
            try:
                with _status(sftp, path):
                    sftp.rmdir(full)
                return
            except RemoteFailure as exc:
                with _status(sftp, path):
                    names = sftp.listdir(full)
                if not names:
                    raise
                if any(not n.startswith(TEMP_PREFIX) for n in names):
                    raise NotEmpty(path) from exc
                # Only leftovers of interrupted writes (hidden from list()): clear them.
                log.info("removing %d stale temp files from %s", len(names), path)
                with _status(sftp, path):
                    for n in names:
                        sftp.remove(f"{full}/{n}")
                    sftp.rmdir(full)

        self._call(op)
        self._forget_dirs()

    def _rename(self, src: str, dst: str) -> None:
        src, dst = check_path(src), check_path(dst)
        if not src or not dst:
            raise InvalidPath("cannot rename the root")
        if dst.startswith(src + "/"):
            raise InvalidArgument(f"cannot move {src!r} into itself ({dst!r})")
        sent = False

        def op(sftp: paramiko.SFTPClient) -> None:
            nonlocal sent
            self._check_dir(sftp, parent_of(src))
            self._check_dir(sftp, parent_of(dst))
            try:
                s = self._lstat(sftp, src)
            except NotFound:
                if sent and self._lstat_or_none(sftp, dst) is not None:
                    return  # moved by the attempt whose connection dropped
                raise
            if src == dst:
                return
            d = self._lstat_or_none(sftp, dst)
            if d is not None:
                s_dir, d_dir = stat_mod.S_ISDIR(s.st_mode or 0), stat_mod.S_ISDIR(d.st_mode or 0)
                if s_dir and not d_dir:
                    raise NotADirectory(f"cannot replace non-directory {dst!r} with a directory")
                if d_dir and not s_dir:
                    raise IsADirectory(f"cannot replace directory {dst!r} with a non-directory")
                if d_dir:
                    with _status(sftp, dst):
                        if sftp.listdir(self._full(dst)):
                            raise NotEmpty(dst)
            sent = True
            try:
                self._replace(sftp, self._full(src), self._full(dst), src)
            except RemoteFailure as exc:
                if d is None:
                    raise self._why_failed(sftp, dst, exc) from exc
                raise

        self._call(op)
        self._forget_dirs()

    def _symlink(self, path: str, target: str, attrs: SetAttrs | None) -> ObjectInfo:
        path = check_path(path)
        if not path:
            raise AlreadyExists("the root exists")
        if not target or "\x00" in target:
            raise InvalidArgument(f"invalid symlink target {target!r}")
        sent = False

        def op(sftp: paramiko.SFTPClient) -> ObjectInfo:
            nonlocal sent
            self._check_dir(sftp, parent_of(path))
            full = self._full(path)
            was_sent, sent = sent, True
            try:
                # OpenSSH takes SSH_FXP_SYMLINK's arguments as (target, link): paramiko's
                # symlink(source, dest) creates ``dest`` pointing to ``source`` there.
                with _status(sftp, path):
                    sftp.symlink(target, full)
            except RemoteFailure as exc:
                err = self._why_failed(sftp, path, exc)
                same = False
                if was_sent and isinstance(err, AlreadyExists):
                    with contextlib.suppress(OmniError):
                        same = sftp.readlink(full) == target
                if not same:
                    raise err from exc
            if attrs is not None and (attrs.uid is not None or attrs.gid is not None):
                log.debug("not setting the owner of symlink %s: SFTP SETSTAT would follow it", path)
            return _info(path, self._lstat(sftp, path), target)

        result = self._call(op)
        self._forget_dirs()
        return result

    def _apply(self, sftp: paramiko.SFTPClient, path: str, attrs: SetAttrs) -> ObjectInfo:
        """Set attributes of ``path`` (never a symlink: SETSTAT would follow it); return new info."""
        st = self._lstat(sftp, path)
        if stat_mod.S_ISLNK(st.st_mode or 0):
            if not attrs.is_empty():
                log.debug("not setting attributes of symlink %s: SFTP SETSTAT would follow it", path)
            return self._info_of(sftp, path, st)
        full = self._full(path)
        with _status(sftp, path):
            if attrs.uid is not None or attrs.gid is not None:
                uid = st.st_uid if attrs.uid is None else attrs.uid
                gid = st.st_gid if attrs.gid is None else attrs.gid
                if (uid, gid) != (st.st_uid, st.st_gid):
                    sftp.chown(full, uid, gid)
            if attrs.mode is not None:
                sftp.chmod(full, attrs.mode & 0o7777)
            if attrs.mtime_ns is not None or attrs.atime_ns is not None:
                atime = st.st_atime if attrs.atime_ns is None else _seconds(attrs.atime_ns, "atime")
                mtime = st.st_mtime if attrs.mtime_ns is None else _seconds(attrs.mtime_ns, "mtime")
                sftp.utime(full, (atime or 0, mtime or 0))
        return _info(path, self._lstat(sftp, path))

    def _set_attrs(self, path: str, attrs: SetAttrs) -> ObjectInfo:
        path = check_path(path)
        if attrs.mtime_ns is not None:
            _seconds(attrs.mtime_ns, "mtime")
        if attrs.atime_ns is not None:
            _seconds(attrs.atime_ns, "atime")

        def op(sftp: paramiko.SFTPClient) -> ObjectInfo:
            self._check_dir(sftp, parent_of(path))
            return self._apply(sftp, path, attrs)

        return self._call(op)

    def _statfs(self) -> StatFs | None:
        if not self._statvfs:
            return None

        def op(sftp: paramiko.SFTPClient) -> StatFs | None:
            # paramiko has no public call for this OpenSSH extension; the request is standard SFTP.
            try:
                with _status(sftp, ""):
                    kind, msg = sftp._request(CMD_EXTENDED, "statvfs@openssh.com", cast(str, self._root))
            except NotSupported:
                log.info("%s does not support statvfs@openssh.com; no free-space figures", self._where)
                self._statvfs = False
                return None
            if kind != CMD_EXTENDED_REPLY:
                raise OmniError(f"unexpected reply to statvfs from {self._where}")
            bsize, frsize, blocks, bfree, bavail, files, ffree = (msg.get_int64() for _ in range(7))
            return StatFs(frsize or bsize, blocks, bfree, bavail, files, ffree)

        return self._call(op)

    # --- async API ------------------------------------------------------------------------
    async def stat(self, path: str) -> ObjectInfo:
        return await self.run_sync(self._stat, path)

    async def list(self, path: str) -> list[ObjectInfo]:
        return await self.run_sync(self._list, path)

    async def read_versioned(self, path: str, offset: int, size: int) -> tuple[bytes, str]:
        return await self.run_sync(self._read_versioned, path, offset, size)

    async def read(self, path: str, offset: int, size: int) -> bytes:
        return await self.run_sync(self._read, path, offset, size)

    async def write(self, path: str, src: BinaryIO, attrs: SetAttrs | None = None) -> ObjectInfo:
        return await self.run_sync(self._write, path, src, attrs)

    async def delete(self, path: str) -> None:
        await self.run_sync(self._delete, path)

    async def mkdir(self, path: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        return await self.run_sync(self._mkdir, path, attrs)

    async def rmdir(self, path: str) -> None:
        await self.run_sync(self._rmdir, path)

    async def rename(self, src: str, dst: str) -> None:
        await self.run_sync(self._rename, src, dst)

    async def symlink(self, path: str, target: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        return await self.run_sync(self._symlink, path, target, attrs)

    async def set_attrs(self, path: str, attrs: SetAttrs) -> ObjectInfo:
        return await self.run_sync(self._set_attrs, path, attrs)

    async def statfs(self) -> StatFs | None:
        return await self.run_sync(self._statfs)

    async def aclose(self) -> None:
        """Close every channel and connection; idempotent."""
        self._pool.close()
