"""Failover and mirror through real mounts, on real servers with real faults (SIGSTOP).

Each test mounts a wrapper remote from a config file that also defines its
children, writes through the mount, freezes one S3 server (a moto server of
its own, so the session server is never frozen), and checks the children
directly: the standby or the other mirrors with boto3 / the SFTP server's
files, the frozen one by content hash after it is thawed and repaired.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.backends.replica_helpers import bucket_digests, dir_digests
from tests.fixtures_s3 import CREDENTIALS_ENV, MotoServer, new_bucket_remote
from tests.mount.conftest import Remote, write_config
from tests.mount.harness import REPO, isolated_env, wait_for

pytest.importorskip("moto.server")
pytest.importorskip("paramiko")


@pytest.fixture
def frozen_safe(spare_moto: MotoServer) -> Iterator[MotoServer]:
    """The spare server (``spare_moto``, from tests/fixtures_s3.py), running and thawed again whatever the test does."""
    spare_moto.start()
    try:
        yield spare_moto
    finally:
        spare_moto.thaw()


def content(i: int) -> bytes:
    return hashlib.sha256(b"file %d" % i).digest() * (200 + 37 * i)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_file(path: Path, data: bytes) -> float:
    """Write and close a file through the mount; return how long it took."""
    started = time.monotonic()
    with open(path, "wb") as f:
        f.write(data)
    return time.monotonic() - started


def files_of(client: Any, bucket: str) -> dict[str, str]:
    return {k: v for k, v in bucket_digests(client, bucket).items() if not k.endswith("/")}


def status_backends(mnt: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    res = subprocess.run(
        [sys.executable, "-m", "omnifs", "status", "--json", str(mnt)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["mounts"][0]["backends"]  # type: ignore[no-any-return]


def failover_remote(tmp_path: Path, home: Path, server: MotoServer, sftp_remote: Any) -> tuple[Remote, str]:
    spec = new_bucket_remote(server)
    config = write_config(
        tmp_path / "config.toml",
        {
            "prim": dict(spec.config),
            "sec": dict(sftp_remote.config),
            "fo": {"type": "failover", "remotes": ["prim", "sec"]},
        },
    )
    return Remote("failover", "fo:", isolated_env(home, CREDENTIALS_ENV), config=config), spec.config["bucket"]


def test_failover_s3_primary_frozen_mid_writing(
    tmp_path: Path, home: Path, mounter: Any, frozen_safe: MotoServer, sftp_remote: Any
) -> None:
    remote, bucket = failover_remote(tmp_path, home, frozen_safe, sftp_remote)
    standby = sftp_remote.local_root
    m = mounter(remote, "write_back=0", "meta_files=hide")
    docs = m.path / "docs"
    docs.mkdir()
    want: dict[str, str] = {}
    for i in range(5):
        write_file(docs / f"f{i}", content(i))
        want[f"docs/f{i}"] = digest(content(i))
    wait_for(lambda: dir_digests(standby) == want, 30, "the SFTP standby to catch up")
    mid = open(docs / "mid", "wb")  # a file open across the freeze
    mid.write(content(99)[:1000])
    time.sleep(0.5)
    frozen_safe.freeze()
    mid.write(content(99)[1000:])
    started = time.monotonic()
    mid.close()
    times = [time.monotonic() - started]
    for i in range(5, 20):
        times.append(write_file(docs / f"f{i}", content(i)))
        want[f"docs/f{i}"] = digest(content(i))
    # Every close() returned, and what was written after the freeze is on the standby.
    assert max(times) < 10, times
    assert {k: v for k, v in dir_digests(standby).items() if k != "docs/mid"} == want
    want["docs/mid"] = digest(content(99))
    assert sorted(p.name for p in docs.iterdir()) == sorted([*(f"f{i}" for i in range(20)), "mid"])

    def primary_down() -> bool:  # the status record is refreshed every 2 s
        children = {b["name"]: b for b in status_backends(m.path, remote.env)}
        return children["prim"]["online"] is False and children["prim"]["pending_repairs"] >= 15

    wait_for(primary_down, 10, "status to show the primary down with repairs pending")
    frozen_safe.thaw()
    client = frozen_safe.client()
    started = time.monotonic()
    wait_for(lambda: files_of(client, bucket) == want, 90, "the S3 primary to be repaired")
    repaired_in = time.monotonic() - started
    wait_for(lambda: status_backends(m.path, remote.env)[1]["pending_repairs"] == 0, 30, "repairs to drain")
    # The mount converged: reads come from the primary again, with the same content.
    for i in range(20):
        assert (docs / f"f{i}").read_bytes() == content(i)
    assert (docs / "mid").read_bytes() == content(99)
    wait_for(lambda: dir_digests(standby) == want, 30, "the standby to hold the same")
    print(
        f"close across the freeze: {times[0]:.2f} s, next write {times[1]:.2f} s; "
        f"primary repaired {repaired_in:.1f} s after the thaw"
    )


def test_mirror_quorum_2_of_3_one_frozen(
    tmp_path: Path,
    home: Path,
    mounter: Any,
    frozen_safe: MotoServer,
    s3_remote: Any,
    s3_server: MotoServer,
    sftp_remote: Any,
) -> None:
    spec = new_bucket_remote(frozen_safe)
    config = write_config(
        tmp_path / "config.toml",
        {
            "s3a": dict(spec.config),
            "s3b": dict(s3_remote.config),
            "nas": dict(sftp_remote.config),
            "mi": {"type": "mirror", "remotes": ["s3a", "s3b", "nas"], "policy": "quorum", "quorum": 2},
        },
    )
    remote = Remote("mirror", "mi:", isolated_env(home, CREDENTIALS_ENV), config=config)
    m = mounter(remote, "write_back=0", "meta_files=hide")
    want: dict[str, str] = {}
    for i in range(4):
        write_file(m.path / f"f{i}", content(i))
        want[f"f{i}"] = digest(content(i))
    frozen_safe.freeze()
    times = []
    for i in range(4, 16):
        times.append(write_file(m.path / f"f{i}", content(i)))
        want[f"f{i}"] = digest(content(i))
    (m.path / "f0").unlink()
    del want["f0"]
    assert max(times) < 10, times
    # Acknowledged by the two others, which hold everything now.
    assert files_of(s3_server.client(), s3_remote.config["bucket"]) == want
    assert dir_digests(sftp_remote.local_root) == want
    wait_for(lambda: status_backends(m.path, remote.env)[1]["online"] is False, 10, "status to show s3a down")
    frozen_safe.thaw()
    wait_for(lambda: files_of(frozen_safe.client(), spec.config["bucket"]) == want, 90, "the frozen S3 to be repaired")
    wait_for(lambda: sum(b.get("pending_repairs", 0) for b in status_backends(m.path, remote.env)) == 0, 30, "drain")


def test_repairs_survive_kill_9_of_the_mount(
    tmp_path: Path, home: Path, mounter: Any, frozen_safe: MotoServer, sftp_remote: Any
) -> None:
    remote, bucket = failover_remote(tmp_path, home, frozen_safe, sftp_remote)
    m = mounter(remote, "write_back=0", "meta_files=hide")
    (m.path / "a").mkdir()
    wait_for(lambda: (sftp_remote.local_root / "a").is_dir(), 30, "the standby to catch up")
    frozen_safe.freeze()
    want = {}
    for i in range(8):
        write_file(m.path / "a" / f"k{i}", content(i))
        want[f"a/k{i}"] = digest(content(i))
    assert dir_digests(sftp_remote.local_root) == want
    log = home / ".local/state/omnifs/fo/replicas/log.jsonl"
    assert log.stat().st_size > 0
    m.kill()  # SIGKILL with repairs pending for the frozen primary
    frozen_safe.thaw()
    client = frozen_safe.client()
    time.sleep(1)
    assert files_of(client, bucket) != want  # nothing repaired the primary while no mount ran
    m2 = mounter(remote, "write_back=0", "meta_files=hide")
    wait_for(lambda: files_of(client, bucket) == want, 90, "the log to repair the primary after the restart")
    for i in range(8):
        assert (m2.path / "a" / f"k{i}").read_bytes() == content(i)
