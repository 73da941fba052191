"""Read-only SQL on a store's database, for tests and diagnostics that deliberately look at raw
rows. Nothing in the product calls it; every product read and write goes through the store's
operations.

:func:`query` opens its own connection, runs one statement and closes it: on a SQLite file with
``mode=ro`` (a statement that writes fails with ``sqlite3.OperationalError``; in WAL mode it
sees every committed transaction and never blocks the store's writer), on a ``postgresql://``
URL in a read-only transaction (a write fails with ``psycopg.errors.ReadOnlySqlTransaction``).
``?`` placeholders work on both.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Sequence

from edgeloop.cloud.store._base import is_url

__all__ = ["query"]


def query(location: Path | str, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """The rows of one read-only statement on the database at ``location``, as dicts."""
    if is_url(location):
        import psycopg
        from psycopg.rows import dict_row

        from edgeloop.cloud.store.postgres import translate
        with psycopg.connect(str(location), row_factory=dict_row, options="-c default_transaction_read_only=on") \
                as pg:
            return list(pg.execute(translate(sql), list(args)).fetchall())
    conn = sqlite3.connect(f"file:{Path(location)}?mode=ro", uri=True, timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()
