"""Config of the wrapper types (failover, mirror): children built from the same file, errors named."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnifs.backends.failover import FailoverBackend
from omnifs.backends.mirror import MirrorBackend
from omnifs.config import build_backend, load_config, resolve_remote
from omnifs.errors import ConfigError

BASE = """
[remotes.a]
type = "memory"

[remotes.b]
type = "memory"

[remotes.c]
type = "memory"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(BASE + text)
    return p


def test_wrappers_build_their_children_recursively(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    cfg = load_config(
        write(
            tmp_path,
            '[remotes.fo]\ntype = "failover"\nremotes = ["a", "b"]\n\n'
            '[remotes.mi]\ntype = "mirror"\nremotes = ["fo", "c"]\npolicy = "quorum"\nquorum = 1\n',
        )
    )
    mi = build_backend(resolve_remote("mi:", cfg))
    assert isinstance(mi, MirrorBackend) and mi.required == 1
    fo = mi.children[0].backend
    assert isinstance(fo, FailoverBackend)
    assert [c.name for c in fo.children] == ["a", "b"]
    assert mi.describe() == "mirror:fo,c"
    assert fo.log_dir == tmp_path / "state" / "omnifs" / "fo" / "replicas"
    default = build_backend(resolve_remote("fo:", cfg))
    assert isinstance(default, FailoverBackend) and default.op_timeout == 1.5


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('[remotes.w]\ntype = "failover"\nremotes = ["a", "nope"]\n', "remotes", "unknown remote 'nope'"),
        ('[remotes.w]\ntype = "failover"\nremotes = []\n', "remotes", "non-empty list"),
        ('[remotes.w]\ntype = "failover"\nremotes = "a"\n', "remotes", "must be list"),
        ('[remotes.w]\ntype = "failover"\nremotes = ["a", "a"]\n', "remotes", "twice"),
        ('[remotes.w]\ntype = "failover"\nremotes = ["a", "w"]\n', "remotes", "cycle"),
        (
            '[remotes.w]\ntype = "failover"\nremotes = ["a", "v"]\n\n[remotes.v]\ntype = "mirror"\nremotes = ["w"]\n',
            "remotes",
            "cycle",
        ),
        ('[remotes.w]\ntype = "mirror"\nremotes = ["a", "b"]\npolicy = "most"\n', "policy", "unknown policy 'most'"),
        (
            '[remotes.w]\ntype = "mirror"\nremotes = ["a", "v"]\n\n'
            '[remotes.v]\ntype = "failover"\nremotes = ["b", "a"]\n',
            "remotes",
            "remote 'a' would be used twice",
        ),
        (
            '[remotes.w]\ntype = "mirror"\nremotes = ["a", "b"]\npolicy = "quorum"\nquorum = 3\n',
            "quorum",
            "quorum 3 is not between 1 and the number of remotes (2)",
        ),
        ('[remotes.w]\ntype = "mirror"\nremotes = ["a", "b"]\nquorum = 1\n', "quorum", "only applies"),
    ],
)
def test_bad_wrapper_config_names_file_line_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    err = ei.value
    assert fragment in str(err), str(err)
    assert str(path) in str(err)
    assert err.key == key
    lines = path.read_text().splitlines()
    assert err.line is not None and lines[err.line - 1].startswith(key), (err.line, lines)


def test_cli_exits_2_on_a_bad_wrapper(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.mount.harness import REPO, isolated_env

    path = write(tmp_path, '[remotes.w]\ntype = "mirror"\nremotes = ["a", "zz"]\n')
    (tmp_path / "mnt").mkdir()
    (tmp_path / "home").mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "omnifs", "mount", "--foreground", "--config", str(path), "w:", str(tmp_path / "mnt")],
        env=isolated_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert res.returncode == 2, res.stderr
    assert f"{path}:" in res.stderr and "unknown remote 'zz'" in res.stderr
