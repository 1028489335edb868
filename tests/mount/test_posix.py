"""POSIX behaviour through a real mount, on every backend."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.mount.harness import Mount, wait_for

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(src: Path, dst: Path, flags: int) -> None:
    res = libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags)
    if res != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_mount_shows_as_fuse_omnifs(mnt: Mount) -> None:
    with open("/proc/self/mountinfo") as f:
        line = next(x for x in f if x.split()[4] == str(mnt.path))
    fstype, source = line.split(" - ")[1].split()[:2]
    assert fstype == "fuse.omnifs"
    assert source == mnt.remote


def test_create_write_read_append(mnt: Mount) -> None:
    p = mnt.path / "hello.txt"
    p.write_bytes(b"hello\n")
    assert p.read_bytes() == b"hello\n"
    with open(p, "ab") as f:
        f.write(b"world\n")
    assert p.read_bytes() == b"hello\nworld\n"
    assert p.stat().st_size == 12
    assert sorted(os.listdir(mnt.path)) == ["hello.meta.json", "hello.txt"]  # the companion (meta_files=show)


def test_random_and_sparse_writes(mnt: Mount) -> None:
    p = mnt.path / "sparse.bin"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"END", 1 << 20)
        os.pwrite(fd, b"start", 0)
        os.pwrite(fd, b"mid", 4096)
        os.pwrite(fd, b"X", 1)  # overwrite inside
    finally:
        os.close(fd)
    data = p.read_bytes()
    assert len(data) == (1 << 20) + 3
    assert data[:5] == b"sXart"
    assert data[4096:4099] == b"mid"
    assert data[5:4096] == bytes(4091)
    assert data[-3:] == b"END"


def test_truncate_by_fd_and_path(mnt: Mount) -> None:
    p = mnt.path / "t.bin"
    p.write_bytes(b"0123456789")
    fd = os.open(p, os.O_RDWR)
    try:
        os.ftruncate(fd, 4)
        assert os.fstat(fd).st_size == 4
        os.ftruncate(fd, 8)
        assert os.pread(fd, 100, 0) == b"0123\0\0\0\0"
    finally:
        os.close(fd)
    assert p.read_bytes() == b"0123\0\0\0\0"
    os.truncate(p, 2)
    assert p.read_bytes() == b"01"
    os.truncate(p, 0)
    assert p.read_bytes() == b""
    with open(p, "w") as f:
        f.write("again")
    assert p.read_text() == "again"


def test_mkdir_rmdir_and_enotempty(mnt: Mount) -> None:
    d = mnt.path / "d"
    d.mkdir()
    (d / "f").write_text("x")
    with pytest.raises(OSError) as ei:
        os.rmdir(d)
    assert ei.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileExistsError):
        d.mkdir()
    (d / "f").unlink()
    os.rmdir(d)
    assert not d.exists()
    with pytest.raises(FileNotFoundError):
        os.rmdir(d)


def test_rename_file_over_existing(mnt: Mount) -> None:
    a, b = mnt.path / "a", mnt.path / "b"
    a.write_text("new")
    b.write_text("old content")
    os.rename(a, b)
    assert not a.exists()
    assert b.read_text() == "new"
    assert sorted(os.listdir(mnt.path)) == ["b", "b.meta.json"]  # b's companion (meta_files=show)


def test_rename_non_empty_directory(mnt: Mount) -> None:
    src = mnt.path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "sub" / "deeper" / "f.txt").write_text("deep")
    (src / "top.txt").write_text("top")
    os.rename(src, mnt.path / "dst")
    assert not src.exists()
    assert (mnt.path / "dst" / "sub" / "deeper" / "f.txt").read_text() == "deep"
    assert (mnt.path / "dst" / "top.txt").read_text() == "top"
    # Over an empty directory works, over a non-empty one is ENOTEMPTY.
    (mnt.path / "empty").mkdir()
    os.rename(mnt.path / "dst", mnt.path / "empty")
    assert (mnt.path / "empty" / "top.txt").read_text() == "top"
    (mnt.path / "full").mkdir()
    (mnt.path / "full" / "x").write_text("x")
    with pytest.raises(OSError) as ei:
        os.rename(mnt.path / "empty", mnt.path / "full")
    assert ei.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    assert (mnt.path / "full" / "x").read_text() == "x"


def test_rename_type_mismatch_and_flags(mnt: Mount) -> None:
    (mnt.path / "dir").mkdir()
    (mnt.path / "file").write_text("f")
    (mnt.path / "other").write_text("o")
    with pytest.raises(OSError) as ei:
        os.rename(mnt.path / "file", mnt.path / "dir")
    assert ei.value.errno == errno.EISDIR
    with pytest.raises(OSError) as ei:
        os.rename(mnt.path / "dir", mnt.path / "file")
    assert ei.value.errno == errno.ENOTDIR
    with pytest.raises(OSError) as ei:
        renameat2(mnt.path / "file", mnt.path / "other", RENAME_NOREPLACE)
    assert ei.value.errno == errno.EEXIST
    assert (mnt.path / "other").read_text() == "o"
    renameat2(mnt.path / "file", mnt.path / "fresh", RENAME_NOREPLACE)
    assert (mnt.path / "fresh").read_text() == "f"
    with pytest.raises(OSError) as ei:
        renameat2(mnt.path / "fresh", mnt.path / "other", RENAME_EXCHANGE)
    assert ei.value.errno == errno.EINVAL
    assert (mnt.path / "fresh").read_text() == "f" and (mnt.path / "other").read_text() == "o"


def test_unlink_while_open(mnt: Mount) -> None:
    p = mnt.path / "ghost"
    p.write_bytes(b"still here")
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        assert not p.exists()
        assert os.pread(fd, 100, 0) == b"still here"
        os.pwrite(fd, b"!", 10)
        assert os.pread(fd, 100, 0) == b"still here!"
        assert os.fstat(fd).st_size == 11
    finally:
        os.close(fd)
    assert os.listdir(mnt.path) == []


def test_unlink_while_open_readonly(mnt: Mount) -> None:
    p = mnt.path / "ghost-ro"
    p.write_bytes(b"r" * 300_000)
    with open(p, "rb") as f:
        os.unlink(p)
        assert f.read() == b"r" * 300_000


def test_symlink_readlink(mnt: Mount) -> None:
    (mnt.path / "target.txt").write_text("through the link")
    os.symlink("target.txt", mnt.path / "link")
    assert os.readlink(mnt.path / "link") == "target.txt"
    assert (mnt.path / "link").read_text() == "through the link"
    assert stat.S_ISLNK(os.lstat(mnt.path / "link").st_mode)
    os.symlink("/nonexistent/abs path", mnt.path / "dangling")
    assert os.readlink(mnt.path / "dangling") == "/nonexistent/abs path"
    os.unlink(mnt.path / "link")
    assert (mnt.path / "target.txt").exists()


def test_chmod_and_utimes(mnt: Mount) -> None:
    p = mnt.path / "f"
    p.write_text("x")
    os.chmod(p, 0o600)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    os.utime(p, ns=(1_500_000_000_000_000_000, 1_600_000_000_000_000_000))
    st = p.stat()
    assert st.st_mtime_ns // 1_000_000_000 == 1_600_000_000
    # UTIME_NOW for mtime, UTIME_OMIT semantics via touch -m.
    before = time.time()
    os.system(f"touch -m '{p}'")
    assert p.stat().st_mtime >= before - 2
    d = mnt.path / "d"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o751)
    assert stat.S_IMODE(d.stat().st_mode) == 0o751


def test_new_files_respect_umask(mnt: Mount) -> None:
    old = os.umask(0o027)
    try:
        fd = os.open(mnt.path / "f", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        os.mkdir(mnt.path / "d", 0o777)
    finally:
        os.umask(old)
    assert stat.S_IMODE((mnt.path / "f").stat().st_mode) == 0o640
    assert stat.S_IMODE((mnt.path / "d").stat().st_mode) == 0o750
    st = (mnt.path / "f").stat()
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


def test_mtime_changes_on_write(mnt: Mount) -> None:
    p = mnt.path / "f"
    p.write_text("a")
    os.utime(p, ns=(10**18, 10**18))
    with open(p, "a") as f:
        f.write("b")
    assert p.stat().st_mtime_ns > 10**18


def test_name_too_long(mnt: Mount) -> None:
    with pytest.raises(OSError) as ei:
        (mnt.path / ("n" * 256)).write_text("x")
    assert ei.value.errno == errno.ENAMETOOLONG
    ok = mnt.path / ("n" * 255)
    ok.write_text("fits")
    assert ok.read_text() == "fits"


def test_statfs(mnt: Mount) -> None:
    st = os.statvfs(mnt.path)
    assert st.f_namemax == 255
    assert st.f_bsize > 0 and st.f_blocks > 0


def test_xattrs(mnt: Mount, remote) -> None:
    p = mnt.path / "f"
    p.write_text("x")
    if remote.kind == "sftp":
        with pytest.raises(OSError) as ei:
            os.setxattr(p, "user.color", b"blue")
        assert ei.value.errno == errno.ENOTSUP
        return
    os.setxattr(p, "user.color", b"blue")
    os.setxattr(p, "user.bin", bytes(range(32)))
    assert os.getxattr(p, "user.color") == b"blue"
    assert sorted(os.listxattr(p)) == ["user.bin", "user.color"]
    os.removexattr(p, "user.color")
    with pytest.raises(OSError) as ei:
        os.getxattr(p, "user.color")
    assert ei.value.errno == errno.ENODATA
    with pytest.raises(OSError) as ei:
        os.setxattr(p, "trusted.x", b"1")
    assert ei.value.errno in (errno.ENOTSUP, errno.EPERM)
    # Rewriting the file keeps its attributes.
    p.write_text("new content")
    assert os.getxattr(p, "user.bin") == bytes(range(32))


def test_two_handles_different_modes(mnt: Mount) -> None:
    p = mnt.path / "shared"
    p.write_bytes(b"aaaa")
    r = os.open(p, os.O_RDONLY)
    w = os.open(p, os.O_WRONLY)
    try:
        os.pwrite(w, b"bb", 1)
        os.fsync(w)
        assert os.pread(r, 10, 0) == b"abba"
    finally:
        os.close(w)
        os.close(r)
    assert p.read_bytes() == b"abba"


def test_odd_flags_never_crash(mnt: Mount) -> None:
    p = mnt.path / "direct"
    p.write_bytes(b"z" * 8192)
    try:
        fd = os.open(p, os.O_RDWR | os.O_DIRECT)
    except OSError as exc:
        assert exc.errno == errno.EINVAL
    else:
        os.close(fd)
    for flags in (os.O_RDONLY | os.O_NOATIME, os.O_RDWR | os.O_SYNC, os.O_WRONLY | os.O_APPEND | os.O_DSYNC):
        try:
            fd = os.open(p, flags)
        except OSError as exc:
            assert exc.errno in (errno.EPERM, errno.EINVAL)
            continue
        os.close(fd)
    with pytest.raises(OSError):
        os.open(mnt.path / "tmpfile", os.O_TMPFILE | os.O_RDWR, 0o600)
    with pytest.raises(OSError) as ei:
        os.link(p, mnt.path / "hard")
    assert ei.value.errno == errno.EPERM
    assert p.read_bytes() == b"z" * 8192  # mount still alive


def test_data_persists_across_remount(remote, mounter) -> None:
    if not remote.persistent:
        pytest.skip("the memory backend lives in the mount process by design")
    m = mounter(remote)
    (m.path / "keep").mkdir()
    (m.path / "keep" / "data.bin").write_bytes(b"persist" * 1000)
    os.chmod(m.path / "keep" / "data.bin", 0o640)
    os.utime(m.path / "keep" / "data.bin", ns=(1_600_000_000_000_000_000,) * 2)
    os.symlink("data.bin", m.path / "keep" / "ln")
    m.unmount()
    m2 = mounter(remote)
    st = (m2.path / "keep" / "data.bin").stat()
    assert (m2.path / "keep" / "data.bin").read_bytes() == b"persist" * 1000
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns // 10**9 == 1_600_000_000
    assert os.readlink(m2.path / "keep" / "ln") == "data.bin"


def test_local_backend_sees_plain_files(remote, mnt: Mount) -> None:
    if remote.backend_root is None:
        pytest.skip(f"{remote.kind} data does not live in a local directory")
    (mnt.path / "sub").mkdir()
    (mnt.path / "sub" / "f.txt").write_text("on disk")
    target = remote.backend_root / "sub" / "f.txt"
    wait_for(lambda: target.exists() and target.read_text() == "on disk", what="write-back upload")


def _as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd], capture_output=True, text=True
    )


@pytest.fixture
def world_dir():
    """A directory other users can traverse (pytest's tmp_path is private to root)."""
    outer = Path(tempfile.mkdtemp(prefix="omnifs-allow-other-"))
    os.chmod(outer, 0o755)
    yield outer
    shutil.rmtree(outer, ignore_errors=True)


def test_other_users_ownership_and_permissions(remote, world_dir: Path, mounter) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    m = mounter(remote, "allow_other", path=world_dir / "mnt")
    shared = m.path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    res = _as_nobody("sh", "-c", f"umask 022; echo mine > '{shared}/theirs.txt'")
    assert res.returncode == 0, res.stderr
    st = (shared / "theirs.txt").stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert stat.S_IMODE(st.st_mode) == 0o644
    (m.path / "root-only.txt").write_text("root")
    os.chmod(m.path / "root-only.txt", 0o600)
    res = _as_nobody("cat", str(m.path / "root-only.txt"))
    assert res.returncode != 0 and "Permission denied" in res.stderr
    res = _as_nobody("sh", "-c", f"echo x >> '{m.path}/root-only.txt'")
    assert res.returncode != 0
    assert (m.path / "root-only.txt").read_text() == "root"
    res = _as_nobody("chmod", "777", str(m.path / "root-only.txt"))
    assert res.returncode != 0
    os.chown(shared / "theirs.txt", 0, 0)
    assert (shared / "theirs.txt").stat().st_uid == 0
