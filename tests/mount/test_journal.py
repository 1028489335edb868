"""Namespace changes made while the backend is away: journaled, shown at once, replayed in order.

Real servers, real outages (moto frozen with SIGSTOP, sshd stopped), real kill -9.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mount.conftest import Remote
from tests.mount.harness import REPO, isolated_env, mounted_fstype, wait_for
from tests.mount.test_cache_offline import FAST, _s3_client, backend_bytes, net, outage

__all__ = ["_s3_client", "net"]  # fixtures used here


def backend_names(remote: Remote, rel: str) -> list[str] | None:
    """Names in directory ``rel`` on the backend itself (None if it does not exist)."""
    if remote.kind == "s3":
        client = remote.extra["s3_client"]
        bucket = remote.server.config["bucket"]
        prefix = rel.rstrip("/") + "/" if rel else ""
        out = set()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rest = obj["Key"][len(prefix) :]
                if rest:
                    out.add(rest.split("/")[0])
        return sorted(out) if out or rel == "" else None
    assert remote.backend_root is not None
    p = remote.backend_root / rel
    return sorted(os.listdir(p)) if p.is_dir() else None


def test_offline_namespace_changes_replay_when_back(net: Remote, mounter) -> None:
    m = mounter(net, *FAST)
    root = m.path
    (root / "projects" / "alpha").mkdir(parents=True)
    (root / "projects" / "alpha" / "plan.txt").write_text("plan v1")
    (root / "projects" / "notes.txt").write_text("notes")
    (root / "trash").mkdir()
    wait_for(lambda: backend_bytes(net, "projects/notes.txt") == b"notes", what="first uploads")
    os.listdir(root)
    os.listdir(root / "projects")
    os.listdir(root / "projects" / "alpha")
    with outage(net):
        (root / "projects" / "beta").mkdir()
        (root / "projects" / "beta" / "new.txt").write_text("made while away")
        os.rename(root / "projects" / "alpha", root / "projects" / "alpha-renamed")
        os.rename(root / "projects" / "notes.txt", root / "projects" / "beta" / "notes.txt")
        with open(root / "projects" / "alpha-renamed" / "plan.txt", "a") as f:
            f.write(" + offline edit")
        os.rmdir(root / "trash")
        os.chmod(root / "projects" / "beta" / "notes.txt", 0o600)
        # Everything is visible at once, from the journaled view.
        assert sorted(os.listdir(root)) == ["projects"]
        assert sorted(os.listdir(root / "projects")) == ["alpha-renamed", "beta"]
        assert sorted(os.listdir(root / "projects" / "beta")) == ["new.txt", "notes.txt"]
        assert (root / "projects" / "alpha-renamed" / "plan.txt").read_text() == "plan v1 + offline edit"
        assert stat.S_IMODE(os.stat(root / "projects" / "beta" / "notes.txt").st_mode) == 0o600
    # Back: the journal is replayed first, then the data uploaded.
    wait_for(
        lambda: backend_bytes(net, "projects/alpha-renamed/plan.txt") == b"plan v1 + offline edit",
        timeout=60,
        what="replay and upload",
    )
    wait_for(lambda: backend_bytes(net, "projects/beta/new.txt") == b"made while away", what="new file uploaded")
    assert backend_bytes(net, "projects/beta/notes.txt") == b"notes"
    assert backend_bytes(net, "projects/notes.txt") is None
    assert backend_names(net, "projects") == ["alpha-renamed", "beta"]
    assert backend_names(net, "trash") is None
    assert backend_names(net, "projects/alpha") is None
    if net.kind == "sftp":
        assert net.backend_root is not None
        assert stat.S_IMODE(os.stat(net.backend_root / "projects/beta/notes.txt").st_mode) == 0o600
    # The mount sees the same after revalidating against the backend.
    assert sorted(os.listdir(root / "projects" / "beta")) == ["new.txt", "notes.txt"]
    assert "replayed" in m.log.read_text()


def test_kill_9_with_journaled_changes_replays_after_restart(net: Remote, mounter) -> None:
    m = mounter(net, *FAST)
    (m.path / "inbox").mkdir()
    (m.path / "inbox" / "a.txt").write_text("a")
    wait_for(lambda: backend_bytes(net, "inbox/a.txt") == b"a", what="first upload")
    os.listdir(m.path)
    os.listdir(m.path / "inbox")
    with outage(net):
        (m.path / "archive").mkdir()
        os.rename(m.path / "inbox" / "a.txt", m.path / "archive" / "a.txt")
        (m.path / "archive" / "b.txt").write_text("b, offline")
        os.rmdir(m.path / "inbox")
        m.kill()
    assert backend_bytes(net, "inbox/a.txt") == b"a"  # nothing was applied before the crash
    m2 = mounter(net, *FAST)
    wait_for(lambda: backend_bytes(net, "archive/b.txt") == b"b, offline", timeout=60, what="replay after restart")
    assert backend_bytes(net, "archive/a.txt") == b"a"
    assert backend_names(net, "inbox") is None
    assert sorted(os.listdir(m2.path)) == ["archive"]
    assert sorted(os.listdir(m2.path / "archive")) == ["a.txt", "b.txt"]
    journal = Path(net.env["XDG_STATE_HOME"]) / "omnifs"
    assert all(p.stat().st_size == 0 for p in journal.glob("*/journal/ops.log"))


def test_unwritable_state_dir_refuses_to_mount(tmp_path: Path, home: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only tmpfs")
    state = home / ".local" / "state"
    state.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(state)], check=True)
    try:
        backend = tmp_path / "backend"
        backend.mkdir()
        mp = tmp_path / "mnt"
        mp.mkdir()
        res = subprocess.run(
            [sys.executable, "-m", "omnifs", "mount", "--foreground", f"local:{backend}", str(mp)],
            env=isolated_env(home),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        subprocess.run(["umount", str(state)], check=True)
    assert res.returncode == 1, res.stderr
    assert mounted_fstype(mp) is None
    errors = [line for line in res.stderr.splitlines() if line.startswith("omnifs: error:")]
    assert len(errors) == 1, res.stderr
    assert str(state / "omnifs") in errors[0]
    assert "Read-only file system" in errors[0] and "not mounting" in errors[0]


def _write_pending(staging: Path, files: dict[str, bytes]) -> None:
    """Leave pending uploads on disk exactly as a crashed mount leaves them (data + record)."""
    staging.mkdir(parents=True, mode=0o700)
    for rel, data in files.items():
        ident = hashlib.sha1(rel.encode()).hexdigest()
        (staging / ident).write_bytes(data)
        record = {"path": rel, "mode": 0o644, "uid": 0, "gid": 0, "mtime_ns": time.time_ns(), "base_version": None}
        (staging / f"{ident}.json").write_text(json.dumps(record))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mount_with_10000_pending_uploads_is_usable_at_once(tmp_path: Path, home: Path, mounter) -> None:
    from omnifs.config import Config, resolve_remote

    backend = tmp_path / "backend"
    folders = [f"d{k:02d}" for k in range(100)]
    for folder in folders:
        (backend / folder).mkdir(parents=True)
    remote = Remote("local", f"local:{backend}", isolated_env(home), backend_root=backend)
    name = resolve_remote(remote.spec, Config(tmp_path / "none.toml")).name
    files = {f"d{i % 100:02d}/f{i:05d}.txt": f"pending upload {i}\n".encode() * (1 + i % 7) for i in range(10_000)}
    _write_pending(home / ".local" / "state" / "omnifs" / name / "staging", files)
    t0 = time.monotonic()
    m = mounter(remote, "write_back=60", "meta_files=hide")
    first = os.listdir(m.path / "d99")
    answered = time.monotonic() - t0
    pending_then = int(os.getxattr(m.path, "user.omnifs.pending"))
    assert sorted(first) == sorted(p.split("/")[1] for p in files if p.startswith("d99/"))
    assert pending_then > 0, "the queue drained before the first answer: this test proves nothing"
    # Every pending file is visible before it is uploaded.
    listed = {f"{folder}/{n}" for folder in folders for n in os.listdir(m.path / folder)}
    assert listed == set(files)
    assert (m.path / "d99" / "f09999.txt").read_bytes() == files["d99/f09999.txt"]
    print(f"10,000 pending uploads: mounted and listed in {answered:.2f} s with {pending_then} still queued")
    wait_for(lambda: int(os.getxattr(m.path, "user.omnifs.pending")) == 0, timeout=600, what="drain")
    for rel, data in files.items():
        assert (backend / rel).read_bytes() == data, rel
