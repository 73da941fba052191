"""The one owner of the control plane's database: its connection, lock, schema and SQL.

Nothing outside this package writes SQL or touches the connection; the rest of edgeloop calls
the domain operations of :class:`Store` (``edgeloop.cloud.store.interface``), which
:class:`SqlStore` implements over SQLite in WAL mode (a file) or PostgreSQL (a
``postgresql://`` URL) with the same SQL. :func:`open_store` migrates an older database in place and refuses one a newer
edgeloop wrote (:class:`~cloud.errors.SchemaTooNew`, exit code 5). Tests that deliberately
inspect raw rows use :func:`edgeloop.cloud.store.readonly.query`.

::

    interface.py   the Store Protocol (one per table family, combined)
    schema.py      every table's DDL, the ordered MIGRATIONS, SCHEMA_VERSION
    sql.py         SqlStore (also named SqliteStore), assembled from:
      _base.py       connection, lock, migrate on open, the Dialect, row helpers
      sqlite.py      the SQLite connection (WAL)
      _file.py       is the file a whole SQLite database (refuse a truncated or foreign one unopened)
      postgres.py    the PostgreSQL connection (psycopg 3), placeholders, errors
      catalog.py     data sets, runs, lineage, model versions, artifacts, packages, updates, pipelines
      fleet.py       devices, enrolment, telemetry, error reports, refused telemetry, label feedback
      access.py      alerts, API tokens
      rollouts.py    rollouts and their devices, groups, attempts (transitions checked against
                     cloud.rollouts.machine's tables)
    readonly.py    read-only raw queries for tests and diagnostics
"""

from __future__ import annotations

from pathlib import Path

from edgeloop.cloud.store.fleet import DeviceFilter
from edgeloop.cloud.store.interface import Store
from edgeloop.cloud.store.rollouts import AttemptEnd
from edgeloop.cloud.store.schema import SCHEMA_VERSION
from edgeloop.cloud.store.sql import SqlStore
from edgeloop.cloud.store.sqlite import SqliteStore

__all__ = ["AttemptEnd", "DeviceFilter", "SCHEMA_VERSION", "SqlStore", "SqliteStore", "Store", "open_store"]


def open_store(location: Path | str) -> SqlStore:
    """The store of the database at ``location``: a SQLite file's path, or a ``postgresql://``
    URL (created if missing, migrated if older). Raises SchemaTooNew for a database from a newer
    edgeloop, changing nothing; ServiceUnavailable for a server it cannot reach; UserError for a
    refused login, a missing database or a malformed URL."""
    return SqlStore(location)
