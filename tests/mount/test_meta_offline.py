"""Companion metadata edited while the backend is away: accepted, shown at once, stored when it returns.

Real outages: moto frozen with SIGSTOP, sshd stopped.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

import pytest

from tests.mount.conftest import Remote
from tests.mount.harness import wait_for
from tests.mount.test_cache_offline import _s3_client, backend_bytes, net, outage
from tests.mount.test_meta import meta_of, write_doc

__all__ = ["_s3_client", "net"]  # fixtures used here

ONLINE_SHOW = ("timeout=2", "poll_interval=1", "probe_timeout=3")


def backend_meta(remote: Remote, main: str, companion: str) -> dict[str, Any]:
    """The writable fields the backend itself holds for ``main`` (S3 user metadata or the sidecar file)."""
    if remote.kind == "s3":
        client = remote.extra["s3_client"]
        try:
            head = client.head_object(Bucket=remote.server.config["bucket"], Key=main)
        except client.exceptions.ClientError:
            return {}
        return {k.removeprefix("omnifs-"): v for k, v in head["Metadata"].items()}
    raw = backend_bytes(remote, companion)
    return {} if raw is None else json.loads(raw)


def test_companion_edits_while_offline_are_stored_when_back(net: Remote, mounter: Any) -> None:
    m = mounter(net, *ONLINE_SHOW)
    docs = m.path / "docs"
    docs.mkdir()
    main, comp = docs / "plan.yaml", docs / "plan.meta.json"
    main.write_text("steps: 1\n")
    wait_for(lambda: backend_bytes(net, "docs/plan.yaml") == b"steps: 1\n", what="upload")
    doc = meta_of(comp)
    doc["tags"] = ["online"]
    write_doc(comp, doc)
    assert meta_of(comp)["tags"] == ["online"]
    with outage(net):
        assert meta_of(comp)["tags"] == ["online"]  # the last rendering, from the cache
        doc = meta_of(comp)
        doc["tags"] = ["offline", "edited"]
        doc["author"] = "alice"
        write_doc(comp, doc)
        assert meta_of(comp)["tags"] == ["offline", "edited"]  # shown at once
        bad = dict(doc, size=12345)
        with pytest.raises(OSError) as ei:
            write_doc(comp, bad)
        assert ei.value.errno == errno.EINVAL
        assert meta_of(comp)["author"] == "alice"
        os.setxattr(main, "user.omnifs.description", b"written offline")  # journaled after the document
    wait_for(
        lambda: "written offline" in json.dumps(backend_meta(net, "docs/plan.yaml", "docs/plan.meta.json")),
        timeout=60,
        what="offline metadata stored on the backend",
    )
    stored = backend_meta(net, "docs/plan.yaml", "docs/plan.meta.json")
    assert "alice" in json.dumps(stored) and "written offline" in json.dumps(stored)
    # The mount shows what the backend holds (rendered live, never from a stale copy).
    wait_for(
        lambda: meta_of(comp)["description"] == "written offline",
        timeout=15,
        what=f"the companion to show the stored metadata (last: {meta_of(comp)})",
    )
    final = meta_of(comp)
    assert final["tags"] == ["offline", "edited"] and final["author"] == "alice"


def test_metadata_set_on_a_file_created_offline_follows_its_upload(net: Remote, mounter: Any) -> None:
    m = mounter(net, *ONLINE_SHOW)
    docs = m.path / "docs"
    docs.mkdir()
    (docs / "seed.txt").write_text("seed")
    wait_for(lambda: backend_bytes(net, "docs/seed.txt") == b"seed", what="upload")
    os.listdir(docs)
    new = docs / "made-offline.txt"
    with outage(net):
        new.write_text("written while away")
        os.setxattr(new, "user.omnifs.author", b"bob")
        os.setxattr(new, "user.omnifs.tags", b'["draft"]')
    # Replayed after the file's upload, not before it (where it would find nothing to change).
    wait_for(
        lambda: "bob" in json.dumps(backend_meta(net, "docs/made-offline.txt", "docs/made-offline.meta.json")),
        timeout=60,
        what="metadata of the offline file stored",
    )
    wait_for(
        lambda: "draft" in json.dumps(backend_meta(net, "docs/made-offline.txt", "docs/made-offline.meta.json")),
        what="both journaled changes applied",
    )
    assert backend_bytes(net, "docs/made-offline.txt") == b"written while away"
    wait_for(lambda: meta_of(docs / "made-offline.meta.json")["author"] == "bob", timeout=15, what="mount shows it")
