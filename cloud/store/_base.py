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

import hashlib
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

__all__ = ["ConnectionLost", "Dialect", "StoreBase", "SqliteBase", "decode", "dumps", "is_url", "lock_key", "marks"]

R = TypeVar("R")



def decode(row: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``row`` with the JSON text of ``keys`` parsed in place."""
    for k in keys:
        if isinstance(row.get(k), str):
            row[k] = json.loads(row[k])
    return row


def marks(values: Sized) -> str:
    return ",".join("?" * len(values))


def lock_key(name: str) -> int:
    """The advisory lock key (a signed 64-bit integer) of ``name``."""
    return int.from_bytes(hashlib.sha256(f"edgeloop/{name}".encode()).digest()[:8], "big", signed=True)


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
    # a lock of this connection's session on one bigint key, taken without waiting (a true/false
    # row) and given back; the server drops it when the session ends, however it ends ("": none,
    # SQLite: one process per file, under the serve lock)
    try_lock: str = ""
    unlock: str = ""
    # a lock on one bigint key held until the transaction ends ("": SQLite's `begin immediate`)
    xact_lock: str = ""
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
        self._tx_depth = 0          # open _tx blocks of the thread holding the lock (the outermost commits)
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

    def hold(self, name: str) -> bool:
        """Take the session lock on ``name`` for as long as this store's connection lives (closing
        the store, or its process ending however it ends, gives it back): False if another
        store's session holds it. SQLite: always True (one process per file, under the serve lock)."""
        if not self.dialect.try_lock:
            return True
        with self._lock:
            return bool(self._conn.execute(self.dialect.try_lock, [lock_key(name)]).fetchone()[0])

    def release(self, name: str) -> None:
        """Give back a lock :meth:`hold` took (nothing if this session does not hold it: its
        connection was lost, and the lock with it)."""
        if not self.dialect.unlock:
            return
        try:
            with self._lock:
                self._conn.execute(self.dialect.unlock, [lock_key(name)])
        except ConnectionLost:
            pass

    def stored_bytes(self) -> int:
        """The bytes the store's tables and their indexes take (SQLite: the file's pages, the
        write-ahead log moved in first; PostgreSQL: the tables of its schema, TOAST and indexes
        included): what a benchmark divides by the fleet's size."""
        if self.dialect.name == "sqlite":
            self.checkpoint()
            return int(self._scalar("select page_count * page_size from pragma_page_count(), pragma_page_size()"))
        return int(self._scalar("select coalesce(sum(pg_total_relation_size(c.oid)), 0) from pg_class c "
                                "join pg_namespace n on n.oid = c.relnamespace "
                                "where c.relkind = 'r' and n.nspname = current_schema()"))

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
        """The lock and one transaction (committed on exit, rolled back on an exception). A
        ``_tx`` inside another joins it: nothing commits until the outermost one ends (SQLite's
        ``with conn:`` would commit the outer transaction at the inner one's end, so a rollout
        could be seen without its devices, or a claim read under ``begin immediate`` written
        after another writer)."""
        with self._lock:
            if self._tx_depth:
                self._tx_depth += 1
                try:
                    yield self._conn
                finally:
                    self._tx_depth -= 1
                return
            self._tx_depth = 1
            try:
                with self._conn:
                    yield self._conn
            finally:
                self._tx_depth = 0

    def _exclusive(self, conn: Any, name: str) -> None:
        """Inside a ``_tx``: hold off every other store's transaction that asks for ``name`` until
        this one ends, so a read and the writes it decides are not interleaved with another
        host's (SQLite: the write lock at once, ``begin immediate``; PostgreSQL: a transaction
        advisory lock on ``name``'s key)."""
        if self.dialect.xact_lock:
            conn.execute(self.dialect.xact_lock, [lock_key(name)])
        elif not conn.in_transaction:
            conn.execute("begin immediate")

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
