"""What the replica wrappers (``failover``, ``mirror``) share: child health, bounded calls, the repair log.

A :class:`ReplicaSet` is a ``Backend`` over an ordered list of child backends.
Every change goes through the same steps:

1. pick the *targets*: children whose circuit is closed and that have no
   pending (unrepaired) operation on a related path (the path itself, an
   ancestor or a descendant);
2. append an entry ``(seq, op, paths, src)`` to the :class:`RepairLog` and
   fsync it, *before* any child sees the change; ``src`` (the first target)
   is the child the others will be repaired from, and the entry is pending
   on every other child;
3. run the change on the targets (failover: the first one only; mirror: all
   of them), each call bounded by a timeout; children that acknowledged are
   marked done (lazily, without fsync: a lost "done" only repeats an
   idempotent copy).  If the source did not answer, the entry is re-pointed
   (``settle``) at the child that did, or at nobody, before the next attempt.

So failover standbys are copied to in the background, like a mirror remote
that was down.  A background task replays each child's pending entries in
order (unrelated paths up to four at a time), by making
the child's state of each path equal to that of a healthy child that has no
pending entry on it (copy of the current content, attributes and xattrs;
removal; ``mkdir``; ``rename`` for a missed rename).  The log lives in
``<state_home>/<wrapper name>/replicas/log.jsonl`` and survives ``kill -9``.

Invariant: for any object path, a child with no pending entry on it (or on an
ancestor) holds the acknowledged state; reads are served only by such
children, so a pending delete can never make an object reappear.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import stat as stat_mod
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, BinaryIO, ClassVar, TypeVar

import trio

from omnifs.backends.base import (
    Backend,
    Capabilities,
    ObjectInfo,
    SetAttrs,
    StatFs,
    check_path,
    join,
    version_key,
)
from omnifs.errors import (
    AlreadyExists,
    BackendUnavailable,
    InvalidArgument,
    NotEmpty,
    NotFound,
    NotSupported,
    OmniError,
    PathUnavailable,
    TransientError,
    from_oserror,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_OP_TIMEOUT = 1.5  # seconds a metadata call may stay silent before the child counts as down
MIN_RATE = 512 * 1024  # bytes/s a data transfer must reach; bounds reads and writes by size
CHUNK = 4 << 20  # repair copies in pieces of this size
PROBE_BACKOFF = (0.5, 5.0)  # first and longest delay between probes of a child that is down
TRANSIENT_LIMIT = 3  # consecutive transient errors that open a child's circuit
STRAGGLER_WAIT = 60.0  # repair waits this long for abandoned calls to a child to finish
CHILD_SLOTS = 8  # calls running on one child at once (unless the child says how many threads it runs)
MAX_REPLAY_FAILURES = 5  # an entry whose replay keeps failing (not for unavailability) is skipped
BUSY_FACTOR = 3  # a call to a busy (not silent) child is waited for up to this many extra timeouts
LONG_CALL_CAP = 600.0  # seconds a heartbeat-checked call (listing, directory rename) may last
REPAIR_PARALLEL = 4  # entries on unrelated paths replayed at once per child


def ancestors(path: str) -> list[str]:
    """Strict ancestors of ``path``, root (``""``) first; none for the root itself."""
    if not path:
        return []
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(len(parts))]


def related(a: Entry, b: Entry) -> bool:
    """True if two entries touch the same path, or one's path lies below the other's."""
    return any(
        p == q or p.startswith(q + "/") or q.startswith(p + "/") or not p or not q for p in a.paths for q in b.paths
    )


def is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, (BackendUnavailable, TransientError))


# --- the repair log ------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Entry:
    """One logged operation; ``pending`` holds the children that have not applied it yet."""

    seq: int
    op: str
    paths: tuple[str, ...]
    src: int | None  # the child the others are repaired from; None: nobody acknowledged it
    pending: set[int]
    failures: int = 0
    settled: bool = True  # False while the change is still running on its targets


class RepairLog:
    """A durable, ordered, append-only log of operations with one queue (cursor) per child.

    Records are JSON lines: ``{"e": seq, "op", "p": paths, "src", "to": children}``
    adds an entry, ``{"s": seq, "src", "to"}`` replaces its source and pending
    set, ``{"d": seq, "c": child}`` marks it applied by one child.  Children are
    named, so reordering the config keeps the log valid.  ``add`` and ``done``
    change the in-memory state at once; ``commit`` returns once every record
    added before it is fsynced (concurrent callers share one fsync).  A torn
    last line left by a crash is ignored.  Not thread-safe: call from trio.
    """

    FILE = "log.jsonl"
    COMPACT_LINES = 4096

    def __init__(self, directory: Path, names: Sequence[str]) -> None:
        self.directory = directory
        self.path = directory / self.FILE
        self.names = list(names)
        self.queues: list[dict[int, Entry]] = [{} for _ in names]  # per child, in seq order
        self.exact: list[Counter[str]] = [Counter() for _ in names]  # pending paths
        self.under: list[Counter[str]] = [Counter() for _ in names]  # strict ancestors of pending paths
        self._seq = 0
        self._buf: list[str] = []
        self._added = 0
        self._durable = 0
        self._lines = 0  # lines in the file
        self._lock = trio.Lock()
        self._file: IO[bytes] | None = None
        self._broken = False  # a write failed: the file may end in a partial line

    # --- state ---
    def pending(self, child: int) -> int:
        return len(self.queues[child])

    def first(self, child: int) -> Entry | None:
        return next(iter(self.queues[child].values()), None)

    def entries(self, child: int) -> list[Entry]:
        return list(self.queues[child].values())

    def stale_obj(self, child: int, path: str) -> bool:
        """True if ``child`` has a pending entry on ``path`` or on an ancestor of it."""
        ex = self.exact[child]
        return bool(ex) and (path in ex or any(a in ex for a in ancestors(path)))

    def stale_tree(self, child: int, path: str) -> bool:
        """``stale_obj`` or a pending entry anywhere below ``path``."""
        return self.stale_obj(child, path) or path in self.under[child]

    def _track(self, child: int, e: Entry, delta: int) -> None:
        for counter, keys in (
            (self.exact[child], e.paths),
            (self.under[child], [a for p in e.paths for a in ancestors(p)]),
        ):
            for k in keys:
                counter[k] += delta
                if counter[k] <= 0:
                    del counter[k]
        if delta > 0:
            self.queues[child][e.seq] = e
        else:
            self.queues[child].pop(e.seq, None)

    def _emit(self, record: dict[str, Any]) -> None:
        self._buf.append(json.dumps(record, separators=(",", ":")) + "\n")
        self._added += 1

    def add(self, op: str, paths: tuple[str, ...], src: int, others: Sequence[int]) -> Entry:
        """Register an entry (pending on ``others``) in memory at once; ``commit`` makes it durable."""
        self._seq += 1
        e = Entry(self._seq, op, paths, src, set(), settled=False)
        self._set_pending(e, set(others))
        self._emit({"e": e.seq, "op": op, "p": list(paths), "src": self.names[src], "to": self._names(e.pending)})
        return e

    def settle(self, e: Entry, src: int | None, pending: set[int]) -> None:
        """Replace an entry's source and pending set (after its source failed to answer)."""
        e.src = src
        self._set_pending(e, pending)
        self._emit({"s": e.seq, "src": None if src is None else self.names[src], "to": self._names(pending)})

    def done(self, e: Entry, child: int) -> None:
        """``child`` has applied ``e`` (recorded lazily)."""
        if child in e.pending:
            e.pending.discard(child)
            self._track(child, e, -1)
            self._emit({"d": e.seq, "c": self.names[child]})

    def _set_pending(self, e: Entry, pending: set[int]) -> None:
        for c in e.pending - pending:
            self._track(c, e, -1)
        for c in pending - e.pending:
            self._track(c, e, +1)
        e.pending = set(pending)

    def _names(self, children: set[int]) -> list[str]:
        return [self.names[c] for c in sorted(children)]

    # --- disk ---
    def load(self) -> None:
        """Read the log left by an earlier run and rewrite it compacted (blocking)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        index = {n: i for i, n in enumerate(self.names)}
        found: dict[int, Entry] = {}
        known: set[str] | None = None  # the children of the run that wrote the log
        if self.path.exists():
            with open(self.path, "rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        log.warning("replica log %s: ignoring a torn last record", self.path)
                        break
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        log.warning("replica log %s: ignoring an unreadable record", self.path)
                        continue
                    if "children" in rec:
                        known = set(rec["children"])
                    elif "e" in rec:
                        to = {index[n] for n in rec["to"] if n in index}
                        found[rec["e"]] = Entry(rec["e"], rec["op"], tuple(rec["p"]), index.get(rec["src"]), to)
                        self._seq = max(self._seq, rec["e"])
                    elif "s" in rec and rec["s"] in found:
                        e = found[rec["s"]]
                        e.src = index.get(rec["src"]) if rec["src"] is not None else None
                        e.pending = {index[n] for n in rec["to"] if n in index}
                    elif "d" in rec and rec["d"] in found and rec["c"] in index:
                        found[rec["d"]].pending.discard(index[rec["c"]])
        for name in self.names if known is not None else []:
            if name not in known:  # a remote added to the wrapper: copy everything to it first
                log.warning("replica log %s: remote %s is new here; it gets a full copy", self.path, name)
                self._seq += 1
                found[self._seq] = Entry(self._seq, "resync", ("",), None, {index[name]})
        for e in found.values():
            pending, e.pending = e.pending, set()
            self._set_pending(e, pending)
        total = sum(1 for e in found.values() if e.pending)
        if total:
            log.warning("replica log %s: %d operation(s) still to repair", self.path, total)
        self._rewrite()

    def _live(self) -> list[Entry]:
        seen: dict[int, Entry] = {}
        for q in self.queues:
            seen.update(q)
        return [seen[s] for s in sorted(seen)]

    def _rewrite(self) -> None:
        """Replace the file by one holding only pending entries (blocking; fsync + rename)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        lines = [
            json.dumps(
                {
                    "e": e.seq,
                    "op": e.op,
                    "p": list(e.paths),
                    "src": None if e.src is None else self.names[e.src],
                    "to": self._names(e.pending),
                },
                separators=(",", ":"),
            )
            + "\n"
            for e in self._live()
        ]
        header = json.dumps({"children": self.names}) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=".log.", dir=self.directory)
        with os.fdopen(fd, "wb") as f:
            f.write((header + "".join(lines)).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._lines = len(lines)

    def _write(self, lines: list[str], durable: bool) -> None:
        if self._file is None:
            self._file = open(self.path, "ab")
        if lines:
            self._file.write("".join(lines).encode())
            self._file.flush()
            self._lines += len(lines)
        if durable:
            os.fsync(self._file.fileno())

    async def _out(self, *, durable: bool, rewrite: bool) -> None:
        """Write the buffer (or the whole state); call with the lock held.

        After a failed write the file may end in a partial line, so the next
        write replaces the file with the in-memory state instead of appending.
        """
        lines, upto, self._buf = self._buf, self._added, []
        try:
            if rewrite or self._broken:
                await trio.to_thread.run_sync(self._rewrite)
                self._broken = False
                durable = True
            else:
                await trio.to_thread.run_sync(self._write, lines, durable)
        except OSError:
            self._broken = True
            raise
        if durable:
            self._durable = upto

    async def commit(self) -> None:
        """Return once every record added so far is on disk (fsynced); NoSpace/OmniError if it cannot be."""
        target = self._added
        async with self._lock:
            if self._durable >= target:
                return
            try:
                await self._out(durable=True, rewrite=False)
            except OSError as exc:
                raise from_oserror(exc, f"replica log {self.path}") from exc

    async def flush(self) -> None:
        """Write buffered records without fsync; compact when nothing or little is pending."""
        async with self._lock:
            live = sum(len(q) for q in self.queues)
            if (live == 0 and self._lines > 0) or (self._lines > self.COMPACT_LINES and live * 4 < self._lines):
                await self._out(durable=False, rewrite=True)
            elif self._buf or self._broken:
                await self._out(durable=False, rewrite=False)

    async def close(self) -> None:
        """Write everything (compacted if nothing is pending), fsync and close the file."""
        await self.flush()
        await self.commit()
        async with self._lock:
            if self._file is not None:
                f, self._file = self._file, None
                await trio.to_thread.run_sync(f.close)


# --- sources ---------------------------------------------------------------------------------------


class _Reader(io.RawIOBase):
    """An independent reader of a regular file from ``start`` (its own open file description)."""

    def __init__(self, fd: int, start: int) -> None:
        self._f = open(f"/proc/self/fd/{fd}", "rb", buffering=0)
        self._f.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self._f.readinto(b) or 0

    def close(self) -> None:
        self._f.close()
        super().close()


class Source:
    """The data of one ``write``, readable once per child, each from the start.

    A regular file (the usual staged copy) is reopened per reader; a stream of
    at most 1 MiB is kept in memory; any other stream is first spooled to an
    unlinked temp file in ``spool_dir``.
    """

    SMALL = 1 << 20

    def __init__(self, fd: int, start: int, size: int, owned: IO[bytes] | None, data: bytes | None = None) -> None:
        self.fd, self.start, self.size, self._owned, self._data = fd, start, size, owned, data

    @classmethod
    def capture(cls, src: BinaryIO, spool_dir: Path) -> Source:
        """Wrap ``src`` (blocking: reads a non-file stream in 1 MiB pieces)."""
        try:
            fd = src.fileno()
            st = os.fstat(fd)
            if stat_mod.S_ISREG(st.st_mode):
                start = src.tell()
                return cls(fd, start, st.st_size - start, None)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass
        first = src.read(cls.SMALL)
        more = src.read(cls.SMALL) if first else b""
        if not more:
            return cls(-1, 0, len(first), None, bytes(first))
        spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        spool = tempfile.TemporaryFile(dir=spool_dir)
        spool.write(first)
        spool.write(more)
        size = len(first) + len(more)
        while True:
            piece = src.read(cls.SMALL)
            if not piece:
                break
            spool.write(piece)
            size += len(piece)
        spool.flush()
        return cls(spool.fileno(), 0, size, spool)

    def reader(self) -> BinaryIO:
        """A new reader positioned at the start of the data (blocking)."""
        if self._data is not None:
            return io.BytesIO(self._data)
        return _Reader(self.fd, self.start)  # type: ignore[return-value]

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()


# --- children and the wrapper ----------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Child:
    """One child backend and its health (a circuit breaker)."""

    index: int
    backend: Backend
    online: bool = True
    failures: int = 0  # consecutive transient failures
    last_error: str | None = None
    retry_at: float = 0.0
    backoff: float = PROBE_BACKOFF[0]
    stragglers: int = 0  # calls whose caller gave up waiting; still running
    last_answer: float = float("-inf")  # trio clock: when a call last got an answer
    probing: bool = False
    repairing: bool = False
    slots: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(CHILD_SLOTS))

    @property
    def name(self) -> str:
        return self.backend.name


class _Stall(Exception):
    """A replay cannot proceed now (no healthy child holds the truth for a path)."""


@dataclass(slots=True)
class _Outcome:
    ok: bool
    value: Any = None


def _same_error(a: _Outcome, b: _Outcome) -> bool:
    return a.ok == b.ok and (a.ok or type(a.value) is type(b.value))


def intersect(caps: Sequence[Capabilities]) -> Capabilities:
    """Capabilities every child has."""
    return Capabilities(
        **{f: all(getattr(c, f) for c in caps) for f in Capabilities.__dataclass_fields__}  # type: ignore[arg-type]
    )


class ReplicaSet(Backend):
    """A backend over several children; subclasses choose how many children a change needs.

    ``sync_all``: every target child gets each change at once (mirror);
    otherwise only the first healthy one, the others through repair (failover).
    ``required``: acknowledgements a change needs to succeed.
    """

    sync_all: ClassVar[bool] = False
    children_option: ClassVar[str] = "remotes"

    def __init__(
        self,
        name: str,
        children: Sequence[Backend],
        *,
        log_dir: Path | None = None,
        op_timeout: float = DEFAULT_OP_TIMEOUT,
        required: int = 1,
    ) -> None:
        super().__init__(name)
        names = [c.name for c in children]
        if not children or len(set(names)) != len(names):
            raise InvalidArgument(f"{name}: needs one or more children with distinct names, got {names}")
        if not 1 <= required <= len(children):
            raise InvalidArgument(f"{name}: {required} acknowledgements asked of {len(children)} remotes")
        # As many calls at once per child as the child runs threads (its own limiter).
        self.children = [
            Child(i, b, slots=trio.CapacityLimiter(getattr(b, "_max_threads", CHILD_SLOTS)))
            for i, b in enumerate(children)
        ]
        self.capabilities = intersect([c.capabilities for c in children])
        if log_dir is None:
            from omnifs.config import state_home

            log_dir = state_home() / name / "replicas"
        self.log_dir = log_dir
        self.log = RepairLog(log_dir, names)
        self.op_timeout = op_timeout
        self.required = required
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._started: trio.Event | None = None
        self._start_error: BaseException | None = None
        self._wake = trio.Event()
        # (child, path) -> (the child's own version, the version this wrapper reports for it)
        self._alias: dict[tuple[int, str], tuple[str, str]] = {}

    def describe(self) -> str:
        return f"{self.type_name}:" + ",".join(c.name for c in self.children)

    # --- status ----------------------------------------------------------------------------------
    def replica_status(self) -> list[dict[str, object]]:
        """Health of each child: name, type, online, last error, operations waiting for repair."""
        return [
            {
                "name": c.name,
                "type": c.backend.type_name,
                "online": c.online,
                "last_error": c.last_error,
                "pending_repairs": self.log.pending(c.index),
            }
            for c in self.children
        ]

    def pending_repairs(self) -> int:
        return sum(self.log.pending(c.index) for c in self.children)

    # --- background --------------------------------------------------------------------------------
    async def _ensure_started(self) -> None:
        if self._nursery is None:
            if self._started is None:
                self._started = trio.Event()
                trio.lowlevel.spawn_system_task(self._main, name=f"replicas:{self.name}")
            await self._started.wait()
        if self._start_error is not None:
            raise OmniError(f"{self.name}: cannot use the replica log in {self.log_dir}: {self._start_error}")
        if self._nursery is None:
            raise BackendUnavailable(f"{self.name} is closed")

    async def _main(self) -> None:
        assert self._started is not None
        self._scope = trio.CancelScope()
        with self._scope:
            try:
                await trio.to_thread.run_sync(self.log.load)
            except (OSError, ValueError) as exc:
                self._start_error = exc
                self._started.set()
                return
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._started.set()
                    nursery.start_soon(self._health_loop)
                    nursery.start_soon(self._repair_loop)
            except Exception:  # never let a system task crash the run
                log.exception("%s: background work failed", self.name)
        self._nursery = None
        self._started.set()

    async def aclose(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        if self._started is not None and self._start_error is None:
            with contextlib.suppress(OSError), trio.move_on_after(5):
                await self.log.close()
        for c in self.children:
            await c.backend.aclose()

    async def _health_loop(self) -> None:
        """Probe children whose circuit is open (half-open: one ``stat("")`` at a time)."""
        assert self._nursery is not None
        while True:
            now = trio.current_time()
            for c in self.children:
                if not c.online and not c.probing and now >= c.retry_at:
                    c.probing = True
                    self._nursery.start_soon(self._probe, c)
            await trio.sleep(0.1)

    async def _probe(self, c: Child) -> None:
        try:
            await self._call(c, self.op_timeout, lambda b: b.stat(""), probe=True)
        except Exception as exc:
            c.last_error = str(exc) or type(exc).__name__
            c.backoff = min(c.backoff * 2, PROBE_BACKOFF[1])
            c.retry_at = trio.current_time() + c.backoff
        else:
            c.online, c.failures, c.backoff = True, 0, PROBE_BACKOFF[0]
            log.warning(
                "%s: remote %s is back; repairing %d operation(s)", self.name, c.name, self.log.pending(c.index)
            )
            self._wake.set()
        finally:
            c.probing = False

    def _failed(self, c: Child, reason: str, *, hard: bool) -> None:
        c.last_error = reason
        c.failures += 1
        if c.online and (hard or c.failures >= TRANSIENT_LIMIT):
            c.online = False
            c.retry_at = trio.current_time() + c.backoff
            log.warning("%s: remote %s is down (%s); using the others", self.name, c.name, reason)

    async def _call(
        self,
        c: Child,
        timeout: float,
        fn: Callable[[Backend], Awaitable[T]],
        *,
        probe: bool = False,
        heartbeat: bool = False,
    ) -> T:
        """Run ``fn(child)``; silence past ``timeout`` or unavailability marks the child down.

        At most ``CHILD_SLOTS`` calls run on a child at once; waiting for a slot
        is not silence (but is given up when the child is found down meanwhile,
        and then the call never runs).  A call that times out is not cancelled:
        it keeps running in the background (a straggler) so that repair can wait
        for it to finish before touching the same child.

        Past ``timeout`` the call is still waited for (up to ``BUSY_FACTOR``
        more timeouts) while other calls to the child are answered (one in the
        last ``op_timeout``): a busy child is not a silent one; such a call then
        fails with TransientError, which opens the circuit only when repeated.
        With ``heartbeat`` it also goes on (up to ``LONG_CALL_CAP``) while the
        child answers a ``stat("")`` probe within ``op_timeout``.
        """
        if self._nursery is None:
            raise BackendUnavailable(f"{self.name} is closed")
        box: list[_Outcome] = []
        started, finished = trio.Event(), trio.Event()
        state = {"abandoned": False, "skip": False}

        async def runner() -> None:
            try:
                async with c.slots:
                    if state["skip"]:
                        return
                    started.set()
                    box.append(_Outcome(True, await fn(c.backend)))
                    c.last_answer = trio.current_time()
            except Exception as exc:
                box.append(_Outcome(False, exc))
                if not is_unavailable(exc):
                    c.last_answer = trio.current_time()
            finally:
                finished.set()
                if state["abandoned"]:
                    c.stragglers -= 1

        self._nursery.start_soon(runner)
        try:
            while not started.is_set() and not finished.is_set():
                if not c.online and not probe:
                    raise BackendUnavailable(f"{c.name} is down: {c.last_error}")
                with trio.move_on_after(0.05):
                    await started.wait()
            with trio.move_on_after(timeout):
                await finished.wait()
            # A busy child is not a silent one: while other calls to it keep being
            # answered (at least one in the last ``op_timeout``), keep waiting a while.
            with trio.move_on_after(BUSY_FACTOR * timeout):
                while not finished.is_set():
                    quiet = trio.current_time() - c.last_answer
                    if quiet >= self.op_timeout:
                        break
                    with trio.move_on_after(self.op_timeout - quiet):
                        await finished.wait()
            if heartbeat:
                # A long call (a big listing, a directory rename) may go on while the
                # child keeps answering a quick probe; silence of the probe ends it.
                with trio.move_on_after(LONG_CALL_CAP):
                    while not finished.is_set():
                        try:
                            await self._call(c, self.op_timeout, lambda b: b.stat(""), probe=True)
                        except OmniError:
                            break
                        with trio.move_on_after(timeout):
                            await finished.wait()
        finally:
            if not finished.is_set():  # timed out, found down, or the caller was cancelled
                if started.is_set():
                    state["abandoned"] = True
                    c.stragglers += 1
                else:
                    state["skip"] = True
        if not box:
            if trio.current_time() - c.last_answer < self.op_timeout:  # slow, but the child answers others
                self._failed(c, f"a call got no answer within {timeout:g} s (the remote is busy)", hard=False)
                raise TransientError(f"{c.name}: no answer within {timeout:g} s (busy)")
            self._failed(c, f"no answer within {timeout:g} s", hard=True)
            raise BackendUnavailable(f"{c.name}: no answer within {timeout:g} s")
        out = box[0]
        if out.ok:
            c.failures = 0
            return out.value  # type: ignore[no-any-return]
        if is_unavailable(out.value):
            self._failed(c, str(out.value) or type(out.value).__name__, hard=isinstance(out.value, BackendUnavailable))
        raise out.value

    def _data_timeout(self, size: int) -> float:
        return self.op_timeout + size / MIN_RATE

    # --- versions ----------------------------------------------------------------------------------
    def _out(self, c: int, info: ObjectInfo) -> ObjectInfo:
        """Report a child's info with the version this wrapper first reported for that content."""
        a = self._alias.get((c, info.path))
        if a is not None and info.kind == "file" and a[0] == version_key(info):
            return replace(info, etag=a[1])
        return info

    def _version(self, c: int, path: str, version: str) -> str:
        a = self._alias.get((c, path))
        return a[1] if a is not None and a[0] == version else version

    def _same_as(self, d: int, c: int, path: str, version: str, copy: ObjectInfo) -> None:
        """Remember that child ``c``'s ``copy`` holds the content child ``d`` had at ``version``."""
        canon = self._version(d, path, version)
        if version_key(copy) != canon:
            self._alias[(c, path)] = (version_key(copy), canon)
        else:
            self._alias.pop((c, path), None)

    def _forget(self, path: str) -> None:
        for c in self.children:
            self._alias.pop((c.index, path), None)

    # --- reads ---------------------------------------------------------------------------------------
    async def _read(
        self,
        path: str,
        timeout: float,
        fn: Callable[[Backend], Awaitable[T]],
        *,
        tree: bool = False,
        heartbeat: bool = False,
    ) -> tuple[int, T]:
        """Ask the first healthy child that is up to date for ``path``; others only if it is down."""
        await self._ensure_started()
        last: BaseException | None = None
        for c in self.children:
            if not c.online:
                last = last or BackendUnavailable(f"{c.name} is down: {c.last_error}")
                continue
            if (self.log.stale_tree if tree else self.log.stale_obj)(c.index, path):
                continue
            try:
                return c.index, await self._call(c, timeout, fn, heartbeat=heartbeat)
            except OmniError as exc:
                if not is_unavailable(exc):
                    raise
                last = exc
        raise self._unavailable(f"{self.name}: no remote can answer for {path or '/'} now ({last or 'repair pending'})")

    def _unavailable(self, message: str) -> BackendUnavailable:
        """PathUnavailable while some child answers (the mount stays online), else BackendUnavailable."""
        cls = PathUnavailable if any(c.online for c in self.children) else BackendUnavailable
        return cls(message)

    async def stat(self, path: str) -> ObjectInfo:
        path = check_path(path)
        c, info = await self._read(path, self.op_timeout, lambda b: b.stat(path))
        return self._out(c, info)

    async def list(self, path: str) -> list[ObjectInfo]:
        path = check_path(path)
        timeout = self.op_timeout * 4
        try:
            c, infos = await self._read(path, timeout, lambda b: b.list(path), tree=True, heartbeat=True)
            return [self._out(c, i) for i in infos]
        except BackendUnavailable:
            pass
        # No child is up to date below ``path``: list a healthy one and correct the
        # names it has pending operations on from children that are up to date for them.
        c, infos = await self._read(path, timeout, lambda b: b.list(path), heartbeat=True)
        merged = {i.name: self._out(c, i) for i in infos}
        prefix = f"{path}/" if path else ""
        names = {
            p[len(prefix) :].split("/")[0]
            for e in self.log.entries(c)
            for p in e.paths
            if p.startswith(prefix) and p != path
        }
        for name in sorted(names):
            sub = join(path, name)
            try:
                d, info = await self._read(sub, self.op_timeout, lambda b, sub=sub: b.stat(sub))  # type: ignore[misc]
                merged[name] = self._out(d, info)
            except NotFound:
                merged.pop(name, None)
            except BackendUnavailable:
                pass  # nobody knows better: keep what the listed child has
        return [merged[n] for n in sorted(merged)]

    async def read(self, path: str, offset: int, size: int) -> bytes:
        path = check_path(path)
        return (await self._read(path, self._data_timeout(size), lambda b: b.read(path, offset, size)))[1]

    async def read_versioned(self, path: str, offset: int, size: int) -> tuple[bytes, str]:
        path = check_path(path)
        c, (data, version) = await self._read(
            path, self._data_timeout(size) * 2, lambda b: b.read_versioned(path, offset, size)
        )
        return data, self._version(c, path, version)

    async def get_xattrs(self, path: str) -> dict[str, bytes]:
        path = check_path(path)
        if not self.capabilities.xattrs:
            raise NotSupported(f"{self.name}: not every remote has xattrs")
        return (await self._read(path, self.op_timeout, lambda b: b.get_xattrs(path)))[1]

    async def statfs(self) -> StatFs | None:
        if not self.capabilities.statfs:
            return None
        return (await self._read("", self.op_timeout, lambda b: b.statfs()))[1]

    # --- changes -------------------------------------------------------------------------------------
    async def _apply(
        self,
        op: str,
        paths: tuple[str, ...],
        timeout: float,
        fn: Callable[[Backend], Awaitable[T]],
        *,
        heartbeat: bool = False,
    ) -> T:
        """Log, then run a change on the targets; see the module docstring for the protocol."""
        await self._ensure_started()
        tried: set[int] = set()
        last: BaseException | None = None
        while True:
            cands = [
                c
                for c in self.children
                if c.online and c.index not in tried and not any(self.log.stale_tree(c.index, p) for p in paths)
            ]
            targets = cands if self.sync_all else cands[:1]
            if len(cands) < self.required or not targets:
                why = f"{len(cands)} of {len(self.children)} remotes can take it now, {self.required} needed"
                raise self._unavailable(
                    f"{self.name}: {op} {paths[0] or '/'} refused: {why}" + (f" ({last})" if last else "")
                )
            tried.update(c.index for c in targets)
            src = targets[0]
            entry = self.log.add(op, paths, src.index, [c.index for c in self.children if c is not src])
            try:
                await self.log.commit()
                outcomes: dict[int, _Outcome] = {}

                if len(targets) == 1:
                    await self._collect(src, timeout, fn, outcomes, heartbeat)
                else:
                    async with trio.open_nursery() as nursery:
                        for c in targets:
                            nursery.start_soon(self._collect, c, timeout, fn, outcomes, heartbeat)
                answered = [c for c in targets if outcomes[c.index].ok or not is_unavailable(outcomes[c.index].value)]
                if not answered:
                    # Nobody acknowledged: only the silent targets may have applied it.
                    self.log.settle(entry, None, {c.index for c in targets})
                    last = outcomes[src.index].value
                    if self.sync_all:
                        raise last  # type: ignore[misc]
                    continue  # failover: try the next child
                auth = answered[0]
                result = outcomes[auth.index]
                same = [c for c in answered if _same_error(outcomes[c.index], result)]
                if not result.ok and auth is src and len(same) == len(targets):
                    self.log.settle(entry, None, set())  # failed the same way everywhere: nothing changed
                    raise result.value
                if auth is not src:
                    self.log.settle(entry, auth.index, {c.index for c in self.children if c not in same})
                    await self.log.commit()
                for c in same:
                    self.log.done(entry, c.index)
                if not result.ok:
                    raise result.value
                if isinstance(result.value, ObjectInfo):
                    for c in same:
                        if c is not auth:
                            self._same_as(
                                auth.index,
                                c.index,
                                result.value.path,
                                version_key(result.value),
                                outcomes[c.index].value,
                            )
                self._wake.set()
                if len(same) < self.required:
                    raise self._unavailable(
                        f"{self.name}: {op} {paths[0]} acknowledged by {len(same)} of {len(self.children)} remotes, "
                        f"{self.required} needed (the others are repaired from the log)"
                    )
                return result.value  # type: ignore[no-any-return]
            finally:
                entry.settled = True
                self._wake.set()

    async def _collect(
        self,
        c: Child,
        timeout: float,
        fn: Callable[[Backend], Awaitable[Any]],
        outcomes: dict[int, _Outcome],
        heartbeat: bool = False,
    ) -> None:
        try:
            outcomes[c.index] = _Outcome(True, await self._call(c, timeout, fn, heartbeat=heartbeat))
        except Exception as exc:
            outcomes[c.index] = _Outcome(False, exc)

    async def write(self, path: str, src: BinaryIO, attrs: SetAttrs | None = None) -> ObjectInfo:
        path = check_path(path)
        source = await trio.to_thread.run_sync(Source.capture, src, self.log_dir / "spool")

        async def put(b: Backend) -> ObjectInfo:
            reader = source.reader() if source.fd < 0 else await trio.to_thread.run_sync(source.reader)
            try:
                return await b.write(path, reader, attrs)
            finally:
                reader.close()

        try:
            return await self._apply("write", (path,), self._data_timeout(source.size), put)
        finally:
            # Stragglers still reading hold their own file descriptions.
            source.close()

    async def delete(self, path: str) -> None:
        path = check_path(path)
        await self._apply("delete", (path,), self.op_timeout, lambda b: b.delete(path))
        self._forget(path)

    async def mkdir(self, path: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        path = check_path(path)
        return await self._apply("mkdir", (path,), self.op_timeout, lambda b: b.mkdir(path, attrs))

    async def rmdir(self, path: str) -> None:
        path = check_path(path)
        await self._apply("rmdir", (path,), self.op_timeout, lambda b: b.rmdir(path))

    async def rename(self, src: str, dst: str) -> None:
        src, dst = check_path(src), check_path(dst)
        if not self.capabilities.rename:
            raise NotSupported(f"{self.name}: not every remote can rename")
        await self._apply("rename", (src, dst), self.op_timeout * 4, lambda b: b.rename(src, dst), heartbeat=True)
        for key in [k for k in self._alias if k[1] == src or k[1].startswith(src + "/")]:
            self._alias[(key[0], dst + key[1][len(src) :])] = self._alias.pop(key)

    async def symlink(self, path: str, target: str, attrs: SetAttrs | None = None) -> ObjectInfo:
        path = check_path(path)
        if not self.capabilities.symlinks:
            raise NotSupported(f"{self.name}: not every remote has symlinks")
        return await self._apply("symlink", (path,), self.op_timeout, lambda b: b.symlink(path, target, attrs))

    async def set_attrs(self, path: str, attrs: SetAttrs) -> ObjectInfo:
        path = check_path(path)
        if not self.capabilities.posix_attrs:
            raise NotSupported(f"{self.name}: not every remote stores attributes")
        return await self._apply("set_attrs", (path,), self.op_timeout * 4, lambda b: b.set_attrs(path, attrs))

    async def set_xattr(self, path: str, name: str, value: bytes | None) -> None:
        path = check_path(path)
        if not self.capabilities.xattrs:
            raise NotSupported(f"{self.name}: not every remote has xattrs")
        await self._apply("set_xattr", (path,), self.op_timeout * 4, lambda b: b.set_xattr(path, name, value))

    # --- repair --------------------------------------------------------------------------------------
    async def _repair_loop(self) -> None:
        assert self._nursery is not None
        while True:
            for c in self.children:
                if c.online and not c.repairing and self.log.pending(c.index):
                    c.repairing = True
                    self._nursery.start_soon(self._repair_child, c)
            try:
                await self.log.flush()
            except OSError as exc:  # the next commit reports it to a caller; keep repairing
                log.error("%s: cannot write the replica log %s: %s", self.name, self.log.path, exc)
            self._wake = trio.Event()
            with trio.move_on_after(1.0):
                await self._wake.wait()

    async def _repair_child(self, c: Child) -> None:
        """Replay ``c``'s pending entries in order until done, stalled or ``c`` goes down.

        Up to ``REPAIR_PARALLEL`` entries run at once, but an entry never starts
        while an earlier entry on a related path (equal, ancestor or descendant)
        is running or has failed in this pass: the order of changes to any one
        path is kept.
        """
        try:
            with trio.move_on_after(STRAGGLER_WAIT):
                while c.stragglers > 0:
                    await trio.sleep(0.1)
            count = 0
            while c.online:
                replayed = await self._repair_pass(c)
                count += replayed
                if not replayed:
                    break
            if count and not self.log.pending(c.index):
                log.warning("%s: remote %s is repaired (%d operation(s) replayed)", self.name, c.name, count)
        finally:
            c.repairing = False

    async def _repair_pass(self, c: Child) -> int:
        """One pass over the entries pending for ``c`` now; returns how many were replayed."""
        running: dict[int, Entry] = {}
        held: list[Entry] = []  # failed or waiting in this pass: later related entries wait too
        state = {"stop": False, "replayed": 0}
        changed = trio.Event()
        slots = trio.Semaphore(REPAIR_PARALLEL)

        async def one(e: Entry) -> None:
            try:
                await self._replay(c, e)
            except _Stall as exc:
                log.info("%s: repair of %s waits: %s", self.name, c.name, exc)
                held.append(e)
                state["stop"] = True
                return
            except Exception as exc:
                if isinstance(exc, OmniError) and is_unavailable(exc):
                    held.append(e)
                    state["stop"] = True
                    return
                e.failures += 1
                if e.failures < MAX_REPLAY_FAILURES:
                    log.warning(
                        "%s: repair of %s %s on %s failed (%s); will retry", self.name, e.op, e.paths, c.name, exc
                    )
                    held.append(e)
                    return
                log.error("%s: giving up repairing %s %s on %s: %s", self.name, e.op, e.paths, c.name, exc)
            finally:
                del running[e.seq]
                slots.release()
                changed.set()
            self.log.done(e, c.index)
            state["replayed"] += 1

        async with trio.open_nursery() as nursery:
            for e in self.log.entries(c.index):
                if state["stop"] or not c.online or not e.settled:
                    break
                if any(related(e, h) for h in held):
                    held.append(e)
                    continue
                while any(related(e, r) for r in running.values()):
                    changed = trio.Event()
                    await changed.wait()
                await slots.acquire()
                if state["stop"] or not c.online:
                    slots.release()
                    break
                running[e.seq] = e
                nursery.start_soon(one, e)
        return state["replayed"]

    def _truth(self, c: Child, path: str, e: Entry) -> Child | None:
        """A healthy child other than ``c`` that is up to date for ``path`` (None: ``c`` itself is)."""
        for d in self.children:
            if d is not c and d.online and not self.log.stale_obj(d.index, path):
                if d.stragglers:
                    raise _Stall(f"calls to {d.name} abandoned earlier are still running")
                return d
        if e.src is None:
            # Nobody acknowledged ``e`` and everyone is unsure: the first unsure child decides.
            first = next((d for d in self.children if d.index in e.pending or d.index == e.src), None)
            if first is c:
                return None
        if any(not d.online for d in self.children if d is not c):
            raise _Stall(f"no healthy remote is up to date for {path or '/'}")
        raise _Stall(f"every remote has repairs pending for {path or '/'}")

    async def _replay(self, c: Child, e: Entry) -> None:
        if e.op == "rename":
            await self._replay_rename(c, e)
            return
        if e.op == "resync":  # a remote new to this wrapper: copy the whole tree from an up-to-date one
            d = next(
                (d for d in self.children if d is not c and d.online and not self.log.stale_obj(d.index, "")), None
            )
            if d is None or d.stragglers:
                raise _Stall("no healthy, up-to-date remote to copy from")
            await self._sync(c, d, "", deep=True, loose=False)
            return
        for p in e.paths:
            d = self._truth(c, p, e)
            if d is not None:
                await self._sync(c, d, p, deep=False)

    async def _replay_rename(self, c: Child, e: Entry) -> None:
        src, dst = e.paths
        d = self._truth(c, dst, e)
        if d is None:
            return
        have_src = await self._stat(c, src)
        if have_src is not None and await self._stat(d, src) is None and await self._stat(c, dst) is None:
            with contextlib.suppress(NotFound, AlreadyExists, NotEmpty):
                await self._call(c, self.op_timeout * 4, lambda b: b.rename(src, dst), heartbeat=True)
        await self._sync(c, d, src, deep=True)
        await self._sync(c, d, dst, deep=True)

    async def _stat(self, c: Child, path: str) -> ObjectInfo | None:
        try:
            return await self._call(c, self.op_timeout, lambda b: b.stat(path))
        except NotFound:
            return None

    async def _sync(self, c: Child, d: Child, path: str, *, deep: bool, loose: bool | None = None) -> None:
        """Make ``c``'s object at ``path`` match ``d``'s (content, attributes, xattrs; children if ``deep``)."""
        t = await self._stat(d, path)
        have = await self._stat(c, path)
        if t is None:
            if have is not None:
                await self._remove(c, path, have)
            return
        if have is not None and have.kind != t.kind:
            await self._remove(c, path, have)
            have = None
        attrs = self._attrs_of(t)
        if t.kind == "file":
            if have is None or not self._same_content(c, d, path, have, t, loose=deep if loose is None else loose):
                await self._copy(c, d, path, t, attrs)
            elif attrs is not None and self._attrs_differ(have, t):
                await self._call(c, self.op_timeout * 4, lambda b: b.set_attrs(path, attrs))
            await self._sync_xattrs(c, d, path)
        elif t.kind == "symlink":
            if have is not None and have.target != t.target:
                await self._remove(c, path, have)
                have = None
            if have is None:
                await self._call(c, self.op_timeout, lambda b: b.symlink(path, t.target or "", attrs))
        else:
            if have is None and path:
                with contextlib.suppress(AlreadyExists):
                    await self._call(c, self.op_timeout, lambda b: b.mkdir(path, attrs))
            elif have is not None and path and attrs is not None and self._attrs_differ(have, t):
                await self._call(c, self.op_timeout * 4, lambda b: b.set_attrs(path, attrs))
            if path:
                await self._sync_xattrs(c, d, path)
            if deep:
                timeout = self.op_timeout * 4
                theirs = {i.name for i in await self._call(d, timeout, lambda b: b.list(path), heartbeat=True)}
                mine = {i.name for i in await self._call(c, timeout, lambda b: b.list(path), heartbeat=True)}
                for name in sorted(theirs | mine):
                    await self._sync(c, d, join(path, name), deep=True, loose=loose)

    def _attrs_of(self, t: ObjectInfo) -> SetAttrs | None:
        if not self.capabilities.posix_attrs or t.kind == "symlink":
            return None
        return SetAttrs(mode=t.mode, uid=t.uid, gid=t.gid, mtime_ns=t.mtime_ns if t.mtime_ns else None)

    @staticmethod
    def _attrs_differ(have: ObjectInfo, t: ObjectInfo) -> bool:
        if any(x is not None and x != y for x, y in ((t.mode, have.mode), (t.uid, have.uid), (t.gid, have.gid))):
            return True
        return bool(t.mtime_ns) and abs(t.mtime_ns - have.mtime_ns) >= 1_000_000_000

    def _same_content(self, c: Child, d: Child, path: str, have: ObjectInfo, t: ObjectInfo, *, loose: bool) -> bool:
        if have.size != t.size:
            return False
        if self._version(c.index, path, version_key(have)) == self._version(d.index, path, version_key(t)):
            return True
        same_kind = type(c.backend) is type(d.backend)
        if same_kind and have.etag is not None and have.etag == t.etag:
            return True
        return loose  # after a moved directory: equal sizes are taken as the moved content

    async def _sync_xattrs(self, c: Child, d: Child, path: str) -> None:
        if not self.capabilities.xattrs:
            return
        theirs = await self._call(d, self.op_timeout, lambda b: b.get_xattrs(path))
        mine = await self._call(c, self.op_timeout, lambda b: b.get_xattrs(path))
        for name in set(mine) | set(theirs):
            if mine.get(name) != theirs.get(name):
                value = theirs.get(name)
                await self._call(c, self.op_timeout * 4, lambda b, n=name, v=value: b.set_xattr(path, n, v))  # type: ignore[misc]

    async def _copy(self, c: Child, d: Child, path: str, t: ObjectInfo, attrs: SetAttrs | None) -> None:
        """Copy ``d``'s current content of ``path`` to ``c`` through an unlinked temp file."""
        spool_dir = self.log_dir / "spool"
        await trio.to_thread.run_sync(lambda: spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700))
        spool = await trio.to_thread.run_sync(lambda: tempfile.TemporaryFile(dir=spool_dir))
        try:
            version: str | None = None
            offset = 0
            while True:
                data, v = await self._call(
                    d,
                    self._data_timeout(CHUNK) * 2,
                    lambda b, o=offset: b.read_versioned(path, o, CHUNK),  # type: ignore[misc]
                )
                if version is not None and v != version:
                    raise TransientError(f"{path} changed on {d.name} while being copied")
                version = v
                await trio.to_thread.run_sync(spool.write, data)
                offset += len(data)
                if len(data) < CHUNK:
                    break
            await trio.to_thread.run_sync(spool.seek, 0)
        except BaseException:
            spool.close()
            raise

        async def put(b: Backend) -> ObjectInfo:
            try:
                return await b.write(path, spool, attrs)
            finally:
                spool.close()

        copy = await self._call(c, self._data_timeout(offset), put)
        assert version is not None
        self._same_as(d.index, c.index, path, version, copy)

    async def _remove(self, c: Child, path: str, have: ObjectInfo) -> None:
        """Remove ``path`` (a whole tree for a directory) from ``c``."""
        if have.kind != "dir":
            with contextlib.suppress(NotFound):
                await self._call(c, self.op_timeout, lambda b: b.delete(path))
            return
        for info in await self._call(c, self.op_timeout * 4, lambda b: b.list(path), heartbeat=True):
            await self._remove(c, info.path, info)
        with contextlib.suppress(NotFound):
            await self._call(c, self.op_timeout, lambda b: b.rmdir(path))


@dataclass(frozen=True, slots=True)
class OptionProblem:
    """A wrapper option that cannot work (reported by the config with file, line and key)."""

    key: str
    message: str


def check_remotes(value: object) -> OptionProblem | None:
    """``remotes`` must be a non-empty list of distinct names."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        return OptionProblem("remotes", "'remotes' must be a non-empty list of remote names")
    if len(set(value)) != len(value):
        return OptionProblem("remotes", "'remotes' names a remote twice")
    return None
