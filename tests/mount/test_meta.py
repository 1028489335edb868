"""Companion .meta.json files, user.omnifs.* xattrs and ``omnifs find`` through real mounts.

Runs on every backend kind (local, memory, S3 via moto, SFTP via sshd).  On
S3 the metadata is checked on the object itself with boto3; on local and SFTP
the companion is a real file in the backend directory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.mount.conftest import Remote
from tests.mount.harness import REPO, wait_for


def meta_of(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_doc(path: Path, doc: dict[str, Any] | str) -> None:
    """Write a companion like a program would: open, write, close (the close reports refusals)."""
    with open(path, "w") as f:
        f.write(doc if isinstance(doc, str) else json.dumps(doc, indent=2))


def atomic_save(path: Path, doc: dict[str, Any]) -> None:
    """An editor-style save: write a temp file beside it, then rename it over the target."""
    tmp = path.with_name("." + path.name + ".tmp-save")
    tmp.write_text(json.dumps(doc))
    os.rename(tmp, path)


def s3_object(remote: Remote, client: Any, key: str) -> dict[str, Any]:
    return client.head_object(Bucket=remote.server.config["bucket"], Key=key)  # type: ignore[no-any-return]


def s3_keys(remote: Remote, client: Any) -> list[str]:
    resp = client.list_objects_v2(Bucket=remote.server.config["bucket"])
    return sorted(o["Key"] for o in resp.get("Contents", []))


@pytest.fixture
def s3(remote: Remote, request: pytest.FixtureRequest) -> Any:
    """The boto3 client when the remote is S3, else None."""
    return request.getfixturevalue("s3_client") if remote.kind == "s3" else None


def stored_meta(remote: Remote, s3: Any, main: str, companion: str) -> dict[str, Any] | None:
    """What the backend itself holds for ``main``: S3 user metadata, or the companion file's JSON."""
    if remote.kind == "s3":
        head = s3_object(remote, s3, main)
        return {"metadata": head["Metadata"], "content_type": head["ContentType"]}
    if remote.backend_root is not None:
        p = remote.backend_root / companion
        return json.loads(p.read_text()) if p.exists() else None
    return None


def test_read_edit_and_atomic_save(remote: Remote, mounter: Any, s3: Any) -> None:
    m = mounter(remote)
    main = m.path / "workflow-1.blueprint.yaml"
    comp = m.path / "workflow-1.blueprint.meta.json"
    main.write_text("steps: 3\n")
    assert sorted(os.listdir(m.path)) == [comp.name, main.name]
    doc = meta_of(comp)
    assert list(doc) == ["schema", "name", "size", "modified", "created", "etag", "content_type", "tags",
                         "author", "description", "custom"]  # fmt: skip
    assert doc["schema"] == 1 and doc["name"] == main.name and doc["size"] == 9
    assert doc["tags"] == [] and doc["author"] is None and doc["custom"] == {}
    assert comp.read_bytes().startswith(b'{\n  "schema": 1,\n')  # pretty-printed
    assert comp.stat().st_size == len(comp.read_bytes())

    # Plain rewrite: open, write, close.
    doc.update(tags=["draft", "blue"], author="alice", custom={"priority": 2})
    write_doc(comp, doc)
    got = meta_of(comp)
    assert got["tags"] == ["draft", "blue"] and got["author"] == "alice" and got["custom"] == {"priority": 2}

    # Editor-style atomic save (temp + rename over the companion).
    got["description"] = "the first blueprint"
    atomic_save(comp, got)
    assert meta_of(comp)["description"] == "the first blueprint"
    assert sorted(os.listdir(m.path)) == [comp.name, main.name]  # the temp file is gone

    stored = stored_meta(remote, s3, main.name, comp.name)
    if remote.kind == "s3":
        md = stored["metadata"]  # type: ignore[index]
        assert json.loads(md["tags"]) == ["draft", "blue"] and md["author"] == "alice"
        assert md["description"] == "the first blueprint" and json.loads(md["custom"]) == {"priority": 2}
        assert s3_keys(remote, s3) == [main.name]  # no companion object: native metadata
    elif stored is not None:
        assert stored["author"] == "alice" and stored["tags"] == ["draft", "blue"]

    # The main file changes: the companion's system fields follow at once.
    main.write_text("steps: 4\nmore: yes\n")
    assert meta_of(comp)["size"] == len("steps: 4\nmore: yes\n")
    assert meta_of(comp)["author"] == "alice"


def test_vim_edits_companion(remote: Remote, mounter: Any) -> None:
    m = mounter(remote)
    (m.path / "notes.txt").write_text("hello\n")
    comp = m.path / "notes.meta.json"
    res = subprocess.run(
        ["vim", "-es", "-c", r'%s/"author": null/"author": "vim-user"/', "-c", "wq", str(comp)],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res
    assert meta_of(comp)["author"] == "vim-user"
    assert sorted(os.listdir(m.path)) == ["notes.meta.json", "notes.txt"]


@pytest.mark.parametrize(
    "change",
    ["{not json", "unknown-key", "changed-size"],
)
def test_invalid_writes_are_refused_and_old_metadata_stays(remote: Remote, mounter: Any, s3: Any, change: str) -> None:
    m = mounter(remote)
    (m.path / "a.csv").write_text("x,y\n")
    comp = m.path / "a.meta.json"
    good = meta_of(comp)
    good.update(tags=["keep"], author="alice")
    write_doc(comp, good)
    bad: dict[str, Any] | str
    if change == "unknown-key":
        bad = {**good, "colour": "red"}
    elif change == "changed-size":
        bad = {**good, "size": 12345}
    else:
        bad = change
    with pytest.raises(OSError) as exc:
        write_doc(comp, bad)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc2:
        atomic_save(comp, {**good, "size": 999})
    assert exc2.value.errno == errno.EINVAL
    got = meta_of(comp)
    assert got["tags"] == ["keep"] and got["author"] == "alice"
    assert "refused" in m.log_text()
    if remote.kind == "s3":
        assert s3_object(remote, s3, "a.csv")["Metadata"]["author"] == "alice"


def test_rename_and_delete_carry_metadata(remote: Remote, mounter: Any, s3: Any) -> None:
    m = mounter(remote)
    (m.path / "sub").mkdir()
    (m.path / "report.txt").write_text("r")
    doc = meta_of(m.path / "report.meta.json")
    write_doc(m.path / "report.meta.json", {**doc, "tags": ["q3"]})
    os.rename(m.path / "report.txt", m.path / "sub" / "final.txt")
    assert not (m.path / "report.meta.json").exists()
    assert meta_of(m.path / "sub" / "final.meta.json")["tags"] == ["q3"]
    assert sorted(os.listdir(m.path)) == ["sub"]
    if remote.backend_root is not None:
        assert sorted(os.listdir(remote.backend_root / "sub")) == ["final.meta.json", "final.txt"]
    # A whole directory moves with its companions.
    os.rename(m.path / "sub", m.path / "moved")
    assert meta_of(m.path / "moved" / "final.meta.json")["tags"] == ["q3"]
    # Delete the file: the metadata goes with it.
    os.unlink(m.path / "moved" / "final.txt")
    assert os.listdir(m.path / "moved") == []
    if remote.backend_root is not None:
        assert os.listdir(remote.backend_root / "moved") == []
    if remote.kind == "s3":
        assert s3_keys(remote, s3) == ["moved/", "sub/"] or s3_keys(remote, s3) == ["moved/"]
    os.rmdir(m.path / "moved")


def test_collisions_use_full_names(remote: Remote, mounter: Any) -> None:
    m = mounter(remote)
    (m.path / "a.yaml").write_text("y")
    write_doc(m.path / "a.meta.json", {"tags": ["yaml"]})
    (m.path / "a.json").write_text("{}")
    assert sorted(os.listdir(m.path)) == ["a.json", "a.json.meta.json", "a.yaml", "a.yaml.meta.json"]
    assert meta_of(m.path / "a.yaml.meta.json")["tags"] == ["yaml"]
    assert meta_of(m.path / "a.json.meta.json")["tags"] == []
    os.unlink(m.path / "a.json")
    assert sorted(os.listdir(m.path)) == ["a.meta.json", "a.yaml"]
    assert meta_of(m.path / "a.meta.json")["tags"] == ["yaml"]


def test_cp_a_tree_with_companions_imports_metadata(remote: Remote, mounter: Any, s3: Any, tmp_path: Path) -> None:
    m = mounter(remote)
    src = tmp_path / "src"
    (src / "deep").mkdir(parents=True)
    (src / "one.txt").write_text("1")
    (src / "deep" / "two.bin").write_bytes(b"22")
    (src / "one.meta.json").write_text(json.dumps({"tags": ["imported"], "author": "carol"}))
    # A full companion from elsewhere: name and size agree, etag/created are another store's.
    st = os.stat(src / "deep" / "two.bin")
    two = {"schema": 1, "name": "two.bin", "size": 2, "etag": "elsewhere", "created": "2001-01-01T00:00:00Z",
           "tags": ["b"], "custom": {"k": "v"}}  # fmt: skip
    (src / "deep" / "two.meta.json").write_text(json.dumps(two))
    os.utime(src / "deep" / "two.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    res = subprocess.run(["cp", "-a", str(src), str(m.path / "copy")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    copy = m.path / "copy"
    assert meta_of(copy / "one.meta.json")["tags"] == ["imported"]
    assert meta_of(copy / "one.meta.json")["author"] == "carol"
    assert meta_of(copy / "deep" / "two.meta.json")["custom"] == {"k": "v"}
    assert sorted(os.listdir(copy)) == ["deep", "one.meta.json", "one.txt"]
    if remote.kind == "s3":
        keys = wait_for(
            lambda: (k := s3_keys(remote, s3)) and not any(x.endswith(".meta.json") for x in k) and k,
            what="no companion objects",
        )
        assert "copy/one.txt" in keys
        assert s3_object(remote, s3, "copy/one.txt")["Metadata"]["author"] == "carol"
    elif remote.backend_root is not None:
        assert sorted(os.listdir(remote.backend_root / "copy")) == ["deep", "one.meta.json", "one.txt"]


def test_companion_copied_before_its_file(remote: Remote, mounter: Any, s3: Any) -> None:
    """cp -a reads the source folder in any order: a companion may arrive before its file."""
    m = mounter(remote)
    (m.path / "new").mkdir()

    def create_excl(path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    create_excl(m.path / "new" / "song.meta.json", json.dumps({"tags": ["first"], "author": "dan"}).encode())
    create_excl(m.path / "new" / "song.mp3", b"ID3")
    create_excl(m.path / "new" / "later.txt", b"L")  # its companion comes second, as cp -a would copy it
    create_excl(m.path / "new" / "later.meta.json", json.dumps({"tags": ["second"]}).encode())
    doc = meta_of(m.path / "new" / "song.meta.json")
    assert doc["tags"] == ["first"] and doc["author"] == "dan" and doc["name"] == "song.mp3"
    assert meta_of(m.path / "new" / "later.meta.json")["tags"] == ["second"]
    assert sorted(os.listdir(m.path / "new")) == ["later.meta.json", "later.txt", "song.meta.json", "song.mp3"]
    if remote.kind == "s3":
        assert s3_object(remote, s3, "new/song.mp3")["Metadata"]["author"] == "dan"
        wait_for(lambda: "new/song.meta.json" not in s3_keys(remote, s3), what="the copied-in object imported")


def test_existing_folder_with_companions_is_recognised(remote: Remote, mounter: Any) -> None:
    if remote.backend_root is None:
        pytest.skip("needs a backend folder on this machine")
    root = remote.backend_root
    (root / "workflow-1.blueprint.yaml").write_text("steps: 12\n")
    stale = {"schema": 1, "name": "workflow-1.blueprint.yaml", "size": 1, "modified": "2001-01-01T00:00:00Z",
             "tags": ["desktop"], "author": "erin"}  # fmt: skip
    (root / "workflow-1.blueprint.meta.json").write_text(json.dumps(stale))
    (root / "other.txt").write_text("o")
    (root / "other.meta.json").write_text(json.dumps({"something": "else"}))  # not a companion document
    m = mounter(remote)
    assert sorted(os.listdir(m.path)) == [
        "other.meta.json",
        "other.txt",
        "workflow-1.blueprint.meta.json",
        "workflow-1.blueprint.yaml",
    ]
    doc = meta_of(m.path / "workflow-1.blueprint.meta.json")
    assert doc["tags"] == ["desktop"] and doc["author"] == "erin"
    assert doc["size"] == len("steps: 12\n") and doc["modified"] != "2001-01-01T00:00:00Z"  # live, never stale
    # A file that is not a companion document is never overwritten.
    with pytest.raises(OSError) as exc:
        write_doc(m.path / "other.meta.json", {"tags": ["x"]})
    assert exc.value.errno == errno.EINVAL
    assert json.loads((root / "other.meta.json").read_text()) == {"something": "else"}


def test_xattrs_round_trip(remote: Remote, mounter: Any, s3: Any) -> None:
    m = mounter(remote)
    p = m.path / "pic.png"
    p.write_bytes(b"\x89PNG")
    os.setxattr(p, "user.omnifs.tags", b'["cat", "cute"]')
    os.setxattr(p, "user.omnifs.author", "Zoë".encode())
    assert json.loads(os.getxattr(p, "user.omnifs.tags")) == ["cat", "cute"]
    assert os.getxattr(p, "user.omnifs.author").decode() == "Zoë"
    assert os.getxattr(p, "user.omnifs.size") == b"4"
    assert os.getxattr(p, "user.omnifs.content_type") == b"image/png"
    assert {"user.omnifs.tags", "user.omnifs.author"} <= set(os.listxattr(p))
    assert "user.omnifs.size" not in os.listxattr(p)  # read-only fields are readable, not listed
    assert meta_of(m.path / "pic.meta.json")["tags"] == ["cat", "cute"]
    with pytest.raises(OSError) as exc:
        os.setxattr(p, "user.omnifs.size", b"99")
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        os.setxattr(p, "user.omnifs.tags", b"not a list")
    assert exc.value.errno == errno.EINVAL
    os.removexattr(p, "user.omnifs.author")
    assert meta_of(m.path / "pic.meta.json")["author"] is None
    with pytest.raises(OSError) as exc:
        os.getxattr(p, "user.omnifs.author")
    assert exc.value.errno == errno.ENODATA
    assert os.getxattr(p, "user.omnifs.pending") in (b"0", b"1")  # the control attributes still work
    if remote.kind == "s3":
        assert json.loads(s3_object(remote, s3, "pic.png")["Metadata"]["tags"]) == ["cat", "cute"]


def test_survives_remount_and_vim_save_of_main(remote: Remote, mounter: Any) -> None:
    m = mounter(remote)
    main = m.path / "plan.yaml"
    main.write_text("a: 1\n")
    write_doc(m.path / "plan.meta.json", {"tags": ["keep"], "custom": {"owner": "ops"}})
    res = subprocess.run(["vim", "-es", "-c", "normal! Gob: 2", "-c", "wq", str(main)], capture_output=True, timeout=60)
    assert res.returncode == 0, res
    assert main.read_text() == "a: 1\nb: 2\n"
    doc = meta_of(m.path / "plan.meta.json")
    assert doc["tags"] == ["keep"] and doc["custom"] == {"owner": "ops"} and doc["size"] == len("a: 1\nb: 2\n")
    # An editor's rename-to-backup save (X -> X~, write new X, delete X~) keeps X's metadata too.
    os.rename(main, m.path / "plan.yaml~")
    main.write_text("a: 3\n")
    os.unlink(m.path / "plan.yaml~")
    assert meta_of(m.path / "plan.meta.json")["tags"] == ["keep"]
    assert sorted(os.listdir(m.path)) == ["plan.meta.json", "plan.yaml"]
    if not remote.persistent:
        return
    m.unmount()
    m2 = mounter(remote, path=m.path.parent / "mnt2")
    doc = meta_of(m2.path / "plan.meta.json")
    assert doc["tags"] == ["keep"] and doc["custom"] == {"owner": "ops"}


def test_hide_option_and_dot_files(remote: Remote, mounter: Any) -> None:
    m = mounter(remote, "meta_files=hide")
    (m.path / "x.txt").write_text("x")
    (m.path / ".hidden").write_text("h")
    (m.path / ".git").mkdir()
    (m.path / ".git" / "HEAD").write_text("ref")
    assert sorted(os.listdir(m.path)) == [".git", ".hidden", "x.txt"]
    assert meta_of(m.path / "x.meta.json")["name"] == "x.txt"  # hidden, still open by name
    write_doc(m.path / "x.meta.json", {"tags": ["h"]})
    assert meta_of(m.path / "x.meta.json")["tags"] == ["h"]
    assert os.listdir(m.path / ".git") == ["HEAD"]
    assert not (m.path / ".hidden.meta.json").exists()
    assert not (m.path / ".git" / "HEAD.meta.json").exists()


def test_find(remote: Remote, mounter: Any) -> None:
    m = mounter(remote)
    (m.path / "d").mkdir()
    for i in range(6):
        (m.path / "d" / f"f{i}.yaml").write_text(str(i))
    (m.path / "d" / "other.txt").write_text("o")
    for i in range(6):
        tags = ["even"] if i % 2 == 0 else ["odd"]
        os.setxattr(m.path / "d" / f"f{i}.yaml", "user.omnifs.tags", json.dumps(tags).encode())
        os.setxattr(m.path / "d" / f"f{i}.yaml", "user.omnifs.author", b"alice" if i < 3 else b"bob")
    os.listdir(m.path / "d")

    def find(*args: str) -> list[str]:
        res = subprocess.run(
            [sys.executable, "-m", "omnifs", "find", *args], capture_output=True, text=True, env=remote.env,
            cwd=REPO, timeout=60,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        return res.stdout.split()

    base = str(m.path) + "/d/"
    assert find(str(m.path), "--tag", "even") == [base + "f0.yaml", base + "f2.yaml", base + "f4.yaml"]
    assert find(str(m.path), "--tag", "even", "--where", "author=alice") == [base + "f0.yaml", base + "f2.yaml"]
    assert find(str(m.path / "d"), "--name", "*.txt") == [base + "other.txt"]
    res = subprocess.run(
        [sys.executable, "-m", "omnifs", "find", str(m.path), "--where", "author=bob", "--json"],
        capture_output=True, text=True, env=remote.env, cwd=REPO, timeout=60,
    )  # fmt: skip
    data = json.loads(res.stdout)
    assert sorted(r["name"] for r in data["results"]) == ["f3.yaml", "f4.yaml", "f5.yaml"]
    # Renames and deletes keep the index current.
    os.rename(m.path / "d" / "f0.yaml", m.path / "d" / "g0.yaml")
    os.unlink(m.path / "d" / "f2.yaml")
    assert find(str(m.path), "--tag", "even") == [base + "f4.yaml", base + "g0.yaml"]


def test_s3_metadata_limit(remote: Remote, mounter: Any) -> None:
    if remote.kind != "s3":
        pytest.skip("the 2 KiB user-metadata limit is S3's")
    m = mounter(remote)
    (m.path / "big.txt").write_text("b")
    with pytest.raises(OSError) as exc:
        write_doc(m.path / "big.meta.json", {"description": "x" * 3000})
    assert exc.value.errno in (errno.E2BIG, errno.EINVAL)
    assert meta_of(m.path / "big.meta.json")["description"] is None


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_repository_has_no_companions_inside_dot_git(remote: Remote, mounter: Any) -> None:
    m = mounter(remote)
    env = {**remote.env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    subprocess.run(["git", "init", "-q", str(m.path)], check=True, env=env, timeout=60)
    (m.path / "README").write_text("hi\n")
    subprocess.run(["git", "-C", str(m.path), "add", "README"], check=True, env=env, timeout=60)
    subprocess.run(["git", "-C", str(m.path), "commit", "-qm", "init"], check=True, env=env, timeout=60)
    for dirpath, _dirs, files in os.walk(m.path / ".git"):
        assert not [f for f in files if f.endswith(".meta.json")], dirpath
    status = subprocess.run(
        ["git", "-C", str(m.path), "status", "--porcelain"], capture_output=True, text=True, env=env, timeout=60
    ).stdout
    assert status.split() == ["??", "README.meta.json"]
