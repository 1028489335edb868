"""Companion naming rules, the metadata schema and the search index (pure, no mount)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omnifs import meta
from omnifs.meta import MetaError, SystemFields, UserMeta
from omnifs.metaindex import MetaIndex


def test_short_and_full_names() -> None:
    assert meta.short_name("workflow-1.blueprint.yaml") == "workflow-1.blueprint.meta.json"
    assert meta.short_name("README") == "README.meta.json"
    assert meta.short_name("archive.tar.gz") == "archive.tar.meta.json"
    assert meta.full_name("a.yaml") == "a.yaml.meta.json"


def test_companion_map_plain_and_collisions() -> None:
    assert meta.companion_map(["workflow-1.blueprint.yaml"]) == {
        "workflow-1.blueprint.meta.json": "workflow-1.blueprint.yaml"
    }
    # Two files would share a.meta.json: both use the full form.
    assert meta.companion_map(["a.yaml", "a.json"]) == {"a.yaml.meta.json": "a.yaml", "a.json.meta.json": "a.json"}
    # "a" keeps a.meta.json (its full form is the same name); a.txt must use the full form.
    assert meta.companion_map(["a", "a.txt"]) == {"a.meta.json": "a", "a.txt.meta.json": "a.txt"}
    # A full form colliding with another file's short form pushes that one to the full form too.
    got = meta.companion_map(["a.b", "a.c", "a.b.c"])
    assert got == {"a.b.meta.json": "a.b", "a.c.meta.json": "a.c", "a.b.c.meta.json": "a.b.c"}
    assert len(set(got)) == len(got)


def test_companions_never_get_companions_nor_dot_files() -> None:
    files = ["x.meta.json", ".gitignore", ".x.swp", "x.txt"]
    assert meta.companion_map(files) == {"x.meta.json": "x.txt"}
    assert not meta.has_companion("x.meta.json")
    assert not meta.has_companion(".bashrc")
    assert not meta.dir_has_companions("repo/.git/objects")
    assert meta.dir_has_companions("repo/src")


def test_overlong_companion_names_are_skipped() -> None:
    name = "n" * 250 + ".txt"
    assert meta.companion_map([name]) == {}


def _system() -> SystemFields:
    return SystemFields("a.yaml", 5, 1_700_000_000_123_456_789, 1_700_000_000_000_000_000, "etag1")


def test_render_is_stable_pretty_and_ordered() -> None:
    user = UserMeta(tags=("x", "y"), author="alice", custom={"k": 1})
    data = meta.render(_system(), user)
    doc = json.loads(data)
    assert list(doc) == list(meta.KEYS)
    assert doc["schema"] == 1 and doc["modified"] == "2023-11-14T22:13:20Z"
    assert doc["tags"] == ["x", "y"] and doc["custom"] == {"k": 1}
    assert data.endswith(b"\n") and b'\n  "name": "a.yaml",\n' in data
    assert meta.render(_system(), user) == data


def test_parse_round_trip_and_partial_documents() -> None:
    user = UserMeta(tags=("x",), author="alice", description="d", custom={"k": [1, 2]}, content_type="text/x-a")
    assert meta.parse(meta.render(_system(), user), _system()) == user
    assert meta.parse(b'{"tags": ["t"]}', _system()) == UserMeta(tags=("t",))


@pytest.mark.parametrize(
    "doc, reason",
    [
        (b"{bad", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"colour": "red"}', "unknown key"),
        (b'{"size": 6}', "size is read-only"),
        (b'{"name": "b.yaml"}', "name is read-only"),
        (b'{"modified": "2001-01-01T00:00:00Z"}', "modified is read-only"),
        (b'{"schema": 2}', "schema"),
        (b'{"tags": "x"}', "tags"),
        (b'{"custom": []}', "custom"),
        (b'{"author": 3}', "author"),
    ],
)
def test_parse_refuses(doc: bytes, reason: str) -> None:
    with pytest.raises(MetaError, match=reason):
        meta.parse(doc, _system())


def test_parse_accepts_another_copy_s_version_fields() -> None:
    doc = json.loads(meta.render(_system(), UserMeta(author="a")))
    doc["etag"], doc["created"] = "other", "1999-01-01T00:00:00Z"
    assert meta.parse(json.dumps(doc).encode(), _system()).author == "a"


def test_s3_encoding_round_trip() -> None:
    user = UserMeta(tags=("x", "é"), author="Zoë", description='"quoted"', custom={"n": 1})
    encoded = meta.to_s3(user)
    assert all(v is None or v.isascii() for v in encoded.values())
    stored = {k: v for k, v in encoded.items() if v is not None}
    assert meta.from_s3(stored, "application/octet-stream", "a.bin") == user
    assert meta.to_s3(UserMeta()) == {"tags": None, "author": None, "description": None, "custom": None}


def test_xattr_values() -> None:
    doc = meta.document(_system(), UserMeta(tags=("x",), author="al"))
    xs = meta.to_xattrs(doc)
    assert xs["user.omnifs.tags"] == b'["x"]' and xs["user.omnifs.author"] == b"al"
    assert xs["user.omnifs.size"] == b"5" and "user.omnifs.description" not in xs
    assert meta.field_from_xattr("tags", b'["a","b"]') == ["a", "b"]
    with pytest.raises(MetaError):
        meta.field_from_xattr("tags", b"not json")


def test_index_find_move_forget(tmp_path: Path) -> None:
    ix = MetaIndex(tmp_path / "ix.sqlite")
    for i in range(20):
        doc = meta.document(
            SystemFields(f"f{i}.yaml", i, 0, None, None),
            UserMeta(tags=("even",) if i % 2 == 0 else ("odd",), author="alice" if i < 5 else "bob", custom={"n": i}),
        )
        ix.put(f"d/f{i}.yaml", doc)
    assert len(ix.find(tags=["even"])) == 10
    assert [r["path"] for r in ix.find(tags=["even"], where={"author": "alice"})] == [
        "d/f0.yaml",
        "d/f2.yaml",
        "d/f4.yaml",
    ]
    assert [r["path"] for r in ix.find(where={"custom.n": "7"})] == ["d/f7.yaml"]
    assert len(ix.find(name="f1*.yaml")) == 11
    ix.move("d", "e")
    assert ix.find(name="f3.yaml")[0]["path"] == "e/f3.yaml"
    ix.move("e/f3.yaml", "e/g3.yaml")
    assert ix.find(name="g3.yaml")[0]["tags"] == ["odd"]
    ix.forget("e")
    assert ix.count() == 0
    ix.close()
