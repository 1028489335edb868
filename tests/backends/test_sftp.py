"""The SFTP backend against a real OpenSSH server (see ``tests/fixtures_sftp.py``)."""

from __future__ import annotations

import errno
import io
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from omnifs.backends.base import Backend, SetAttrs
from omnifs.backends.sftp import TEMP_PREFIX, ChangedHostKey, HostKeyError, SFTPBackend, UnknownHostKey
from omnifs.errors import (
    BackendUnavailable,
    ConfigError,
    InvalidPath,
    IsADirectory,
    NotADirectory,
    NotEmpty,
    NotFound,
    OmniError,
    PermissionDenied,
)
from tests.backends.conformance import BackendConformance, blob
from tests.fixtures_sftp import RemoteSpec, SSHServer, free_port, generate_key


def make_backend(spec: RemoteSpec, **overrides: Any) -> SFTPBackend:
    """Build the backend a config loader would build from ``spec`` (plus overrides)."""
    opts = {k: v for k, v in spec.config.items() if k != "type"}
    opts.update(overrides)
    return SFTPBackend(spec.name, **opts)


def run(backend: Backend, fn: Callable[[Backend], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        try:
            return await fn(backend)
        finally:
            await backend.aclose()

    return trio.run(main)


class TestSFTPBackend(BackendConformance):
    @pytest.fixture
    def backend_factory(self, sftp_remote: RemoteSpec) -> Callable[[], Backend]:
        return lambda: make_backend(sftp_remote)

    def test_posix_attrs(self, backend_factory: Callable[[], Backend]) -> None:
        """Like the suite's test, but SFTP v3 stores whole seconds: sub-second parts are dropped."""
        mtime = 1_600_000_000_123_456_789
        whole = mtime // 10**9 * 10**9

        async def t(b: Backend) -> None:
            await self.put(b, "f", b"x", SetAttrs(mode=0o640, mtime_ns=mtime))
            st = await b.stat("f")
            assert st.mode == 0o640
            assert st.mtime_ns == whole
            await b.set_attrs("f", SetAttrs(mode=0o600, mtime_ns=mtime + 10**9))
            st = await b.stat("f")
            assert st.mode == 0o600 and st.mtime_ns == whole + 10**9
            await b.mkdir("d", SetAttrs(mode=0o711))
            assert (await b.stat("d")).mode == 0o711
            await self.put(b, "f", b"yy")
            assert (await b.stat("f")).mode == 0o600

        self.run(backend_factory, t)


# --- configuration ------------------------------------------------------------------------


def test_describe_has_no_secrets(sftp_remote: RemoteSpec) -> None:
    b = make_backend(sftp_remote, password="hunter2")
    port = sftp_remote.config["port"]
    assert b.describe() == f"sftp://{sftp_remote.config['user']}@127.0.0.1:{port}{sftp_remote.config['path']}"
    assert "hunter2" not in b.describe()
    assert make_backend(sftp_remote, path="").describe().endswith(f":{port}/~")
    assert make_backend(sftp_remote, path="data").describe().endswith(f":{port}/~/data")
    assert SFTPBackend.options["password"].secret and SFTPBackend.options["passphrase"].secret
    assert SFTPBackend.options["host"].required
    assert not SFTPBackend.capabilities.xattrs


def test_bad_config_values(sftp_remote: RemoteSpec, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="host_key_policy"):
        make_backend(sftp_remote, host_key_policy="yolo")
    with pytest.raises(ConfigError, match="key_file"):
        make_backend(sftp_remote, key_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="port"):
        make_backend(sftp_remote, port=0)


def test_missing_root_is_clear(sftp_remote: RemoteSpec) -> None:
    b = make_backend(sftp_remote, path=f"{sftp_remote.config['path']}/absent")
    with pytest.raises(NotFound, match=r"root directory .* does not exist"):
        run(b, lambda b: b.stat(""))


def test_relative_path_is_below_login_directory(sftp_remote: RemoteSpec) -> None:
    """A relative ``path`` starts at the login directory (the user's home on OpenSSH)."""
    assert sftp_remote.local_root is not None
    home = os.path.realpath(os.path.expanduser("~"))
    relative = os.path.relpath(sftp_remote.local_root, home)
    run(make_backend(sftp_remote, path=relative), lambda b: b.write("f", io.BytesIO(b"rel")))
    assert (sftp_remote.local_root / "f").read_bytes() == b"rel"
    assert run(make_backend(sftp_remote, path=""), lambda b: b.stat("")).kind == "dir"


# --- host keys and authentication -------------------------------------------------------------


def test_unknown_host_key_refused_under_strict(sftp_remote: RemoteSpec, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    b = make_backend(sftp_remote, known_hosts=str(known))
    with pytest.raises(UnknownHostKey) as info:
        run(b, lambda b: b.write("f", io.BytesIO(b"x")))
    message = str(info.value)
    assert f"127.0.0.1:{sftp_remote.config['port']}" in message and str(known) in message
    assert "SHA256:" in message
    assert isinstance(info.value, PermissionDenied)
    assert not b.is_temp_failure(info.value)
    assert known.read_text() == ""
    assert sftp_remote.local_root is not None and list(sftp_remote.local_root.iterdir()) == []


def test_accept_new_records_the_key(sftp_remote: RemoteSpec, sshd_server: SSHServer, tmp_path: Path) -> None:
    known = tmp_path / "sub" / "known_hosts"  # neither the file nor its directory exists yet
    b = make_backend(sftp_remote, known_hosts=str(known), host_key_policy="accept-new")
    run(b, lambda b: b.write("f", io.BytesIO(b"x")))
    assert known.read_text() == sshd_server.known_hosts_line()
    # Now known: strict accepts it, and accept-new does not add it twice.
    run(make_backend(sftp_remote, known_hosts=str(known)), lambda b: b.stat("f"))
    run(make_backend(sftp_remote, known_hosts=str(known), host_key_policy="accept-new"), lambda b: b.stat("f"))
    assert known.read_text() == sshd_server.known_hosts_line()


def test_changed_host_key_refused_even_with_accept_new(
    sftp_remote: RemoteSpec, sshd_server: SSHServer, tmp_path: Path
) -> None:
    other = generate_key(tmp_path / "other_host_key")
    known = tmp_path / "known_hosts"
    known.write_text(sshd_server.known_hosts_line(Path(f"{other}.pub")))
    before = known.read_text()
    for policy in ("strict", "accept-new"):
        b = make_backend(sftp_remote, known_hosts=str(known), host_key_policy=policy)
        with pytest.raises(ChangedHostKey, match=r"HOST KEY CHANGED for 127\.0\.0\.1:\d+"):
            run(b, lambda b: b.write("f", io.BytesIO(b"x")))
    assert known.read_text() == before
    assert sftp_remote.local_root is not None and list(sftp_remote.local_root.iterdir()) == []


def test_wrong_client_key_is_an_auth_error(sftp_remote: RemoteSpec, tmp_path: Path) -> None:
    stranger = generate_key(tmp_path / "stranger")
    b = make_backend(sftp_remote, key_file=str(stranger))
    with pytest.raises(PermissionDenied, match="authentication failed") as info:
        run(b, lambda b: b.stat(""))
    assert not isinstance(info.value, HostKeyError)
    assert f"{sftp_remote.config['user']}@127.0.0.1:{sftp_remote.config['port']}" in str(info.value)
    assert not b.is_temp_failure(info.value)


def test_closed_port_fails_fast(sftp_remote: RemoteSpec) -> None:
    port = free_port()
    b = make_backend(sftp_remote, port=port)
    start = time.monotonic()
    with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{port}") as info:
        run(b, lambda b: b.stat(""))
    assert time.monotonic() - start < 2
    assert b.is_temp_failure(info.value)


# --- connection failures ----------------------------------------------------------------------


def test_reconnects_after_server_restart(sftp_remote: RemoteSpec, sshd_server: SSHServer) -> None:
    b = make_backend(sftp_remote)

    async def t(b: Backend) -> None:
        await b.write("f", io.BytesIO(b"before"))
        sshd_server.stop()
        try:
            with pytest.raises(BackendUnavailable):
                await b.stat("f")
        finally:
            sshd_server.start()
        assert await b.read("f", 0, 100) == b"before"
        await b.write("g", io.BytesIO(b"after"))
        # A restart between two operations, with no failed operation in between.
        sshd_server.stop()
        sshd_server.start()
        assert await b.read("g", 0, 100) == b"after"
        assert {i.name for i in await b.list("")} == {"f", "g"}

    run(b, t)


def test_survives_dropped_connections(sftp_remote: RemoteSpec, sshd_server: SSHServer) -> None:
    """The server closing every connection between operations is invisible to callers."""
    b = make_backend(sftp_remote, max_threads=4)

    async def t(b: Backend) -> None:
        for i in range(5):
            async with trio.open_nursery() as n:
                for j in range(4):
                    n.start_soon(b.write, f"f{i}-{j}", io.BytesIO(b"x" * j))
            sshd_server.drop_connections()
            assert await b.read(f"f{i}-3", 0, 10) == b"xxx"
            assert len(await b.list("")) == 4 * (i + 1)
            sshd_server.drop_connections()

    run(b, t)


def test_connection_lost_during_an_operation_is_retried(sftp_remote: RemoteSpec, sshd_server: SSHServer) -> None:
    """Operations in flight when the connection drops reconnect and repeat (safely)."""
    b = make_backend(sftp_remote, max_threads=3)
    data = blob(100_000, seed=5)

    async def t(b: Backend) -> None:
        await b.write("f", io.BytesIO(data))
        await b.mkdir("gone")
        results: dict[str, Any] = {}

        async def do(name: str, fn: Callable[[], Awaitable[Any]]) -> None:
            results[name] = await fn()

        sshd_server.freeze(connections_only=True)
        try:
            async with trio.open_nursery() as n:
                n.start_soon(do, "read", lambda: b.read("f", 1000, 50_000))
                n.start_soon(do, "mkdir", lambda: b.mkdir("new"))
                n.start_soon(do, "rmdir", lambda: b.rmdir("gone"))
                await trio.sleep(0.3)  # all three wait for replies that never come
                sshd_server.drop_connections()
        finally:
            sshd_server.thaw()
        assert results["read"] == data[1000:51000]
        assert results["mkdir"].kind == "dir"
        assert sorted(i.name for i in await b.list("")) == ["f", "new"]

    run(b, t)


def test_frozen_server_fails_within_timeout(sftp_remote: RemoteSpec, sshd_server: SSHServer) -> None:
    b = make_backend(sftp_remote, op_timeout=1.5, connect_timeout=1.5)
    fresh = make_backend(sftp_remote, op_timeout=1.5, connect_timeout=1.5)

    async def t(b: Backend) -> None:
        await b.write("f", io.BytesIO(b"data"))
        sshd_server.freeze()
        try:
            start = time.monotonic()
            with pytest.raises(BackendUnavailable, match="no reply") as info:
                await b.read("f", 0, 10)
            assert time.monotonic() - start < 5
            assert b.is_temp_failure(info.value)
            # A new connection to the frozen server is bounded by connect_timeout.
            start = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await fresh.stat("")
            assert time.monotonic() - start < 5
        finally:
            sshd_server.thaw()
            await fresh.aclose()
        assert await b.read("f", 0, 10) == b"data"  # reconnected

    run(b, t)


def test_write_cut_off_by_a_frozen_server(sftp_remote: RemoteSpec, sshd_server: SSHServer) -> None:
    """A write stalled mid-stream fails after op_timeout, is not repeated, and its temp file goes later."""

    class FreezingSource(io.RawIOBase):
        def __init__(self) -> None:
            self.reads = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            self.reads += 1
            if self.reads == 2:
                sshd_server.freeze()  # after the first MiB went out
            b[:] = bytes(len(b))
            return len(b)

    b = make_backend(sftp_remote, op_timeout=1.5, connect_timeout=1.5)
    root = sftp_remote.local_root
    assert root is not None

    async def t(b: Backend) -> None:
        await b.write("f", io.BytesIO(b"old"))
        src = FreezingSource()
        start = time.monotonic()
        try:
            with pytest.raises(BackendUnavailable, match="no reply"):
                await b.write("f", src)  # type: ignore[arg-type]
            assert time.monotonic() - start < 6
        finally:
            sshd_server.thaw()
        assert any(n.startswith(TEMP_PREFIX) for n in os.listdir(root))
        assert await b.read("f", 0, 10) == b"old"  # the next operation also clears the temp file

    run(b, t)
    assert os.listdir(root) == ["f"]


def test_failed_source_leaves_no_temp_file(sftp_remote: RemoteSpec) -> None:
    class Boom(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            self.calls += 1
            if self.calls > 3:
                raise RuntimeError("source failed")
            b[:1000] = b"z" * 1000
            return 1000

    b = make_backend(sftp_remote)

    async def t(b: Backend) -> None:
        await b.write("keep", io.BytesIO(b"old content"))
        with pytest.raises(RuntimeError):
            await b.write("keep", Boom())
        with pytest.raises(RuntimeError):
            await b.write("new", Boom())
        assert await b.read("keep", 0, 100) == b"old content"
        with pytest.raises(NotFound):
            await b.stat("new")

    run(b, t)
    assert sftp_remote.local_root is not None
    assert sorted(os.listdir(sftp_remote.local_root)) == ["keep"]


def test_many_concurrent_writes_through_the_pool(sftp_remote: RemoteSpec) -> None:
    """200 concurrent writes over 20 channels (three SSH connections)."""
    b = make_backend(sftp_remote, max_threads=20)

    async def t(b: Backend) -> None:
        await b.mkdir("c")
        async with trio.open_nursery() as n:
            for i in range(200):
                n.start_soon(b.write, f"c/f{i:03d}", io.BytesIO(blob(5000 + i, seed=i)))
        listed = await b.list("c")
        assert [i.name for i in listed] == [f"f{i:03d}" for i in range(200)]
        results: dict[int, bytes] = {}

        async def check(i: int) -> None:
            results[i] = await b.read(f"c/f{i:03d}", 0, 10_000)

        async with trio.open_nursery() as n:
            for i in range(0, 200, 7):
                n.start_soon(check, i)
        assert all(data == blob(5000 + i, seed=i) for i, data in results.items())

    run(b, t)


# --- paths, symlinks and other server specifics --------------------------------------------------


def test_symlink_escape_refused(sftp_remote: RemoteSpec, tmp_path: Path) -> None:
    root = sftp_remote.local_root
    assert root is not None
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    os.symlink(str(outside), root / "link")
    os.symlink(str(outside / "secret"), root / "filelink")
    (root / "inner").mkdir()
    os.symlink("inner", root / "goodlink")
    b = make_backend(sftp_remote)

    async def t(b: Backend) -> None:
        with pytest.raises(InvalidPath):
            await b.stat("link/secret")
        with pytest.raises(InvalidPath):
            await b.write("link/new", io.BytesIO(b"x"))
        with pytest.raises(InvalidPath):
            await b.list("link")
        with pytest.raises(InvalidPath):
            await b.mkdir("link/d")
        # Links themselves are objects; the final component is never followed.
        assert (await b.stat("link")).kind == "symlink"
        with pytest.raises(OmniError) as info:
            await b.read("filelink", 0, 10)
        assert info.value.errno == errno.ELOOP
        await b.set_attrs("filelink", SetAttrs(mode=0o600))
        await b.delete("link")
        # A link that stays inside the root may be traversed.
        await b.write("goodlink/f", io.BytesIO(b"in"))
        assert await b.read("inner/f", 0, 10) == b"in"

    run(b, t)
    assert sorted(os.listdir(outside)) == ["secret"]
    assert oct((outside / "secret").stat().st_mode & 0o777) == oct(0o644)


def test_symlink_direction_on_disk(sftp_remote: RemoteSpec) -> None:
    """paramiko's symlink(source, dest) with OpenSSH: dest is the link, source its target."""
    b = make_backend(sftp_remote)
    run(b, lambda b: b.symlink("ln", "../some/where"))
    assert sftp_remote.local_root is not None
    assert os.readlink(sftp_remote.local_root / "ln") == "../some/where"


def test_temp_files_hidden_and_cleared_by_rmdir(sftp_remote: RemoteSpec) -> None:
    root = sftp_remote.local_root
    assert root is not None
    (root / "d").mkdir()
    (root / "d" / f"{TEMP_PREFIX}stale").write_text("x")
    (root / f"{TEMP_PREFIX}stale").write_text("x")
    b = make_backend(sftp_remote)

    async def t(b: Backend) -> None:
        assert [i.name for i in await b.list("")] == ["d"]
        assert await b.list("d") == []
        await b.rmdir("d")

    run(b, t)
    assert sorted(os.listdir(root)) == [f"{TEMP_PREFIX}stale"]


def test_names_that_are_not_utf8_are_skipped(sftp_remote: RemoteSpec) -> None:
    root = sftp_remote.local_root
    assert root is not None
    os.close(os.open(os.path.join(bytes(root), b"latin1-\xe9"), os.O_CREAT | os.O_WRONLY))
    (root / "good").write_text("x")
    b = make_backend(sftp_remote)

    async def t(b: Backend) -> None:
        assert [i.name for i in await b.list("")] == ["good"]
        assert [i.name for i in await b.list("")] == ["good"]  # the channel is still in step

    run(b, t)


def test_rename_refusals(sftp_remote: RemoteSpec) -> None:
    b = make_backend(sftp_remote)

    async def t(b: Backend) -> None:
        await b.mkdir("a")
        await b.mkdir("full")
        await b.write("full/x", io.BytesIO(b"x"))
        await b.write("file", io.BytesIO(b"f"))
        with pytest.raises(NotEmpty):
            await b.rename("a", "full")
        with pytest.raises(NotADirectory):
            await b.rename("a", "file")
        with pytest.raises(IsADirectory):
            await b.rename("file", "a")
        with pytest.raises(NotFound):
            await b.rename("file", "missing/file")
        with pytest.raises(NotFound):
            await b.rename("nothing", "x")
        assert await b.read("full/x", 0, 10) == b"x"

    run(b, t)


def test_write_preserves_mode_and_sets_times(sftp_remote: RemoteSpec) -> None:
    root = sftp_remote.local_root
    assert root is not None
    b = make_backend(sftp_remote)

    async def t(b: Backend) -> None:
        await b.write("f", io.BytesIO(b"1"), SetAttrs(mode=0o4750, mtime_ns=1_500_000_000 * 10**9))
        info = await b.write("f", io.BytesIO(b"22"))
        assert info.mode == 0o4750 and info.size == 2
        info = await b.write("f", io.BytesIO(b"333"), SetAttrs(mode=0o600, atime_ns=1_400_000_000 * 10**9))
        assert info.mode == 0o600

    run(b, t)
    st = (root / "f").stat()
    assert st.st_mode & 0o7777 == 0o600 and st.st_atime == 1_400_000_000
    assert (root / "f").read_bytes() == b"333"


def test_statfs_matches_the_server_filesystem(sftp_remote: RemoteSpec) -> None:
    b = make_backend(sftp_remote)
    st = run(b, lambda b: b.statfs())
    assert sftp_remote.local_root is not None
    local = os.statvfs(sftp_remote.local_root)
    assert st is not None
    assert (st.block_size, st.blocks, st.files) == (local.f_frsize, local.f_blocks, local.f_files)


def test_large_unaligned_reads(sftp_remote: RemoteSpec) -> None:
    data = blob(700_000, seed=3)
    assert sftp_remote.local_root is not None
    (sftp_remote.local_root / "big").write_bytes(data)
    b = make_backend(sftp_remote)

    async def t(b: Backend) -> None:
        for offset, size in [(1, 32768), (32767, 32770), (12345, 300_000), (650_000, 1 << 20), (0, 1 << 21)]:
            assert await b.read("big", offset, size) == data[offset : offset + size]

    run(b, t)
