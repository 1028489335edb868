"""The backend conformance suite.

A backend's test module subclasses :class:`BackendConformance` and provides a
``backend_factory`` fixture: a zero-argument callable returning a *fresh, empty*
backend (called inside ``trio.run``).  What a backend cannot do is declared by
its ``capabilities``; tests for missing abilities are skipped with that reason.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from omnifs.backends.base import Backend, SetAttrs, version_key
from omnifs.errors import (
    AlreadyExists,
    InvalidPath,
    IsADirectory,
    NameTooLong,
    NoSuchAttribute,
    NotADirectory,
    NotEmpty,
    NotFound,
)

MiB = 1 << 20


class BoundedReader(io.RawIOBase):
    """A non-seekable stream that fails if anyone reads it whole or in huge pieces."""

    def __init__(self, data: bytes, max_read: int = 64 * MiB) -> None:
        self._buf = io.BytesIO(data)
        self.max_read = max_read
        self.largest = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self.max_read:
            raise AssertionError(f"backend read the whole stream at once (size={size})")
        self.largest = max(self.largest, size)
        return self._buf.read(size)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def blob(n: int, seed: int = 1) -> bytes:
    """Deterministic pseudo-random bytes (incompressible, position-dependent)."""
    import random

    return random.Random(seed).randbytes(n)


class BackendConformance:
    """Behaviour every backend (and every wrapper) must show."""

    backend_factory: Callable[[], Backend]

    def run(self, backend_factory: Callable[[], Backend], fn: Callable[[Backend], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            backend = backend_factory()
            try:
                return await fn(backend)
            finally:
                await backend.aclose()

        return trio.run(main)

    @staticmethod
    async def put(b: Backend, path: str, data: bytes, attrs: SetAttrs | None = None) -> Any:
        return await b.write(path, io.BytesIO(data), attrs)

    # --- files -------------------------------------------------------------------
    def test_empty_root(self, backend_factory: Callable[[], Backend]) -> None:
        async def t(b: Backend) -> None:
            assert await b.list("") == []
            assert (await b.stat("")).is_dir

        self.run(backend_factory, t)

    def test_write_read_roundtrip(self, backend_factory: Callable[[], Backend]) -> None:
        data = blob(3 * MiB + 17)

        async def t(b: Backend) -> None:
            info = await self.put(b, "f.bin", data)
            assert info.size == len(data) and info.kind == "file"
            st = await b.stat("f.bin")
            assert st.size == len(data) and st.kind == "file"
            assert await b.read("f.bin", 0, len(data)) == data
            assert await b.read("f.bin", MiB + 5, 1000) == data[MiB + 5 : MiB + 1005]
            assert await b.read("f.bin", len(data) - 10, 100) == data[-10:]
            assert await b.read("f.bin", len(data) + 10, 100) == b""

        self.run(backend_factory, t)

    def test_read_versioned_matches_stat(self, backend_factory: Callable[[], Backend]) -> None:
        async def t(b: Backend) -> None:
            await self.put(b, "v", b"first version")
            data, v1 = await b.read_versioned("v", 0, 5)
            assert data == b"first"
            assert v1 == version_key(await b.stat("v"))
            await self.put(b, "v", b"second, longer version")
            data, v2 = await b.read_versioned("v", 0, 6)
            assert data == b"second" and v2 != v1
            assert v2 == version_key(await b.stat("v"))

        self.run(backend_factory, t)

    def test_empty_file(self, backend_factory: Callable[[], Backend]) -> None:
        async def t(b: Backend) -> None:
            await self.put(b, "empty", b"")
            assert (await b.stat("empty")).size == 0
            assert await b.read("empty", 0, 10) == b""

        self.run(backend_factory, t)

    def test_write_streams_in_bounded_pieces(self, backend_factory: Callable[[], Backend]) -> None:
        data = blob(5 * MiB, seed=7)

        async def t(b: Backend) -> None:
            src = BoundedReader(data)
            await b.write("stream.bin", src)  # type: ignore[arg-type]
            assert await b.read("stream.bin", 0, len(data)) == data

        self.run(backend_factory, t)

    def test_overwrite_replaces_content_and_etag(self, backend_factory: Callable[[], Backend]) -> None:
        async def t(b: Backend) -> None:
            first = await self.put(b, "f", b"a much longer first version")
            second = await self.put(b, "f", b"short")
            assert await b.read("f", 0, 100) == b"short"
            assert (await b.stat("f")).size == 5
            if first.etag is not None:
                assert first.etag != second.etag

        self.run(backend_factory, t)

    def test_missing_objects(self, backend_factory: Callable[[], Backend]) -> None:
        async def t(b: Backend) -> None:
            with pytest.raises(NotFound):
                await b.stat("nope")
            with pytest.raises(NotFound):
                await b.read("nope", 0, 1)
            with pytest.raises(NotFound):
                await b.delete("nope")
            with pytest.raises(NotFound):
                await b.list("nodir")
            with pytest.raises(NotFound):
                await self.put(b, "nodir/f", b"x")

        self.run(backend_factory, t)

    def test_delete(self, backend_factory: Callable[[], Backend]) -> None:
        async def t(b: Backend) -> None:
            await self.put(b, "f", b"x")
            await b.delete("f")
            with pytest.raises(NotFound):
                await b.stat("f")
            assert await b.list("") == []

        self.run(backend_factory, t)

    # --- directories ----------------------------------------------------------------
    def test_mkdir_list_rmdir(self, backend_factory: Callable[[], Backend]) -> None:
        async def t(b: Backend) -> None:
            await b.mkdir("d")
            assert (await b.stat("d")).is_dir
            with pytest.raises(AlreadyExists):
                await b.mkdir("d")
            await b.mkdir("d/sub")
            await self.put(b, "d/f1", b"1")
            await self.put(b, "d/sub/deep", b"22")
            names = {(i.name, i.kind) for i in await b.list("d")}
            assert names == {("f1", "file"), ("sub", "dir")}
            assert [i.path for i in await b.list("d/sub")] == ["d/sub/deep"]
            with pytest.raises(NotEmpty):
                await b.rmdir("d")
            with pytest.raises(IsADirectory):
                await b.delete("d")
            await b.delete("d/sub/deep")
            await b.rmdir("d/sub")
            await b.delete("d/f1")
            await b.rmdir("d")
            with pytest.raises(NotFound):
                await b.rmdir("d")
            assert await b.list("") == []

        self.run(backend_factory, t)

    def test_list_file_is_not_a_directory(self, backend_factory: Callable[[], Backend]) -> None:
        async def t(b: Backend) -> None:
            await self.put(b, "f", b"x")
            with pytest.raises((NotADirectory, NotFound)):
                await b.list("f")
            await b.mkdir("d")
            with pytest.raises(IsADirectory):
                await self.put(b, "d", b"x")

        self.run(backend_factory, t)

    def test_many_entries(self, backend_factory: Callable[[], Backend]) -> None:
        count = 1205  # more than one S3 page

        async def t(b: Backend) -> None:
            await b.mkdir("many")
            async with trio.open_nursery() as n:
                for i in range(count):
                    n.start_soon(self.put, b, f"many/f{i:05d}", b"x")
            listed = await b.list("many")
            assert sorted(i.name for i in listed) == [f"f{i:05d}" for i in range(count)]

        self.run(backend_factory, t)

    def test_special_names_roundtrip(self, backend_factory: Callable[[], Backend]) -> None:
        names = ["with space", "ünïcødé-名前", "pct%20sign", "plus+sign", "hash#tag", "what?", "a=b&c", "x" * 255]

        async def t(b: Backend) -> None:
            await b.mkdir("sp ace")
            for i, name in enumerate(names):
                await self.put(b, f"sp ace/{name}", str(i).encode())
            listed = {i.name: i for i in await b.list("sp ace")}
            assert set(listed) == set(names)
            for i, name in enumerate(names):
                assert await b.read(f"sp ace/{name}", 0, 10) == str(i).encode()

        self.run(backend_factory, t)

    def test_invalid_paths_refused(self, backend_factory: Callable[[], Backend]) -> None:
        async def t(b: Backend) -> None:
            for bad in ("../escape", "a/../../b", "/etc/passwd", "a//b", "./x"):
                with pytest.raises(InvalidPath):
                    await self.put(b, bad, b"x")
                with pytest.raises(InvalidPath):
                    await b.stat(bad)
            with pytest.raises(NameTooLong):
                await self.put(b, "y" * 256, b"x")

        self.run(backend_factory, t)

    # --- optional abilities -----------------------------------------------------------
    def test_rename_file_over_existing(self, backend_factory: Callable[[], Backend]) -> None:
        async def t(b: Backend) -> None:
            if not b.capabilities.rename:
                pytest.skip("backend declares no rename")
            await self.put(b, "a", b"AAA")
            await self.put(b, "b", b"B")
            await b.rename("a", "b")
            with pytest.raises(NotFound):
                await b.stat("a")
            assert await b.read("b", 0, 10) == b"AAA"
            await b.mkdir("d")
            await b.rename("b", "d/c")
            assert await b.read("d/c", 0, 10) == b"AAA"

        self.run(backend_factory, t)

    def test_rename_directory(self, backend_factory: Callable[[], Backend]) -> None:
        async def t(b: Backend) -> None:
            if not b.capabilities.rename:
                pytest.skip("backend declares no rename")
            await b.mkdir("src")
            await b.mkdir("src/sub")
            await self.put(b, "src/sub/f", b"deep")
            await self.put(b, "src/g", b"top")
            await b.rename("src", "dst")
            with pytest.raises(NotFound):
                await b.stat("src")
            assert await b.read("dst/sub/f", 0, 10) == b"deep"
            assert await b.read("dst/g", 0, 10) == b"top"
            await b.mkdir("empty")
            await b.rename("dst", "empty")  # over an empty directory
            assert await b.read("empty/g", 0, 10) == b"top"

        self.run(backend_factory, t)

    def test_symlink(self, backend_factory: Callable[[], Backend]) -> None:
        async def t(b: Backend) -> None:
            if not b.capabilities.symlinks:
                pytest.skip("backend declares no symlinks")
            info = await b.symlink("ln", "some/target path")
            assert info.kind == "symlink"
            st = await b.stat("ln")
            assert st.kind == "symlink" and st.target == "some/target path"
            listed = await b.list("")
            assert [(i.name, i.kind, i.target) for i in listed] == [("ln", "symlink", "some/target path")]
            with pytest.raises(AlreadyExists):
                await b.symlink("ln", "x")
            await b.delete("ln")
            assert await b.list("") == []

        self.run(backend_factory, t)

    def test_posix_attrs(self, backend_factory: Callable[[], Backend]) -> None:
        async def t(b: Backend) -> None:
            if not b.capabilities.posix_attrs:
                pytest.skip("backend declares no POSIX attributes")
            mtime = 1_600_000_000_123_456_789
            await self.put(b, "f", b"x", SetAttrs(mode=0o640, mtime_ns=mtime))
            st = await b.stat("f")
            assert st.mode == 0o640
            assert abs(st.mtime_ns - mtime) < 1_000_000  # backends may store microseconds
            await b.set_attrs("f", SetAttrs(mode=0o600, mtime_ns=mtime + 10**9))
            st = await b.stat("f")
            assert st.mode == 0o600 and abs(st.mtime_ns - mtime - 10**9) < 1_000_000
            await b.mkdir("d", SetAttrs(mode=0o711))
            assert (await b.stat("d")).mode == 0o711
            # Attributes survive an overwrite that does not name them.
            await self.put(b, "f", b"yy")
            assert (await b.stat("f")).mode == 0o600

        self.run(backend_factory, t)

    def test_xattrs(self, backend_factory: Callable[[], Backend]) -> None:
        async def t(b: Backend) -> None:
            if not b.capabilities.xattrs:
                pytest.skip("backend declares no xattrs")
            await self.put(b, "f", b"x")
            assert await b.get_xattrs("f") == {}
            await b.set_xattr("f", "user.color", b"blue")
            await b.set_xattr("f", "user.bin", bytes(range(256)))
            assert await b.get_xattrs("f") == {"user.color": b"blue", "user.bin": bytes(range(256))}
            await b.set_xattr("f", "user.color", None)
            assert await b.get_xattrs("f") == {"user.bin": bytes(range(256))}
            with pytest.raises(NoSuchAttribute):
                await b.set_xattr("f", "user.color", None)
            # An overwrite keeps the object's extended attributes.
            await self.put(b, "f", b"new content")
            assert await b.get_xattrs("f") == {"user.bin": bytes(range(256))}

        self.run(backend_factory, t)

    def test_statfs(self, backend_factory: Callable[[], Backend]) -> None:
        async def t(b: Backend) -> None:
            st = await b.statfs()
            if st is None:
                assert not b.capabilities.statfs
                return
            assert st.block_size > 0 and st.blocks >= st.blocks_free >= 0

        self.run(backend_factory, t)
