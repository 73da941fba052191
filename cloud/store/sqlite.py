"""The SQLite backend: one file in WAL mode (readers never block the ingest writer),
``synchronous=NORMAL``, one connection shared by the store's threads under its lock.

:func:`connect` is what :class:`~cloud.store._base.StoreBase` opens for a path;
:class:`SqliteStore` is the store (cloud.store.sql.SqlStore) under the name it had before the
PostgreSQL backend, for SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import sqlite3
import time

from edgeloop.cloud.store._base import Dialect
from edgeloop.cloud.store.sql import SqlStore

__all__ = ["DIALECT", "SqliteStore", "connect"]

DIALECT = Dialect("sqlite", skip_locked="")
BUSY_TIMEOUT_S = 30.0
SqliteStore = SqlStore


def connect(path: str) -> tuple[sqlite3.Connection, Dialect]:
    conn = sqlite3.connect(path, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
    try:
        _wal(conn)
        conn.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn, DIALECT


def _wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL. Changing the journal mode needs the database to itself, and SQLite answers
    "database is locked" at once, without its busy timeout, while another connection opens the
    same new file: try again until the busy timeout has passed."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)
