"""VFS logic without a kernel (memory backend, no disk cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from omnifs.backends.memory import MemoryBackend
from omnifs.errors import NotFound
from omnifs.remote import Remote
from omnifs.staging import StagedFile, StagingArea
from omnifs.vfs import VFS, Ctx, VfsOptions

ROOT = 1
CTX = Ctx(uid=0, gid=0)


def make_vfs(tmp_path: Path, **opts: object) -> VFS:
    backend = MemoryBackend("mem")
    return VFS(Remote(backend, None), StagingArea(tmp_path / "staging"), VfsOptions(**opts))  # type: ignore[arg-type]


def test_release_racing_reopen_and_unlink_keeps_the_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow release must not drop the staged copy a newer handle reads (a race seen under load)."""

    async def main() -> None:
        vfs = make_vfs(tmp_path, write_back=5.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(vfs.run)
            h, node = await vfs.create(ROOT, "f", 0o644, os.O_WRONLY, CTX)
            await vfs.write(h.fh, 0, b"still here")
            await vfs.flush(h.fh)
            original = StagedFile.write_record

            async def slow(self: StagedFile, record: dict[str, object], *, durable: bool) -> None:
                await trio.sleep(0.2)
                await original(self, record, durable=durable)

            monkeypatch.setattr(StagedFile, "write_record", slow)
            nursery.start_soon(vfs.release, h.fh)
            await trio.sleep(0.05)
            h2, _ = await vfs.open(node.inode, os.O_RDWR)
            await vfs.unlink(ROOT, "f")
            await trio.sleep(0.3)
            assert await vfs.read(h2.fh, 0, 100) == b"still here"
            await vfs.release(h2.fh)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_write_back_uploads_once_after_delay_and_drain(tmp_path: Path) -> None:
    async def main() -> None:
        vfs = make_vfs(tmp_path, write_back=0.3)
        async with trio.open_nursery() as nursery:
            await nursery.start(vfs.run)
            h, _ = await vfs.create(ROOT, "doc", 0o600, os.O_WRONLY, CTX)
            await vfs.write(h.fh, 0, b"v1")
            await vfs.release(h.fh)
            with pytest.raises(NotFound):  # not yet, not even empty: created and written back later
                await vfs.backend.stat("doc")
            assert vfs.pending_uploads() == 1
            with trio.fail_after(5):
                while vfs.pending_uploads():
                    await trio.sleep(0.05)
            assert await vfs.backend.read("doc", 0, 10) == b"v1"
            assert (await vfs.backend.stat("doc")).mode == 0o600
            nursery.cancel_scope.cancel()
        # drain uploads what is queued without waiting for the delay
        vfs2 = make_vfs(tmp_path / "2", write_back=60.0)
        h, _ = await vfs2.create(ROOT, "x", 0o644, os.O_WRONLY, CTX)
        await vfs2.write(h.fh, 0, b"drained")
        await vfs2.release(h.fh)
        assert await vfs2.drain() == []
        assert await vfs2.backend.read("x", 0, 10) == b"drained"

    trio.run(main)


def test_conflict_name() -> None:
    from omnifs.vfs import conflict_name

    when = 1_795_000_000.0
    name = conflict_name("docs/plan.blueprint.yaml", when)
    assert name.startswith("docs/plan.blueprint.conflict-") and name.endswith("Z.yaml")
    assert conflict_name("README", when).startswith("README.conflict-")
    assert conflict_name(".bashrc", when).startswith(".bashrc.conflict-")
    long = conflict_name("d/" + "x" * 250 + ".txt", when)
    assert len(long.split("/")[1].encode()) <= 255 and long.endswith(".txt")


def test_create_is_local_and_a_name_taken_meanwhile_keeps_both(tmp_path: Path) -> None:
    """create() makes no backend call; if another client creates the name before our upload, both survive."""
    import io

    async def main() -> None:
        vfs = make_vfs(tmp_path, write_back=60.0)
        h, _ = await vfs.create(ROOT, "report.txt", 0o644, os.O_WRONLY, CTX)
        await vfs.write(h.fh, 0, b"ours")
        await vfs.release(h.fh)
        await vfs.backend.write("report.txt", io.BytesIO(b"theirs"))
        assert await vfs.drain() == []
        names = sorted(i.name for i in await vfs.backend.list(""))
        assert names[0].startswith("report.conflict-") and names[1] == "report.txt"
        assert await vfs.backend.read("report.txt", 0, 10) == b"theirs"
        assert await vfs.backend.read(names[0], 0, 10) == b"ours"

    trio.run(main)
