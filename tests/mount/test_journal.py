"""Namespace changes made while the backend is away: journaled, shown at once, replayed in order.

Real servers, real outages (moto frozen with SIGSTOP, sshd stopped), real kill -9.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.mount.conftest import Remote
from tests.mount.harness import wait_for
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
