"""The configurations under test, as data, and how each one is mounted.

Adding a configuration is one line in :data:`CONFIGS`, e.g. omnifs over S3
with an extra ``-o`` option. A configuration whose tool is not installed, or
whose options the tool refuses (omnifs exits 2 with "unknown mount option"),
is skipped with a note instead of failing the run.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from benchmarks.mounts import REPO, Mount, ProcessMount
from benchmarks.servers import HOST, S3Server, SSHServer

Tool = Literal["plain", "omnifs", "rclone", "s3fs", "sshfs"]
BackendKind = Literal["local", "s3", "sftp"]


@dataclass(frozen=True, slots=True)
class Config:
    """One configuration: a tool mounting a backend with some options."""

    name: str
    tool: Tool
    backend: BackendKind
    options: tuple[str, ...] = ()
    note: str = ""

    def describe(self) -> str:
        """One line for the report: tool, backend, options and note."""
        opts = " ".join(f"-o {o}" if self.tool == "omnifs" else o for o in self.options)
        parts = [
            f"{self.tool} on {self.backend}" if self.tool != "plain" else "",
            f"`{opts}`" if opts else "",
            self.note,
        ]
        return "; ".join(p for p in parts if p)


BASELINE = "local"

CONFIGS: tuple[Config, ...] = (
    Config(BASELINE, "plain", "local", note="plain directory on the same disk (the baseline)"),
    Config("omnifs-local", "omnifs", "local", note="default options"),
    # omnifs's defaults are cache_mode=full and write_back=5s, so `omnifs-s3` is also "omnifs-s3-cache-full"
    # (running both would measure the same thing twice).
    Config("omnifs-s3", "omnifs", "s3", note="default options: cache_mode=full, write_back=5s"),
    Config("omnifs-s3-cache-off", "omnifs", "s3", ("cache_mode=off",), note="no data cache (metadata still cached)"),
    Config("omnifs-sftp", "omnifs", "sftp", note="default options"),
    Config("rclone-s3-full", "rclone", "s3", ("--vfs-cache-mode", "full"), note="uploads 5 s after close"),
    Config("rclone-s3-off", "rclone", "s3", ("--vfs-cache-mode", "off")),
    Config("s3fs", "s3fs", "s3"),
    Config("sshfs", "sshfs", "sftp"),
)

FSTYPES: dict[Tool, str] = {
    "omnifs": "fuse.omnifs",
    "rclone": "fuse.rclone",
    "s3fs": "fuse.s3fs",
    "sshfs": "fuse.sshfs",
}


def tool_missing(tool: Tool) -> str | None:
    """Why ``tool`` cannot run here, or None when it is installed."""
    binary = {"plain": None, "omnifs": None, "rclone": "rclone", "s3fs": "s3fs", "sshfs": "sshfs"}[tool]
    if binary is not None and shutil.which(binary) is None:
        return f"{binary} is not installed (apt-get install {binary})"
    return None


@dataclass
class Backends:
    """The running backends of one benchmark run and the files describing them."""

    workdir: Path
    local_root: Path
    s3: S3Server | None
    bucket: str
    sshd: SSHServer | None
    sftp_root: Path
    omnifs_src: Path | None = None  # run omnifs from this source tree instead of the checkout
    files: dict[str, Path] = field(default_factory=dict)

    def write_client_files(self) -> None:
        """Write the omnifs config, rclone config and s3fs password file for these backends."""
        cfg = [f'[remotes.bench-local]\ntype = "local"\npath = "{self.local_root}"\n']
        if self.s3 is not None:
            cfg.append(
                f'[remotes.bench-s3]\ntype = "s3"\nbucket = "{self.bucket}"\n'
                f'endpoint_url = "{self.s3.endpoint_url}"\nregion = "{self.s3.region}"\naddressing_style = "path"\n'
            )
            rclone = self.workdir / "rclone.conf"
            rclone.write_text(
                "[bench]\ntype = s3\nprovider = Other\nenv_auth = false\n"
                f"access_key_id = {self.s3.access_key}\nsecret_access_key = {self.s3.secret_key}\n"
                f"endpoint = {self.s3.endpoint_url}\nregion = {self.s3.region}\nforce_path_style = true\n"
            )
            self.files["rclone"] = rclone
            passwd = self.workdir / "s3fs.passwd"
            passwd.write_text(f"{self.s3.access_key}:{self.s3.secret_key}\n")
            passwd.chmod(0o600)
            self.files["s3fs"] = passwd
        if self.sshd is not None:
            cfg.append(
                f'[remotes.bench-sftp]\ntype = "sftp"\nhost = "{HOST}"\nport = {self.sshd.port}\n'
                f'user = "{self.sshd.user}"\npath = "{self.sftp_root}"\nkey_file = "{self.sshd.client_key}"\n'
                f'known_hosts = "{self.sshd.known_hosts}"\n'
            )
        omnifs = self.workdir / "omnifs.toml"
        omnifs.write_text("\n".join(cfg))
        self.files["omnifs"] = omnifs

    def available(self, backend: BackendKind) -> str | None:
        """Why ``backend`` is unavailable in this run, or None."""
        if backend == "s3" and self.s3 is None:
            return "no S3 server (node/s3rver and moto both unavailable)"
        if backend == "sftp" and self.sshd is None:
            return "no sshd (apt-get install openssh-server)"
        return None


def private_dirs(cfg: Config, b: Backends, tag: str) -> list[Path]:
    """The tool's own state of one pass: omnifs's HOME (disk cache, staging), rclone's cache directory.

    Every pass (and the profiling pass) starts with them empty, so no pass reads what an earlier one
    cached; within a pass they survive the remount before the cold read, as they would for a user.
    """
    return [b.workdir / "home" / cfg.name / tag, b.workdir / "cache" / cfg.name / tag]


def mount_factory(cfg: Config, b: Backends, counts_file: Path | None = None, tag: str = "run") -> Callable[[], Mount]:
    """Return a function building a fresh, not yet started :class:`Mount` for ``cfg``.

    ``tag`` names the pass; the tool's disk cache and state live in :func:`private_dirs` of that tag.
    With ``counts_file`` an omnifs mount counts its backend requests into that file (``probe/sitecustomize.py``).
    """
    if cfg.tool == "plain":
        return lambda: Mount(b.local_root)
    home, cache_dir = private_dirs(cfg, b, tag)
    mnt = b.workdir / "mnt" / cfg.name
    logfile = b.workdir / "logs" / f"{cfg.name}.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("OMNIFS_CONFIG", None)
    marker: str | None = None
    cwd = REPO
    if cfg.tool == "omnifs":
        env.update(
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / ".config"),
            XDG_CACHE_HOME=str(home / ".cache"),
            XDG_DATA_HOME=str(home / ".local/share"),
            XDG_STATE_HOME=str(home / ".local/state"),
        )
        if b.s3 is not None:
            env.update(b.s3.credentials_env)
        pythonpath = []
        if counts_file is not None:
            pythonpath.append(str(Path(__file__).parent / "probe"))
            env["OMNIFS_BENCH_COUNTS"] = str(counts_file)
        if b.omnifs_src is not None:
            pythonpath.append(str(b.omnifs_src))
            cwd = b.omnifs_src
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        cmd = [sys.executable, "-m", "omnifs", "mount", "--foreground", "--config", str(b.files["omnifs"])]
        for opt in cfg.options:
            cmd += ["-o", opt]
        cmd += [f"bench-{cfg.backend}:", str(mnt)]
        marker = "unknown mount option"
    elif cfg.tool == "rclone":
        assert cfg.backend == "s3", "rclone is configured for S3 only"
        # rclone reads AWS_CA_BUNDLE and then refuses plain-http endpoints; it needs no AWS_* here.
        env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
        cmd = [
            "rclone",
            "mount",
            f"bench:{b.bucket}",
            str(mnt),
            "--config",
            str(b.files["rclone"]),
            "--cache-dir",
            str(cache_dir),
            "--log-file",
            str(logfile),
            *cfg.options,
        ]
    elif cfg.tool == "s3fs":
        assert b.s3 is not None
        cmd = [
            "s3fs",
            b.bucket,
            str(mnt),
            "-f",
            "-o",
            f"url={b.s3.endpoint_url},use_path_request_style,endpoint={b.s3.region}",
            "-o",
            f"passwd_file={b.files['s3fs']}",
            *cfg.options,
        ]
    else:
        assert b.sshd is not None
        s = b.sshd
        cmd = [
            "sshfs",
            f"{s.user}@{HOST}:{b.sftp_root}",
            str(mnt),
            "-f",
            "-p",
            str(s.port),
            "-o",
            f"IdentityFile={s.client_key},UserKnownHostsFile={s.known_hosts},StrictHostKeyChecking=yes,BatchMode=yes",
            *cfg.options,
        ]
    fstype = FSTYPES[cfg.tool]
    return lambda: ProcessMount(mnt, cmd, fstype, env, logfile, marker, cwd)
