"""Bad remotes fail at mount time with a one-line error naming the remote, and write nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_s3 import CREDENTIALS_ENV, MotoServer, free_port
from tests.fixtures_sftp import generate_key
from tests.mount.conftest import write_config
from tests.mount.harness import REPO, isolated_env, mounted_fstype


def mount_fails(tmp_path: Path, remotes: dict[str, dict[str, Any]], name: str, env: dict[str, str]) -> str:
    """Try a foreground mount of ``name``; assert it fails cleanly and return its error line."""
    config = write_config(tmp_path / "config.toml", remotes)
    mp = tmp_path / "mnt"
    mp.mkdir(exist_ok=True)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "omnifs",
            "mount",
            "--foreground",
            "-o",
            "probe_timeout=20",
            "--config",
            str(config),
            f"{name}:",
            str(mp),
        ],
        env=isolated_env(home, env),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert res.returncode != 0
    assert mounted_fstype(mp) is None
    errors = [line for line in res.stderr.splitlines() if line.startswith("omnifs: error:")]
    assert len(errors) == 1, res.stderr
    assert f"remote {name!r}" in errors[0]
    return errors[0]


def test_s3_unknown_bucket(tmp_path: Path, s3_server: MotoServer, s3_client: Any) -> None:
    line = mount_fails(
        tmp_path,
        {
            "nobucket": {
                "type": "s3",
                "bucket": "no-such-bucket-x",
                "endpoint_url": s3_server.endpoint_url,
                "region": "us-east-1",
            }
        },
        "nobucket",
        CREDENTIALS_ENV,
    )
    assert "no-such-bucket-x" in line
    names = [b["Name"] for b in s3_client.list_buckets()["Buckets"]]
    assert "no-such-bucket-x" not in names


def test_s3_unreachable_endpoint(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    line = mount_fails(
        tmp_path,
        {"gone": {"type": "s3", "bucket": "b", "endpoint_url": f"http://127.0.0.1:{port}", "region": "us-east-1"}},
        "gone",
        CREDENTIALS_ENV,
    )
    assert f"127.0.0.1:{port}" in line


def test_s3_wrong_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")  # this moto checks credentials
    server = MotoServer()
    server.start()
    try:
        line = mount_fails(
            tmp_path,
            {"badcreds": {"type": "s3", "bucket": "b", "endpoint_url": server.endpoint_url, "region": "us-east-1"}},
            "badcreds",
            {**CREDENTIALS_ENV, "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG"},
        )
        assert "denied" in line.lower() or "credentials" in line.lower() or "access key" in line.lower()
        assert "AKIAWRONG" not in line or "testing" not in line  # never the secret
    finally:
        server.close()


def test_sftp_unknown_host_key(tmp_path: Path, sftp_remote: Any) -> None:
    empty_known_hosts = tmp_path / "known_hosts"
    empty_known_hosts.write_text("")
    config = dict(sftp_remote.config, known_hosts=str(empty_known_hosts))
    line = mount_fails(tmp_path, {"unknownkey": config}, "unknownkey", {})
    assert "host key" in line.lower() and str(sftp_remote.config["port"]) in line
    assert list(sftp_remote.local_root.iterdir()) == []
    assert empty_known_hosts.read_text() == ""  # strict policy never learns a key


def test_sftp_wrong_client_key(tmp_path: Path, sftp_remote: Any) -> None:
    other = generate_key(tmp_path / "other_key")
    config = dict(sftp_remote.config, key_file=str(other))
    line = mount_fails(tmp_path, {"wrongkey": config}, "wrongkey", {})
    assert "auth" in line.lower() or "denied" in line.lower()
    assert list(sftp_remote.local_root.iterdir()) == []


def test_sftp_unreachable(tmp_path: Path, sftp_remote: Any) -> None:
    port = free_port()
    config = dict(sftp_remote.config, port=port)
    line = mount_fails(tmp_path, {"noserver": config}, "noserver", {})
    assert f"127.0.0.1:{port}" in line
