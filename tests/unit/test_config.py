from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from omnifs.config import build_backend, load_config, resolve_remote
from omnifs.errors import ConfigError
from omnifs.mount import parse_mount_options
from tests.mount.harness import REPO, isolated_env


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_valid_config_and_remote_forms(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, f'[remotes.docs]\ntype = "local"\npath = "{tmp_path}"\n\n[remotes.scratch]\ntype = "memory"\n')
    )
    assert set(cfg.remotes) == {"docs", "scratch"}
    r = resolve_remote("docs:sub/dir", cfg)
    assert (r.name, r.remote.type, r.subdir) == ("docs", "local", "sub/dir")
    assert resolve_remote("memory:", cfg).remote.type == "memory"
    inline = resolve_remote(f"local:{tmp_path}", cfg)
    assert inline.remote.options == {"path": str(tmp_path)}
    s3 = resolve_remote("s3://bucket/some/prefix", cfg)
    assert s3.remote.options == {"bucket": "bucket", "prefix": "some/prefix"}
    default = resolve_remote(None, cfg)
    assert default.remote.type == "local" and default.remote.options["path"].endswith("omnifs/default")
    assert build_backend(r).describe().endswith("sub/dir")


@pytest.mark.parametrize(
    ("text", "line", "key", "fragment"),
    [
        ('[remotes.a]\ntype = "local"\npath = "/x"\ncolour = "red"\n', 4, "colour", "unknown key 'colour'"),
        ('[remotes.a]\ntype = "local"\n', 1, "path", "missing required key 'path'"),
        ('[remotes.a]\ntype = "local"\npath = 5\n', 3, "path", "must be str"),
        ('[remotes.a]\ntype = "ftp"\n', 2, "type", "unknown type 'ftp'"),
        ('[remotes.a]\npath = "/x"\n', 1, "type", "missing required key 'type'"),
        ("[remotes.a\n", 1, None, "invalid TOML"),
        ("[other]\nx = 1\n", None, "other", "unknown top-level key"),
    ],
)
def test_bad_config_names_file_line_key(
    tmp_path: Path, text: str, line: int | None, key: str | None, fragment: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    err = ei.value
    assert fragment in str(err)
    assert str(path) in str(err)
    assert err.line == line
    if key:
        assert err.key == key


def test_unknown_remote_and_bad_inline(tmp_path: Path) -> None:
    cfg = load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="unknown remote 'nope'"):
        resolve_remote("nope:", cfg)
    with pytest.raises(ConfigError, match="absolute path"):
        resolve_remote("local:relative/path", cfg)
    with pytest.raises(ConfigError):
        resolve_remote("no-colon", cfg)


def test_mount_options() -> None:
    o = parse_mount_options(["allow_other,ro", "attr_timeout=2.5", "writeback_cache=false"])
    assert {"allow_other", "ro", "default_permissions"} <= o.fuse_flags
    assert o.attr_timeout == 2.5 and not o.writeback_cache and o.read_only
    assert "default_permissions" not in parse_mount_options(["default_permissions=false"]).fuse_flags
    with pytest.raises(ConfigError, match="unknown mount option"):
        parse_mount_options(["max_read=4096"])
    with pytest.raises(ConfigError):
        parse_mount_options(["attr_timeout=soon"])


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omnifs", *args], env=isolated_env(home), capture_output=True, text=True, cwd=REPO
    )


def test_cli_exit_codes_for_bad_input(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    mp = tmp_path / "mnt"
    mp.mkdir()
    bad = write(tmp_path, '[remotes.a]\ntype = "local"\npath = "/x"\nbogus = 1\n')
    res = _cli("mount", "--config", str(bad), "a:", str(mp), home=home)
    assert res.returncode == 2
    assert f"{bad}:4" in res.stderr and "bogus" in res.stderr
    res = _cli("mount", "memory:", str(tmp_path / "does-not-exist"), home=home)
    assert res.returncode == 2 and "does not exist" in res.stderr
    (tmp_path / "file").write_text("x")
    res = _cli("mount", "memory:", str(tmp_path / "file"), home=home)
    assert res.returncode == 2 and "not a directory" in res.stderr
    res = _cli("mount", "-o", "bogus_opt", "memory:", str(mp), home=home)
    assert res.returncode == 2 and "bogus_opt" in res.stderr
    res = _cli("mount", "--config", str(tmp_path / "nope.toml"), "memory:", str(mp), home=home)
    assert res.returncode == 2 and "nope.toml" in res.stderr
    res = _cli("--version", home=home)
    assert res.returncode == 0 and "omnifs" in res.stdout
