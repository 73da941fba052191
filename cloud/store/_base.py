"""The connection, lock and small query helpers every store module shares (private to cloud.store).

One store holds one connection and one re-entrant lock held by every operation, so one store
may be shared by threads. Where the database lives picks the backend (its connection and
:class:`Dialect`): a path is a SQLite file (:mod:`cloud.store.sqlite`: WAL, ``synchronous=NORMAL``),
a ``postgresql://`` URL a PostgreSQL database (:mod:`cloud.store.postgres`). The operation
modules write one SQL text for both: ``?`` placeholders (or ``:name`` with a dict), ``insert
... on conflict``, no backend-only function except through the dialect's fragments
(:meth:`Dialect.json_item`, :meth:`Dialect.json_pairs`, :meth:`Dialect.json_values`,
:attr:`Dialect.skip_locked`). Opening migrates the database (cloud.store.schema) or refuses it: one from a newer edgeloop
(SchemaTooNew), or a SQLite file that is not a whole database (WorkspaceDamaged, before SQLite
touches it, so a damaged registry is never rewritten as a new one).

``self._db[table]`` gives the few row helpers the operation modules use (insert, insert_all,
upsert, upsert_all, update by primary key), as portable SQL.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, Sized, TypeVar

from edgeloop.cloud.errors import ServiceUnavailable, WorkspaceDamaged
from edgeloop.cloud.store import _file
from edgeloop.cloud.store.schema import TABLES, migrate

try:   # the ingest path stores a few KB of JSON per telemetry record: orjson is ~10x faster
    import orjson

    def dumps(value: Any) -> str:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
except ImportError:  # pragma: no cover - orjson is in the cloud extra
    def dumps(value: Any) -> str:
        return json.dumps(value, sort_keys=True)

__all__ = ["ConnectionLost", "Dialect", "StoreBase", "SqliteBase", "decode", "dumps", "is_url", "marks"]

R = TypeVar("R")



def decode(row: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``row`` with the JSON text of ``keys`` parsed in place."""
    for k in keys:
        if isinstance(row.get(k), str):
            row[k] = json.loads(row[k])
    return row


def marks(values: Sized) -> str:
    return ",".join("?" * len(values))


def is_url(location: Path | str) -> bool:
    return isinstance(location, str) and "://" in location


class ConnectionLost(ServiceUnavailable):
    """The database connection broke during an operation: its transaction was rolled back
    (nothing of it is stored); the store reconnects on the next operation."""


@dataclass(frozen=True)
class Dialect:
    """What differs between the backends, as SQL fragments the operation modules splice in."""

    name: str
    skip_locked: str        # appended to a SELECT whose rows the transaction then claims
    # what the backend raises for a duplicate primary or unique key (psycopg is imported only
    # by the PostgreSQL backend: a SQLite store, and `edgeloop status`, never load it)
    duplicate_key: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)

    def json_item(self, column: str, index: int) -> str:
        """The number at ``index`` of the JSON array text in ``column`` (NULL if absent)."""
        if self.name == "postgresql":
            return f"(({column})::jsonb->>{int(index)})::float8"
        return f"json_extract({column}, '$[{int(index)}]')"

    def json_pairs(self, column: str) -> str:
        """A FROM item with (key, value) text rows of the JSON object text in ``column``."""
        if self.name == "postgresql":
            return f"jsonb_each_text(coalesce(({column})::jsonb, '{{}}'::jsonb))"
        return f"json_each({column})"

    def json_values(self, column: str) -> str:
        """A FROM item with ``value`` text rows of the JSON array text in ``column``."""
        if self.name == "postgresql":
            return f"jsonb_array_elements_text(coalesce(({column})::jsonb, '[]'::jsonb)) as j(value)"
        return f"json_each({column})"


class _Table:
    """Row helpers on one table, as portable SQL (what sqlite_utils' Table did for SQLite)."""

    def __init__(self, store: StoreBase, name: str) -> None:
        self.store, self.name = store, name
        self.pk = TABLES[name][1]

    def _insert_sql(self, keys: Sequence[str], conflict: str) -> str:
        cols = ", ".join(f'"{k}"' for k in keys)
        return f'insert into "{self.name}" ({cols}) values ({marks(keys)}){conflict}'

    def _write(self, rows: Iterable[dict[str, Any]], conflict: Callable[[Sequence[str]], str]) -> int:
        groups: dict[tuple[str, ...], list[list[Any]]] = {}
        for row in rows:
            groups.setdefault(tuple(row), []).append([_value(v) for v in row.values()])
        changed = 0
        with self.store._tx() as conn:
            for keys, values in groups.items():
                changed += max(conn.executemany(self._insert_sql(keys, conflict(keys)), values).rowcount, 0)
        return changed

    def insert(self, row: dict[str, Any], pk: Any = None, ignore: bool = False) -> int:
        return self.insert_all([row], ignore=ignore)

    def insert_all(self, rows: Iterable[dict[str, Any]], ignore: bool = False) -> int:
        """Insert rows (those whose key is already stored skipped with ``ignore``); how many were new."""
        return self._write(rows, lambda keys: " on conflict do nothing" if ignore else "")

    def upsert(self, row: dict[str, Any], pk: Any = None) -> int:
        return self.upsert_all([row])

    def upsert_all(self, rows: Iterable[dict[str, Any]], pk: Any = None) -> int:
        """Insert rows, or set the columns they name on the stored row with their key (columns
        they do not name keep their stored values)."""
        def conflict(keys: Sequence[str]) -> str:
            target = ", ".join(f'"{k}"' for k in self.pk)
            sets = ", ".join(f'"{k}" = excluded."{k}"' for k in keys if k not in self.pk)
            return f" on conflict ({target}) do " + (f"update set {sets}" if sets else "nothing")
        return self._write(rows, conflict)

    def update(self, key: Any, fields: dict[str, Any]) -> int:
        """Set ``fields`` on the row whose (single-column) primary key is ``key``."""
        if not fields:
            return 0
        sets = ", ".join(f'"{k}" = ?' for k in fields)
        with self.store._tx() as conn:
            return conn.execute(f'update "{self.name}" set {sets} where "{self.pk[0]}" = ?',
                                [*map(_value, fields.values()), key]).rowcount


def _value(value: Any) -> Any:
    """A column value as stored: a dict or list as its JSON text (as sqlite_utils stored them)."""
    return dumps(value) if isinstance(value, (dict, list, tuple)) else value


class _Tables:
    def __init__(self, store: StoreBase) -> None:
        self._store = store

    def __getitem__(self, name: str) -> _Table:
        return _Table(self._store, name)


class StoreBase:
    """Connection (SQLite file or PostgreSQL URL), lock, migration on open, query helpers."""

    def __init__(self, location: Path | str) -> None:
        self._lock = threading.RLock()
        if is_url(location):
            from edgeloop.cloud.store.postgres import connect
            self.path: Path | None = None
            self.location = str(location)
        else:
            from edgeloop.cloud.store.sqlite import connect  # type: ignore[assignment]
            self.path = Path(location)
            _file.check_database_file(self.path)
            self.location = str(self.path)
        try:
            conn, self.dialect = connect(self.location)
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as e:
            raise self._damaged(e) from None
        try:
            migrate(conn, _redacted(self.location))
        except sqlite3.OperationalError:     # locked, unreadable, disk full: not damage
            conn.close()
            raise
        except sqlite3.DatabaseError as e:   # "file is not a database", "disk image is malformed"
            conn.close()
            raise self._damaged(e) from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._db = _Tables(self)
        self._registered = self.path is not None
        if self._registered:
            _file.opened(self.path)

    def _damaged(self, error: Exception) -> WorkspaceDamaged:
        return WorkspaceDamaged(f"{self.path} is corrupt ({error}): restore it from a backup "
                                "(move this file aside first; nothing was changed)")

    def checkpoint(self) -> None:
        """Move everything committed into the main database file (SQLite: the write-ahead log
        emptied; PostgreSQL: nothing to do)."""
        if self.dialect.name == "sqlite":
            with self._lock:
                self._conn.execute("PRAGMA wal_checkpoint(FULL)")

    def close(self) -> None:
        with self._lock:
            if getattr(self, "_registered", False):
                self._registered = False
                _file.closed(self.path)
            self._conn.close()

    def _retrying(self, operation: Callable[[], R]) -> R:
        """Run ``operation`` (one that is safe to run again: a read, an insert of keyed rows
        that ignores those already stored) once more if the connection broke under it."""
        try:
            return operation()
        except ConnectionLost:
            return operation()

    def _rows(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            with self._lock:
                cursor = self._conn.execute(sql, args)
                keys = [c[0] for c in cursor.description or ()]
                return [dict(zip(keys, row)) for row in cursor.fetchall()]
        return self._retrying(read)

    def _tuples(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows as tuples (wide aggregate rows: no dict per row)."""
        def read() -> list[tuple[Any, ...]]:
            with self._lock:
                return [tuple(r) for r in self._conn.execute(sql, args).fetchall()]
        return self._retrying(read)

    def _one(self, sql: str, args: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, args)
        return rows[0] if rows else None

    def _scalar(self, sql: str, args: Sequence[Any] = ()) -> Any:
        def read() -> Any:
            with self._lock:
                row = self._conn.execute(sql, args).fetchone()
            return row[0] if row else None
        return self._retrying(read)

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """The lock and one transaction (committed on exit, rolled back on an exception)."""
        with self._lock, self._conn:
            yield self._conn

    def _chunks(self, ids: Iterable[str], size: int = 500) -> Iterator[list[str]]:
        ids = list(ids)
        for i in range(0, len(ids), size):
            yield ids[i:i + size]


SqliteBase = StoreBase      # the name the operation modules were written against


def _redacted(location: str) -> str:
    """A database URL without its password (for messages)."""
    if not is_url(location):
        return location
    from edgeloop.cloud.store.postgres import redact
    return redact(location)
