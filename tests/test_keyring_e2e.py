"""Credentials against a real Secret Service (gnome-keyring in its own D-Bus session) and a credential-checking S3.

The S3 server is moto with authentication switched on after setup, so only an
access key created through its IAM API works: a mount that succeeds proves the
secret travelled keyring -> omnifs -> boto3.  The scenario: store the key with
`omnifs config add --secret-from-stdin`, check, mount, write and read, status,
show, rotate the key, mount again with the new one, remove the remote (its
keyring entries go too), then search every file under the test's HOME/XDG tree
and every captured output for the secrets.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_s3 import REGION, MotoServer, new_bucket_name
from tests.mount.harness import REPO, isolated_env, mounted_fstype, wait_for

TOOLS = ("dbus-run-session", "gnome-keyring-daemon", "secret-tool")
KEYRING_PASSWORD = "keyring-login-password"
FUSE = shutil.which("fusermount3") is not None and Path("/dev/fuse").exists()


def _body(s3: Any, bucket: str, key: str) -> bytes | None:
    """The object's content, or None while it does not exist yet (uploads are written back)."""
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]
    except s3.exceptions.NoSuchKey:
        return None


def _missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    """HOME/XDG under tmp_path; no AWS credentials, no OMNIFS_* variables, no session bus."""
    home = tmp_path / "home"
    home.mkdir()
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = isolated_env(home, {"XDG_RUNTIME_DIR": str(runtime)})
    for key in list(env):
        if key.startswith(("AWS_", "OMNIFS_")) and key != "AWS_CA_BUNDLE":
            del env[key]
    for key in ("DBUS_SESSION_BUS_ADDRESS", "PYTHON_KEYRING_BACKEND", "GNOME_KEYRING_CONTROL"):
        env.pop(key, None)
    env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
    )
    return env


@contextlib.contextmanager
def secret_service(env: dict[str, str], log: Path, *, unlock: bool = True) -> Iterator[dict[str, str]]:
    """Run gnome-keyring-daemon in a private D-Bus session; yield ``env`` plus its bus address."""
    missing = _missing_tools()
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/setup installs them)")
    start = (
        'printf %s "$KEYRING_PASSWORD" | gnome-keyring-daemon --unlock --components=secrets >/dev/null'
        if unlock
        else "gnome-keyring-daemon --start --components=secrets >/dev/null"
    )
    script = f'{start} && echo "$DBUS_SESSION_BUS_ADDRESS" && exec sleep 3600'
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            ["dbus-run-session", "--", "sh", "-c", script],
            env={**env, "KEYRING_PASSWORD": KEYRING_PASSWORD},
            stdout=subprocess.PIPE,
            stderr=logf,
            start_new_session=True,
        )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().decode().strip()
        assert address, f"the keyring session did not start:\n{log.read_text(errors='replace')}"
        yield {**env, "DBUS_SESSION_BUS_ADDRESS": address}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass
class AuthS3:
    server: MotoServer
    bucket: str
    user: str
    key_id: str
    secret: str

    def client(self, service: str, key_id: str, secret: str) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            service,
            endpoint_url=self.server.endpoint_url,
            region_name=REGION,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )


@pytest.fixture
def auth_s3() -> Iterator[AuthS3]:
    """A moto server that, after setup, accepts only an IAM access key of user 'omnifs-e2e'."""
    pytest.importorskip("moto.server")
    server = MotoServer()
    server.start()
    try:
        setup = AuthS3(server, new_bucket_name(), "omnifs-e2e", "", "")
        iam = setup.client("iam", "testing", "testing")
        iam.create_user(UserName=setup.user)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName=setup.user, PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=setup.user)["AccessKey"]
        setup.key_id, setup.secret = key["AccessKeyId"], key["SecretAccessKey"]
        setup.client("s3", "testing", "testing").create_bucket(Bucket=setup.bucket)
        req = urllib.request.Request(
            f"{server.endpoint_url}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(req, timeout=10):
            pass  # from now on every request must be signed with a known key
        yield setup
    finally:
        server.close()


def omnifs(*args: str, env: dict[str, str], input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omnifs", *args],
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def secret_tool_lookup(env: dict[str, str], user: str) -> str | None:
    res = subprocess.run(
        ["secret-tool", "lookup", "service", "omnifs", "username", user],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return res.stdout if res.returncode == 0 and res.stdout else None


def files_containing(root: Path, needles: list[str]) -> list[str]:
    """Every file under ``root`` (following no symlinks) whose bytes contain one of ``needles``."""
    hits = []
    encoded = [n.encode() for n in needles]
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {n.decode()[:4]}…" for n in encoded if n in data]
    return hits


def s3_options(s3: AuthS3) -> list[str]:
    return [
        "--type",
        "s3",
        "--bucket",
        s3.bucket,
        "--endpoint-url",
        s3.server.endpoint_url,
        "--region",
        REGION,
        "--addressing-style",
        "path",
    ]


SECRETS = ["--secret-from-stdin", "access_key_id", "--secret-from-stdin", "secret_access_key"]


@pytest.mark.skipif(not FUSE, reason="FUSE is not available (need /dev/fuse and fusermount3)")
def test_store_mount_rotate_remove(tmp_path: Path, base_env: dict[str, str], auth_s3: AuthS3) -> None:
    outputs: list[str] = []
    secrets = [auth_s3.key_id, auth_s3.secret]
    mp = tmp_path / "mnt"
    mp.mkdir()

    with secret_service(base_env, tmp_path / "keyring.log") as env:

        def run(*args: str, input: str | None = None, code: int = 0) -> subprocess.CompletedProcess[str]:
            res = omnifs(*args, env=env, input=input)
            outputs.append(res.stdout + res.stderr)
            assert res.returncode == code, f"omnifs {' '.join(args)}: {res.stdout}{res.stderr}"
            return res

        run("config", "add", "creds", *s3_options(auth_s3), *SECRETS, input=f"{auth_s3.key_id}\n{auth_s3.secret}\n")
        assert secret_tool_lookup(env, "creds.access_key_id") == auth_s3.key_id
        assert secret_tool_lookup(env, "creds.secret_access_key") == auth_s3.secret
        config_text = (Path(env["XDG_CONFIG_HOME"]) / "omnifs/config.toml").read_text()
        assert 'secrets = ["access_key_id", "secret_access_key"]' in config_text

        check = run("config", "check", "creds", "--write")
        assert "ok     connect" in check.stdout and "ok     write" in check.stdout

        run("mount", "creds:", str(mp))
        try:
            (mp / "report.txt").write_text("quarterly numbers")
            s3 = auth_s3.client("s3", auth_s3.key_id, auth_s3.secret)
            wait_for(lambda: _body(s3, auth_s3.bucket, "report.txt") == b"quarterly numbers", what="upload")
            assert (mp / "report.txt").read_text() == "quarterly numbers"

            status = json.loads(run("status", "--json").stdout)
            assert [m["mountpoint"] for m in status["mounts"]] == [str(mp)]
            assert "creds:" in run("status").stdout
            shown = run("config", "show", "creds").stdout
            assert "access_key_id" in shown and "(keyring)" in shown
            shown_json = json.loads(run("config", "show", "creds", "--json").stdout)
            assert shown_json["secrets"]["secret_access_key"]["set"] is True
            run("config", "list")

            # Rotate: a new key replaces the old one in the keyring; the old key is then revoked.
            iam = auth_s3.client("iam", auth_s3.key_id, auth_s3.secret)
            new = iam.create_access_key(UserName=auth_s3.user)["AccessKey"]
            secrets += [new["AccessKeyId"], new["SecretAccessKey"]]
            run("config", "add", "creds", *SECRETS, input=f"{new['AccessKeyId']}\n{new['SecretAccessKey']}\n")
            assert secret_tool_lookup(env, "creds.secret_access_key") == new["SecretAccessKey"]
            iam.delete_access_key(UserName=auth_s3.user, AccessKeyId=auth_s3.key_id)
        finally:
            run("unmount", str(mp))
        assert mounted_fstype(mp) is None

        # The old key is dead, so this mount works only with the rotated secret.
        run("mount", "creds:", str(mp))
        try:
            assert (mp / "report.txt").read_text() == "quarterly numbers"
            (mp / "second.txt").write_text("after rotation")
        finally:
            run("unmount", str(mp))
        s3 = auth_s3.client("s3", new["AccessKeyId"], new["SecretAccessKey"])
        assert s3.get_object(Bucket=auth_s3.bucket, Key="second.txt")["Body"].read() == b"after rotation"

        run("config", "remove", "creds")
        assert secret_tool_lookup(env, "creds.access_key_id") is None
        assert secret_tool_lookup(env, "creds.secret_access_key") is None
        run("mount", "creds:", str(mp), code=2)  # the remote is gone

    assert files_containing(tmp_path, secrets) == []
    leaked = [out for out in outputs for s in secrets if s in out]
    assert leaked == []


def test_without_a_usable_keyring(tmp_path: Path, base_env: dict[str, str], auth_s3: AuthS3) -> None:
    """No session bus: a one-line error names the variable; the variables then work; a locked keyring says so."""
    config = Path(base_env["XDG_CONFIG_HOME"]) / "omnifs/config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(
        "[remotes.creds]\n"
        'type = "s3"\n'
        f'bucket = "{auth_s3.bucket}"\n'
        f'endpoint_url = "{auth_s3.server.endpoint_url}"\n'
        f'region = "{REGION}"\n'
        'addressing_style = "path"\n'
        'secrets = ["access_key_id", "secret_access_key"]\n'
    )
    mp = tmp_path / "mnt"
    mp.mkdir()
    res = omnifs("mount", "--foreground", "creds:", str(mp), env=base_env)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("omnifs: error: ")
    assert "OMNIFS_CREDS_ACCESS_KEY_ID" in res.stderr and "Secret Service" in res.stderr

    env = {
        **base_env,
        "OMNIFS_CREDS_ACCESS_KEY_ID": auth_s3.key_id,
        "OMNIFS_CREDS_SECRET_ACCESS_KEY": auth_s3.secret,
    }
    res = omnifs("config", "check", "creds", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "access_key_id (env)" in res.stdout and auth_s3.secret not in res.stdout + res.stderr
    res = omnifs("config", "check", "creds", env={**env, "OMNIFS_CREDS_SECRET_ACCESS_KEY": "wrong-secret-value"})
    assert res.returncode == 1 and "wrong-secret-value" not in res.stdout + res.stderr

    # A keyring that exists but is locked: the error says to unlock it.
    log = tmp_path / "keyring.log"
    with secret_service(base_env, log) as unlocked:
        res = omnifs(
            "config",
            "add",
            "other",
            "--type",
            "sftp",
            "--host",
            "h",
            "--secret-from-stdin",
            "password",
            env=unlocked,
            input="pw-in-keyring\n",
        )
        assert res.returncode == 0, res.stderr
    with secret_service(base_env, log, unlock=False) as locked:
        res = omnifs("config", "check", "creds", env=locked)
        assert res.returncode == 1
        assert "unlock" in res.stdout and "OMNIFS_CREDS_ACCESS_KEY_ID" in res.stdout
