"""The registry: the name the rest of edgeloop knows the control plane's store by.

:class:`Registry` is :class:`edgeloop.cloud.store.SqlStore` (the only connection, lock, schema and
SQL, on SQLite or PostgreSQL; see cloud.store): data sets, runs, model versions with their stage, artifacts, packages,
updates, lineage (edges ``kind:id -> kind:id``: data set -> run -> model version -> package ->
update -> device), devices, telemetry (primary key ``(device_id, seq)``, so a record delivered
twice is stored once), error reports, alerts, API tokens, pipeline runs and rollouts. Opening
one migrates an older database and refuses one from a newer edgeloop (SchemaTooNew) or a file
that is not a whole database (WorkspaceDamaged); it also marks ``interrupted`` every training
run left ``running`` by a process of this host that is gone (cloud.train.runrecord).
"""

from __future__ import annotations

from pathlib import Path

from edgeloop.cloud.store import SCHEMA_VERSION, SqlStore

__all__ = ["Registry", "SCHEMA_VERSION"]


class Registry(SqlStore):
    """The workspace's store (``registry.db``, or the PostgreSQL database its ``store`` setting names:
    ``Registry(ws.store_location)``); see cloud.store.interface for its operations."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(path)
        if self.running_runs():    # only then the training side is imported (a read-only command stays fast)
            from edgeloop.cloud.train.runrecord import reap_orphaned_runs

            reap_orphaned_runs(self)
