"""Every table of the control plane's database, and the ordered migrations that build it.

The schema is declared once, here: :data:`TABLES` (columns in order, primary key) and
:data:`INDEXES`. A database records its version in ``meta.schema_version``;
:func:`migrate` reads it on open and

- refuses a database a newer edgeloop wrote (version above :data:`SCHEMA_VERSION`) with
  :class:`~cloud.errors.SchemaTooNew`, changing nothing;
- applies, in order and in one transaction each, every step of :data:`MIGRATIONS` after the
  recorded version, then records the new version.

Step 1 creates the schema. Databases written before the store record version 1 but were built
piecemeal by several modules (a table created only once its module was used, columns added
later on open); step 2 adds whatever of it they lack and keeps every row. A later step is
appended to :data:`MIGRATIONS` as a function of the connection; never edit a shipped step.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable

from edgeloop.cloud.errors import SchemaTooNew

__all__ = ["INDEXES", "MIGRATIONS", "SCHEMA_VERSION", "TABLES", "add_column", "column_type", "columns", "migrate",
           "stored_version"]

T, I, R = "TEXT", "INTEGER", "REAL"
J = "JSON"     # JSON text: TEXT on SQLite, jsonb on PostgreSQL (parsed once, on insert)

# table -> (columns in order, primary key)
TABLES: dict[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...]]] = {
    "meta": ((("key", T), ("value", T)), ("key",)),
    # -- catalog: data sets, runs, model versions, artifacts, packages, updates, lineage
    "datasets": ((("dataset_id", T), ("name", T), ("version", I), ("sha256", T), ("path", T), ("files", T),
                  ("schema", T), ("added_at", R)), ("dataset_id",)),
    "runs": ((("run_id", T), ("model", T), ("status", T), ("reason", T), ("dataset_id", T), ("dataset_sha256", T),
              ("params", T), ("dist", T), ("code", T), ("environment", T), ("hardware", T), ("metrics", T),
              ("history", T), ("weights_sha256", T), ("reproduces", T), ("started_at", R), ("ended_at", R),
              ("pid", I), ("host", T)),
             ("run_id",)),
    "lineage": ((("src", T), ("dst", T), ("relation", T), ("created_at", R)), ("src", "dst", "relation")),
    "model_versions": ((("model_version", T), ("model", T), ("version", I), ("run_id", T), ("stage", T),
                        ("onnx_sha256", T), ("state_sha256", T), ("arch", T), ("features", T), ("labels", T),
                        ("metrics", T), ("created_at", R), ("task", T)), ("model_version",)),
    "artifacts": ((("sha256", T), ("kind", T), ("length", I), ("path", T), ("created_at", R)), ("sha256",)),
    "packages": ((("sha256", T), ("model_version", T), ("tier", T), ("target", T), ("length", I),
                  ("created_at", R), ("baseline_sha256", T)), ("sha256",)),
    "updates": ((("update_id", T), ("model_version", T), ("tier", T), ("target", T), ("sha256", T), ("length", I),
                 ("issued_at", R)), ("update_id",)),
    "pipeline_steps": ((("key", T), ("step", T), ("output", T), ("created_at", R)), ("key",)),
    "pipeline_runs": ((("run_id", T), ("name", T), ("file_sha256", T), ("status", T), ("reason", T),
                       ("trigger", T), ("steps", T), ("started_at", R), ("ended_at", R)), ("run_id",)),
    # -- fleet: devices, their telemetry and error reports
    "devices": ((("device_id", T), ("tier", T), ("state", T), ("model_version", T), ("update_id", T), ("reason", T),
                 ("first_seen", R), ("last_seen", R), ("hardware", T), ("tags", T), ("groups", T),
                 ("target_model_version", T), ("enrolled_at", R), ("cert_serial", T), ("cert_fingerprint", T),
                 ("cert_not_after", R), ("revoked", I), ("revoked_at", R), ("faults", T), ("clock_offset_s", R)),
                ("device_id",)),
    "telemetry": ((("device_id", T), ("seq", I), ("model_version", T), ("window_start", R), ("window_end", R),
                   ("count", I), ("labelled", I), ("correct", I), ("errors", I), ("latency_ms_p50", R),
                   ("latency_ms_max", R), ("predictions", J), ("confidence_hist", T), ("features", J),
                   ("samples", T), ("received_at", R), ("abs_err_sum", R), ("clock_suspect", I),
                   ("device_window_start", R), ("device_window_end", R)), ("device_id", "seq")),
    "device_errors": ((("id", I), ("device_id", T), ("update_id", T), ("code", T), ("message", T), ("ts", R),
                       ("received_at", R), ("report_id", T)), ("id",)),
    "telemetry_rejects": ((("id", I), ("device_id", T), ("seq", I), ("reason", T), ("detail", T), ("topic", T),
                           ("received_at", R)), ("id",)),
    "label_feedback": ((("device_id", T), ("seq", I), ("labelled", I), ("correct", I), ("abs_err_sum", R),
                        ("source", T), ("added_at", R)), ("device_id", "seq")),
    # -- per-device drift summaries, merged at ingest (cloud/store/drift_summary.py)
    # key in the report's GROUP BY order (a SQLite WITHOUT ROWID table: rows stored in key order)
    "drift_summaries": ((("device_id", T), ("model_version", T), ("field", T), ("chunk", I),
                         *((f"v{j}", R) for j in range(64))), ("model_version", "field", "chunk", "device_id")),
    "drift_devices": ((("device_id", T), ("model_version", T), ("featured", I), ("residual", I), ("rn", R)),
                      ("device_id", "model_version")),
    # -- alerts and API tokens
    "alerts": ((("id", I), ("kind", T), ("cohort", T), ("key", T), ("model_version", T), ("detail", T),
                ("created_at", R)), ("id",)),
    "api_tokens": ((("token_id", T), ("name", T), ("role", T), ("sha256", T), ("created_at", R), ("revoked_at", R),
                    ("last_used_at", R), ("expires_at", R)), ("token_id",)),
    # -- rollouts
    "rollouts": ((("rollout_id", T), ("model_version", T), ("target", T), ("spec", T), ("state", T),
                  ("paused_from", T), ("reason", T), ("created_at", R), ("updated_at", R), ("bake_until", R),
                  ("waves_started_at", R), ("waves_sent", I), ("last_wave_at", R), ("health", T), ("health_at", R),
                  ("finished_at", R)), ("rollout_id",)),
    "rollout_devices": ((("rollout_id", T), ("device_id", T), ("tier", T), ("prev_version", T), ("ord", T),
                         ("state", T), ("attempt", I), ("wave", I), ("update_id", T), ("sent_at", R),
                         ("deadline", R), ("code", T), ("reason", T), ("finished_at", R), ("rb_attempt", I),
                         ("resent_at", R), ("resends", I)),
                        ("rollout_id", "device_id")),
    "rollout_groups": ((("rollout_id", T), ("kind", T), ("tier", T), ("prev_version", T), ("attempt", I),
                        ("grp", T), ("update_id", T), ("announce", T)),
                       ("rollout_id", "kind", "tier", "prev_version", "attempt")),
    "rollout_attempts": ((("rollout_id", T), ("device_id", T), ("phase", T), ("attempt", I), ("update_id", T),
                          ("sent_at", R), ("outcome", T), ("code", T), ("finished_at", R)),
                         ("rollout_id", "device_id", "phase", "attempt")),
    # -- the operators' actions (cloud/audit.py): who did what, when
    "audit": ((("id", I), ("ts", R), ("actor", T), ("action", T), ("subject", T), ("detail", T)), ("id",)),
}

# (table, columns, unique)
INDEXES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("device_errors", ("report_id",), True),          # an error report sent again is stored once
    ("device_errors", ("device_id", "id"), False),
    ("api_tokens", ("sha256",), True),
    ("rollout_devices", ("rollout_id", "state"), False),
    ("rollout_devices", ("device_id",), False),
    ("audit", ("ts",), False),
)


_WITHOUT_ROWID = {"drift_summaries"}
_PG_TYPES = {T: "text", I: "bigint", R: "double precision", J: "jsonb"}
_SQLITE_TYPES = {J: "TEXT"}


def dialect_of(conn: Any) -> str:
    """"sqlite" or "postgresql": the backend of a connection a migration step is given."""
    return "sqlite" if isinstance(conn, sqlite3.Connection) else str(conn.dialect_name)


def column_type(conn: Any, kind: str) -> str:
    """The backend's type for a TEXT, INTEGER, REAL or JSON column."""
    return _PG_TYPES.get(kind, kind) if dialect_of(conn) == "postgresql" else _SQLITE_TYPES.get(kind, kind)


def columns(conn: Any, table: str) -> set[str]:
    """The columns ``table`` has (for a step that adds one: use this, not a backend's catalog)."""
    if dialect_of(conn) == "sqlite":
        return {row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')}
    return set(conn.columns(table))


def add_column(conn: Any, table: str, column: str, kind: str) -> None:
    """Add ``column`` (TEXT, INTEGER, REAL or JSON) to ``table`` unless it has it."""
    if column not in columns(conn, table):
        conn.execute(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {column_type(conn, kind)}')


def _create_table(name: str, dialect: str = "sqlite") -> str:
    """The table's DDL: SQLite's as it always was; on PostgreSQL a single ``id`` key is an identity
    column (SQLite's rowid), and the types are text, bigint and double precision."""
    columns_, pk = TABLES[name]
    keys = ", ".join(f'"{k}"' for k in pk)
    if dialect == "postgresql":
        body = [f'"{c}" bigint generated by default as identity' if (c,) == pk == ("id",) else
                f'"{c}" {_PG_TYPES[t]}' for c, t in columns_]
    else:
        body = [f'"{c}" {_SQLITE_TYPES.get(t, t)}' for c, t in columns_]
    body.append(f"PRIMARY KEY ({keys})")
    # SQLite: rows stored in key order, so the drift report's GROUP BY (the key's leading columns)
    # aggregates while it scans, in sequence, instead of sorting or seeking every 64-column row
    rowid = " WITHOUT ROWID" if dialect == "sqlite" and name in _WITHOUT_ROWID else ""
    return f'CREATE TABLE IF NOT EXISTS "{name}" ({", ".join(body)}){rowid}'


def _ensure(conn: Any) -> None:
    """Every table, column and index of :data:`TABLES` and :data:`INDEXES` that is missing."""
    for name, (columns_, _) in TABLES.items():
        conn.execute(_create_table(name, dialect_of(conn)))
        for column, kind in columns_:
            add_column(conn, name, column, kind)
    for table, cols, unique in INDEXES:
        conn.execute(f'CREATE {"UNIQUE " if unique else ""}INDEX IF NOT EXISTS "idx_{table}_{"_".join(cols)}" '
                     f'ON "{table}" ({", ".join(cols)})')


def _v1(conn: Any) -> None:
    """Version 1: the schema as of the store (a new database gets all of it at once)."""
    _ensure(conn)


def _v2(conn: Any) -> None:
    """Version 2: complete a database written before the store. Those record version 1 but were
    built piecemeal (a table created only once its module was used, columns added on open),
    so add whatever of version 1 they lack; every row stays. A no-op after :func:`_v1`."""
    _ensure(conn)


def _v3(conn: Any) -> None:
    """Version 3: ``packages.baseline_sha256``, the drift baseline stored once per package
    (cloud/drift/baselines.py). Packages from before it have none recorded: their readers say so."""
    add_column(conn, "packages", "baseline_sha256", T)


def _add_columns(conn: Any, table: str, columns_: tuple[tuple[str, str], ...]) -> None:
    for column, kind in columns_:
        add_column(conn, table, column, kind)


def _v4(conn: Any) -> None:
    """Version 4: ``runs.pid`` and ``runs.host``, the process training a run, so a run left
    ``running`` by a process that is gone is recognised (and marked ``interrupted``). Runs from
    before it have none recorded: they stay as they are."""
    _add_columns(conn, "runs", (("pid", I), ("host", T)))


def _v5(conn: Any) -> None:
    """Version 5: the faults a device reports (``devices.faults``, ``devices.clock_offset_s``: its
    clock against the control plane's signed time) and telemetry stored with the ingest's time
    because the device's was impossible (``telemetry.clock_suspect``, the device's own window
    times in ``device_window_start``/``device_window_end``). Rows from before have none."""
    _add_columns(conn, "devices", (("faults", T), ("clock_offset_s", R)))
    _add_columns(conn, "telemetry", (("clock_suspect", I), ("device_window_start", R), ("device_window_end", R)))


def _v6(conn: Any) -> None:
    """Version 6: ``rollout_devices.resent_at`` and ``resends``, a command sent again to a device
    that never acknowledged it (cloud/rollouts/controller.py). Rows from before it have none."""
    _add_columns(conn, "rollout_devices", (("resent_at", R), ("resends", I)))


def _v7(conn: Any) -> None:
    """Version 7: the ``audit`` table, one row per operator action (rollout start, pause, resume,
    abort; promotion and archiving; key rotation; token creation and revocation) with its time
    and actor (cloud/audit.py). Nothing before it was recorded."""
    conn.execute(_create_table("audit", dialect_of(conn)))
    conn.execute('CREATE INDEX IF NOT EXISTS "idx_audit_ts" ON "audit" (ts)')


def _v8(conn: Any) -> None:
    """Version 8: ``drift_summaries`` and ``drift_devices``, every device's telemetry summaries
    merged per model version at ingest, so the drift report adds up one row set per device
    instead of parsing every record (cloud/store/drift_summary.py). The records stored before
    are summarised here, in this step's transaction (each record's JSON parsed once)."""
    from edgeloop.cloud.store.drift_summary import backfill
    for name in ("drift_summaries", "drift_devices"):
        conn.execute(_create_table(name, dialect_of(conn)))
    backfill(conn)


# MIGRATIONS[i] takes a database from version i to version i + 1
MIGRATIONS: tuple[Callable[[Any], None], ...] = (_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8)
SCHEMA_VERSION = len(MIGRATIONS)


def _has_meta(conn: Any) -> bool:
    if dialect_of(conn) == "sqlite":
        return bool(conn.execute("select 1 from sqlite_master where type = 'table' and name = 'meta'").fetchone())
    return conn.execute("select to_regclass('meta') is not null").fetchone()[0]


def stored_version(conn: Any) -> int:
    """The version a database records (0: a new, empty one). Raises SchemaTooNew for a value
    this edgeloop cannot read."""
    if not _has_meta(conn):
        return 0
    row = conn.execute("select value from meta where key = 'schema_version'").fetchone()
    if row is None:
        return 0
    try:
        return int(row[0])
    except (TypeError, ValueError):
        raise SchemaTooNew(f"the database records schema version {row[0]!r}, which this edgeloop "
                           f"(schema {SCHEMA_VERSION}) cannot read") from None


def _too_new(found: int, path: str) -> SchemaTooNew:
    return SchemaTooNew(f"{path} has schema version {found}, newer than this edgeloop's {SCHEMA_VERSION}: "
                        "upgrade edgeloop to open it (nothing was changed)")


def _lock_for_migration(conn: Any) -> None:
    """Hold off every other process's migration until this transaction ends."""
    if dialect_of(conn) == "sqlite":
        conn.execute("begin immediate")
    else:
        conn.execute("select pg_advisory_xact_lock(?)", [_PG_MIGRATION_LOCK])


_PG_MIGRATION_LOCK = 0x6564676C   # "edgl": the advisory lock key of schema migrations


def migrate(conn: Any, path: str = "the database") -> int:
    """Bring the database to :data:`SCHEMA_VERSION`; returns the version it had. Raises
    SchemaTooNew, changing nothing, for a database from a newer edgeloop. Each step and its
    version commit together, under a lock no other process's migration can interleave with (two
    control-plane hosts opening one new database build it once)."""
    first = found = stored_version(conn)
    if found > SCHEMA_VERSION:
        raise _too_new(found, path)
    while found < SCHEMA_VERSION:
        with conn:
            _lock_for_migration(conn)
            found = stored_version(conn)          # another process may have migrated meanwhile
            if found > SCHEMA_VERSION:
                raise _too_new(found, path)
            if found == SCHEMA_VERSION:
                break
            MIGRATIONS[found](conn)
            conn.execute("insert into meta (key, value) values ('schema_version', ?) "
                         "on conflict(key) do update set value = excluded.value", [str(found + 1)])
            found += 1
    return first
