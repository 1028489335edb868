"""Credentials: naming, env-over-keyring precedence, one-line errors, redaction, and the config commands.

The keyring here is ``tests.fake_keyring.FileKeyring`` (no D-Bus); the real
Secret Service is exercised by ``tests/test_keyring_e2e.py``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import keyring
import pytest
from click.testing import CliRunner
from keyring.backends import fail

from omnifs import backends, credentials
from omnifs.backends.base import Option
from omnifs.backends.memory import MemoryBackend
from omnifs.cli import main
from omnifs.config import ResolvedRemote, build_backend, load_config, save_remote
from omnifs.credentials import KeyringUnavailable, MissingSecret, env_var, resolve
from omnifs.errors import ConfigError
from tests import fake_keyring
from tests.mount.harness import REPO, isolated_env

SECRET = "s3cr3t-Value-9f8e7d"


@pytest.fixture
def fake_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Use the file-backed fake keyring in this process; yield its file."""
    path = tmp_path / "fake-keyring.json"
    monkeypatch.setenv(fake_keyring.ENV, str(path))
    previous = keyring.get_keyring()
    keyring.set_keyring(fake_keyring.FileKeyring())
    try:
        yield path
    finally:
        keyring.set_keyring(previous)


@pytest.fixture
def no_keyring() -> Iterator[None]:
    previous = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    try:
        yield
    finally:
        keyring.set_keyring(previous)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point HOME and XDG at a temp dir for in-process CLI runs."""
    h = tmp_path / "home"
    h.mkdir()
    for key, value in isolated_env(h).items():
        if key in ("HOME",) or key.startswith("XDG_"):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("OMNIFS_CONFIG", raising=False)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # main() installs a redacting hook
    for var in [k for k in os.environ if k.startswith("OMNIFS_") and k != fake_keyring.ENV]:
        monkeypatch.delenv(var)
    return h


def cli(*args: str, input: str | None = None) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)
    return res.exit_code, res.output


OPTS = {
    "user": Option(str),
    "password": Option(str, secret=True),
    "passphrase": Option(str, secret=True),
}


def test_env_var_names() -> None:
    assert env_var("my-s3", "secret_access_key") == "OMNIFS_MY_S3_SECRET_ACCESS_KEY"
    assert env_var("a.b", "password") == "OMNIFS_A_B_PASSWORD"
    assert credentials.username("my-s3", "password") == "my-s3.password"


def test_env_wins_and_keyring_is_not_touched(monkeypatch: pytest.MonkeyPatch, no_keyring: None) -> None:
    monkeypatch.setenv("OMNIFS_BOX_PASSWORD", SECRET)
    # The fail keyring raises on any use: resolving proves the keyring was not consulted.
    assert resolve("box", OPTS, stored=["password"]) == {"password": SECRET}
    assert credentials.source_of("box", "password", ["password"]) == "env"


def test_env_wins_over_a_stored_secret(monkeypatch: pytest.MonkeyPatch, fake_store: Path) -> None:
    credentials.keyring_set("box", "password", "from-keyring")
    monkeypatch.setenv("OMNIFS_BOX_PASSWORD", "from-env")
    assert resolve("box", OPTS, ["password"]) == {"password": "from-env"}
    monkeypatch.delenv("OMNIFS_BOX_PASSWORD")
    assert resolve("box", OPTS, ["password"]) == {"password": "from-keyring"}


def test_optional_secret_not_listed_is_left_out(monkeypatch: pytest.MonkeyPatch, no_keyring: None) -> None:
    monkeypatch.delenv("OMNIFS_BOX_PASSWORD", raising=False)
    assert resolve("box", OPTS, stored=[]) == {}


def test_unusable_keyring_names_the_variable(monkeypatch: pytest.MonkeyPatch, no_keyring: None) -> None:
    monkeypatch.delenv("OMNIFS_BOX_PASSWORD", raising=False)
    with pytest.raises(KeyringUnavailable) as ei:
        resolve("box", OPTS, stored=["password"])
    msg = str(ei.value)
    assert "\n" not in msg and ei.value.exit_code == 1
    assert "OMNIFS_BOX_PASSWORD" in msg and "'box'" in msg and "'password'" in msg


def test_locked_keyring_says_how_to_unlock(monkeypatch: pytest.MonkeyPatch, fake_store: Path) -> None:
    monkeypatch.delenv("OMNIFS_BOX_PASSWORD", raising=False)
    fake_store.write_text("LOCKED")
    with pytest.raises(KeyringUnavailable) as ei:
        resolve("box", OPTS, stored=["password"])
    msg = str(ei.value)
    assert "\n" not in msg and "unlock" in msg and "OMNIFS_BOX_PASSWORD" in msg


def test_missing_entry_is_bad_input(monkeypatch: pytest.MonkeyPatch, fake_store: Path) -> None:
    monkeypatch.delenv("OMNIFS_BOX_PASSWORD", raising=False)
    with pytest.raises(MissingSecret) as ei:
        resolve("box", OPTS, stored=["password"])
    assert ei.value.exit_code == 2
    assert "omnifs config add box --secret-from-stdin password" in str(ei.value)


def test_redact_masks_registered_values() -> None:
    credentials.register_secret("hunter2-xyz")
    assert credentials.redact("login with hunter2-xyz failed") == "login with ******** failed"
    credentials.register_secret("ab")  # too short to redact safely
    assert credentials.redact("tab") == "tab"


def test_secret_in_config_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[remotes.box]\ntype = "sftp"\nhost = "h"\npassword = "x"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert ei.value.line == 4 and ei.value.key == "password"
    assert "OMNIFS_BOX_PASSWORD" in str(ei.value) and "--secret-from-stdin password" in str(ei.value)


def test_secrets_list_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[remotes.box]\ntype = "sftp"\nhost = "h"\nsecrets = ["host"]\n')
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert ei.value.line == 4 and ei.value.key == "secrets" and "not a secret" in str(ei.value)
    path.write_text('[remotes.box]\ntype = "sftp"\nhost = "h"\nsecrets = ["password"]\n')
    assert load_config(path).remotes["box"].secrets == ("password",)
    assert "secrets" not in load_config(path).remotes["box"].options


def test_save_remote_keeps_comments_and_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('# my remotes\n[remotes.docs]  # the docs\ntype = "local"\npath = "/srv"  # here\n')
    save_remote(path, "box", "sftp", {"host": "h", "port": 2222}, ["password"])
    text = path.read_text()
    assert "# my remotes" in text and "# the docs" in text and "# here" in text
    cfg = load_config(path)
    assert cfg.remotes["box"].options == {"host": "h", "port": 2222}
    assert cfg.remotes["box"].secrets == ("password",)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]  # no temp files left
    with pytest.raises(ConfigError):
        save_remote(path, "bad", "sftp", {"port": 1})  # missing host: refused, file untouched
    assert path.read_text() == text


class TokenBackend(MemoryBackend):
    """A memory backend that needs a secret token and remembers the one it was given."""

    type_name = "tokenmem"
    options = {"label": Option(str), "token": Option(str, secret=True), "extra": Option(str, secret=True)}
    built: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, name: str, label: str = "", token: str | None = None, extra: str | None = None) -> None:
        super().__init__(name)
        TokenBackend.built.append({"label": label, "token": token, "extra": extra})


def test_build_backend_passes_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_store: Path) -> None:
    """Secrets listed in the config come from env or keyring into the backend's constructor; others are omitted."""
    monkeypatch.setitem(backends._REGISTRY, "tokenmem", f"{__name__}:TokenBackend")
    monkeypatch.delenv("OMNIFS_TOK_TOKEN", raising=False)
    monkeypatch.delenv("OMNIFS_TOK_EXTRA", raising=False)
    path = tmp_path / "c.toml"
    save_remote(path, "tok", "tokenmem", {"label": "x"}, ["token"])
    resolved = ResolvedRemote("tok", load_config(path).remotes["tok"])
    with pytest.raises(MissingSecret):
        build_backend(resolved)
    credentials.keyring_set("tok", "token", SECRET)
    TokenBackend.built.clear()
    build_backend(resolved)
    assert TokenBackend.built == [{"label": "x", "token": SECRET, "extra": None}]
    monkeypatch.setenv("OMNIFS_TOK_EXTRA", "from-env")
    build_backend(resolved)
    assert TokenBackend.built[-1] == {"label": "x", "token": SECRET, "extra": "from-env"}


def test_build_backend_gets_the_passphrase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_keyring: None) -> None:
    """An encrypted SFTP key loads only if the passphrase from the environment reaches the backend."""
    pytest.importorskip("paramiko")
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", SECRET, "-f", str(key)], check=True)
    path = tmp_path / "c.toml"
    save_remote(path, "box", "sftp", {"host": "127.0.0.1", "key_file": str(key)}, ["passphrase"])
    resolved = ResolvedRemote("box", load_config(path).remotes["box"])
    monkeypatch.delenv("OMNIFS_BOX_PASSPHRASE", raising=False)
    with pytest.raises(KeyringUnavailable, match="OMNIFS_BOX_PASSPHRASE"):
        build_backend(resolved)
    monkeypatch.setenv("OMNIFS_BOX_PASSPHRASE", "wrong passphrase")
    with pytest.raises(ConfigError):
        build_backend(resolved)
    monkeypatch.setenv("OMNIFS_BOX_PASSPHRASE", SECRET)
    assert build_backend(resolved).describe().startswith("sftp://")


# --- config commands (in process, fake keyring) --------------------------------------------


def test_config_add_show_list_remove(home: Path, fake_store: Path) -> None:
    code, out = cli(
        "config",
        "add",
        "box",
        "--type",
        "sftp",
        "--host",
        "example.org",
        "--port=2222",
        "--secret-from-stdin",
        "password",
        input=SECRET + "\n",
    )
    assert code == 0, out
    assert SECRET not in out
    config_file = home / ".config/omnifs/config.toml"
    assert SECRET not in config_file.read_text()
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    assert json.loads(fake_store.read_text()) == {"omnifs\0box.password": SECRET}

    code, out = cli("config", "show", "box")
    assert code == 0 and SECRET not in out
    assert "password" in out and credentials.MASK in out and "(keyring)" in out and "2222" in out
    code, out = cli("config", "show", "box", "--json")
    data = json.loads(out)
    assert data["options"]["host"] == "example.org" and data["secrets"]["password"]["set"] is True
    assert data["secrets"]["passphrase"]["source"] is None and SECRET not in out
    code, out = cli("config", "list", "--json")
    assert json.loads(out)["remotes"] == [
        {"name": "box", "type": "sftp", "where": "sftp://example.org:2222", "secrets": ["password"]}
    ]
    code, out = cli("config", "list")
    assert code == 0 and "box" in out and "sftp" in out

    # Update: only what is given changes; the secret is rotated in place.
    code, out = cli("config", "add", "box", "--user", "me", "--secret-from-stdin", "password", input="rotated-pw\n")
    assert code == 0, out
    rc = load_config(config_file).remotes["box"]
    assert rc.options == {"host": "example.org", "port": 2222, "user": "me"} and rc.secrets == ("password",)
    assert json.loads(fake_store.read_text()) == {"omnifs\0box.password": "rotated-pw"}

    code, out = cli("config", "add", "box", "--unset", "password", "--unset", "user")
    assert code == 0, out
    rc = load_config(config_file).remotes["box"]
    assert rc.secrets == () and "user" not in rc.options
    assert json.loads(fake_store.read_text()) == {}

    cli("config", "add", "box", "--secret-from-stdin", "password", input="again\n")
    code, out = cli("config", "remove", "box")
    assert code == 0 and "password" in out
    assert json.loads(fake_store.read_text()) == {}
    assert "box" not in load_config(config_file).remotes


def test_config_add_bad_input_exits_2(home: Path, fake_store: Path) -> None:
    code, out = cli("config", "add", "box", "--type", "sftp", "--host", "h", "--password", SECRET)
    assert code == 2 and "--secret-from-stdin password" in out and SECRET not in out
    code, out = cli("config", "add", "box", "--type", "sftp", "--host", "h", "--colour", "red")
    assert code == 2 and "colour" in out
    code, out = cli("config", "add", "box", "--type", "sftp", "--host", "h", "--port", "many")
    assert code == 2 and "port" in out and "int" in out
    code, out = cli("config", "add", "box", "--type", "sftp")  # no TTY: no prompt for host
    assert code == 2 and "host" in out
    code, out = cli("config", "add", "box", "--host", "h")
    assert code == 2 and "--type" in out
    code, out = cli("config", "add", "bad name", "--type", "memory")
    assert code == 2 and "invalid remote name" in out
    code, out = cli("config", "add", "box", "--type", "sftp", "--host", "h", "--secret-from-stdin", "host")
    assert code == 2 and "not a secret" in out
    code, out = cli("config", "show", "nope")
    assert code == 2 and "unknown remote 'nope'" in out
    assert not (home / ".config/omnifs/config.toml").exists()


def test_config_add_without_keyring_fails_before_writing(home: Path, no_keyring: None) -> None:
    code, out = cli(
        "config", "add", "box", "--type", "sftp", "--host", "h", "--secret-from-stdin", "password", input="pw1234\n"
    )
    assert code == 1 and "OMNIFS_BOX_PASSWORD" in out and len(out.strip().splitlines()) == 1
    assert not (home / ".config/omnifs/config.toml").exists()


def test_remove_with_unreachable_keyring_needs_force(home: Path, fake_store: Path) -> None:
    cli("config", "add", "box", "--type", "sftp", "--host", "h", "--secret-from-stdin", "password", input="pw1234\n")
    fake_store.write_text("LOCKED")
    code, out = cli("config", "remove", "box")
    assert code == 1 and "unlock" in out and "--force" in out
    assert "box" in load_config(home / ".config/omnifs/config.toml").remotes
    code, out = cli("config", "remove", "box", "--force")
    assert code == 0 and "warning" in out
    assert "box" not in load_config(home / ".config/omnifs/config.toml").remotes


def test_config_check(home: Path, tmp_path: Path, fake_store: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a").write_text("x")
    cli("config", "add", "docs", "--type", "local", "--path", str(data))
    code, out = cli("config", "check", "docs", "--write")
    assert code == 0, out
    assert "connect" in out and "1 entry" in out and "write" in out
    assert sorted(os.listdir(data)) == ["a"]  # the probe file is gone
    code, out = cli("config", "add", "gone", "--type", "local", "--path", str(tmp_path / "missing"))
    code, out = cli("config", "check", "gone", "--json")
    result = json.loads(out)
    assert code == 1 and not result["ok"] and result["steps"][-1]["step"] == "connect"


def test_interactive_add_on_a_tty(tmp_path: Path) -> None:
    """With a terminal on stdin, `omnifs config add NAME` asks for type, options and secrets (hidden)."""
    import pty
    import select

    home = tmp_path / "home"
    home.mkdir()
    store = tmp_path / "fake-keyring.json"
    env = isolated_env(
        home,
        {fake_keyring.ENV: str(store), "PYTHON_KEYRING_BACKEND": fake_keyring.BACKEND, "PYTHONPATH": str(REPO)},
    )
    pid, fd = pty.fork()
    if pid == 0:  # child: becomes the CLI on the pty
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "-m", "omnifs", "config", "add", "box"], env)
    transcript = b""

    def expect(text: bytes, timeout: float = 20) -> None:
        nonlocal transcript
        import time

        deadline = time.monotonic() + timeout
        while text not in transcript:
            left = deadline - time.monotonic()
            assert left > 0, transcript.decode(errors="replace")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    chunk = b""
                assert chunk, transcript.decode(errors="replace")
                transcript += chunk

    answers = [
        (b"type", "sftp"),
        (b"host", "example.org"),
        (b"port", ""),
        (b"user", "me"),
        (b"path", ""),
        (b"key_file", ""),
        (b"known_hosts", ""),
        (b"host_key_policy", ""),
        (b"connect_timeout", ""),
        (b"op_timeout", ""),
        (b"password (hidden", SECRET),
        (b"passphrase (hidden", ""),
    ]
    for prompt, answer in answers:
        expect(prompt)
        transcript = transcript[transcript.index(prompt) + len(prompt) :]
        os.write(fd, answer.encode() + b"\r")
    expect(b"added remote 'box'")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert SECRET.encode() not in transcript  # hidden input is not echoed
    rc = load_config(home / ".config/omnifs/config.toml").remotes["box"]
    assert rc.options == {"host": "example.org", "user": "me"} and rc.secrets == ("password",)
    assert json.loads(store.read_text()) == {"omnifs\0box.password": SECRET}
