"""The measured workload, run inside one mountpoint per pass.

Every step records one number; a failing step records None with a note and
the pass goes on (unless the mount itself died). Nothing here asserts on time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from benchmarks.mounts import Mount
from benchmarks.stores import Store, syncfs

log = logging.getLogger(__name__)
T = TypeVar("T")

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class Metric:
    """One reported figure."""

    key: str
    label: str
    unit: str
    higher_is_better: bool
    target: str = ""


METRICS: tuple[Metric, ...] = (
    Metric("mount_ls", "mount → first `ls`", "ms", False),
    Metric("ls_first", "`ls` {entries} backend-created entries, first", "ms", False, "< 300 ms"),
    Metric("ls_second", "`ls` {entries} entries, second", "ms", False, "≥ 0.5x local"),
    Metric("bp_list", "blueprints: `ls -l` of {entries}", "ms", False, "< 100 ms"),
    Metric("bp_search", "blueprints: search {entries} by name", "ms", False, "< 200 ms"),
    Metric("bp_load", "blueprints: load one (median)", "ms", False, "< 20 ms"),
    Metric("bp_save", "blueprints: save one (median)", "ms", False, "< 50 ms"),
    Metric("editor", "{saves} atomic saves of 20 KiB", "saves/s", True, "≥ 1x local"),
    Metric("small_create", "create {small} x 4 KiB", "files/s", True),
    Metric("small_lsl", "`ls -l` of {small} files", "ms", False),
    Metric("small_stat", "stat {small} files", "files/s", True),
    Metric("small_read", "read {small} files", "files/s", True, "≥ 0.5x local"),
    Metric("small_delete", "delete {small} files", "files/s", True),
    Metric("write_seq", "write {big} MiB, `conv=fsync`", "MiB/s", True, "≥ 0.5x local"),
    Metric("on_backend", "write start → whole file on backend", "s", False),
    Metric("read_backend", "read {big} MiB created on the backend (nothing cached)", "MiB/s", True),
    Metric("read_cold", "read {big} MiB written here, cold (remount, kernel caches dropped)", "MiB/s", True),
    Metric("read_warm", "read {big} MiB warm", "MiB/s", True, "≥ 0.5x local"),
    Metric("rand4k", "random 4 KiB reads, QD1, {fio}s (fio)", "IOPS", True),
)


@dataclass(frozen=True, slots=True)
class Sizes:
    """How big each step is."""

    big_mib: int = 256
    entries: int = 10_000
    small: int = 1_000
    saves: int = 200
    bp_ops: int = 20
    fio_seconds: int = 20
    step_timeout: float = 300.0

    def label(self, metric: Metric) -> str:
        """The metric's label with this run's sizes filled in."""
        return metric.label.format(
            entries=f"{self.entries:,}",
            saves=self.saves,
            small=f"{self.small:,}",
            big=self.big_mib,
            fio=self.fio_seconds,
        )


QUICK = Sizes(big_mib=32, entries=1_000, small=100, saves=20, bp_ops=10, fio_seconds=3, step_timeout=120.0)


class Profiler(Protocol):
    """Hook around each workload phase (py-spy in a profiling pass; a no-op otherwise)."""

    def phase(self, name: str, pid: int | None) -> contextlib.AbstractContextManager[None]:
        """Profile the serving process ``pid`` while the ``with`` body runs."""


class NoProfiler:
    """The default hook: does nothing."""

    @contextlib.contextmanager
    def phase(self, name: str, pid: int | None) -> Iterator[None]:
        yield


def blueprint(i: int) -> bytes:
    """A small YAML workflow file, about 600 bytes."""
    steps = "".join(f"  - name: step-{j}\n    run: tool-{(i + j) % 17} --input data/{i}/{j}.csv\n" for j in range(6))
    return (
        f"# workflow {i}\nschema: 1\nname: workflow-{i:05d}\nowner: user-{i % 50}\ntags: [bench, t{i % 10}]\n"
        f"steps:\n{steps}"
    ).encode()


def blueprint_files(n: int) -> Iterator[tuple[str, bytes]]:
    """The (name, content) pairs of the listing directory."""
    for i in range(n):
        yield f"workflow-{i:05d}.blueprint.yaml", blueprint(i)


def drop_caches(disk: Path) -> bool:
    """Flush the disk under ``disk`` and drop the page, dentry and inode caches; False without permission."""
    syncfs(disk)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


class StepTimeout(Exception):
    """A step ran past its time limit; ``partial`` is the rate over the part that finished, if any."""

    def __init__(self, what: str, partial: float | None = None) -> None:
        super().__init__(what)
        self.partial = partial


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def atomic_save(target: Path, data: bytes) -> None:
    """Save like an editor: write a temp file beside the target, fsync it, rename it over the target."""
    tmp = target.with_name(f".{target.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)


@dataclass
class PassResult:
    """Numbers of one configuration in one pass (None where a step failed or timed out)."""

    values: dict[str, float | None] = field(default_factory=dict)
    timeouts: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Workload:
    """Runs every step for one configuration in one pass."""

    name: str
    make_mount: Callable[[], Mount]
    store: Store
    sizes: Sizes
    listing_dir: str
    work_dir: str
    search_cmd: Callable[[Path], list[str]]
    backend_big: str = ""  # a big_mib file created directly on the backend before the pass ("" = no such step)
    profiler: Profiler = field(default_factory=NoProfiler)
    fio: bool = field(default_factory=lambda: shutil.which("fio") is not None)
    result: PassResult = field(default_factory=PassResult)
    mount: Mount | None = None
    deadline: float = 0.0
    done: int = 0
    partial_s: float = 0.0

    def step(self, key: str, fn: Callable[[], float]) -> None:
        """Run one measured step within ``sizes.step_timeout``; record its number, a timeout or a note."""
        self.deadline = time.monotonic() + self.sizes.step_timeout
        try:
            with self.profiler.phase(key, self.mount.pid if self.mount else None):
                self.result.values[key] = fn()
        except StepTimeout as exc:
            self.result.values[key] = exc.partial
            self.result.timeouts[key] = self.sizes.step_timeout
            log.warning("%s: step %s timed out after %.0fs", self.name, key, self.sizes.step_timeout)
        except Exception as exc:  # a step failure must not end the run
            self.result.values[key] = None
            self.result.notes.append(f"{key}: {type(exc).__name__}: {str(exc)[:300]}")
            log.warning("%s: step %s failed: %s", self.name, key, exc)
            if self.mount is not None and not os.path.isdir(self.mount.path):
                raise

    def sh(self, *cmd: str) -> str:
        """Run a command, killed at the step's deadline."""
        try:
            res = subprocess.run(cmd, capture_output=True, timeout=max(self.deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired as exc:
            raise StepTimeout(cmd[0]) from exc
        if res.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({res.returncode}): {res.stderr.decode(errors='replace')[-500:]}")
        return res.stdout.decode(errors="replace")

    def each(self, items: Iterable[T], fn: Callable[[T], object]) -> list[float]:
        """Apply ``fn`` to every item in turn; return each call's seconds; stop at the step's deadline.

        ``self.done`` counts the calls that completed (also after a timeout).
        """
        times: list[float] = []
        self.done = 0
        for item in items:
            times.append(_timed(lambda item=item: fn(item)))
            self.done += 1
            if time.monotonic() > self.deadline:
                self.partial_s = sum(times)
                raise StepTimeout(getattr(fn, "__name__", "step"))
        return times

    def rate(self, items: list[T], fn: Callable[[T], object]) -> float:
        """Operations per second of ``fn`` over ``items`` (the partial rate if the step times out)."""
        try:
            return len(items) / sum(self.each(items, fn))
        except StepTimeout as exc:
            raise StepTimeout(str(exc), partial=self.done / self.partial_s) from None

    def run(self) -> PassResult:
        """Mount, run every step, unmount; always leaves nothing mounted."""
        try:
            self._run()
        finally:
            if self.mount is not None:
                self.mount.stop()
                self.mount = None
        return self.result

    def _run(self) -> None:
        s = self.sizes
        t0 = time.perf_counter()
        self.mount = self.make_mount()
        self.mount.start()
        self.mount.wait_ready()
        root = self.mount.path
        self.deadline = time.monotonic() + s.step_timeout
        self.sh("ls", str(root))
        self.result.values["mount_ls"] = (time.perf_counter() - t0) * 1000

        listing = str(root / self.listing_dir)
        self.step("ls_first", lambda: _timed(lambda: self.sh("ls", listing)) * 1000)
        self.step("ls_second", lambda: _timed(lambda: self.sh("ls", listing)) * 1000)
        self.step("bp_list", lambda: _timed(lambda: self.sh("ls", "-l", listing)) * 1000)
        self.step("bp_search", lambda: _timed(lambda: self.sh(*self.search_cmd(Path(listing)))) * 1000)
        rng = random.Random(f"{self.listing_dir}-load")
        picks = [Path(listing, f"workflow-{i:05d}.blueprint.yaml") for i in rng.sample(range(s.entries), s.bp_ops)]
        self.step("bp_load", lambda: statistics.median(self.each(picks, Path.read_bytes)) * 1000)
        saved = Path(listing, f"saved-{self.name}.blueprint.yaml")
        self.step(
            "bp_save",
            lambda: statistics.median(self.each(range(s.bp_ops), lambda i: atomic_save(saved, blueprint(i)))) * 1000,
        )

        work = root / self.work_dir
        work.mkdir()
        self.step("editor", lambda: self._editor(work))
        small = work / "small"
        small.mkdir()
        names = [small / f"f{i:05d}.dat" for i in range(s.small)]
        data4k = os.urandom(4096)
        self.step("small_create", lambda: self.rate(names, lambda p: p.write_bytes(data4k)))
        names = names[: self.done]  # after a timeout, go on with the files that exist
        self.step("small_lsl", lambda: _timed(lambda: self.sh("ls", "-l", str(small))) * 1000)
        self.step("small_stat", lambda: self.rate(names, os.stat))
        self.step("small_read", lambda: self.rate(names, Path.read_bytes))
        self.step("small_delete", lambda: self.rate(names, os.unlink))

        big = work / "big.bin"
        t_write = time.perf_counter()
        self.step("write_seq", lambda: s.big_mib / _timed(lambda: self._dd(f"of={big}", "if=/dev/zero", "conv=fsync")))
        if self.result.values.get("write_seq") is not None:
            self.step("on_backend", lambda: self._wait_on_backend(f"{self.work_dir}/big.bin", t_write))

        self.mount.stop()
        if not drop_caches(Path(self.store.disk)):
            self.result.notes.append("read_cold: caches not dropped (needs root)")
        self.mount = self.make_mount()
        self.mount.start()
        self.mount.wait_ready()
        if self.backend_big:
            # Never seen by this mount (nor by its disk cache): every byte comes from the backend.
            elsewhere = root / self.backend_big
            self.step("read_backend", lambda: s.big_mib / _timed(lambda: self._dd(f"if={elsewhere}", "of=/dev/null")))
        self.step("read_cold", lambda: s.big_mib / _timed(lambda: self._dd(f"if={big}", "of=/dev/null")))
        self.step("read_warm", lambda: s.big_mib / _timed(lambda: self._dd(f"if={big}", "of=/dev/null")))
        if self.fio:
            self.step("rand4k", lambda: self._fio(big))

    def _dd(self, *args: str) -> None:
        self.sh("dd", "bs=1M", f"count={self.sizes.big_mib}", "status=none", *args)

    def _editor(self, work: Path) -> float:
        target = work / "settings.yaml"
        body = b"".join(b"key-%05d: value %05d with some padding text\n" % (i, i) for i in range(440))[:20480]
        target.write_bytes(body)
        return self.rate(list(range(self.sizes.saves)), lambda i: atomic_save(target, body[:-8] + b"%08d" % i))

    def _wait_on_backend(self, rel: str, since: float) -> float:
        """Seconds from ``since`` until the backend holds the whole file, polled from outside the mount.

        With write-back (omnifs ``write_back``, rclone ``--vfs-write-back``) the upload starts only some
        seconds after ``close``, so this polls (a HEAD or ``stat`` every 50 ms) until the object has its
        full size, stopped at the step's deadline. Every tool measured here makes a file appear whole at
        once (S3 PUT or multipart completion, omnifs's temp file + rename on local and SFTP backends) or
        writes it in order (sshfs), so the full size means the whole content is there.
        """
        want = self.sizes.big_mib * MiB
        while self.store.size(rel) != want:
            if time.monotonic() > self.deadline:
                raise StepTimeout("on_backend")
            time.sleep(0.05)
        return time.perf_counter() - since

    def _fio(self, path: Path) -> float:
        out = self.sh(
            "fio",
            "--name=rand4k",
            f"--filename={path}",
            "--readonly",
            "--rw=randread",
            "--bs=4k",
            "--iodepth=1",
            "--ioengine=psync",
            f"--size={self.sizes.big_mib}m",
            f"--runtime={self.sizes.fio_seconds}",
            "--time_based",
            "--invalidate=1",
            "--randrepeat=1",
            "--output-format=json",
        )
        return float(json.loads(out[out.index("{") :])["jobs"][0]["read"]["iops"])
