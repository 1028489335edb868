"""VFS hooks for companion .meta.json files, without a kernel (memory backend wrapped in MetaBackend)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import trio

from omnifs.backends.memory import MemoryBackend
from omnifs.backends.metafiles import MetaBackend
from omnifs.errors import NotFound, OmniError
from omnifs.remote import Remote
from omnifs.staging import StagingArea
from omnifs.vfs import VFS, Ctx, VfsOptions

ROOT = 1
CTX = Ctx(uid=0, gid=0)


def make_vfs(tmp_path: Path) -> VFS:
    backend = MetaBackend(MemoryBackend("mem"))
    return VFS(Remote(backend, None), StagingArea(tmp_path / "staging"), VfsOptions(write_back=5.0))


async def write_file(vfs: VFS, name: str, data: bytes, flags: int = os.O_WRONLY) -> None:
    h, _ = await vfs.create(ROOT, name, 0o644, flags, CTX)
    await vfs.write(h.fh, 0, data)
    await vfs.flush(h.fh)
    await vfs.release(h.fh)


async def read_doc(vfs: VFS, name: str) -> dict[str, object]:
    node = await vfs.lookup(ROOT, name)
    h, _ = await vfs.open(node.inode, os.O_RDONLY)
    try:
        return json.loads(await vfs.read(h.fh, 0, 1 << 20))  # type: ignore[no-any-return]
    finally:
        await vfs.release(h.fh)


async def rewrite(vfs: VFS, name: str, data: bytes) -> None:
    node = await vfs.lookup(ROOT, name)
    h, _ = await vfs.open(node.inode, os.O_WRONLY | os.O_TRUNC)
    try:
        await vfs.write(h.fh, 0, data)
        await vfs.flush(h.fh)
    finally:
        await vfs.release(h.fh)


def test_companion_checked_at_close_and_stored_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        vfs = make_vfs(tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(vfs.run)
            await write_file(vfs, "a.txt", b"hello")
            doc = await read_doc(vfs, "a.meta.json")
            assert doc["size"] == 5  # the pending upload of a.txt was pushed first: live values
            await rewrite(vfs, "a.meta.json", json.dumps({**doc, "tags": ["x"]}).encode())
            assert vfs.pending_uploads() == 0  # stored at close, not after write_back
            for bad in (b"{nope", json.dumps({**doc, "size": 6}).encode(), b'{"extra": 1}'):
                with pytest.raises(OmniError) as exc:
                    await rewrite(vfs, "a.meta.json", bad)
                assert exc.value.errno == errno.EINVAL
                assert (await read_doc(vfs, "a.meta.json"))["tags"] == ["x"]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_companion_of_a_file_created_exclusively_waits_for_cp(tmp_path: Path) -> None:
    async def main() -> None:
        vfs = make_vfs(tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(vfs.run)
            await write_file(vfs, "b.txt", b"b", os.O_WRONLY | os.O_EXCL)
            with pytest.raises(NotFound):
                await vfs.lookup(ROOT, "b.meta.json")  # so cp's O_EXCL create of it succeeds
            await write_file(vfs, "b.meta.json", json.dumps({"tags": ["copied"]}).encode(), os.O_WRONLY | os.O_EXCL)
            assert (await read_doc(vfs, "b.meta.json"))["tags"] == ["copied"]
            nursery.cancel_scope.cancel()

    trio.run(main)
