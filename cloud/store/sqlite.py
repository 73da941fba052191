"""The SQLite backend: one file in WAL mode (readers never block the ingest writer),
``synchronous=NORMAL``, one connection shared by the store's threads under its lock.

:func:`connect` is what :class:`~cloud.store._base.StoreBase` opens for a path;
:class:`SqliteStore` is the store (cloud.store.sql.SqlStore) under the name it had before the
PostgreSQL backend, for SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import sqlite3

from edgeloop.cloud.store._base import Dialect
from edgeloop.cloud.store.sql import SqlStore

__all__ = ["DIALECT", "SqliteStore", "connect"]

DIALECT = Dialect("sqlite", skip_locked="")
SqliteStore = SqlStore


def connect(path: str) -> tuple[sqlite3.Connection, Dialect]:
    conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn, DIALECT
