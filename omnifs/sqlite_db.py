"""Opening the small SQLite databases omnifs keeps (metadata cache, metadata index)."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_db(path: Path, schema: str, *, timeout: float = 5.0) -> sqlite3.Connection:
    """A connection usable from any thread (callers serialise), in WAL mode, with ``schema`` applied.

    Autocommit (``isolation_level=None``): callers open transactions themselves.
    ``synchronous=NORMAL``: a crash never corrupts the database, a power loss
    may forget the last transactions (both databases are caches or indexes
    that are rebuilt from the backend).
    """
    db = sqlite3.connect(str(path), timeout=timeout, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(schema)
    return db
