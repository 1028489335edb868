"""The mirror wrapper: conformance over memory and local children, policies and repair."""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path

import pytest
import trio

from omnifs.backends.local import LocalBackend
from omnifs.backends.memory import MemoryBackend
from omnifs.backends.mirror import MirrorBackend
from omnifs.errors import BackendUnavailable, NotFound
from tests.backends.conformance import BackendConformance
from tests.backends.replica_helpers import FaultyBackend, tree, wait_until


class TestMirrorMemory(BackendConformance):
    @pytest.fixture
    def backend_factory(self, tmp_path: Path):
        return lambda: MirrorBackend(
            "mi", [MemoryBackend("a"), MemoryBackend("b"), MemoryBackend("c")], log_dir=tmp_path / uuid.uuid4().hex
        )


class TestMirrorLocalQuorum(BackendConformance):
    @pytest.fixture
    def backend_factory(self, tmp_path: Path):
        def make() -> MirrorBackend:
            root = tmp_path / uuid.uuid4().hex
            kids = []
            for n in "ab":
                (root / n).mkdir(parents=True)
                kids.append(LocalBackend(n, str(root / n)))
            kids.append(MemoryBackend("m"))
            return MirrorBackend("mi", kids, policy="quorum", quorum=2, log_dir=root / "log")

        return make


class TestMirrorOneDown(BackendConformance):
    """The whole suite with quorum 2 of 3 while the first remote is down."""

    @pytest.fixture
    def backend_factory(self, tmp_path: Path):
        def make() -> MirrorBackend:
            down = FaultyBackend(MemoryBackend("a"))
            down.mode = "down"
            kids = [down, MemoryBackend("b"), MemoryBackend("c")]
            return MirrorBackend("mi", kids, policy="quorum", quorum=2, log_dir=tmp_path / uuid.uuid4().hex)

        return make


def make(tmp_path: Path, policy: str = "quorum", quorum: int | None = 2) -> tuple[MirrorBackend, list[FaultyBackend]]:
    kids = [FaultyBackend(MemoryBackend(f"c{i}")) for i in range(3)]
    return MirrorBackend("mi", kids, policy=policy, quorum=quorum, log_dir=tmp_path / "log", op_timeout=0.5), kids  # type: ignore[arg-type]


async def put(b, path: str, data: bytes) -> None:
    await b.write(path, io.BytesIO(data))


async def _all_equal(kids) -> bool:
    trees = [await tree(k.inner) for k in kids]
    return all(t == trees[0] for t in trees)


async def _no_pending(b) -> bool:
    return b.pending_repairs() == 0


def test_every_write_lands_everywhere(tmp_path: Path) -> None:
    async def main() -> None:
        mi, kids = make(tmp_path, policy="all", quorum=None)
        await mi.mkdir("d")
        await put(mi, "d/f", b"x" * 1000)
        await mi.set_xattr("d/f", "user.k", b"v")
        for k in kids:
            assert await k.inner.read("d/f", 0, 2000) == b"x" * 1000
            assert await k.inner.get_xattrs("d/f") == {"user.k": b"v"}
        assert mi.pending_repairs() == 0
        await mi.aclose()

    trio.run(main)


@pytest.mark.parametrize("fault", ["down", "frozen"])
def test_quorum_survives_one_outage_and_repairs_it(tmp_path: Path, fault: str) -> None:
    async def main() -> None:
        mi, kids = make(tmp_path)
        await mi.mkdir("d")
        await put(mi, "d/keep", b"k")
        await put(mi, "d/gone", b"g")
        kids[1].mode = fault
        started = time.monotonic()
        await put(mi, "d/new", b"during")
        assert time.monotonic() - started < 2.0
        await mi.delete("d/gone")
        await mi.rename("d/keep", "d/kept")
        await mi.mkdir("d/sub")
        await put(mi, "d/sub/deep", b"deep")
        assert mi.replica_status()[1]["pending_repairs"] >= 5
        assert await kids[0].inner.read("d/new", 0, 10) == b"during"
        assert await kids[2].inner.read("d/new", 0, 10) == b"during"
        kids[1].mode = "up"
        await wait_until(lambda: _all_equal(kids), what="the missing remote to be repaired")
        await wait_until(lambda: _no_pending(mi), what="log to drain")
        assert await tree(kids[1].inner) == {
            "d": None,
            "d/kept": b"k",
            "d/new": b"during",
            "d/sub": None,
            "d/sub/deep": b"deep",
        }
        await mi.aclose()

    trio.run(main)


def test_policy_all_refuses_when_one_is_down(tmp_path: Path) -> None:
    async def main() -> None:
        mi, kids = make(tmp_path, policy="all", quorum=None)
        await put(mi, "f", b"old")
        kids[2].mode = "down"
        with pytest.raises(BackendUnavailable):
            await put(mi, "f", b"new")  # c2 was believed up: it is tried, and found down
        with pytest.raises(BackendUnavailable):
            await put(mi, "g", b"new")  # now known down: refused before anything changes
        with pytest.raises(NotFound):
            await kids[0].inner.stat("g")
        kids[2].mode = "up"
        await wait_until(lambda: _all_equal(kids), what="convergence")
        await mi.aclose()

    trio.run(main)


def test_best_effort_needs_one(tmp_path: Path) -> None:
    async def main() -> None:
        mi, kids = make(tmp_path, policy="best-effort", quorum=None)
        kids[0].mode = kids[1].mode = "down"
        await put(mi, "f", b"only c2")
        assert await mi.read("f", 0, 10) == b"only c2"
        kids[0].mode = kids[1].mode = "up"
        await wait_until(lambda: _all_equal(kids), what="convergence")
        await mi.aclose()

    trio.run(main)


def test_repair_runs_in_order_per_child(tmp_path: Path) -> None:
    """A path deleted, recreated as a directory and filled ends up the same on the repaired child."""

    async def main() -> None:
        mi, kids = make(tmp_path)
        await put(mi, "x", b"file first")
        kids[2].mode = "down"
        await mi.delete("x")
        await mi.mkdir("x")
        await put(mi, "x/y", b"then a dir")
        await mi.symlink("x/ln", "y")
        await mi.set_attrs("x/y", __import__("omnifs.backends.base", fromlist=["SetAttrs"]).SetAttrs(mode=0o600))
        kids[2].mode = "up"
        await wait_until(lambda: _all_equal(kids), what="repair")
        assert (await kids[2].inner.stat("x/y")).mode == 0o600
        await mi.aclose()

    trio.run(main)


# --- real servers ------------------------------------------------------------------------------------


def test_quorum_2_of_3_real_servers(tmp_path: Path, spare_moto, s3_remote, s3_server) -> None:
    """S3 (frozen mid-way), S3 on another server and a local directory; the frozen one is repaired."""
    import hashlib

    from tests.backends.replica_helpers import bucket_digests, dir_digests
    from tests.fixtures_s3 import make_s3_backend, new_bucket_remote

    spec = new_bucket_remote(spare_moto, "s3a")  # children need distinct names (they name the log's cursors)
    client = spare_moto.client()
    local_root = tmp_path / "local"
    local_root.mkdir()
    payload = {f"f{i}": hashlib.sha256(b"%d" % i).digest() * (50 + i) for i in range(10)}

    async def main() -> None:
        kids = [make_s3_backend(spec), make_s3_backend(s3_remote), LocalBackend("loc", str(local_root))]
        mi = MirrorBackend("mi", kids, policy="quorum", quorum=2, log_dir=tmp_path / "log")
        for i in range(3):
            await put(mi, f"f{i}", payload[f"f{i}"])
        spare_moto.freeze()
        try:
            started = time.monotonic()
            await put(mi, "f3", payload["f3"])
            assert time.monotonic() - started < 2.5
            for i in range(4, 10):
                await put(mi, f"f{i}", payload[f"f{i}"])
            await mi.delete("f1")
            assert mi.replica_status()[0]["pending_repairs"] >= 7
        finally:
            spare_moto.thaw()
        want = {k: hashlib.sha256(v).hexdigest() for k, v in payload.items() if k != "f1"}
        assert dir_digests(local_root) == want
        assert await trio.to_thread.run_sync(bucket_digests, s3_server.client(), s3_remote.config["bucket"]) == want

        async def repaired() -> bool:
            return await trio.to_thread.run_sync(bucket_digests, client, spec.config["bucket"]) == want

        await wait_until(repaired, timeout=90, what="the frozen S3 to be repaired")
        await wait_until(lambda: _no_pending(mi), timeout=30, what="log to drain")
        await mi.aclose()

    trio.run(main)


def test_many_missed_changes_are_repaired(tmp_path: Path) -> None:
    """Hundreds of missed changes on many paths, some on the same path, repair to the same tree."""

    async def main() -> None:
        mi, kids = make(tmp_path)
        kids[0].mode = "down"
        await mi.mkdir("d")
        for i in range(300):
            await put(mi, f"d/f{i % 120}", b"%d" % i)  # most paths written two or three times
            if i % 50 == 49:
                await mi.delete(f"d/f{i % 120}")
        kids[0].mode = "up"
        started = time.monotonic()
        await wait_until(lambda: _all_equal(kids), timeout=60, what="repair")
        await wait_until(lambda: _no_pending(mi), what="log to drain")
        assert time.monotonic() - started < 30
        await mi.aclose()

    trio.run(main)


class TestMirrorS3AndLocal(BackendConformance):
    """The suite over a real S3 server and a local directory (the first answers reads)."""

    @pytest.fixture
    def backend_factory(self, tmp_path: Path, s3_remote):
        from tests.fixtures_s3 import make_s3_backend

        def make() -> MirrorBackend:
            root = tmp_path / uuid.uuid4().hex
            (root / "loc").mkdir(parents=True)
            return MirrorBackend(
                "mi",
                [make_s3_backend(s3_remote), LocalBackend("loc", str(root / "loc"))],
                log_dir=root / "log",
                op_timeout=15.0,  # about behaviour, not outages: a busy test machine must not look like one
            )

        return make
