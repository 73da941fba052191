"""The PostgreSQL backend (psycopg 3): what :class:`~cloud.store._base.StoreBase` opens for a
``postgresql://`` URL.

:class:`PgConnection` gives the operation modules the part of ``sqlite3.Connection`` they use
(``execute``, ``executemany``, ``with conn:`` for one transaction, ``in_transaction``), so one
SQL text serves both backends: ``?`` and ``:name`` placeholders become psycopg's ``%s`` and
``%(name)s``; results come back as tuples, ``numeric`` (PostgreSQL's ``sum`` of bigints) as
int or float, and a Python bool is stored as 0/1 as SQLite stores it. The connection runs in
autocommit outside ``with conn:``; ``executemany`` goes through psycopg's pipeline mode (one
round trip per batch, not per row).

Errors are one line each, the password never shown: a server that cannot be reached raises
ServiceUnavailable (exit 3); a refused login, a missing database or a malformed URL raises
UserError (exit 2). A connection that breaks during an operation raises :class:`ConnectionLost`
(a ServiceUnavailable): its transaction is rolled back by the server, so nothing of it is
stored, and the next operation reconnects (reads and keyed inserts are retried once at once).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Sequence

import psycopg
import psycopg.errors
from psycopg.adapt import Dumper, Loader
from psycopg.pq import TransactionStatus
from psycopg.types.string import TextLoader

from edgeloop.cloud.errors import ServiceUnavailable, UserError
from edgeloop.cloud.store._base import ConnectionLost, Dialect

__all__ = ["DIALECT", "PgConnection", "connect", "redact", "translate"]

DIALECT = Dialect("postgresql", skip_locked=" for update skip locked", duplicate_key=(psycopg.errors.UniqueViolation,),
                  try_lock="select pg_try_advisory_lock(?)", unlock="select pg_advisory_unlock(?)",
                  xact_lock="select pg_advisory_xact_lock(?)")
CONNECT_TIMEOUT_S = 10
# the server ends the session of a client that vanished (power, network) after at most
# IDLE + INTERVAL * COUNT seconds of silence, and with it the session's locks (a rollout's step lock)
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 10, 5, 3

_PASSWORD = re.compile(r"(://[^:/@?]*):[^@/?]*@")
_LOGIN = ("password authentication failed", "no password supplied", "role ", "authentication failed")


def redact(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``."""
    return _PASSWORD.sub(r"\1:***@", url)


def _line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__


@lru_cache(maxsize=4096)
def translate(sql: str) -> str:
    """SQLite-style placeholders to psycopg's: ``?`` -> ``%s``, ``:name`` -> ``%(name)s``, and
    a literal ``%`` doubled; nothing inside quotes but ``%`` is touched, nor ``::`` casts."""
    out: list[str] = []
    i, n, quote = 0, len(sql), ""
    while i < n:
        c = sql[i]
        if quote:
            out.append("%%" if c == "%" else c)
            if c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
            out.append(c)
        elif c == "?":
            out.append("%s")
        elif c == "%":
            out.append("%%")
        elif c == ":" and i + 1 < n and sql[i + 1] == ":":
            out.append("::")
            i += 1
        elif c == ":" and i + 1 < n and (sql[i + 1].isalpha() or sql[i + 1] == "_"):
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] == "_"):
                j += 1
            out.append(f"%({sql[i + 1:j]})s")
            i = j
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


class _Numeric(Loader):
    """``numeric`` as int when whole (``sum`` of bigint columns), else float: as SQLite returns it."""

    def load(self, data: Any) -> int | float:
        text = bytes(data).decode()
        return float(text) if any(ch in text for ch in ".eEN") else int(text)


class _BoolAsInt(Dumper):
    """A Python bool stored as SQLite stores it (the schema's flags are integer columns)."""

    oid = psycopg.adapters.types["int8"].oid

    def dump(self, obj: Any) -> bytes:
        return b"1" if obj else b"0"


def _open(url: str) -> psycopg.Connection:
    shown = redact(url)
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.ProgrammingError as e:          # the URL itself does not parse
        raise UserError(f"malformed store URL {shown}: {_line(e)} (fix `store` in edgeloop.toml)") from None
    except psycopg.OperationalError as e:
        text = _line(e)
        if any(k in text for k in _LOGIN):
            raise UserError(f"the store at {shown} refused the login: {text} (check the user and password: "
                            "PGPASSWORD or ~/.pgpass)") from None
        if "does not exist" in text:
            raise UserError(f"the store at {shown} has no such database: {text} "
                            "(create it: createdb, or fix `store` in edgeloop.toml)") from None
        raise ServiceUnavailable(f"cannot reach the store at {shown}: {text} "
                                 "(start PostgreSQL or fix `store` in edgeloop.toml, then retry)") from None
    try:      # telemetry summaries (~6 KB of JSON each) are compressed on insert: lz4 is ~2x cheaper than pglz
        conn.execute("set default_toast_compression = 'lz4'")
    except psycopg.Error:       # a server built without lz4 (or before PostgreSQL 14) keeps its default
        pass
    try:      # server-side keepalives: a dead client's session (and its locks) ends within ~25 s, not hours
        conn.execute(f"set tcp_keepalives_idle = {KEEPALIVE_IDLE_S}")
        conn.execute(f"set tcp_keepalives_interval = {KEEPALIVE_INTERVAL_S}")
        conn.execute(f"set tcp_keepalives_count = {KEEPALIVE_COUNT}")
    except psycopg.Error:       # a Unix-socket connection has no TCP keepalives to set
        pass
    conn.adapters.register_loader("numeric", _Numeric)
    conn.adapters.register_loader("jsonb", TextLoader)      # JSON columns read back as text, as on SQLite
    conn.adapters.register_dumper(bool, _BoolAsInt)
    return conn


class PgConnection:
    """One psycopg connection behind the subset of ``sqlite3.Connection`` the store uses."""

    dialect_name = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        self._pg = _open(url)
        self._txs: list[Any] = []

    def _live(self) -> psycopg.Connection:
        if self._pg.closed or self._pg.broken:
            if self._txs:        # inside a transaction that broke: it is gone, say so until it ends
                raise ConnectionLost(self._lost_text())
            self._pg = _open(self.url)
        return self._pg

    def _lost_text(self) -> str:
        return (f"lost the connection to the store at {redact(self.url)}: the transaction was rolled back, "
                "nothing of it is stored (retry)")

    def _run(self, method: str, sql: str, args: Any) -> psycopg.Cursor:
        cursor = self._live().cursor()
        try:
            getattr(cursor, method)(translate(sql), args)
        except psycopg.OperationalError as e:
            if self._pg.closed or self._pg.broken:
                raise ConnectionLost(self._lost_text()) from e
            raise
        return cursor

    def execute(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> psycopg.Cursor:
        return self._run("execute", sql, args)     # always params: translate doubled every literal %

    def executemany(self, sql: str, rows: Sequence[Any]) -> psycopg.Cursor:
        return self._run("executemany", sql, rows)

    def executemany_returning(self, sql: str, rows: Sequence[Any]) -> list[tuple[Any, ...]]:
        """``executemany`` of a statement with ``returning``: every row it returned, in order
        (one pipelined round trip, as :meth:`executemany`)."""
        cursor = self._live().cursor()
        try:
            cursor.executemany(translate(sql), rows, returning=True)
            out: list[tuple[Any, ...]] = []
            while True:
                out.extend(cursor.fetchall())
                if not cursor.nextset():
                    return out
        except psycopg.OperationalError as e:
            if self._pg.closed or self._pg.broken:
                raise ConnectionLost(self._lost_text()) from e
            raise

    @property
    def in_transaction(self) -> bool:
        return self._pg.info.transaction_status != TransactionStatus.IDLE

    def __enter__(self) -> PgConnection:
        tx = self._live().transaction()
        tx.__enter__()
        self._txs.append(tx)
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        tx = self._txs.pop()
        try:
            tx.__exit__(kind, exc, tb)
        except psycopg.OperationalError as e:
            if self._pg.closed or self._pg.broken:
                raise ConnectionLost(self._lost_text()) from e
            raise
        return False

    def columns(self, table: str) -> list[str]:
        return [r[0] for r in self.execute("select column_name from information_schema.columns where "
                                           "table_schema = current_schema() and table_name = ?", [table])]

    def backend_pid(self) -> int:
        return int(self._live().info.backend_pid)

    def close(self) -> None:
        self._pg.close()


def connect(url: str) -> tuple[PgConnection, Dialect]:
    return PgConnection(url), DIALECT
