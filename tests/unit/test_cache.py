from __future__ import annotations

from pathlib import Path

import pytest

from omnifs.backends.base import ObjectInfo
from omnifs.cache import CacheSettings, DiskCache, cache_report, clear_cache, parse_size


def test_parse_size() -> None:
    assert parse_size("10G") == 10 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("4096") == 4096
    assert parse_size("1.5K") == 1536
    assert parse_size("2GiB") == 2 << 30
    with pytest.raises(ValueError):
        parse_size("lots")


def _info(path: str, etag: str, mode: int | None = None) -> ObjectInfo:
    return ObjectInfo(path, "file", size=3, mtime_ns=1, etag=etag, mode=mode)


def test_metadata_listing_and_write_through(tmp_path: Path) -> None:
    c = DiskCache(tmp_path / "c", CacheSettings())
    try:
        assert c.get_stat("d/a") is None
        c.put_listing("d", [_info("d/a", "e1"), _info("d/b", "e1")])
        assert c.get_stat("d/a")[1].etag == "e1"  # type: ignore[index]
        _, missing = c.get_stat("d/zzz")  # type: ignore[misc]
        assert missing is None  # absent from a known listing
        # A richer stat of the same version survives a newer listing.
        c.put_stat("d/a", _info("d/a", "e1", mode=0o600))
        c.put_listing("d", [_info("d/a", "e1"), _info("d/b", "e2")])
        assert c.get_stat("d/a")[1].mode == 0o600  # type: ignore[index]
        assert c.get_stat("d/b")[1].etag == "e2"  # type: ignore[index]
        c.record("d/c", _info("d/c", "e9"))
        assert set(c.get_listing("d")[1]) == {"a", "b", "c"}  # type: ignore[index]
        c.record("d/a", None)
        assert c.get_stat("d/a")[1] is None  # type: ignore[index]
        c.forget_tree("d")
        assert c.get_listing("d") is None and c.get_stat("d/b") is None
    finally:
        c.close()


def test_chunks_versions_pins_and_eviction(tmp_path: Path) -> None:
    c = DiskCache(tmp_path / "c", CacheSettings(max_size=2 << 20, min_free=0))
    try:
        c.put_chunk("keep/p", "v1", 0, b"p" * 500_000)
        c.pin("keep")
        assert c.is_pinned("keep/p") and not c.is_pinned("other")
        c.put_chunk("keep/p", "v1", 0, b"p" * 500_000, True)
        for i in range(12):  # far beyond the cap
            c.put_chunk(f"f{i}", "v1", 0, bytes([i]) * 500_000)
        assert c.data.volume() < 3 << 20
        assert c.get_chunk("keep/p", "v1", 0) == b"p" * 500_000  # pinned: never evicted
        assert c.get_chunk("f11", "v1", 0) == bytes([11]) * 500_000  # most recent survives
        assert c.get_chunk("keep/p", "v2", 0) is None  # another version is another key
        c.unpin("keep")
        assert c.pinned.volume() == 0 or len(c.pinned) == 0
        assert c.get_chunk("keep/p", "v1", 0) == b"p" * 500_000  # moved back to the evictable store
    finally:
        c.close()
    report = cache_report(tmp_path / "c")
    assert report["pinned_paths"] == [] and report["max_bytes"] == 2 << 20
    clear_cache(tmp_path / "c")
    assert cache_report(tmp_path / "c")["chunks"] == 0


def test_open_files_chunks_are_protected_from_eviction(tmp_path: Path) -> None:
    c = DiskCache(tmp_path / "c", CacheSettings(max_size=2 << 20, min_free=0))
    try:
        c.put_chunk("open.bin", "v1", 0, b"o" * 500_000)
        assert c.get_chunk("open.bin", "v1", 0, True) == b"o" * 500_000  # a reader holds it now
        for i in range(12):
            c.put_chunk(f"f{i}", "v1", 0, bytes([i]) * 500_000)
        assert c.get_chunk("open.bin", "v1", 0) == b"o" * 500_000
        c.release_chunks("open.bin", "v1", 500_000)
        assert len(c.pinned) == 0 and c.get_chunk("open.bin", "v1", 0) == b"o" * 500_000
    finally:
        c.close()


def test_a_listing_started_before_our_change_never_hides_it(tmp_path: Path) -> None:
    """A LIST in flight while this mount writes must not bring back the old version (a race seen in CI)."""
    import time

    c = DiskCache(tmp_path / "c", CacheSettings())
    try:
        started = time.time()
        c.record("d/new", _info("d/new", "e2"))  # our upload lands while the LIST runs
        c.record("d/gone", None)  # and our delete
        merged = c.put_listing("d", [_info("d/new", "e1"), _info("d/gone", "e1")], started)
        assert [(i.name, i.etag) for i in merged] == [("new", "e2")]
        assert c.get_stat("d/new")[1].etag == "e2"  # type: ignore[index]
        assert c.get_stat("d/gone")[1] is None  # type: ignore[index]
        c.put_stat("d/new", _info("d/new", "e1"), started)  # a slow HEAD from before: ignored
        assert c.get_stat("d/new")[1].etag == "e2"  # type: ignore[index]
        # A created entry the in-flight listing did not include yet stays listed.
        c.record("d/created", _info("d/created", "e5"))
        merged = c.put_listing("d", [_info("d/new", "e2")], started)
        assert sorted(i.name for i in merged) == ["created", "new"]
    finally:
        c.close()
