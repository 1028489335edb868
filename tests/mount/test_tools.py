"""Real programs through a real mount: cp, sed -i, vim, git, tar, rsync, editor saves."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.mount.harness import Mount


def run(*cmd: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


def make_tree(root: Path, seed: int = 3) -> None:
    """A small but varied tree: nesting, empty dirs, binary data, modes, symlinks, odd names."""
    rnd = random.Random(seed)
    (root / "docs" / "nested" / "deeper").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "with space & ünïcode").mkdir()
    for i in range(12):
        sub = rnd.choice(["docs", "docs/nested", "docs/nested/deeper", "with space & ünïcode", "."])
        (root / sub / f"file-{i}.bin").write_bytes(rnd.randbytes(rnd.choice([0, 1, 4095, 4096, 70_000, 300_001])))
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "script.sh", 0o755)
    (root / "private.txt").write_text("secret-ish")
    os.chmod(root / "private.txt", 0o600)
    os.symlink("docs/nested", root / "link-to-dir")
    os.symlink("script.sh", root / "link-to-file")
    os.utime(root / "docs" / "nested", ns=(1_500_000_000_000_000_000,) * 2)


def tree_digest(root: Path) -> dict[str, tuple[str, int, str]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def test_cp_a_tree_and_diff(mnt: Mount, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    run("cp", "-a", str(src), str(mnt.path / "copy"))
    run("diff", "-r", "--no-dereference", str(src), str(mnt.path / "copy"))
    assert tree_digest(src) == tree_digest(mnt.path / "copy")
    # cp -a keeps mtimes of files.
    s, d = (src / "private.txt").stat(), (mnt.path / "copy" / "private.txt").stat()
    assert s.st_mtime_ns // 10**6 == d.st_mtime_ns // 10**6
    # And back out again.
    run("cp", "-a", str(mnt.path / "copy"), str(tmp_path / "back"))
    run("diff", "-r", "--no-dereference", str(src), str(tmp_path / "back"))


def test_sed_in_place(mnt: Mount) -> None:
    p = mnt.path / "conf.yaml"
    p.write_text("name: alpha\nsteps: 3\nname: alpha\n")
    os.chmod(p, 0o640)
    run("sed", "-i", "s/alpha/beta/g", str(p))
    assert p.read_text() == "name: beta\nsteps: 3\nname: beta\n"
    assert stat.S_IMODE(p.stat().st_mode) == 0o640
    assert sorted(os.listdir(mnt.path)) == ["conf.meta.json", "conf.yaml"]  # sed's temp file is gone


def _vim() -> str | None:
    for name in ("vim", "vim.tiny", "vi"):
        if shutil.which(name):
            return name
    return None


def test_vim_saves_file(mnt: Mount) -> None:
    vim = _vim()
    if vim is None:
        pytest.fail("vim is not installed; scripts/setup installs vim-tiny")
    p = mnt.path / "blueprint.yaml"
    p.write_text("workflow: one\nsteps:\n  - fetch\n")
    env = dict(os.environ, HOME=str(mnt.path.parent))
    res = subprocess.run(
        [vim, "-es", "-u", "NONE", "-c", "%s/one/two/", "-c", "$put ='  - publish'", "-c", "wq", str(p)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert p.read_text() == "workflow: two\nsteps:\n  - fetch\n  - publish\n"
    leftovers = [n for n in os.listdir(mnt.path) if n != "blueprint.yaml"]
    assert leftovers == ["blueprint.meta.json"]  # its companion (meta_files=show), no temp or swap files


def test_python_atomic_save(mnt: Mount) -> None:
    target = mnt.path / "doc.json"
    target.write_text('{"v": 0}')
    for i in range(1, 21):
        tmp = mnt.path / f".doc.json.tmp{i}"
        with open(tmp, "w") as f:
            f.write(f'{{"v": {i}}}')
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        assert target.read_text() == f'{{"v": {i}}}'
    assert sorted(os.listdir(mnt.path)) == ["doc.json", "doc.meta.json"]  # with its companion (meta_files=show)


@pytest.mark.mount_options("meta_files=hide")  # about git, not companions (test_meta.py covers git with them)
def test_git_workflow(mnt: Mount, tmp_path: Path) -> None:
    repo = mnt.path / "repo"
    repo.mkdir()
    env = dict(
        os.environ,
        HOME=str(tmp_path),
        GIT_AUTHOR_NAME="T",
        GIT_AUTHOR_EMAIL="t@example.invalid",
        GIT_COMMITTER_NAME="T",
        GIT_COMMITTER_EMAIL="t@example.invalid",
        GIT_CONFIG_NOSYSTEM="1",
    )
    run("git", "init", "-q", "-b", "main", cwd=repo, env=env)
    (repo / "a.txt").write_text("first\n")
    (repo / "sub").mkdir()
    (repo / "sub" / "b.bin").write_bytes(os.urandom(50_000))
    run("git", "add", "-A", cwd=repo, env=env)
    run("git", "commit", "-q", "-m", "first", cwd=repo, env=env)
    (repo / "a.txt").write_text("second\n")
    run("git", "commit", "-q", "-am", "second", cwd=repo, env=env)
    log = run("git", "log", "--format=%s", cwd=repo, env=env)
    assert log.split() == ["second", "first"]
    assert run("git", "status", "--porcelain", cwd=repo, env=env) == ""
    run("git", "fsck", "--strict", cwd=repo, env=env)
    run("git", "checkout", "-q", "HEAD~1", cwd=repo, env=env)
    assert (repo / "a.txt").read_text() == "first\n"
    run("git", "checkout", "-q", "main", cwd=repo, env=env)
    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(repo), str(clone), env=env)
    assert (clone / "a.txt").read_text() == "second\n"


def test_tar_extract_and_create(mnt: Mount, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(src, arcname="tree")
    run("tar", "xf", str(archive), "-C", str(mnt.path))
    assert tree_digest(src) == tree_digest(mnt.path / "tree")
    run("tar", "cf", str(tmp_path / "b.tar"), "-C", str(mnt.path), "tree")
    (tmp_path / "out").mkdir()
    run("tar", "xf", str(tmp_path / "b.tar"), "-C", str(tmp_path / "out"))
    assert tree_digest(src) == tree_digest(tmp_path / "out" / "tree")


@pytest.mark.mount_options("meta_files=hide")  # compares whole trees; companions would be extra entries
def test_rsync_archive(mnt: Mount, tmp_path: Path) -> None:
    if shutil.which("rsync") is None:
        pytest.fail("rsync is not installed; scripts/setup installs it")
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    run("rsync", "-a", f"{src}/", str(mnt.path / "r"))
    assert tree_digest(src) == tree_digest(mnt.path / "r")
    # A second run with one change transfers into place over the old file.
    (src / "private.txt").write_text("changed")
    run("rsync", "-a", f"{src}/", str(mnt.path / "r"))
    assert (mnt.path / "r" / "private.txt").read_text() == "changed"
    out = run("rsync", "-a", "--dry-run", "--itemize-changes", f"{src}/", str(mnt.path / "r"))
    assert out.strip() == ""
