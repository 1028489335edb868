from __future__ import annotations

import io
import os

import pytest
import trio

from omnifs.backends.local import TEMP_PREFIX, LocalBackend
from omnifs.errors import InvalidPath, NotFound, OmniError
from tests.backends.conformance import BackendConformance


class TestLocalBackend(BackendConformance):
    @pytest.fixture
    def backend_factory(self, tmp_path):
        root = tmp_path / "root"
        root.mkdir()
        return lambda: LocalBackend("local", str(root))


def test_symlink_escape_refused(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("s")
    os.symlink(str(outside), root / "link")

    async def main():
        b = LocalBackend("l", str(root))
        with pytest.raises(InvalidPath):
            await b.stat("link/secret")
        with pytest.raises(InvalidPath):
            await b.write("link/new", io.BytesIO(b"x"))
        with pytest.raises(InvalidPath):
            await b.list("link")
        # The link itself is an object; reading it never follows it.
        assert (await b.stat("link")).kind == "symlink"
        with pytest.raises(OmniError):
            await b.read("link", 0, 10)

    trio.run(main)
    assert not (outside / "new").exists()


def test_temp_files_hidden_and_cleaned(tmp_path):
    class Boom(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            raise RuntimeError("source failed")

    async def main():
        b = LocalBackend("l", str(tmp_path))
        (tmp_path / f"{TEMP_PREFIX}stale").write_text("x")
        assert await b.list("") == []
        with pytest.raises(RuntimeError):
            await b.write("f", Boom())
        with pytest.raises(NotFound):
            await b.stat("f")

    trio.run(main)
    assert sorted(os.listdir(tmp_path)) == [f"{TEMP_PREFIX}stale"]
