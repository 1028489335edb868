"""The namespace journal: durable ordered log, replay, and offline namespace changes in the VFS."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import pytest
import trio

from omnifs.backends.base import Backend, ObjectInfo, SetAttrs
from omnifs.backends.memory import MemoryBackend
from omnifs.cache import CacheSettings, DiskCache
from omnifs.errors import BackendUnavailable, NotEmpty
from omnifs.journal import Journal
from omnifs.remote import Remote, RemoteSettings
from omnifs.staging import StagingArea
from omnifs.vfs import VFS, Ctx, VfsOptions

ROOT = 1
CTX = Ctx(uid=0, gid=0)


class Switchable(Backend):
    """A memory backend whose reachability a test switches (``down`` raises BackendUnavailable)."""

    type_name = "switchable"

    def __init__(self) -> None:
        super().__init__("sw")
        self.inner = MemoryBackend("mem")
        self.down = False
        self.calls: list[str] = []

    def _gate(self, what: str) -> None:
        if self.down:
            raise BackendUnavailable("switched off")
        self.calls.append(what)

    async def stat(self, path: str) -> ObjectInfo:
        self._gate("stat")
        return await self.inner.stat(path)

    async def list(self, path: str) -> list[ObjectInfo]:
        self._gate("list")
        return await self.inner.list(path)

    async def read(self, path: str, offset: int, size: int) -> bytes:
        self._gate("read")
        return await self.inner.read(path, offset, size)

    async def read_versioned(self, path: str, offset: int, size: int) -> tuple[bytes, str]:
        self._gate("read")
        return await self.inner.read_versioned(path, offset, size)

    async def write(self, path: str, src: BinaryIO, attrs: SetAttrs | None = None) -> ObjectInfo:
        self._gate("write " + path)
        return await self.inner.write(path, src, attrs)

    async def delete(self, path: str) -> None:
        self._gate("delete " + path)
        await self.inner.delete(path)

    async def mkdir(self, path: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        self._gate("mkdir " + path)
        return await self.inner.mkdir(path, attrs)

    async def rmdir(self, path: str) -> None:
        self._gate("rmdir " + path)
        await self.inner.rmdir(path)

    async def rename(self, src: str, dst: str) -> None:
        self._gate(f"rename {src} {dst}")
        await self.inner.rename(src, dst)

    async def symlink(self, path: str, target: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        self._gate("symlink " + path)
        return await self.inner.symlink(path, target, attrs)

    async def set_attrs(self, path: str, attrs: SetAttrs) -> ObjectInfo:
        self._gate("set_attrs " + path)
        return await self.inner.set_attrs(path, attrs)

    async def get_xattrs(self, path: str) -> dict[str, bytes]:
        self._gate("get_xattrs")
        return await self.inner.get_xattrs(path)

    async def set_xattr(self, path: str, name: str, value: bytes | None) -> None:
        self._gate("set_xattr " + path)
        await self.inner.set_xattr(path, name, value)


def make_vfs(tmp_path: Path, backend: Backend) -> VFS:
    cache = DiskCache(tmp_path / "cache", CacheSettings())
    remote = Remote(backend, cache, RemoteSettings(timeout=2, probe_interval=0.1))
    return VFS(remote, StagingArea(tmp_path / "state" / "staging"), VfsOptions(write_back=0.05, poll_interval=0))


async def write_file(vfs: VFS, parent: int, name: str, data: bytes) -> int:
    h, node = await vfs.create(parent, name, 0o640, os.O_WRONLY, CTX)
    await vfs.write(h.fh, 0, data)
    await vfs.release(h.fh)
    return node.inode


async def names(vfs: VFS, inode: int) -> list[str]:
    fh = await vfs.opendir(inode)
    out: list[str] = []
    await vfs.readdir(fh, 0, lambda name, node, off: out.append(name) or True)
    vfs.releasedir(fh)
    return out


def test_journal_is_durable_ordered_and_tolerates_a_torn_line(tmp_path: Path) -> None:
    async def main() -> None:
        j = Journal(tmp_path / "j")
        await j.append("mkdir", "a", attrs={"mode": 0o700})
        await j.append("rename", "a", dst="b")
        await j.append("set_xattr", "b", name="user.k", value=b"\x00\xffv")
        with open(j.log_path, "ab") as f:
            f.write(b'{"seq": 4, "op": "delete", "pa')  # a crash in the middle of an append
        again = Journal(tmp_path / "j")
        assert [(op.seq, op.op, op.path, op.dst) for op in again.pending] == [
            (1, "mkdir", "a", None),
            (2, "rename", "a", "b"),
            (3, "set_xattr", "b", None),
        ]
        backend = MemoryBackend("m")
        assert await again.replay(backend, lambda fn, *a: fn(*a))
        assert (await backend.stat("b")).mode == 0o700
        assert (await backend.get_xattrs("b"))["user.k"] == b"\x00\xffv"
        assert Journal(tmp_path / "j").pending == []  # applied: nothing replays twice
        assert j.log_path.stat().st_size == 0  # truncated once everything was applied

    trio.run(main)


def test_replay_is_idempotent_and_skips_refused_operations(tmp_path: Path) -> None:
    async def main() -> None:
        backend = MemoryBackend("m")
        await backend.mkdir("full")
        await backend.write("full/x", io.BytesIO(b"x"))
        j = Journal(tmp_path / "j")
        await j.append("mkdir", "d")
        await j.append("rmdir", "full")  # someone else put a file in it: refused for good
        await j.append("delete", "gone")  # already absent: done
        await j.append("symlink", "d/l", target="../x")
        assert await j.replay(backend, lambda fn, *a: fn(*a))
        assert [f["op"] for f in j.failures] == ["rmdir full"]
        assert (await backend.stat("d/l")).target == "../x"
        # A crash before the cursor moved repeats operations: still the same state.
        (tmp_path / "j" / "applied").write_text("0")
        j2 = Journal(tmp_path / "j")
        assert j2.pending == []  # the log was truncated when everything was applied
        await j2.append("mkdir", "d")
        await j2.append("symlink", "d/l", target="../x")
        assert await j2.replay(backend, lambda fn, *a: fn(*a))
        assert j2.failures == []

    trio.run(main)


def test_replay_stops_while_the_backend_is_away(tmp_path: Path) -> None:
    async def main() -> None:
        backend = Switchable()
        j = Journal(tmp_path / "j")
        await j.append("mkdir", "a")
        await j.append("mkdir", "a/b")
        backend.down = True
        assert not await j.replay(backend, lambda fn, *a: fn(*a))
        assert len(j) == 2
        backend.down = False
        assert await j.replay(backend, lambda fn, *a: fn(*a))
        assert (await backend.inner.stat("a/b")).is_dir

    trio.run(main)


def test_offline_namespace_changes_are_journaled_and_replayed_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        backend = Switchable()
        vfs = make_vfs(tmp_path, backend)
        async with trio.open_nursery() as nursery:
            await nursery.start(vfs.run)
            docs = (await vfs.mkdir(ROOT, "docs", 0o755, CTX)).inode
            await write_file(vfs, docs, "a.txt", b"online")
            await write_file(vfs, docs, "old.txt", b"to delete")
            (await vfs.mkdir(ROOT, "empty", 0o755, CTX))
            assert await vfs.drain() == []
            assert sorted(await names(vfs, docs)) == ["a.txt", "old.txt"]
            assert sorted(await names(vfs, ROOT)) == ["docs", "empty"]

            backend.down = True
            backend.calls.clear()
            vfs.remote.mark_offline("test outage")
            new = (await vfs.mkdir(docs, "new", 0o700, CTX)).inode
            await write_file(vfs, new, "made-offline.txt", b"written while away")
            await vfs.rename(docs, "a.txt", new, "moved.txt")
            await vfs.unlink(docs, "old.txt")
            await vfs.rmdir(ROOT, "empty")
            await vfs.symlink(docs, "link", "new/moved.txt", CTX)
            with pytest.raises(NotEmpty):
                await vfs.rmdir(docs, "new")
            # The cached view shows every change at once.
            assert sorted(await names(vfs, docs)) == ["link", "new"]
            assert sorted(await names(vfs, new)) == ["made-offline.txt", "moved.txt"]
            assert sorted(await names(vfs, ROOT)) == ["docs"]
            assert len(vfs.journal) == 5
            assert backend.calls == []  # nothing reached the backend

            backend.down = False
            with trio.fail_after(10):
                while not vfs.remote.health.online or vfs.pending_uploads():
                    await trio.sleep(0.05)
            inner = backend.inner
            assert sorted(i.name for i in await inner.list("docs")) == ["link", "new"]
            assert sorted(i.name for i in await inner.list("docs/new")) == ["made-offline.txt", "moved.txt"]
            assert await inner.read("docs/new/moved.txt", 0, 100) == b"online"
            assert await inner.read("docs/new/made-offline.txt", 0, 100) == b"written while away"
            assert (await inner.stat("docs/new")).mode == 0o700
            assert (await inner.stat("docs/link")).target == "new/moved.txt"
            assert [i.name for i in await inner.list("")] == ["docs"]
            # The journal was replayed before any upload: the mkdir preceded the file's write.
            order = [c for c in backend.calls if c.split(" ")[0] in ("mkdir", "write", "rename", "delete")]
            assert order.index("mkdir docs/new") < order.index("write docs/new/made-offline.txt")
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_pending_data_follows_a_journaled_rename_across_a_restart(tmp_path: Path) -> None:
    async def main() -> None:
        backend = Switchable()
        vfs = make_vfs(tmp_path, backend)
        d = (await vfs.mkdir(ROOT, "d", 0o755, CTX)).inode
        await write_file(vfs, d, "f", b"v1")
        assert await vfs.drain() == []
        assert await names(vfs, ROOT) == ["d"]  # cached: what the offline view is built on
        backend.down = True
        vfs.remote.mark_offline("test outage")
        h, _ = await vfs.open((await vfs.lookup(d, "f")).inode, os.O_WRONLY | os.O_TRUNC)
        await vfs.write(h.fh, 0, b"v2 written offline")
        await vfs.release(h.fh)
        await vfs.rename(ROOT, "d", ROOT, "e")
        assert vfs.remote.cache is not None
        vfs.remote.cache.close()
        # "Crash": a new VFS over the same state and cache directories, backend back.
        backend.down = False
        vfs2 = make_vfs(tmp_path, backend)
        assert len(vfs2.journal) == 1
        async with trio.open_nursery() as nursery:
            await nursery.start(vfs2.run)
            with trio.fail_after(10):
                while not vfs2.remote.health.online or vfs2.pending_uploads():
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert [i.name for i in await backend.inner.list("")] == ["e"]
        assert await backend.inner.read("e/f", 0, 100) == b"v2 written offline"

    trio.run(main)


def test_journal_dir_unwritable_is_an_error_not_silence(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    with pytest.raises(OSError):
        Journal(blocker / "journal")


