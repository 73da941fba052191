"""The store: :class:`SqlStore` implements :class:`edgeloop.cloud.store.interface.Store` from one
operation module per table family (catalog, fleet, access, rollouts), over SQLite (a path) or
PostgreSQL (a ``postgresql://`` URL) with the same SQL (cloud.store._base). Opening one migrates
the database in place (cloud.store.schema) or raises SchemaTooNew for one from a newer
edgeloop. One store may be shared by threads: every operation holds its re-entrant lock.
"""

from __future__ import annotations

from edgeloop.cloud.store.access import AccessOps
from edgeloop.cloud.store.catalog import CatalogOps
from edgeloop.cloud.store.drift import DriftOps
from edgeloop.cloud.store.fleet import FleetOps
from edgeloop.cloud.store.rollouts import RolloutOps

__all__ = ["SqlStore"]


class SqlStore(CatalogOps, FleetOps, DriftOps, AccessOps, RolloutOps):
    """SQLite (WAL) or PostgreSQL behind the :class:`~cloud.store.interface.Store` Protocol."""
