"""Sample the serving process with py-spy during each workload phase and summarise where CPU goes.

Only used in a separate profiling pass, never in the measured passes (sampling
perturbs timings). Idle threads are not sampled, so shares are of CPU time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")

# Leaf frames where a thread waits (epoll, socket reads, idle trio workers, locks). py-spy's
# --nonblocking idle detection still samples some of them; they are counted apart as "waiting".
WAITS = {
    "EpollIOManager.get_events",
    "SocketIO.readinto",
    "WorkerThread._work",
    "poll_wait_for_socket.<locals>.do_poll",
    "Condition.wait",
    "Event.wait",
    "Lock.acquire",
    "Semaphore.acquire",
    "SimpleQueue.get",
    "Queue.get",
    "Thread._wait_for_tstate_lock",
}


def find_py_spy() -> str | None:
    """Path of py-spy (in the venv or on PATH), or None."""
    venv = Path(sys.executable).parent / "py-spy"
    return str(venv) if venv.exists() else shutil.which("py-spy")


def _cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class PhaseProfile:
    """Samples and CPU use of one phase."""

    name: str
    wall: float
    cpu: float
    samples: int
    waiting: int = 0
    by_package: Counter[str] = field(default_factory=Counter)
    leaf: Counter[str] = field(default_factory=Counter)
    omnifs_inclusive: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)


def _package(path: str) -> str:
    """The top-level package (or stdlib module) a frame's file belongs to.

    py-spy prints paths relative to their sys.path entry (``omnifs/vfs.py``,
    ``botocore/auth.py``, ``ssl.py``); absolute paths are reduced the same way.
    """
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif "/lib/python3" in path:
        path = path.split("/lib/python3", 1)[1].split("/", 1)[-1]
    elif "/omnifs/" in path:
        path = "omnifs/" + path.rsplit("/omnifs/", 1)[1]
    return path.split("/", 1)[0].removesuffix(".py") or "?"


# Frames every sample of the trio thread passes through; they say nothing about the phase.
_BASE = {("<module>", "__main__.py"), ("mount", "cli.py"), ("serve", "mount.py"), ("main", "mount.py")}


def _is_omnifs(path: str) -> bool:
    return path.startswith("omnifs/") or "/omnifs/" in path


def parse_raw(text: str, name: str, wall: float, cpu: float) -> PhaseProfile:
    """Summarise py-spy's raw (collapsed-stack) output."""
    prof = PhaseProfile(name, wall, cpu, 0)
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [f for f in stack.split(";") if not f.startswith("thread (") and not f.startswith("process ")]
        if not frames or any("sitecustomize" in f for f in frames):
            continue  # empty, or the benchmark's own request counter
        parsed = [(m.group("func"), m.group("file")) if (m := FRAME.match(f)) else (f, "") for f in frames]
        func, path = parsed[-1]
        if func in WAITS:
            prof.waiting += count
            continue
        prof.samples += count
        prof.leaf[f"{func} ({Path(path).name})"] += count
        prof.by_package[_package(path)] += count
        seen = {f"{fn} ({Path(p).name})" for fn, p in parsed if _is_omnifs(p) and (fn, Path(p).name) not in _BASE}
        for key in seen:
            prof.omnifs_inclusive[key] += count
    return prof


class PySpyProfiler:
    """Record each phase of the serving process with ``py-spy record``."""

    def __init__(self, py_spy: str, outdir: Path, rate: int = 250) -> None:
        self.py_spy = py_spy
        self.outdir = outdir
        self.counts_file = outdir / "requests.json"
        self.rate = rate
        self.phases: list[PhaseProfile] = []
        outdir.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def phase(self, name: str, pid: int | None) -> Iterator[None]:
        if pid is None:
            yield
            return
        out = self.outdir / f"{name}.txt"
        proc = subprocess.Popen(
            [
                self.py_spy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(self.rate),
                "--format",
                "raw",
                "--output",
                str(out),
                "--nonblocking",
                "--threads",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(0.3)  # let py-spy attach (and the request counter flush)
        req0 = self._requests()
        cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
        try:
            yield
        finally:
            wall = time.perf_counter() - t0
            cpu = 0.0
            with contextlib.suppress(OSError):
                cpu = _cpu_seconds(pid) - cpu0
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            text = out.read_text(errors="replace") if out.exists() else ""
            prof = parse_raw(text, name, wall, cpu)
            prof.requests = self._requests() - req0
            self.phases.append(prof)
            summary = {"wall": wall, "cpu": cpu, "requests": dict(prof.requests)}
            (self.outdir / f"{name}.json").write_text(json.dumps(summary))

    def _requests(self) -> Counter[str]:
        """Backend requests counted so far by the probe in the mount process."""
        time.sleep(0.25)
        try:
            return Counter(json.loads(self.counts_file.read_text()))
        except (OSError, ValueError):
            return Counter()

    def markdown(self, config: str) -> str:
        """A section describing where the serving process spent its CPU, phase by phase."""
        lines = [
            f"Profile of `{config}` (py-spy {self.rate} Hz; one extra pass, not part of the timings). "
            "CPU is the serving process's user+system time during the phase (100% = one core). Backend "
            "requests are counted inside the process. Package and frame shares are of the samples in which "
            "a thread was running Python code; samples parked in epoll, socket reads, locks or idle "
            "workers are left out.",
            "",
            "| phase | wall s | CPU % | backend requests | top packages (share of samples) "
            "| top omnifs frames (inclusive) |",
            "|---|---:|---:|---|---|---|",
        ]
        for p in self.phases:
            total = max(p.samples, 1)
            pkgs = ", ".join(f"{k} {v * 100 // total}%" for k, v in p.by_package.most_common(4))
            frames = ", ".join(f"`{k}` {v * 100 // total}%" for k, v in p.omnifs_inclusive.most_common(5))
            reqs = ", ".join(f"{k} {v:,}" for k, v in p.requests.most_common(4))
            cpu_pct = 100 * p.cpu / p.wall if p.wall > 0 else 0
            lines.append(
                f"| {p.name} | {p.wall:.2f} | {cpu_pct:.0f} | {reqs or '—'} | {pkgs or '—'} | {frames or '—'} |"
            )
        return "\n".join(lines)
