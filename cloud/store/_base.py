"""The SQLite connection and lock every store module shares (private to cloud.store).

One connection (``check_same_thread=False``), WAL mode so readers never block the ingest
writer, ``synchronous=NORMAL``; one re-entrant lock held by every operation, so one store may
be shared by threads. Opening migrates the database (cloud.store.schema) or refuses it: one
from a newer edgeloop (SchemaTooNew), or a file that is not a whole database (WorkspaceDamaged,
before SQLite touches it, so a damaged registry is never rewritten as a new one).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Sized

from edgeloop.cloud.errors import WorkspaceDamaged
from edgeloop.cloud.store._file import check_database_file
from edgeloop.cloud.store.schema import migrate

try:   # the ingest path stores a few KB of JSON per telemetry record: orjson is ~10x faster
    import orjson

    def dumps(value: Any) -> str:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
except ImportError:  # pragma: no cover - orjson is in the cloud extra
    def dumps(value: Any) -> str:
        return json.dumps(value, sort_keys=True)


def decode(row: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``row`` with the JSON text of ``keys`` parsed in place."""
    for k in keys:
        if isinstance(row.get(k), str):
            row[k] = json.loads(row[k])
    return row


def marks(values: Sized) -> str:
    return ",".join("?" * len(values))


class SqliteBase:
    """Connection, lock, migration on open, and small query helpers."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        check_database_file(self.path)
        conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            migrate(conn, str(self.path))
        except sqlite3.OperationalError:     # locked, unreadable, disk full: not damage
            conn.close()
            raise
        except sqlite3.DatabaseError as e:   # "file is not a database", "disk image is malformed"
            conn.close()
            raise WorkspaceDamaged(f"{self.path} is corrupt ({e}): restore it from a backup "
                                   "(move this file aside first; nothing was changed)") from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._utils_db: Any = None

    @property
    def _db(self) -> Any:
        """sqlite-utils over the connection, for the writes; made on first use: importing it
        imports numpy (~0.2 s), which a command that only reads (``edgeloop status``) skips."""
        if self._utils_db is None:
            import sqlite_utils

            self._utils_db = sqlite_utils.Database(self._conn)
        return self._utils_db

    def checkpoint(self) -> None:
        """Move everything committed into the main database file (the write-ahead log emptied)."""
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(FULL)")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _rows(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            cursor = self._conn.execute(sql, args)
            keys = [c[0] for c in cursor.description or ()]
            return [dict(zip(keys, row)) for row in cursor]

    def _one(self, sql: str, args: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, args)
        return rows[0] if rows else None

    def _scalar(self, sql: str, args: Sequence[Any] = ()) -> Any:
        with self._lock:
            row = self._conn.execute(sql, args).fetchone()
        return row[0] if row else None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """The lock and one transaction (committed on exit, rolled back on an exception)."""
        with self._lock, self._conn:
            yield self._conn

    def _chunks(self, ids: Iterable[str], size: int = 500) -> Iterator[list[str]]:
        ids = list(ids)
        for i in range(0, len(ids), size):
            yield ids[i:i + size]
