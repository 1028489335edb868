"""Start and stop real omnifs mounts in a subprocess for tests.

The filesystem is served by ``python -m omnifs mount --foreground`` in its own
process; tests talk to it only through ordinary system calls and programs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def mounted_fstype(path: Path) -> str | None:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == real:
                return fields[fields.index("-") + 1]
    return None


def isolated_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment whose HOME and XDG dirs live under ``home``."""
    env = dict(os.environ)
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local/share"),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_STATE_HOME=str(home / ".local/state"),
        PYTHONUNBUFFERED="1",
    )
    env.pop("OMNIFS_CONFIG", None)
    env.update(extra or {})
    return env


@dataclass
class Mount:
    """A running foreground mount."""

    path: Path
    remote: str
    env: dict[str, str]
    log: Path
    options: Sequence[str] = ()
    config: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> Mount:
        cmd = [sys.executable, "-m", "omnifs", "-vv", "mount", "--foreground"]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        for opt in self.options:
            cmd += ["-o", opt]
        cmd += [self.remote, str(self.path)]
        try:
            os.lstat(self.path)
        except FileNotFoundError:
            self.path.mkdir(parents=True)
        except OSError:
            pass  # a stale mount (ENOTCONN): the mount command cleans it
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=logf, stderr=logf, cwd=REPO)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if mounted_fstype(self.path) == "fuse.omnifs":
                try:
                    os.stat(self.path)
                    return self
                except OSError:
                    pass  # a stale mount not yet cleaned by the new process
            if self.proc.poll() is not None:
                raise RuntimeError(f"mount exited with {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"mount did not come up:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def unmount(self, timeout: float = 60.0) -> None:
        """Unmount with fusermount3 -u and wait for the server process to exit."""
        if self.proc is None:
            return
        if mounted_fstype(self.path) == "fuse.omnifs":
            res = subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True, text=True)
            if res.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None

    def terminate(self, timeout: float = 60.0) -> int:
        """Stop with SIGTERM (clean unmount with drain); return the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL the server and clean the mountpoint like a crash would leave it."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)

    def rss_peak_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmHWM")


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy (uploads are written back after close)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except FileNotFoundError:  # not there yet (a new file reaches the backend with its first upload)
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)
