from __future__ import annotations

import pytest

from omnifs.backends.base import ObjectInfo, check_path
from omnifs.errors import InvalidPath, NameTooLong
from omnifs.inodes import Attr, InodeTable


def test_check_path() -> None:
    assert check_path("") == ""
    assert check_path("a/b/") == "a/b"
    for bad in ("/abs", "a/../b", "..", "a//b", "./a", "a/\x00"):
        with pytest.raises(InvalidPath):
            check_path(bad)
    with pytest.raises(NameTooLong):
        check_path("a/" + "é" * 128)  # 256 bytes in UTF-8


def _attr(kind: str) -> Attr:
    return Attr.from_info(ObjectInfo("x", kind), 0, 0)  # type: ignore[arg-type]


def test_inode_table_lookup_counts_and_rename() -> None:
    t = InodeTable(_attr("dir"))
    d = t.ensure(ObjectInfo("d", "dir"), _attr("dir"), 0)
    f = t.ensure(ObjectInfo("d/f", "file"), _attr("file"), 0)
    d.lookups = f.lookups = 1
    t.move("d", "e")
    assert t.by_path("e/f") is f and f.path == "e/f" and t.by_path("d/f") is None
    t.forget(f.inode, 1)
    assert t.get(f.inode) is None
    # An open node outlives its lookups and its name.
    g = t.ensure(ObjectInfo("g", "file"), _attr("file"), 0)
    g.lookups, g.open_count = 1, 1
    t.detach(g)
    t.forget(g.inode, 1)
    assert t.get(g.inode) is g and g.unlinked
    g.open_count = 0
    t.maybe_drop(g)
    assert t.get(g.inode) is None
    # A type change on the backend gives a new inode.
    h = t.ensure(ObjectInfo("h", "file"), _attr("file"), 0)
    h.lookups = 1
    h2 = t.ensure(ObjectInfo("h", "dir"), _attr("dir"), 0)
    assert h2 is not h and h2.inode != h.inode
