"""The registry: the name the rest of edgeloop knows the control plane's store by.

:class:`Registry` is :class:`edgeloop.cloud.store.SqlStore` (the only connection, lock, schema and
SQL, on SQLite or PostgreSQL; see cloud.store): data sets, runs, model versions with their stage, artifacts, packages,
updates, lineage (edges ``kind:id -> kind:id``: data set -> run -> model version -> package ->
update -> device), devices, telemetry (primary key ``(device_id, seq)``, so a record delivered
twice is stored once), error reports, alerts, API tokens, pipeline runs and rollouts. Opening
one migrates an older database and refuses one from a newer edgeloop (SchemaTooNew).
"""

from __future__ import annotations

from edgeloop.cloud.store import SCHEMA_VERSION, SqlStore

__all__ = ["Registry", "SCHEMA_VERSION"]


class Registry(SqlStore):
    """The workspace's store (``registry.db``, or the PostgreSQL database its ``store`` setting names:
    ``Registry(ws.store_location)``); see cloud.store.interface for its operations."""
