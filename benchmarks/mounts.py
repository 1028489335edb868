"""Start and stop one mount of any tool (omnifs, rclone, s3fs, sshfs) in a subprocess.

Each mount runs in its own process group; :meth:`ProcessMount.stop` unmounts
with ``fusermount3 -u`` (lazy as a fallback) and kills the group if it does not
exit, so nothing survives a failed or interrupted run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.servers import stop_group

REPO = Path(__file__).resolve().parents[1]


class Unsupported(Exception):
    """The tool refused an option of this configuration (the configuration is skipped)."""


def mounted_fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at ``path``, or None."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == real:
                return fields[fields.index("-") + 1]
    return None


def lazy_unmount(path: Path) -> None:
    """Detach whatever FUSE mount is at ``path`` (a no-op when nothing is mounted)."""
    if mounted_fstype(path) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


class Mount:
    """A place the workload runs in; the plain local directory needs no mounting."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def pid(self) -> int | None:
        """Pid of the serving process (None for a plain directory)."""
        return None

    def start(self) -> None:
        """Begin mounting (returns at once)."""

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Return once the mount answers; raises Unsupported or RuntimeError."""

    def stop(self) -> None:
        """Unmount and wait for the serving process to exit; idempotent."""


class ProcessMount(Mount):
    """A FUSE filesystem served by a foreground subprocess."""

    def __init__(
        self,
        path: Path,
        cmd: Sequence[str],
        fstype: str,
        env: dict[str, str],
        logfile: Path,
        unsupported_marker: str | None = None,
        cwd: Path = REPO,
    ) -> None:
        super().__init__(path)
        self.cmd = list(cmd)
        self.fstype = fstype
        self.env = env
        self.logfile = logfile
        self.unsupported_marker = unsupported_marker
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        lazy_unmount(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )

    def log_tail(self, n: int = 2000) -> str:
        """The end of this mount's log."""
        try:
            return self.logfile.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            # Only /proc/self/mountinfo is read here: a stat of a mount whose server hangs would block
            # this process for good. The first access (the timed `ls`, with a time limit) follows.
            if mounted_fstype(self.path) == self.fstype:
                return
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                tail = self.log_tail()
                if self.unsupported_marker and self.unsupported_marker in tail:
                    line = next((ln for ln in tail.splitlines() if self.unsupported_marker in ln), tail)
                    raise Unsupported(line.strip())
                raise RuntimeError(f"{self.cmd[0]} exited with {code}: {tail[-800:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mount did not come up in {timeout:.0f}s: {self.log_tail(800)}")
            time.sleep(0.005)

    def stop(self, timeout: float = 300.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            for _ in range(20):
                if mounted_fstype(self.path) != self.fstype:
                    break
                res = subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
                if res.returncode == 0:
                    break
                time.sleep(0.25)  # busy: a closing file may still be flushing
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        lazy_unmount(self.path)
        if proc is not None:
            stop_group(proc, timeout=5)
        with contextlib.suppress(OSError):
            self.path.rmdir()
