"""Fixtures for real-mount tests, parametrized over every backend.

``mnt`` yields a running mount of a fresh, empty remote of one backend kind.
Local and memory need nothing; S3 and SFTP use the real servers started by
``tests/fixtures_s3.py`` and ``tests/fixtures_sftp.py``.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.mount.harness import Mount, isolated_env

if shutil.which("fusermount3") is None or not Path("/dev/fuse").exists():
    pytest.skip("FUSE is not available (need /dev/fuse and fusermount3)", allow_module_level=True)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def write_config(path: Path, remotes: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for name, table in remotes.items():
        lines.append(f"[remotes.{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@dataclass
class Remote:
    """A fresh remote of one backend kind, and how to mount it."""

    kind: str
    spec: str
    env: dict[str, str]
    config: Path | None = None
    backend_root: Path | None = None  # where the data lives on this machine, if it does
    persistent: bool = True  # survives a restart of the mount process
    server: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


BACKEND_KINDS = ["local", "memory"]
if _have("omnifs.backends.s3"):
    BACKEND_KINDS.append("s3")
if _have("omnifs.backends.sftp"):
    BACKEND_KINDS.append("sftp")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def make_remote(kind: str, request: pytest.FixtureRequest, tmp_path: Path, home: Path) -> Remote:
    if kind == "local":
        root = tmp_path / "backend"
        root.mkdir()
        return Remote(kind, f"local:{root}", isolated_env(home), backend_root=root)
    if kind == "memory":
        return Remote(kind, "memory:", isolated_env(home), persistent=False)
    fixture = {"s3": "s3_remote", "sftp": "sftp_remote"}[kind]
    spec = request.getfixturevalue(fixture)
    config = write_config(tmp_path / "config.toml", {spec.name: dict(spec.config)})
    root = getattr(spec, "local_root", None)
    return Remote(
        kind,
        f"{spec.name}:",
        isolated_env(home, spec.env),
        config=config,
        backend_root=Path(root) if root else None,
        server=spec,
    )


@pytest.fixture(params=BACKEND_KINDS)
def remote(request: pytest.FixtureRequest, tmp_path: Path, home: Path) -> Remote:
    return make_remote(request.param, request, tmp_path, home)


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[Any]:
    """Factory starting mounts of a remote; every mount is unmounted at the end."""
    started: list[Mount] = []

    def start(remote: Remote, *options: str, path: Path | None = None) -> Mount:
        m = Mount(
            path=path or tmp_path / "mnt",
            remote=remote.spec,
            env=remote.env,
            log=tmp_path / f"mount-{len(started)}.log",
            options=options,
            config=remote.config,
        )
        started.append(m)
        return m.start()

    yield start
    for m in started:
        try:
            m.unmount()
        except Exception:
            m.kill()


@pytest.fixture
def mnt(remote: Remote, mounter: Any, request: pytest.FixtureRequest) -> Mount:
    """A running mount of a fresh remote (``@pytest.mark.mount_options(...)`` adds ``-o`` options)."""
    marker = request.node.get_closest_marker("mount_options")
    return mounter(remote, *(marker.args if marker is not None else ()))
