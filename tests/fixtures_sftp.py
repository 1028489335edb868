"""A real OpenSSH server for tests (pytest plugin, loaded from ``tests/conftest.py``).

``sshd_server`` (session scope) runs ``/usr/sbin/sshd -D -e`` on a free loopback
port with freshly generated ed25519 host and client keys; ``sftp_remote``
(function scope) hands each test an empty directory on it as a ``RemoteSpec``.
The server can be stopped and restarted on the same port (its files are on
disk), and frozen with SIGSTOP to simulate a network partition.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

log = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"


@dataclass
class RemoteSpec:
    """One test remote: the ``[remotes.NAME]`` table and environment it needs."""

    name: str
    config: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    local_root: Path | None = None  # where the remote's files are on this machine


def generate_key(path: Path, comment: str = "omnifs-test") -> Path:
    """Create an unencrypted ed25519 key pair at ``path`` (and ``path.pub``)."""
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    """Return all descendants of ``pid`` (from /proc, depth first)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces.
        fields = stat[stat.rfind(b")") + 2 :].split()
        parents.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


class SSHServer:
    """A running OpenSSH daemon on 127.0.0.1 with its keys in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = free_port()
        self.user = getpass.getuser()
        self.host_key = generate_key(workdir / "host_ed25519", "omnifs-test-host")
        self.client_key = generate_key(workdir / "client_ed25519", "omnifs-test-client")
        self.authorized_keys = workdir / "authorized_keys"
        shutil.copyfile(f"{self.client_key}.pub", self.authorized_keys)
        self.known_hosts = workdir / "known_hosts"
        self.known_hosts.write_text(self.known_hosts_line())
        self.config = workdir / "sshd_config"
        self.config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.host}",
                    f"Port {self.port}",
                    f"HostKey {self.host_key}",
                    f"PidFile {workdir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "UsePAM no",
                    "StrictModes no",
                    "UseDNS no",
                    "PrintMotd no",
                    "LogLevel INFO",
                    f"Subsystem sftp {SFTP_SERVER}",
                    "",
                ]
            )
        )
        self.log_file = workdir / "sshd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._frozen: list[int] = []

    def known_hosts_line(self, pub_path: Path | None = None) -> str:
        """Return a known_hosts line for this server and the key in ``pub_path`` (default: its own)."""
        keytype, b64 = Path(pub_path or f"{self.host_key}.pub").read_text().split()[:2]
        return f"[{self.host}]:{self.port} {keytype} {b64}\n"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, timeout: float = 10.0) -> None:
        """Start sshd on ``self.port`` and wait until it accepts connections."""
        if self.pid is not None:
            return
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        with open(self.log_file, "ab") as logf:
            self._proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self._proc.returncode}: {self.log_file.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    s.settimeout(1)
                    if s.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not accept connections on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop sshd and every per-connection process, so clients see their connections drop."""
        if self._proc is None:
            return
        self.thaw()
        pids = [*_children(self._proc.pid), self._proc.pid]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids[:-1]) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._proc = None

    def drop_connections(self) -> None:
        """Kill every per-connection process (as an idle timeout would) but keep listening."""
        if self.pid is None:
            return
        children = _children(self.pid)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._frozen = [p for p in self._frozen if p not in children]
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.02)

    def freeze(self, connections_only: bool = False) -> None:
        """SIGSTOP the daemon and its connection processes: connections stay open, nothing answers.

        With ``connections_only`` the daemon itself keeps accepting new connections.
        """
        if self.pid is None:
            raise RuntimeError("sshd is not running")
        children = _children(self.pid)
        self._frozen = children if connections_only else [self.pid, *children]
        for pid in self._frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Undo :meth:`freeze` (SIGCONT); harmless when not frozen."""
        for pid in self._frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._frozen = []


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """A real OpenSSH sshd for the whole session (skipped when not installed)."""
    for tool in (SSHD, SFTP_SERVER, SSH_KEYGEN):
        if not os.access(tool, os.X_OK):
            pytest.skip(f"OpenSSH server not installed ({tool} missing; apt install openssh-server)")
    server = SSHServer(tmp_path_factory.mktemp("sshd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _sftp_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sftp-data")


@pytest.fixture
def sftp_remote(sshd_server: SSHServer, _sftp_data_dir: Path) -> RemoteSpec:
    """A fresh, empty directory on the test sshd, as a ``[remotes.NAME]`` table."""
    sshd_server.thaw()  # in case an earlier test left the server frozen or stopped
    sshd_server.start()
    root = _sftp_data_dir / uuid.uuid4().hex[:12]
    root.mkdir()
    return RemoteSpec(
        name="sftptest",
        config={
            "type": "sftp",
            "host": sshd_server.host,
            "port": sshd_server.port,
            "user": sshd_server.user,
            "path": str(root),
            "key_file": str(sshd_server.client_key),
            "known_hosts": str(sshd_server.known_hosts),
        },
        env={},
        local_root=root,
    )
