"""``omnifs find`` without a mount: resolving REMOTE to its index, output, and a light import path.

Real mounts (MOUNTPOINT targets, a live index) are covered by tests/mount/test_meta.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from omnifs import cli, config, credentials, mount
from omnifs.metaindex import INDEX_FILE, MetaIndex
from tests.mount.harness import REPO, isolated_env

# Modules `omnifs find` must not load: each costs tens of milliseconds of start-up.
HEAVY = ("trio", "pyfuse3", "omnifs.mount", "omnifs.config", "omnifs.credentials", "omnifs.backends", "rich")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A HOME with remote ``docs`` indexed (an index and a ``data`` dir, as a mount leaves them)."""
    h = tmp_path / "home"
    cache = h / ".cache" / "omnifs" / "docs"
    (cache / "data").mkdir(parents=True)
    index = MetaIndex(cache / INDEX_FILE)
    for i in range(6):
        doc = {
            "tags": ["even" if i % 2 == 0 else "odd", "all"],
            "author": "alice" if i < 3 else "bob",
            "custom": {"n": i, "nested": {"deep": [i, "é"]}} if i else {},
            "size": i,
        }
        index.put(f"d/f{i}.yaml", doc)
    index.put("other.txt", {"description": 'quotes " and \\ and ünïcode'})
    index.close()
    return h


def find(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omnifs", "find", *args],
        env=isolated_env(home),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_find_by_remote_name(home: Path) -> None:
    res = find(home, "docs:", "--tag", "even", "--where", "author=alice")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "docs:d/f0.yaml\ndocs:d/f2.yaml\n"
    assert find(home, "docs", "--name", "*.txt").stdout == "docs:other.txt\n"
    assert find(home, "--where", "n=4").stdout == "docs:d/f4.yaml\n"  # every indexed remote
    assert find(home, "docs:", "--tag", "none").stdout == ""


def test_find_json_output(home: Path) -> None:
    res = find(home, "docs:", "--tag", "all", "--json")
    assert res.returncode == 0, res.stderr
    index = MetaIndex(home / ".cache" / "omnifs" / "docs" / INDEX_FILE, readonly=True)
    expected = index.find(tags=["all"])
    index.close()
    for item in expected:
        item["location"] = "docs:" + item["path"]
    assert res.stdout == json.dumps({"results": expected}, indent=2, default=str) + "\n"
    assert find(home, "docs:", "--tag", "none", "--json").stdout == '{\n  "results": []\n}\n'


def test_find_resolves_other_remotes_through_the_config(home: Path) -> None:
    res = find(home, "nosuch:")
    assert res.returncode == 2 and "nosuch" in res.stderr
    res = find(home, "memory:")  # a valid remote that was never mounted: nothing indexed
    assert res.returncode == 0 and res.stdout == ""
    res = find(home, "docs:", "--where", "author")
    assert res.returncode == 2 and "FIELD=VALUE" in res.stderr


def test_find_imports_no_mount_machinery(home: Path) -> None:
    """`omnifs find` stays fast: neither the FUSE/trio stack nor the config and backends are imported."""
    code = (
        "import sys\n"
        "from omnifs.cli import main\n"
        "try:\n"
        "    main(['find', 'docs:', '--tag', 'even', '--json'], prog_name='omnifs')\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], env=isolated_env(home), capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["results"], res.stdout
    assert res.stderr.strip() == "[]"


def test_light_paths_match_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cli keeps its own copies of the XDG rules (omnifs.config is heavy to import); they must agree."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for value in (None, "", "relative/dir", str(tmp_path / "xdg")):
        for var in ("XDG_CACHE_HOME", "XDG_STATE_HOME"):
            if value is None:
                monkeypatch.delenv(var, raising=False)
            else:
                monkeypatch.setenv(var, value)
        assert cli._cache_home() == config.cache_home()
        assert cli._state_home() == config.state_home()


def test_light_mount_check_matches_mount() -> None:
    table = mount.mount_table()
    assert cli._omnifs_mountpoints() == {p for p, fstype in table.items() if fstype == "fuse.omnifs"}


def test_redact_delegates_to_credentials() -> None:
    credentials.register_secret("find-test-secret-7f3a")
    assert cli.redact("key find-test-secret-7f3a end") == f"key {credentials.MASK} end"


class Odd:
    def __str__(self) -> str:
        return "odd <object>"


@pytest.mark.parametrize(
    "rows",
    [
        [],
        [{}],
        [{"a": 1}],
        [
            {
                "path": "d/ä €.yaml",
                "size": 12,
                "modified": None,
                "flag": True,
                "off": False,
                "ratio": 0.1,
                "big": 10**30,
                "nan": math.nan,
                "inf": -math.inf,
                "ctl": 'tab\tnul\x00quote"back\\slash%s%%',
                "custom": {"k": {"deep": [1, [], {}, "x"]}, "e": {}, "l": []},
                "tags": ["a", "b"],
                "blob": b"\x00\xff",
                "obj": Odd(),
            },
            {
                "path": "😀",
                "size": None,
                "modified": "2024-01-01T00:00:00Z",
                "flag": False,
                "off": True,
                "ratio": 1e100,
                "big": -1,
                "nan": 0.0,
                "inf": 3,
                "ctl": "",
                "custom": {},
                "tags": [],
                "blob": None,
                "obj": (1, "t"),
            },
        ],
        [{"a": 1, "b": 2}, {"b": 2, "a": 1}],  # key order differs: json.dumps itself
        [{"a": 1}, {"a": 1, "b": 2}],
        [{1: "int key"}],
        [{"%s": "percent key", "x%%": 1, 'ключ "q"': [1]}],
    ],
)
def test_rows_json_matches_json_dumps(rows: list[dict[Any, Any]]) -> None:
    assert cli._rows_json("results", rows) == json.dumps({"results": rows}, indent=2, default=str)
