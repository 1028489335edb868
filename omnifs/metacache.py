"""Cached metadata (stat results and directory listings), one SQLite row per entry.

A listing is stored entry by entry, so recording one change in a directory of
10,000 files touches one row, not the whole listing (the cost of every create
and upload there).  Tables:

- ``stats(path, parent, fetched, info)``: a stat observed at ``fetched``;
  ``info`` NULL means "known to be absent";
- ``listings(path, fetched)``: directory ``path`` was listed completely at ``fetched``;
- ``entries(parent, name, info)``: the entries of those listings.

``info`` is a pickled ``ObjectInfo``.  Every method blocks (callers use worker
threads) and is thread-safe: one connection, serialised by a lock, each
method one transaction.  WAL mode keeps the file consistent across crashes.
"""

from __future__ import annotations

import contextlib
import pickle
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from omnifs.backends.base import ObjectInfo, basename, join, parent_of, version_key
from omnifs.sqlite_db import open_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stats (path TEXT PRIMARY KEY, parent TEXT NOT NULL, fetched REAL NOT NULL, info BLOB);
CREATE INDEX IF NOT EXISTS stats_parent ON stats (parent);
CREATE TABLE IF NOT EXISTS listings (path TEXT PRIMARY KEY, fetched REAL NOT NULL);
CREATE TABLE IF NOT EXISTS entries (parent TEXT NOT NULL, name TEXT NOT NULL, info BLOB NOT NULL,
                                    PRIMARY KEY (parent, name));
"""


_TREE_COLUMNS = (("stats", "path"), ("listings", "path"), ("entries", "parent"))
_UNDER = "WHERE {c} = ? OR ({c} >= ? AND {c} < ?)"  # at or below a path (see _below)


def _dump(info: ObjectInfo | None) -> bytes | None:
    return None if info is None else pickle.dumps(info, protocol=pickle.HIGHEST_PROTOCOL)


def _load(blob: bytes | None) -> ObjectInfo | None:
    return None if blob is None else pickle.loads(blob)  # our own 0700 cache directory


def _below(path: str) -> tuple[str, str]:
    """Bounds of the paths strictly below ``path`` for a range query (``'/'`` + 1 is ``'0'``)."""
    return (path + "/", path + "0") if path else ("", "\U0010ffff")


class MetadataStore:
    """Stat results and listings of one remote, persistent across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = open_db(path, _SCHEMA, timeout=60)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock (reads too: a consistent snapshot)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- reads ---------------------------------------------------------------------------
    def _own(self, db: sqlite3.Connection, path: str) -> tuple[float, ObjectInfo | None] | None:
        row = db.execute("SELECT fetched, info FROM stats WHERE path = ?", (path,)).fetchone()
        return None if row is None else (row[0], _load(row[1]))

    def _listed(self, db: sqlite3.Connection, path: str) -> float | None:
        row = db.execute("SELECT fetched FROM listings WHERE path = ?", (path,)).fetchone()
        return None if row is None else float(row[0])

    def get_stat(self, path: str) -> tuple[float, ObjectInfo | None] | None:
        """(fetched_at, info or None if absent), from the stat or from the parent's listing."""
        with self._tx() as db:
            own = self._own(db, path)
            from_listing = None
            if path:
                fetched = self._listed(db, parent_of(path))
                if fetched is not None:
                    row = db.execute(
                        "SELECT info FROM entries WHERE parent = ? AND name = ?", (parent_of(path), basename(path))
                    ).fetchone()
                    from_listing = (fetched, None if row is None else _load(row[0]))
        if own is None:
            return from_listing
        if from_listing is not None and from_listing[0] > own[0]:
            # A newer listing wins unless it shows the same version (keep the richer stat).
            info = from_listing[1]
            if info is None or own[1] is None or version_key(info) != version_key(own[1]):
                return from_listing
            return (from_listing[0], own[1])
        return own

    def get_listing(self, path: str) -> tuple[float, dict[str, ObjectInfo]] | None:
        with self._tx() as db:
            fetched = self._listed(db, path)
            if fetched is None:
                return None
            rows = db.execute("SELECT name, info FROM entries WHERE parent = ?", (path,)).fetchall()
        return fetched, {name: _load(blob) for name, blob in rows}  # type: ignore[misc]

    def has_any(self) -> bool:
        with self._tx() as db:
            return db.execute("SELECT 1 FROM stats UNION ALL SELECT 1 FROM listings LIMIT 1").fetchone() is not None

    def count(self) -> int:
        with self._tx() as db:
            return sum(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("stats", "listings", "entries"))

    # --- writes ----------------------------------------------------------------------------
    def put_stat(self, path: str, info: ObjectInfo | None, fetched_at: float | None = None) -> None:
        """Store a stat observed at ``fetched_at``; a newer entry (our own change) is kept."""
        now = fetched_at or time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO stats VALUES (?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET "
                "fetched = excluded.fetched, info = excluded.info WHERE stats.fetched <= excluded.fetched",
                (path, parent_of(path), now, _dump(info)),
            )

    def put_listing(self, path: str, infos: list[ObjectInfo], fetched_at: float | None = None) -> list[ObjectInfo]:
        """Store a complete listing; return it with entries replaced by richer stats of the same version.

        Listings of some backends (S3) lack mode and owner; a stat fetched
        earlier for the same version has them, so it is used instead.  A stat
        recorded after the listing started (a change this mount made) wins,
        and entries this mount created meanwhile are kept.
        """
        now = fetched_at or time.time()
        merged: dict[str, ObjectInfo] = {}
        with self._tx() as db:
            own = {
                p: (f, _load(b))
                for p, f, b in db.execute("SELECT path, fetched, info FROM stats WHERE parent = ?", (path,))
            }
            stale = []
            for info in infos:
                old = own.pop(info.path, None)
                if old is not None and old[0] > now:
                    if old[1] is not None:
                        merged[info.name] = old[1]
                elif old is not None and old[1] is not None and version_key(old[1]) == version_key(info):
                    merged[info.name] = old[1] if info.mode is None else info
                else:
                    merged[info.name] = info
                    if old is not None:
                        stale.append(info.path)
            for p, (fetched, info) in own.items():
                if fetched > now and info is not None:  # created here after the listing started
                    merged[basename(p)] = info
            db.executemany("DELETE FROM stats WHERE path = ?", [(p,) for p in stale])
            db.execute("DELETE FROM entries WHERE parent = ?", (path,))
            db.executemany(
                "INSERT INTO entries VALUES (?, ?, ?)", [(path, n, _dump(i)) for n, i in merged.items()]
            )
            db.execute("INSERT OR REPLACE INTO listings VALUES (?, ?)", (path, now))
        return sorted(merged.values(), key=lambda i: i.name)

    def record(self, path: str, info: ObjectInfo | None) -> None:
        """Write-through of a change made by this mount: the stat, and the parent's listing if cached."""
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO stats VALUES (?, ?, ?, ?)", (path, parent_of(path), now, _dump(info)))
            if not path or self._listed(db, parent_of(path)) is None:
                return
            if info is None:
                db.execute("DELETE FROM entries WHERE parent = ? AND name = ?", (parent_of(path), basename(path)))
            else:
                db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)", (parent_of(path), info.name, _dump(info)))

    def forget_stat(self, path: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM stats WHERE path = ?", (path,))

    def stale_listing(self, path: str) -> None:
        """Mark a listing outdated (listed again when online) but keep it for offline use."""
        with self._tx() as db:
            db.execute("UPDATE listings SET fetched = 0 WHERE path = ?", (path,))

    def forget_listing(self, path: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM listings WHERE path = ?", (path,))
            db.execute("DELETE FROM entries WHERE parent = ?", (path,))

    def forget_tree(self, path: str) -> None:
        """Drop cached metadata for ``path`` and everything below it."""
        lo, hi = _below(path)
        with self._tx() as db:
            for table, column in _TREE_COLUMNS:
                db.execute(f"DELETE FROM {table} {_UNDER.format(c=column)}", (path, lo, hi))

    def move_tree(self, old: str, new: str) -> None:
        """Re-key metadata at and below ``old`` to ``new`` (parent listings are the caller's)."""
        lo, hi = _below(old)

        def moved(p: str) -> str:
            return new + p[len(old) :]

        def repath(blob: bytes | None, p: str) -> bytes | None:
            info = _load(blob)
            return None if info is None else _dump(replace(info, path=p))

        with self._tx() as db:
            args = (old, lo, hi)
            stats = db.execute(f"SELECT path, fetched, info FROM stats {_UNDER.format(c='path')}", args).fetchall()
            lists = db.execute(f"SELECT path, fetched FROM listings {_UNDER.format(c='path')}", args).fetchall()
            ents = db.execute(f"SELECT parent, name, info FROM entries {_UNDER.format(c='parent')}", args).fetchall()
            for table, column in _TREE_COLUMNS:
                db.execute(f"DELETE FROM {table} {_UNDER.format(c=column)}", args)
            db.executemany(
                "INSERT OR REPLACE INTO stats VALUES (?, ?, ?, ?)",
                [(moved(p), parent_of(moved(p)), f, repath(b, moved(p))) for p, f, b in stats],
            )
            db.executemany("INSERT OR REPLACE INTO listings VALUES (?, ?)", [(moved(p), f) for p, f in lists])
            db.executemany(
                "INSERT OR REPLACE INTO entries VALUES (?, ?, ?)",
                [(moved(p), n, repath(b, join(moved(p), n))) for p, n, b in ents],
            )

    def clear(self) -> None:
        with self._tx() as db:
            for table in ("stats", "listings", "entries"):
                db.execute(f"DELETE FROM {table}")
