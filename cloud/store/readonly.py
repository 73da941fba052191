"""Read-only SQL on a store's database file, for tests and diagnostics that deliberately look
at raw rows. Nothing in the product calls it; every product read and write goes through the
store's operations.

:func:`query` opens its own connection with SQLite's ``mode=ro`` (so a statement that writes
fails with ``sqlite3.OperationalError``), runs one statement and closes it. In WAL mode it sees
every transaction the store has committed and never blocks the store's writer.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Sequence

__all__ = ["query"]


def query(path: Path | str, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """The rows of one read-only statement on the database at ``path``, as dicts."""
    conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()
