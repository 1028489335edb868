"""Type=notify without systemd: a real foreground mount tells our NOTIFY_SOCKET it is READY, then STOPPING.

The test listens on a UNIX datagram socket with SO_PASSCRED, so the kernel
stamps every message with the sender's pid (SCM_CREDENTIALS); the messages must
come from the mount process itself, READY=1 only once the mount is up.
`omnifs status` is checked against the same live mount.
"""

from __future__ import annotations

import json
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mount.harness import REPO, isolated_env, mounted_fstype

if shutil.which("fusermount3") is None or not Path("/dev/fuse").exists():
    pytest.skip("FUSE is not available (need /dev/fuse and fusermount3)", allow_module_level=True)

_UCRED = struct.Struct("3i")  # pid, uid, gid


def receive(sock: socket.socket, timeout: float) -> tuple[str, int]:
    """Return the next notification and the pid the kernel says sent it."""
    ready, _, _ = select.select([sock], [], [], timeout)
    assert ready, "no notification within the timeout"
    data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
    pids = [
        _UCRED.unpack(cdata[: _UCRED.size])[0]
        for level, kind, cdata in ancdata
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
    ]
    assert pids, "no SCM_CREDENTIALS on the message"
    return data.decode(), pids[0]


def omnifs(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omnifs", *args], env=env, capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_ready_and_stopping_from_the_mount_process(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    mp = tmp_path / "mnt"
    mp.mkdir()
    addr = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(str(addr))
    env = isolated_env(home, {"NOTIFY_SOCKET": str(addr)})
    log = tmp_path / "mount.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "omnifs", "-v", "mount", "--foreground", "memory:", str(mp)],
            env=env,
            stdout=logf,
            stderr=logf,
            cwd=REPO,
        )
    try:
        message, pid = receive(sock, 30)
        assert "READY=1" in message.split("\n"), message
        assert pid == proc.pid
        assert mounted_fstype(mp) == "fuse.omnifs"  # ready means mounted
        (mp / "hello.txt").write_text("hi")

        status_env = isolated_env(home)
        res = omnifs("status", "--json", env=status_env)
        assert res.returncode == 0, res.stderr
        mounts = json.loads(res.stdout)["mounts"]
        assert [(m["mountpoint"], m["pid"]) for m in mounts] == [(str(mp), proc.pid)]
        res = omnifs("status", env=status_env)
        assert res.returncode == 0 and "memory:" in res.stdout and str(proc.pid) in res.stdout
        assert omnifs("status", "-q", str(mp), env=status_env).returncode == 0

        proc.send_signal(signal.SIGTERM)
        message, pid = receive(sock, 30)
        assert "STOPPING=1" in message.split("\n"), message
        assert pid == proc.pid
        assert proc.wait(60) == 0, log.read_text()
        assert mounted_fstype(mp) is None
        res = omnifs("status", "--json", env=status_env)
        assert json.loads(res.stdout) == {"mounts": []}
        assert omnifs("status", "-q", str(mp), env=status_env).returncode == 1
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + 5
        while mounted_fstype(mp) is not None and time.monotonic() < deadline:
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
            time.sleep(0.1)
