"""Loopback servers for the benchmark: an S3 server (s3rver, else moto) and OpenSSH sshd.

Every server runs in its own process group, listens on 127.0.0.1 only and is
stopped by :meth:`stop` (idempotent, kills the whole group).
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
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
S3RVER_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "omnifs-bench" / "s3rver"
S3RVER_JS = S3RVER_DIR / "node_modules" / "s3rver" / "bin" / "s3rver.js"
SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def stop_group(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """Terminate a process started with ``start_new_session=True`` and its whole group."""
    if proc is None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    # Reap stragglers of the group (e.g. sshd's per-connection children).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_for(check: Any, proc: subprocess.Popen[bytes], what: str, logfile: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {logfile.read_text(errors='replace')[-1500:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout:.0f}s; see {logfile}")
        time.sleep(0.05)


class S3Server:
    """A local S3 server: s3rver (fast, on disk) when installed, else moto (in memory)."""

    region = "us-east-1"

    def __init__(self, workdir: Path, prefer: Literal["s3rver", "moto"] = "s3rver") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.endpoint_url = f"http://{HOST}:{self.port}"
        self.kind: Literal["s3rver", "moto"] = "s3rver" if prefer == "s3rver" and s3rver_available() else "moto"
        if self.kind == "s3rver":
            self.access_key, self.secret_key = "S3RVER", "S3RVER"
        else:
            self.access_key, self.secret_key = "testing", "testing"
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile = workdir / f"{self.kind}.log"

    @property
    def credentials_env(self) -> dict[str, str]:
        """Environment variables a client subprocess needs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def start(self) -> None:
        """Start the server and return once it answers HTTP."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if self.kind == "s3rver":
            data = self.workdir / "s3rver-data"
            data.mkdir(parents=True, exist_ok=True)
            cmd = [
                "node",
                "--openssl-legacy-provider",
                str(S3RVER_JS),
                "-d",
                str(data),
                "-a",
                HOST,
                "-p",
                str(self.port),
                "--silent",
                "--no-vhost-buckets",
            ]
        else:
            env.update(self.credentials_env)
            cmd = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)]
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env, start_new_session=True
            )
        _wait_for(self._answers, self.proc, self.kind, self.logfile, 30)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def client(self) -> Any:
        """A boto3 client for this server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, max_pool_connections=32),
        )

    def stop(self) -> None:
        """Stop the server; idempotent."""
        proc, self.proc = self.proc, None
        stop_group(proc)

    def version(self) -> str:
        """Human-readable server name and version."""
        if self.kind == "s3rver":
            import json

            pkg = S3RVER_JS.parent.parent / "package.json"
            return f"s3rver {json.loads(pkg.read_text())['version']}"
        from importlib.metadata import version

        return f"moto {version('moto')}"


def s3rver_available() -> bool:
    """True when node and the s3rver package (installed by scripts/bench) are present."""
    return shutil.which("node") is not None and S3RVER_JS.is_file()


class SSHServer:
    """OpenSSH sshd on a loopback port with generated host and client keys (root by key only)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.user = getpass.getuser()
        self.host_key = self._keygen(workdir / "host_ed25519")
        self.client_key = self._keygen(workdir / "client_ed25519")
        authorized = workdir / "authorized_keys"
        shutil.copyfile(f"{self.client_key}.pub", authorized)
        keytype, b64 = Path(f"{self.host_key}.pub").read_text().split()[:2]
        self.known_hosts = workdir / "known_hosts"
        self.known_hosts.write_text(f"[{HOST}]:{self.port} {keytype} {b64}\n")
        self.config = workdir / "sshd_config"
        self.config.write_text(
            "\n".join(
                [
                    f"ListenAddress {HOST}",
                    f"Port {self.port}",
                    f"HostKey {self.host_key}",
                    f"PidFile {workdir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized}",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "UseDNS no",
                    "MaxSessions 32",
                    "MaxStartups 64",
                    f"Subsystem sftp {SFTP_SERVER}",
                    "",
                ]
            )
        )
        self.logfile = workdir / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        """True when sshd, sftp-server and ssh-keygen are installed."""
        return os.access(SSHD, os.X_OK) and os.access(SFTP_SERVER, os.X_OK) and shutil.which("ssh-keygen") is not None

    @staticmethod
    def _keygen(path: Path) -> Path:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "omnifs-bench", "-f", str(path)],
            check=True,
            stdin=subprocess.DEVNULL,
        )
        return path

    def start(self) -> None:
        """Start sshd and return once it sends its banner."""
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
            )
        _wait_for(self._answers, self.proc, "sshd", self.logfile, 15)

    def _answers(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=1) as s:
                s.settimeout(1)
                return s.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop sshd and its connection processes; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        # Per-connection sshd children run in their own sessions; find them via /proc.
        children = _descendants(proc.pid)
        stop_group(proc)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    """All descendants of ``pid`` according to /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        parents.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
