"""Persistent cache and offline mode, with real faults on real servers.

S3 outages are simulated by freezing moto (SIGSTOP: connections hang, data is
kept); SFTP outages by stopping sshd (connections refused, data on disk kept).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.mount.conftest import Remote, make_remote
from tests.mount.harness import REPO, isolated_env, wait_for

# meta_files=hide: these tests compare listings and are about caching, not companion .meta.json files.
FAST = ("timeout=2", "poll_interval=1", "probe_timeout=3", "meta_files=hide")


@pytest.fixture(params=["s3", "sftp"])
def net(request: pytest.FixtureRequest, tmp_path: Path, home: Path) -> Remote:
    """A fresh remote on a real server we can take down."""
    remote = make_remote(request.param, request, tmp_path, home)
    remote.extra["server"] = request.getfixturevalue("s3_server" if request.param == "s3" else "sshd_server")
    return remote


@contextmanager
def outage(remote: Remote) -> Iterator[None]:
    """Take the remote's server down for the duration of the block."""
    server = remote.extra["server"]
    if remote.kind == "s3":
        server.freeze()
        try:
            yield
        finally:
            server.thaw()
    else:
        server.stop()
        try:
            yield
        finally:
            server.start()


def backend_bytes(remote: Remote, rel: str) -> bytes | None:
    """Read an object directly from the backend (not through omnifs)."""
    if remote.kind == "s3":
        client = remote.extra["s3_client"]
        try:
            return client.get_object(Bucket=remote.server.config["bucket"], Key=rel)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None
    assert remote.backend_root is not None
    p = remote.backend_root / rel
    return p.read_bytes() if p.exists() else None


def put_backend(remote: Remote, rel: str, data: bytes) -> None:
    """Create or replace an object directly on the backend."""
    if remote.kind == "s3":
        remote.extra["s3_client"].put_object(Bucket=remote.server.config["bucket"], Key=rel, Body=data)
    else:
        assert remote.backend_root is not None
        p = remote.backend_root / rel
        p.write_bytes(data)
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))  # whole-second mtimes on SFTP


@pytest.fixture(autouse=True)
def _s3_client(request: pytest.FixtureRequest) -> None:
    if "net" in request.fixturenames:
        remote = request.getfixturevalue("net")
        if remote.kind == "s3":
            remote.extra["s3_client"] = request.getfixturevalue("s3_client")


def test_offline_listing_reads_and_deferred_writes(net: Remote, mounter) -> None:
    m = mounter(net, *FAST, "dir_cache_time=1")
    docs = m.path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("version 1")
    big = random.Random(1).randbytes(3 * 1024 * 1024 + 5)
    (docs / "big.bin").write_bytes(big)
    put_backend(net, "docs/remote-only.txt", b"never read through the mount")
    time.sleep(1.2)
    assert sorted(os.listdir(docs)) == ["a.txt", "big.bin", "remote-only.txt"]
    assert (docs / "big.bin").read_bytes() == big
    with outage(net):
        assert sorted(os.listdir(docs)) == ["a.txt", "big.bin", "remote-only.txt"]
        assert (docs / "a.txt").read_text() == "version 1"
        assert (docs / "big.bin").read_bytes() == big
        t0 = time.monotonic()
        with pytest.raises(OSError) as ei:
            (docs / "remote-only.txt").read_bytes()
        assert ei.value.errno == errno.EIO
        assert time.monotonic() - t0 < 10
        # Editing a cached file offline succeeds; the upload waits for the backend.
        with open(docs / "a.txt", "w") as f:
            f.write("version 2, written offline")
        assert (docs / "a.txt").read_text() == "version 2, written offline"
        # A new file is created here and uploaded when the backend is back.
        (docs / "new-offline.txt").write_text("created offline")
        assert "new-offline.txt" in os.listdir(docs)
    # Back online: the mount notices by itself and uploads what waited.
    wait_for(lambda: backend_bytes(net, "docs/a.txt") == b"version 2, written offline", what="deferred upload")
    wait_for(lambda: backend_bytes(net, "docs/new-offline.txt") == b"created offline", what="offline create")
    assert (docs / "remote-only.txt").read_bytes() == b"never read through the mount"
    (docs / "after.txt").write_text("online again")
    wait_for(lambda: backend_bytes(net, "docs/after.txt") == b"online again", what="upload after reconnect")


def test_restart_offline_from_cache(net: Remote, mounter) -> None:
    m = mounter(net, *FAST)
    (m.path / "tree" / "sub").mkdir(parents=True)
    files = {f"tree/sub/f{i}.txt": f"content {i}".encode() for i in range(5)}
    for rel, data in files.items():
        (m.path / rel).write_bytes(data)
    put_backend(net, "tree/uncached.bin", b"u" * 1000)
    m.unmount()
    m = mounter(net, *FAST)
    assert sorted(os.listdir(m.path / "tree")) == ["sub", "uncached.bin"]  # listed, never read
    m.unmount()
    with outage(net):
        m2 = mounter(net, *FAST)
        assert sorted(os.listdir(m2.path / "tree")) == ["sub", "uncached.bin"]
        assert sorted(os.listdir(m2.path / "tree" / "sub")) == [f"f{i}.txt" for i in range(5)]
        for rel, data in files.items():
            assert (m2.path / rel).read_bytes() == data
        with pytest.raises(OSError) as ei:
            (m2.path / "tree" / "uncached.bin").read_bytes()
        assert ei.value.errno == errno.EIO
        assert "offline" in m2.log_text()
    # It comes back online on its own: what was not cached can be read again.
    wait_for(lambda: "back online" in m2.log_text(), what="back online")
    assert (m2.path / "tree" / "uncached.bin").read_bytes() == b"u" * 1000


def test_kill_9_with_deferred_upload_loses_nothing(net: Remote, mounter) -> None:
    m = mounter(net, *FAST)
    (m.path / "doc.txt").write_text("original")
    wait_for(lambda: backend_bytes(net, "doc.txt") == b"original", what="first upload")
    with outage(net):
        with open(m.path / "doc.txt", "w") as f:
            f.write("edited while offline")
        os.kill(m.pid, signal.SIGKILL)
        m.proc.wait()  # type: ignore[union-attr]
        m.proc = None
        subprocess.run(["fusermount3", "-u", "-z", str(m.path)], capture_output=True)
    assert backend_bytes(net, "doc.txt") == b"original"
    m2 = mounter(net, *FAST)
    wait_for(lambda: backend_bytes(net, "doc.txt") == b"edited while offline", what="recovered upload")
    assert (m2.path / "doc.txt").read_text() == "edited while offline"


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_remote_change_is_seen_never_mixed(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, home: Path, mounter
) -> None:
    remote = make_remote(kind, request, tmp_path, home)
    if kind == "s3":
        remote.extra["s3_client"] = request.getfixturevalue("s3_client")
    m = mounter(remote, "dir_cache_time=1", "poll_interval=1", "attr_timeout=0.5")
    old = b"A" * (3 * 1024 * 1024)
    new = b"B" * (3 * 1024 * 1024)
    (m.path / "f.bin").write_bytes(old)
    assert (m.path / "f.bin").read_bytes() == old
    wait_for(lambda: backend_bytes(remote, "f.bin") == old, what="write-back upload")
    put_backend(remote, "f.bin", new)

    def read_new() -> bool:
        try:
            data = (m.path / "f.bin").read_bytes()
        except OSError as exc:  # ESTALE: the object changed under an open reader
            assert exc.errno == errno.ESTALE
            return False
        assert data in (old, new), "a read mixed two versions of the object"
        return data == new

    wait_for(read_new, timeout=20, what="new content")


def test_two_mounts_see_each_others_changes(
    request: pytest.FixtureRequest, tmp_path: Path, home: Path, mounter
) -> None:
    a = make_remote("s3", request, tmp_path, home)
    home_b = tmp_path / "home-b"
    home_b.mkdir()
    b = Remote(a.kind, a.spec, isolated_env(home_b, a.server.env), config=a.config, server=a.server)
    ma = mounter(a, "poll_interval=1", "dir_cache_time=2")
    mb = mounter(b, "poll_interval=1", "dir_cache_time=2", path=tmp_path / "mnt-b")
    assert os.listdir(mb.path) == []
    (ma.path / "shared.txt").write_text("from A")
    shared_b = mb.path / "shared.txt"
    wait_for(lambda: shared_b.exists() and shared_b.read_text() == "from A", what="B sees A's file")
    (mb.path / "shared.txt").write_text("B changed it")
    wait_for(lambda: (ma.path / "shared.txt").read_text() == "B changed it", what="A sees B's change")
    os.unlink(ma.path / "shared.txt")
    wait_for(lambda: not (mb.path / "shared.txt").exists(), what="B sees the deletion")


def test_eviction_keeps_pinned_data(
    request: pytest.FixtureRequest, tmp_path: Path, home: Path, mounter, s3_server: Any
) -> None:
    remote = make_remote("s3", request, tmp_path, home)
    remote.extra["server"] = s3_server
    remote.extra["s3_client"] = request.getfixturevalue("s3_client")
    m = mounter(remote, *FAST, "cache_max_size=4M", "cache_min_free=0")
    keep = m.path / "keep"
    keep.mkdir()
    pinned = {f"p{i}.bin": random.Random(i).randbytes(1_500_000) for i in range(3)}
    for name, data in pinned.items():
        (keep / name).write_bytes(data)
    os.setxattr(keep, "user.omnifs.pin", b"1")
    assert os.getxattr(keep / "p0.bin", "user.omnifs.pin") == b"1"
    # A file open for reading keeps its chunks too (O_DIRECT: every read reaches omnifs).
    held = random.Random(99).randbytes(1_800_000)
    (m.path / "held.bin").write_bytes(held)
    wait_for(lambda: backend_bytes(remote, "held.bin") == held, what="upload")
    fd = os.open(m.path / "held.bin", os.O_RDONLY | os.O_DIRECT)
    assert os.pread(fd, len(held) + 10, 0) == held
    # Push far more than the cap through the cache.
    for i in range(12):
        data = random.Random(100 + i).randbytes(2_000_000)
        (m.path / f"other{i}.bin").write_bytes(data)
        assert (m.path / f"other{i}.bin").read_bytes() == data
    with outage(remote):
        for name, data in pinned.items():
            assert (keep / name).read_bytes() == data
        assert os.pread(fd, len(held) + 10, 0) == held
    os.close(fd)
    os.setxattr(keep, "user.omnifs.pin", b"0")
    assert os.getxattr(keep / "p0.bin", "user.omnifs.pin") == b"0"


def test_cache_survives_kill_9(tmp_path: Path, home: Path, request: pytest.FixtureRequest, mounter) -> None:
    remote = make_remote("local", request, tmp_path, home)
    m = mounter(remote)
    expected = {}
    for i in range(40):
        data = random.Random(i).randbytes(random.Random(i).randrange(1, 2_500_000))
        (remote.backend_root / f"f{i}.bin").write_bytes(data)  # type: ignore[operator]
        expected[f"f{i}.bin"] = hashlib.sha256(data).hexdigest()
    # Kill the mount while it is busy filling the cache.
    reader = subprocess.Popen(["sh", "-c", f"cat {m.path}/*.bin > /dev/null"])
    time.sleep(0.4)
    m.kill()
    reader.wait()
    m2 = mounter(remote)
    for name, digest in expected.items():
        assert hashlib.sha256((m2.path / name).read_bytes()).hexdigest() == digest, name


def test_full_disk_gives_enospc_and_keeps_old_content(
    tmp_path: Path, home: Path, request: pytest.FixtureRequest, mounter
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    remote = make_remote("local", request, tmp_path, home)
    state = home / ".local" / "state"
    state.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(state)], check=True)
    try:
        m = mounter(remote, "cache_min_free=0")
        (m.path / "doc.bin").write_bytes(b"old" * 1000)
        # Once uploaded, a failed rewrite never replaces the remote's good version.
        wait_for(lambda: (remote.backend_root / "doc.bin").read_bytes() == b"old" * 1000)  # type: ignore[operator]
        with pytest.raises(OSError) as ei:
            with open(m.path / "doc.bin", "wb") as f:
                for _ in range(8):
                    f.write(b"x" * (1024 * 1024))
                f.flush()
                os.fsync(f.fileno())
        assert ei.value.errno == errno.ENOSPC
        assert (remote.backend_root / "doc.bin").read_bytes() == b"old" * 1000  # type: ignore[operator]
        (m.path / "small.txt").write_text("still works")
        m.unmount()
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True)


def test_cache_cli_pin_stats_unpin_clear(request: pytest.FixtureRequest, tmp_path: Path, home: Path, mounter) -> None:
    remote = make_remote("local", request, tmp_path, home)
    m = mounter(remote, "meta_files=hide")  # counts pinned files; companions would add to the count
    folder = m.path / "project"
    folder.mkdir()
    for i in range(3):
        (folder / f"f{i}.bin").write_bytes(random.Random(i).randbytes(700_000))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [sys.executable, "-m", "omnifs", *args], env=remote.env, capture_output=True, text=True, cwd=REPO
        )
        assert res.returncode == 0, res.stderr
        return res

    out = cli("cache", "pin", str(folder))
    assert "pinned" in out.stdout and "3 file(s)" in out.stdout

    def stats() -> dict[str, Any]:
        return json.loads(cli("cache", "stats", str(m.path), "--json").stdout)["caches"][0]  # type: ignore[no-any-return]

    assert stats()["pinned_paths"] == ["project"]
    # Files still waiting for upload are pinned when their upload lands.
    wait_for(lambda: stats()["pinned_bytes"] >= 3 * 700_000, what="pinned data")
    cli("cache", "unpin", str(folder))
    after = stats()
    assert after["pinned_paths"] == [] and after["pinned_bytes"] < 100_000
    assert after["used_bytes"] >= 3 * 700_000  # unpinned data stays cached, evictable again
    cli("cache", "clear", str(m.path))
    assert stats()["used_bytes"] < 100_000
    for i in range(3):  # still readable after a clear
        assert (folder / f"f{i}.bin").read_bytes() == random.Random(i).randbytes(700_000)


@pytest.mark.parametrize("kind", ["local", "s3", "sftp"])
def test_conflicting_change_keeps_both_versions(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, home: Path, mounter
) -> None:
    remote = make_remote(kind, request, tmp_path, home)
    if kind == "s3":
        remote.extra["s3_client"] = request.getfixturevalue("s3_client")
    m = mounter(remote, "write_back=2s", "poll_interval=1", "dir_cache_time=1")
    doc = m.path / "plan.yaml"
    doc.write_text("base\n")
    wait_for(lambda: backend_bytes(remote, "plan.yaml") == b"base\n", what="first upload")
    doc.write_text("ours\n")  # queued for 2 s
    put_backend(remote, "plan.yaml", b"theirs\n")  # another writer gets there first

    def conflict_copies() -> list[str]:
        return [n for n in os.listdir(m.path) if n.startswith("plan.conflict-") and n.endswith(".yaml")]

    copies = wait_for(conflict_copies, what="a conflict copy")
    assert len(copies) == 1
    assert backend_bytes(remote, "plan.yaml") == b"theirs\n"
    assert backend_bytes(remote, copies[0]) == b"ours\n"
    wait_for(lambda: doc.read_text() == "theirs\n", what="theirs under the original name")
    assert (m.path / copies[0]).read_text() == "ours\n"

    def listed_conflicts() -> list[str]:
        status = subprocess.run(
            [sys.executable, "-m", "omnifs", "status", "--json"],
            env=remote.env,
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        mount = next(x for x in json.loads(status.stdout)["mounts"] if x["mountpoint"] == str(m.path))
        return [c["copy"] for c in mount["journal"]["conflicts"]]

    assert wait_for(listed_conflicts, what="the conflict in omnifs status") == copies
