"""The store owns the schema: a database from a newer edgeloop is refused, one from before the
store is migrated in place with its rows, and no SQL lives outside cloud/store/."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from edgeloop.cloud.errors import SchemaTooNew
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.store import SCHEMA_VERSION, DeviceFilter, open_store
from edgeloop.cloud.store.readonly import query
from edgeloop.cloud.store.schema import INDEXES, TABLES
from edgeloop.cloud.workspace import Workspace
from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent

# today's main (schema_version 1) as a registry first opened by cloud/registry.py alone: no
# rollout, token or pipeline tables, no fleet columns, telemetry without features/samples/abs_err_sum
PRE_STORE_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
INSERT INTO meta VALUES ('schema_version', '1');
CREATE TABLE model_versions (model_version TEXT PRIMARY KEY, model TEXT, version INTEGER, run_id TEXT, stage TEXT,
    onnx_sha256 TEXT, labels TEXT, metrics TEXT, created_at FLOAT, features TEXT);
INSERT INTO model_versions (model_version, model, version, run_id, stage, created_at)
    VALUES ('m:1', 'm', 1, 'r1', 'production', 1.0);
CREATE TABLE devices (device_id TEXT PRIMARY KEY, tier TEXT, state TEXT, model_version TEXT, update_id TEXT,
    reason TEXT, first_seen FLOAT, last_seen FLOAT);
INSERT INTO devices VALUES ('d1', 'edge-gateway', 'committed', 'm:1', 'upd-1', NULL, 1.0, 2.0);
CREATE TABLE telemetry (device_id TEXT, seq INTEGER, model_version TEXT, window_start FLOAT, window_end FLOAT,
    count INTEGER, labelled INTEGER, correct INTEGER, errors INTEGER, latency_ms_p50 FLOAT, latency_ms_max FLOAT,
    predictions TEXT, confidence_hist TEXT, received_at FLOAT, PRIMARY KEY (device_id, seq));
INSERT INTO telemetry VALUES ('d1', 0, 'm:1', 0, 1, 10, 4, 3, 0, 1.0, 2.0, '[5, 5]', '[1]', 3.0);
CREATE TABLE device_errors (id INTEGER PRIMARY KEY, device_id TEXT, update_id TEXT, code TEXT, message TEXT,
    ts FLOAT, received_at FLOAT);
INSERT INTO device_errors (device_id, update_id, code, message, ts, received_at)
    VALUES ('d1', 'upd-0', 'health.golden', 'wrong outputs', 1.0, 1.0);
"""


def _columns(path: Path, table: str) -> list[str]:
    return [r["name"] for r in query(path, f'PRAGMA table_info("{table}")')]


def test_a_database_from_a_newer_edgeloop_is_refused_and_left_unchanged(tmp_path):
    path = tmp_path / "registry.db"
    open_store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("update meta set value = ? where key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    db.close()
    before = path.read_bytes()
    with pytest.raises(SchemaTooNew, match=rf"schema version {SCHEMA_VERSION + 1}, newer than this edgeloop's "
                                           rf"{SCHEMA_VERSION}: upgrade edgeloop"):
        Registry(path)
    assert path.read_bytes() == before
    assert query(path, "select value from meta where key = 'schema_version'") == [{"value": str(SCHEMA_VERSION + 1)}]


def test_the_cli_refuses_a_newer_database_with_one_line_and_exit_code_5(tmp_path, capsys):
    ws = Workspace.init(tmp_path / "ws", mqtt="127.0.0.1:1")
    open_store(ws.registry_path).close()
    with sqlite3.connect(ws.registry_path) as db:
        db.execute("update meta set value = '99' where key = 'schema_version'")
    db.close()
    code, out, err = run_cli(["models", "--workspace", str(ws.root)], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == SchemaTooNew.exit_code == 5
    assert len(lines) == 1 and lines[0].startswith("edgeloop: error: ") and "schema version 99" in lines[0]
    assert "Traceback" not in err


def test_a_database_from_before_the_store_is_migrated_in_place_and_keeps_its_rows(tmp_path):
    path = tmp_path / "registry.db"
    db = sqlite3.connect(path)
    db.executescript(PRE_STORE_V1)
    db.close()
    registry = Registry(path)
    try:
        assert query(path, "select value from meta where key = 'schema_version'") == [{"value": str(SCHEMA_VERSION)}]
        for table, (columns, _) in TABLES.items():        # every table and column of the schema now exists
            assert set(_columns(path, table)) >= {c for c, _ in columns}, table
        indexes = {r["name"] for r in query(path, "select name from sqlite_master where type = 'index'")}
        assert {f"idx_{t}_{'_'.join(c)}" for t, c, _ in INDEXES} <= indexes
        # the old rows, through the store's operations
        assert registry.model_version("m:1")["stage"] == "production"
        assert [d["model_version"] for d in registry.devices()] == ["m:1"]
        assert registry.telemetry_summary("m:1")["inferences"] == 10
        assert [e["code"] for e in registry.device_errors("d1")] == ["health.golden"]
        # and the new columns work on them
        registry.set_target(["d1"], "m:2")
        assert registry.fleet_devices(DeviceFilter(), 0.0)[0]["target_model_version"] == "m:2"
        assert registry.add_telemetry([{"device_id": "d1", "seq": 1, "model_version": "m:1", "count": 5,
                                        "features": {"hist": [[1]]}, "abs_err_sum": 1.5}]) == 1
    finally:
        registry.close()
    again = Registry(path)           # opening a current database changes nothing
    try:
        assert again.telemetry_count() == 2
    finally:
        again.close()


def test_a_new_database_records_the_current_version(tmp_path):
    path = tmp_path / "new.db"
    open_store(path).close()
    assert query(path, "select value from meta where key = 'schema_version'") == [{"value": str(SCHEMA_VERSION)}]
    assert {r["name"] for r in query(path, "select name from sqlite_master where type = 'table'")} == set(TABLES)


def test_the_read_only_helper_cannot_write(tmp_path):
    path = tmp_path / "r.db"
    open_store(path).close()
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        query(path, "delete from devices")


# SQL or the store's connection and lock, used outside cloud/store/
_FORBIDDEN = re.compile(r"\.execute\(|\.executemany\(|\.executescript\(|\bdb\.query\(|(registry|store)\._lock\b|"
                        r"(registry|store)\.(db|_db|_conn)(\.|\[|[,)]|$)|\.db\[|\bsqlite3\b|\bsqlite_utils\b|"
                        r"CREATE TABLE|\.conn\.", re.IGNORECASE)
_ALLOWED = {"device_sdk/outbox.py"}      # the device's own SQLite outbox, not the control plane's store


def test_no_sql_outside_the_store():
    offenders = []
    for folder in ("cloud", "fleet", "edge", "simulators", "bench", "device_sdk"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("cloud/store/") or rel in _ALLOWED:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if _FORBIDDEN.search(line):
                    offenders.append(f"{rel}:{n}: {line.strip()}")
    assert offenders == []
