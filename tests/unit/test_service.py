"""The systemd user unit and its installer, `omnifs status` rendering, and journal-friendly logging.

systemctl is always a stub on PATH here, so no test can touch a real user manager.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from omnifs import credentials, service
from omnifs.cli import LogFormatter, _stderr_is_journal, active_mounts, render_status
from tests.mount.harness import REPO, isolated_env

SHIPPED = REPO / "systemd" / "omnifs@.service"


def _stub_systemctl(bin_dir: Path, reachable: bool) -> Path:
    """A fake systemctl that logs its arguments; show-environment tells whether a manager is 'reachable'."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = bin_dir / "systemctl.log"
    stub = bin_dir / "systemctl"
    stub.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        f'if [ "$2" = show-environment ]; then exit {0 if reachable else 1}; fi\n'
        "exit 0\n"
    )
    stub.chmod(0o755)
    return log


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    e = isolated_env(home, {"XDG_RUNTIME_DIR": str(runtime)})
    e["PATH"] = f"{tmp_path / 'bin'}:{e.get('PATH', '/usr/bin:/bin')}"
    cfg = home / ".config/omnifs"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text('[remotes.photos]\ntype = "memory"\n\n[remotes.docs]\ntype = "memory"\n')
    return e


def omnifs(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omnifs", *args], env=env, capture_output=True, text=True, timeout=60, cwd=REPO
    )


def verify(unit: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is missing (scripts/setup installs systemd)")
    return subprocess.run([exe, "verify", "--user", str(unit)], env=env, capture_output=True, text=True, timeout=60)


def test_shipped_unit_is_the_generated_template() -> None:
    assert SHIPPED.read_text() == service.unit_text(service.SHIPPED_EXEC, service.SHIPPED_ENV_DIR)
    text = SHIPPED.read_text()
    for line in (
        "Type=notify",
        "Restart=on-failure",
        f"TimeoutStopSec={service.STOP_TIMEOUT_S}",
        "ExecStart=/usr/bin/env omnifs -v mount --foreground $OMNIFS_MOUNT_ARGS %i: ${OMNIFS_MOUNTPOINT}",
        "WantedBy=default.target",
    ):
        assert line in text.splitlines()


def test_shipped_unit_verifies_cleanly(env: dict[str, str]) -> None:
    res = verify(SHIPPED, env)
    assert (res.returncode, res.stderr) == (0, ""), res.stderr


def test_install_with_a_user_manager(env: dict[str, str], tmp_path: Path) -> None:
    log = _stub_systemctl(tmp_path / "bin", reachable=True)
    mp = tmp_path / "My Photos"
    res = omnifs("service", "install", "photos", str(mp), "--enable", "-o", "ro", env=env)
    assert res.returncode == 0, res.stderr
    unit_dir = Path(env["XDG_CONFIG_HOME"]) / "systemd/user"
    unit = unit_dir / "omnifs@.service"
    env_file = unit_dir / "omnifs-photos.env"
    assert mp.is_dir()
    text = unit.read_text()
    exec_line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    exe = exec_line.split("=", 1)[1].split()[0]
    assert os.path.isabs(exe) and os.access(exe, os.X_OK)
    assert f"EnvironmentFile={unit_dir}/omnifs-%i.env" in text
    assert env_file.read_text().splitlines()[1:] == [f'OMNIFS_MOUNTPOINT="{mp}"', 'OMNIFS_MOUNT_ARGS="-o ro"']
    assert log.read_text().splitlines() == [
        "--user show-environment",
        "--user daemon-reload",
        "--user enable --now omnifs@photos.service",
    ]
    assert "enabled and started omnifs@photos.service" in res.stdout
    ver = verify(unit, env)
    assert (ver.returncode, ver.stderr) == (0, ""), ver.stderr

    # A second instance shares the template; uninstalling one keeps it for the other.
    assert omnifs("service", "install", "docs", env=env).returncode == 0
    assert (unit_dir / "omnifs-docs.env").exists()
    assert Path(env["HOME"], "OmniFS-docs").is_dir()
    res = omnifs("service", "uninstall", "photos", env=env)
    assert res.returncode == 0, res.stderr
    assert "--user disable --now omnifs@photos.service" in log.read_text()
    assert not env_file.exists() and unit.exists()
    assert omnifs("service", "uninstall", "docs", env=env).returncode == 0
    assert not unit.exists()


def test_install_without_a_user_manager_prints_the_commands(env: dict[str, str], tmp_path: Path) -> None:
    log = _stub_systemctl(tmp_path / "bin", reachable=False)
    res = omnifs("service", "install", "photos", str(tmp_path / "mnt"), "--enable", env=env)
    assert res.returncode == 0, res.stderr
    assert "systemctl --user daemon-reload && systemctl --user enable --now omnifs@photos.service" in res.stdout
    assert log.read_text().splitlines() == ["--user show-environment"]  # nothing else was attempted
    unit = Path(env["XDG_CONFIG_HOME"]) / "systemd/user/omnifs@.service"
    ver = verify(unit, env)
    assert (ver.returncode, ver.stderr) == (0, ""), ver.stderr


def test_install_bad_input(env: dict[str, str], tmp_path: Path) -> None:
    _stub_systemctl(tmp_path / "bin", reachable=False)
    res = omnifs("service", "install", "nope", str(tmp_path / "mnt"), env=env)
    assert res.returncode == 2 and "unknown remote 'nope'" in res.stderr
    res = omnifs("service", "install", "photos", str(tmp_path / 'say "cheese"'), env=env)
    assert res.returncode == 2 and "OMNIFS_MOUNTPOINT" in res.stderr
    res = omnifs("service", "install", "photos", str(tmp_path / "m"), "-o", "bogus_option", env=env)
    assert res.returncode == 2 and "bogus_option" in res.stderr
    assert not (Path(env["XDG_CONFIG_HOME"]) / "systemd/user/omnifs@.service").exists()


def test_unit_escaping() -> None:
    text = service.unit_text(["/opt/my tools/omnifs", "50%$"], "/cfg/100%%")
    assert 'ExecStart="/opt/my tools/omnifs" 50%%$$ -v mount' in text
    assert "EnvironmentFile=/cfg/100%%/omnifs-%i.env" in text


# --- status ------------------------------------------------------------------------------


def test_status_ignores_dead_and_unmounted_records(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    records = tmp_path / "mounts"
    records.mkdir()
    (records / "a.json").write_text(json.dumps({"pid": dead.pid, "mountpoint": "/", "source": "x:"}))
    (records / "b.json").write_text(json.dumps({"pid": os.getpid(), "mountpoint": str(tmp_path), "source": "y:"}))
    (records / "c.json").write_text("{not json")
    (records / "d.json").write_text(json.dumps(["unexpected"]))
    assert active_mounts(records) == []
    assert active_mounts(tmp_path / "missing") == []


def test_status_renders_whatever_is_present() -> None:
    from rich.console import Console

    mounts = [
        {"pid": 12, "mountpoint": "/mnt/a", "source": "a:"},  # only the basic keys
        {
            "pid": 34,
            "mountpoint": "/mnt/b",
            "source": "b:",
            "backends": [
                {"name": "primary", "type": "s3", "online": False, "last_error": "timed out"},
                {"name": "mirror", "type": "sftp", "online": True, "last_error": None},
            ],
            "cache": {"used_bytes": 3 << 30, "max_bytes": 10 << 30, "files": 7},
            "journal": {"pending": 2, "failed": 0},
            "future_key": {"nested": {"deep": 1}},
        },
    ]
    console = Console(width=200, record=True)
    console.print(render_status(mounts))
    text = console.export_text()
    for fragment in ("/mnt/a", "/mnt/b", "primary (s3) OFFLINE: timed out", "mirror (sftp) online", "3.0 GiB"):
        assert fragment in text
    assert "pending 2" in text and "files 7" in text


def test_status_cli_without_mounts(env: dict[str, str], tmp_path: Path) -> None:
    res = omnifs("status", env=env)
    assert res.returncode == 0 and "no active omnifs mounts" in res.stdout
    res = omnifs("status", "--json", env=env)
    assert res.returncode == 0 and json.loads(res.stdout) == {"mounts": []}
    res = omnifs("status", "-q", str(tmp_path), env=env)
    assert res.returncode == 1 and res.stdout == ""


# --- logging -------------------------------------------------------------------------------


def _record(level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("omnifs.test", level, __file__, 1, msg, None, None)


def test_journal_log_lines_carry_priorities_and_no_secrets() -> None:
    credentials.register_secret("super-secret-42")
    fmt = LogFormatter(journal=True)
    assert fmt.format(_record(logging.ERROR, "failed\nsecond line")) == "<3>omnifs.test: failed\n<3>second line"
    assert fmt.format(_record(logging.INFO, "key super-secret-42")) == "<6>omnifs.test: key ********"
    plain = LogFormatter(journal=False).format(_record(logging.WARNING, "x super-secret-42"))
    assert "WARNING omnifs.test: x ********" in plain


def test_journal_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "stderr", "w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setattr(sys, "stderr", f)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert _stderr_is_journal()
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not _stderr_is_journal()
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not _stderr_is_journal()


def test_env_file_is_private(env: dict[str, str], tmp_path: Path) -> None:
    _stub_systemctl(tmp_path / "bin", reachable=False)
    assert omnifs("service", "install", "photos", str(tmp_path / "m"), env=env).returncode == 0
    env_file = Path(env["XDG_CONFIG_HOME"]) / "systemd/user/omnifs-photos.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
