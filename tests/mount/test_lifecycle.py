"""Mount lifetime through the CLI: background mount, unmount, signals, crashes, large files."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mount.conftest import Remote, make_remote
from tests.mount.harness import REPO, Mount, isolated_env, mounted_fstype, wait_for

GiB = 1 << 30
MiB = 1 << 20


def omnifs(*args: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omnifs", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.fixture
def local_remote(request: pytest.FixtureRequest, tmp_path: Path, home: Path) -> Remote:
    return make_remote("local", request, tmp_path, home)


def test_background_mount_and_unmount(tmp_path: Path, home: Path) -> None:
    env = isolated_env(home)
    mp = tmp_path / "mnt"
    mp.mkdir()
    res = omnifs("mount", str(mp), env=env)
    try:
        assert res.returncode == 0, res.stderr
        assert mounted_fstype(mp) == "fuse.omnifs"
        (mp / "note.txt").write_text("default store")
        store = home / ".local/share/omnifs/default"
        wait_for(lambda: (store / "note.txt").exists() and (store / "note.txt").read_text() == "default store")
        assert omnifs("mount", str(mp), env=env).returncode == 2  # already mounted
    finally:
        res = omnifs("unmount", str(mp), env=env)
    assert res.returncode == 0, res.stderr
    assert mounted_fstype(mp) is None


def test_sigterm_unmounts_cleanly(local_remote: Remote, mounter) -> None:
    m = mounter(local_remote)
    fd = os.open(m.path / "open.txt", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"written before SIGTERM")
    os.close(fd)
    assert m.terminate() == 0
    assert mounted_fstype(m.path) is None
    assert (local_remote.backend_root / "open.txt").read_bytes() == b"written before SIGTERM"


def test_stale_mount_after_kill_is_cleaned(local_remote: Remote, mounter, tmp_path: Path) -> None:
    m = mounter(local_remote)
    (m.path / "f").write_text("x")
    assert m.proc is not None
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait()
    m.proc = None
    # The kernel mount may linger (ENOTCONN) or be removed by auto_unmount; either way we can mount again.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and mounted_fstype(m.path) is not None:
        try:
            os.stat(m.path)
        except OSError:
            break
        time.sleep(0.05)
    m2 = mounter(local_remote)
    assert (m2.path / "f").read_text() == "x"


def test_stale_enotconn_mount_is_cleaned(tmp_path: Path, home: Path) -> None:
    """Without auto_unmount a killed server leaves ENOTCONN; the next mount cleans it."""
    backend = tmp_path / "b"
    backend.mkdir()
    mp = tmp_path / "mnt"
    env = isolated_env(home)
    code = (
        "import pyfuse3, sys\n"
        "from omnifs.fuse_ops import FuseOperations\n"
        "import os, signal\n"
        "ops = pyfuse3.Operations()\n"
        "pyfuse3.init(ops, sys.argv[1], {'fsname=stale', 'subtype=omnifs'})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    mp.mkdir()
    subprocess.run([sys.executable, "-c", code, str(mp)], env=env, timeout=30)
    try:
        with pytest.raises(OSError):
            os.listdir(mp)
        m = Mount(mp, f"local:{backend}", env, tmp_path / "m.log").start()
        try:
            assert os.listdir(mp) == []
        finally:
            m.unmount()
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


def _pattern(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (MiB // 32)


def test_two_gib_file_streams_with_bounded_memory(local_remote: Remote, mounter) -> None:
    m = mounter(local_remote)
    p = m.path / "big.bin"
    size = 2 * GiB
    want = hashlib.sha256()
    with open(p, "wb") as f:
        for i in range(size // MiB):
            chunk = _pattern(i % 97)
            want.update(chunk)
            f.write(chunk)
    assert p.stat().st_size == size
    uploaded = local_remote.backend_root / "big.bin"
    wait_for(lambda: uploaded.exists() and uploaded.stat().st_size == size, timeout=120, what="upload")
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], capture_output=True)
    got = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(4 * MiB):
            got.update(chunk)
    assert got.hexdigest() == want.hexdigest()
    peak_mib = m.rss_peak_kib() / 1024
    assert peak_mib < 300, f"mount process peaked at {peak_mib:.0f} MiB for a 2 GiB file"
    os.unlink(p)


def test_flush_wait_uploads_queued_writes(local_remote: Remote, mounter) -> None:
    m = mounter(local_remote, "write_back=10m")
    for i in range(5):
        (m.path / f"f{i}.txt").write_text(f"queued {i}")
    assert int(os.getxattr(m.path, "user.omnifs.pending")) == 5
    assert not (local_remote.backend_root / "f0.txt").exists()  # created here, not uploaded yet
    res = omnifs("flush", str(m.path), "--wait", "--timeout", "60", env=local_remote.env)
    assert res.returncode == 0, res.stderr
    assert "all uploads done" in res.stdout
    for i in range(5):
        assert (local_remote.backend_root / f"f{i}.txt").read_text() == f"queued {i}"
    assert omnifs("flush", "/nonexistent-mount", env=local_remote.env).returncode == 2
