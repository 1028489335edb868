"""The metadata index forgets and moves exactly one subtree (case-sensitive, no pattern characters)."""

from __future__ import annotations

from pathlib import Path

from omnifs.metaindex import MetaIndex


def _doc(tag: str) -> dict[str, object]:
    return {"tags": [tag], "author": "a", "custom": {}}


def test_forget_and_move_touch_exactly_one_subtree(tmp_path: Path) -> None:
    ix = MetaIndex(tmp_path / "ix.sqlite")
    for path in ["Docs/a.yaml", "docs/a.yaml", "docs/b.yaml", "docs_x/c.yaml", "docs%/d.yaml", "docs0/e.yaml", "docs"]:
        ix.put(path, _doc("t"))
    ix.forget("docs")
    left = sorted(r["path"] for r in ix.find(tags=["t"]))
    assert left == ["Docs/a.yaml", "docs%/d.yaml", "docs0/e.yaml", "docs_x/c.yaml"]
    ix.move("Docs", "new")
    moved = sorted(r["path"] for r in ix.find(tags=["t"]))
    assert moved == ["docs%/d.yaml", "docs0/e.yaml", "docs_x/c.yaml", "new/a.yaml"]
    assert [r["path"] for r in ix.find(tags=["t"], under="docs_x")] == ["docs_x/c.yaml"]
    ix.forget("")
    assert ix.find(tags=["t"]) == []
    ix.close()
