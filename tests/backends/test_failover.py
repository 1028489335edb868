"""The failover wrapper: conformance over memory and local children, and fault tests."""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path

import pytest
import trio

from omnifs.backends.failover import FailoverBackend
from omnifs.backends.local import LocalBackend
from omnifs.backends.memory import MemoryBackend
from omnifs.errors import BackendUnavailable, NotFound, OmniError
from tests.backends.conformance import BackendConformance
from tests.backends.replica_helpers import FaultyBackend, tree, wait_until


class TestFailoverMemory(BackendConformance):
    @pytest.fixture
    def backend_factory(self, tmp_path: Path):
        return lambda: FailoverBackend(
            "fo", [MemoryBackend("a"), MemoryBackend("b")], log_dir=tmp_path / uuid.uuid4().hex
        )


class TestFailoverLocal(BackendConformance):
    @pytest.fixture
    def backend_factory(self, tmp_path: Path):
        def make() -> FailoverBackend:
            root = tmp_path / uuid.uuid4().hex
            (root / "a").mkdir(parents=True)
            (root / "b").mkdir()
            children = [LocalBackend("a", str(root / "a")), LocalBackend("b", str(root / "b"))]
            return FailoverBackend("fo", children, log_dir=root / "log")

        return make


class TestFailoverPrimaryDown(BackendConformance):
    """The whole suite while the primary is down: everything is served by the secondary."""

    @pytest.fixture
    def backend_factory(self, tmp_path: Path):
        def make() -> FailoverBackend:
            down = FaultyBackend(MemoryBackend("a"))
            down.mode = "down"
            return FailoverBackend("fo", [down, MemoryBackend("b")], log_dir=tmp_path / uuid.uuid4().hex)

        return make


def make(tmp_path: Path, n: int = 2, timeout: float = 0.5) -> tuple[FailoverBackend, list[FaultyBackend]]:
    kids = [FaultyBackend(MemoryBackend(f"c{i}")) for i in range(n)]
    return FailoverBackend("fo", kids, log_dir=tmp_path / "log", op_timeout=timeout), kids


async def put(b, path: str, data: bytes) -> None:
    await b.write(path, io.BytesIO(data))


def test_secondary_follows_primary(tmp_path: Path) -> None:
    async def main() -> None:
        fo, (a, b) = make(tmp_path)
        await fo.mkdir("d")
        await put(fo, "d/f", b"one")
        await fo.rename("d/f", "d/g")
        await fo.symlink("ln", "d/g")
        await wait_until(lambda: _equal(a.inner, b.inner), what="secondary to catch up")
        assert await tree(b.inner) == {"d": None, "d/g": b"one", "ln": ("->", "d/g")}
        assert fo.pending_repairs() == 0
        await fo.aclose()

    trio.run(main)


async def _equal(x, y) -> bool:
    return await tree(x) == await tree(y)


@pytest.mark.parametrize("fault", ["down", "frozen"])
def test_writes_move_to_secondary_and_repair_brings_primary_back(tmp_path: Path, fault: str) -> None:
    async def main() -> None:
        fo, (a, b) = make(tmp_path)
        await fo.mkdir("d")
        await put(fo, "d/old", b"before")
        await put(fo, "d/gone", b"to be deleted")
        await wait_until(lambda: _equal(a.inner, b.inner), what="secondary to catch up")
        a.mode = fault
        started = time.monotonic()
        await put(fo, "d/new", b"during the outage")
        assert time.monotonic() - started < 2.0, "a write must move to the secondary within 2 s"
        await fo.delete("d/gone")
        await put(fo, "d/old", b"rewritten during the outage")
        assert await b.inner.read("d/new", 0, 100) == b"during the outage"
        # Reads and listings are served by the secondary meanwhile.
        assert await fo.read("d/old", 0, 100) == b"rewritten during the outage"
        assert {i.name for i in await fo.list("d")} == {"old", "new"}
        assert fo.replica_status()[0]["online"] is False
        assert fo.replica_status()[0]["pending_repairs"] >= 3
        a.mode = "up"
        await wait_until(lambda: _equal(a.inner, b.inner), what="primary to be repaired")
        await wait_until(lambda: _no_pending(fo), what="log to drain")
        want = {"d": None, "d/old": b"rewritten during the outage", "d/new": b"during the outage"}
        assert await tree(a.inner) == want
        with pytest.raises(NotFound):
            await fo.stat("d/gone")
        await fo.aclose()

    trio.run(main)


async def _no_pending(b) -> bool:
    return b.pending_repairs() == 0


def test_pending_delete_never_reappears(tmp_path: Path) -> None:
    async def main() -> None:
        fo, (a, b) = make(tmp_path)
        await put(fo, "f", b"x")
        await wait_until(lambda: _equal(a.inner, b.inner), what="secondary to catch up")
        a.mode = "down"
        await fo.delete("f")  # lands on b only; a still has f
        a.mode = "up"
        # a answers again but has the delete pending: it must not serve f.
        for _ in range(20):
            with pytest.raises(NotFound):
                await fo.stat("f")
            assert [i.name for i in await fo.list("")] == []
            await trio.sleep(0.05)
        await wait_until(lambda: _equal(a.inner, b.inner), what="repair")
        await fo.aclose()

    trio.run(main)


def test_all_down_is_unavailable_and_nothing_is_lost(tmp_path: Path) -> None:
    async def main() -> None:
        fo, (a, b) = make(tmp_path)
        await put(fo, "f", b"x")
        a.mode = b.mode = "down"
        with pytest.raises(BackendUnavailable):
            await put(fo, "g", b"y")
        with pytest.raises(BackendUnavailable):
            await fo.stat("f")
        a.mode = b.mode = "up"
        await wait_until(lambda: _readable(fo, "f"), what="recovery")
        await fo.aclose()

    trio.run(main)


async def _readable(fo, path: str) -> bool:
    try:
        await fo.stat(path)
        return True
    except BackendUnavailable:
        return False


def test_log_survives_restart(tmp_path: Path) -> None:
    """A wrapper closed (or killed) with repairs pending resumes them from the log."""
    a, b = MemoryBackend("a"), MemoryBackend("b")

    async def first() -> None:
        fa, fb = FaultyBackend(a), FaultyBackend(b)
        fo = FailoverBackend("fo", [fa, fb], log_dir=tmp_path / "log", op_timeout=0.5)
        await put(fo, "keep", b"k")
        await wait_until(lambda: _equal(a, b), what="catch up")
        fa.mode = "down"
        for i in range(5):
            await put(fo, f"f{i}", b"%d" % i)
        pending = fo.replica_status()[0]["pending_repairs"]
        assert pending >= 5  # (plus the write that found a down)
        # no aclose: the process "dies" here (the log is fsynced before each ack)

    trio.run(first)
    assert (tmp_path / "log" / "log.jsonl").stat().st_size > 0

    async def second() -> None:
        fo = FailoverBackend("fo", [a, b], log_dir=tmp_path / "log", op_timeout=0.5)
        await fo.stat("")
        assert fo.replica_status()[0]["pending_repairs"] >= 5
        await wait_until(lambda: _equal(a, b), what="repair after restart")
        await wait_until(lambda: _no_pending(fo), what="log to drain")
        await fo.aclose()

    trio.run(second)
    assert (tmp_path / "log" / "log.jsonl").read_text().splitlines() == ['{"children": ["a", "b"]}']  # compacted


# --- real servers ------------------------------------------------------------------------------------


def test_s3_primary_frozen_writes_move_to_sftp_and_come_back(tmp_path: Path, spare_moto, sftp_remote) -> None:
    import hashlib

    from omnifs.backends.sftp import SFTPBackend
    from tests.backends.replica_helpers import bucket_digests
    from tests.fixtures_s3 import make_s3_backend, new_bucket_remote

    spec = new_bucket_remote(spare_moto)
    bucket = spec.config["bucket"]
    client = spare_moto.client()
    root = sftp_remote.local_root
    payload = {f"d/f{i}": hashlib.sha256(b"%d" % i).digest() * (100 + i) for i in range(12)}

    async def main() -> None:
        s3 = make_s3_backend(spec)
        sftp = SFTPBackend("sftp", **{k: v for k, v in sftp_remote.config.items() if k != "type"})
        fo = FailoverBackend("fo", [s3, sftp], log_dir=tmp_path / "log")
        await fo.mkdir("d")
        for i in range(4):
            await put(fo, f"d/f{i}", payload[f"d/f{i}"])
        await wait_until(lambda: _no_pending(fo), what="sftp standby to catch up")
        spare_moto.freeze()
        try:
            started = time.monotonic()
            await put(fo, "d/f4", payload["d/f4"])
            took = time.monotonic() - started
            assert took < 2.0, f"the write took {took:.2f} s to move to the secondary"
            for i in range(5, 12):
                await put(fo, f"d/f{i}", payload[f"d/f{i}"])
            await fo.delete("d/f0")
            assert (root / "d" / "f11").read_bytes() == payload["d/f11"]
            assert not (root / "d" / "f0").exists()
            assert fo.replica_status()[0]["online"] is False
        finally:
            spare_moto.thaw()
        want = {f"d/{k[2:]}": hashlib.sha256(v).hexdigest() for k, v in payload.items() if k != "d/f0"}

        async def primary_repaired() -> bool:
            got = await trio.to_thread.run_sync(bucket_digests, client, bucket)
            return {k: v for k, v in got.items() if not k.endswith("/")} == want

        await wait_until(primary_repaired, timeout=90, what="the S3 primary to be repaired")
        await wait_until(lambda: _no_pending(fo), timeout=30, what="log to drain")
        await fo.aclose()

    trio.run(main)


def test_unusable_log_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")

    async def main() -> None:
        fo = FailoverBackend("fo", [MemoryBackend("a"), MemoryBackend("b")], log_dir=blocker / "log")
        with pytest.raises(OmniError) as ei:
            await put(fo, "f", b"x")
        assert "replica log" in str(ei.value) and str(blocker) in str(ei.value)
        await fo.aclose()

    trio.run(main)


def test_torn_log_tail_is_ignored(tmp_path: Path) -> None:
    """A crash in the middle of appending leaves a partial line; the entries before it still count."""
    a, b = MemoryBackend("a"), MemoryBackend("b")

    async def first() -> None:
        fb = FaultyBackend(b)
        fo = FailoverBackend("fo", [a, fb], log_dir=tmp_path / "log", op_timeout=0.5)
        fb.mode = "down"
        await put(fo, "f", b"x")
        await put(fo, "g", b"y")

    trio.run(first)
    with open(tmp_path / "log" / "log.jsonl", "ab") as f:
        f.write(b'{"e":99,"op":"write","p":["h"')

    async def second() -> None:
        fo = FailoverBackend("fo", [a, b], log_dir=tmp_path / "log", op_timeout=0.5)
        await fo.stat("")
        await wait_until(lambda: _equal(a, b), what="repair of the entries before the torn line")
        await fo.aclose()

    trio.run(second)


class SlowList(FaultyBackend):
    """Listings take ``delay`` seconds, while every other call answers at once."""

    delay = 3.0

    async def list(self, path: str):  # type: ignore[override]
        await trio.sleep(self.delay)
        return await super().list(path)


def test_slow_listing_of_a_live_remote_is_not_an_outage(tmp_path: Path) -> None:
    async def main() -> None:
        slow = SlowList(MemoryBackend("a"))
        fo = FailoverBackend("fo", [slow, MemoryBackend("b")], log_dir=tmp_path / "log", op_timeout=0.3)
        await put(fo, "f", b"x")
        assert [i.name for i in await fo.list("")] == ["f"]  # 3 s > 4 x 0.3 s, but the remote answers probes
        assert fo.replica_status()[0]["online"] is True
        await wait_until(lambda: _no_pending(fo), what="the standby to catch up")
        slow.mode = "frozen"
        started = time.monotonic()
        assert [i.name for i in await fo.list("")] == ["f"]  # a is silent, also to probes: b answers
        assert time.monotonic() - started < 3.0
        assert fo.replica_status()[0]["online"] is False
        slow.mode = "up"
        await fo.aclose()

    trio.run(main)


class StuckWrites(FaultyBackend):
    """Writes to names starting with "stuck" never return; everything else answers at once."""

    async def write(self, path, src, attrs=None):  # type: ignore[override]
        if path.startswith("stuck"):
            await trio.sleep_forever()
        return await super().write(path, src, attrs)


def test_stuck_call_on_a_busy_remote_fails_over_without_marking_it_down(tmp_path: Path) -> None:
    async def main() -> None:
        a, b = StuckWrites(MemoryBackend("a")), MemoryBackend("b")
        fo = FailoverBackend("fo", [a, b], log_dir=tmp_path / "log", op_timeout=0.3)
        await put(fo, "f", b"x")

        async def traffic() -> None:  # other calls keep being answered: a is busy, not silent
            while True:
                await fo.stat("f")
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic)
            started = time.monotonic()
            await put(fo, "stuck-1", b"y")
            took = time.monotonic() - started
            nursery.cancel_scope.cancel()
        assert 0.3 * 3 < took < 3.0, took
        assert await b.read("stuck-1", 0, 10) == b"y"
        assert fo.replica_status()[0]["online"] is True  # one transient failure does not open the circuit
        assert await fo.read("stuck-1", 0, 10) == b"y"  # a has it pending: served by b
        await fo.aclose()

    trio.run(main)


def test_standby_down_then_back_catches_up(tmp_path: Path) -> None:
    async def main() -> None:
        fo, (a, b) = make(tmp_path)
        b.mode = "frozen"
        await fo.mkdir("d")
        for i in range(20):
            await put(fo, f"d/f{i}", b"%d" % i)
        await fo.rename("d", "e")
        assert await tree(a.inner) == {"e": None, **{f"e/f{i}": b"%d" % i for i in range(20)}}
        await trio.sleep(1.0)  # b is found silent by the standby copies
        assert fo.replica_status()[1]["online"] is False
        b.mode = "up"
        await wait_until(lambda: _equal(a.inner, b.inner), what="the standby to catch up")
        await wait_until(lambda: _no_pending(fo), what="log to drain")
        await fo.aclose()

    trio.run(main)


def test_a_remote_added_later_gets_a_full_copy(tmp_path: Path) -> None:
    a, b, c = MemoryBackend("a"), MemoryBackend("b"), MemoryBackend("c")

    async def first() -> None:
        fo = FailoverBackend("fo", [a, b], log_dir=tmp_path / "log")
        await fo.mkdir("d")
        await put(fo, "d/f", b"before c existed")
        await wait_until(lambda: _equal(a, b), what="catch up")
        await fo.aclose()

    trio.run(first)

    async def second() -> None:
        await put(c, "stray", b"not in the others")
        fo = FailoverBackend("fo", [a, b, c], log_dir=tmp_path / "log")
        await fo.stat("")
        await wait_until(lambda: _equal(a, c), what="the new remote to get a full copy")
        await fo.aclose()

    trio.run(second)
