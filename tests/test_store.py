"""The store owns the schema: a database from a newer edgeloop is refused, one from before the
store is migrated in place with its rows, and no SQL lives outside cloud/store/. The
operations behave the same on both backends (``store_location``: a SQLite file, or a fresh
database on the session's private PostgreSQL), also with two stores on one database at once
(two control-plane hosts), and a PostgreSQL that cannot be reached, refuses the login or
drops the connection mid-batch gives one clear error with nothing half-stored."""

from __future__ import annotations

import re
import sqlite3
import threading
from pathlib import Path

import pytest

from edgeloop.cloud.errors import SchemaTooNew, ServiceUnavailable, UserError
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.store import SCHEMA_VERSION, AttemptEnd, DeviceFilter, open_store
from edgeloop.cloud.store._base import ConnectionLost
from edgeloop.cloud.store.readonly import query
from edgeloop.cloud.store.schema import INDEXES, TABLES
from edgeloop.cloud.rollouts.machine import DeviceEvent
from edgeloop.cloud.workspace import Workspace
from conftest import run_cli
from tests.pg_server import PASSWORD, _free_port, pg_server, store_location  # noqa: F401 - fixtures

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



# -- both backends ---------------------------------------------------------------------------------
def _write(location, sql: str, args=()) -> None:
    """A raw write behind the store's back (what an operator's tool or a newer edgeloop does)."""
    if isinstance(location, Path):
        with sqlite3.connect(location) as db:
            db.execute(sql, args)
        db.close()
        return
    import psycopg
    with psycopg.connect(location, autocommit=True) as conn:
        conn.execute(sql.replace("?", "%s"), args)


def _tables(location) -> set[str]:
    if isinstance(location, Path):
        return {r["name"] for r in query(location, "select name from sqlite_master where type = 'table'")}
    return {r["table_name"] for r in query(location, "select table_name from information_schema.tables "
                                                     "where table_schema = current_schema()")}


def test_a_new_database_gets_every_table_and_the_current_version_on_both_backends(store_location):
    open_store(store_location).close()
    assert _tables(store_location) == set(TABLES)
    assert query(store_location, "select value from meta where key = 'schema_version'") == \
        [{"value": str(SCHEMA_VERSION)}]
    store = open_store(store_location)          # opening it again changes nothing
    store.close()
    assert query(store_location, "select count(*) as n from meta") == [{"n": 1}]


def test_a_newer_schema_is_refused_on_both_backends_changing_nothing(store_location):
    open_store(store_location).close()
    _write(store_location, "update meta set value = ? where key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    with pytest.raises(SchemaTooNew, match=rf"schema version {SCHEMA_VERSION + 1}, newer than this edgeloop's"):
        open_store(store_location)
    assert query(store_location, "select value from meta where key = 'schema_version'") == \
        [{"value": str(SCHEMA_VERSION + 1)}]
    if not isinstance(store_location, Path):
        assert PASSWORD not in str(pytest.raises(SchemaTooNew, open_store, store_location).value)


def _telemetry(device: str, seqs, model_version: str = "m:1", **extra):
    return [{"device_id": device, "seq": s, "model_version": model_version, "window_end": float(s), "count": 10,
             "labelled": 4, "correct": 3, "errors": 1, "predictions": [6, 4], "confidence_hist": [1, 9],
             "features": {"hist": [[1, 2]], "n": [3], "missing": [0], "sum": [1.5], "sumsq": [2.0], "min": [0.0],
                          "max": [1.0]}, **extra} for s in seqs]


def test_catalog_operations_read_back_the_same_on_both_backends(store_location):
    store = open_store(store_location)
    try:
        assert store.add_dataset("digits", "aa", "/d", ["a.csv"], {"x": 1}) == ("digits:1", True)
        assert store.add_dataset("digits", "aa", "/d", ["a.csv"], {"x": 1}) == ("digits:1", False)
        assert store.add_dataset("digits", "bb", "/d2", [], {}) == ("digits:2", True)
        assert store.dataset("digits")["version"] == 2 and store.dataset("digits:1")["files"] == ["a.csv"]
        store.start_run({"run_id": "r1", "model": "m", "params": {"lr": 0.1}, "started_at": 1.0})
        store.finish_run("r1", status="succeeded", metrics={"acc": 0.9})
        assert store.run("r1")["metrics"] == {"acc": 0.9} and store.run("r1")["params"] == {"lr": 0.1}
        assert store.count_runs() == 1 and [r["status"] for r in store.runs()] == ["succeeded"]
        store.add_model_version({"model_version": "m:1", "model": "m", "version": 1, "run_id": "r1",
                                 "stage": "none", "features": ["a"], "labels": ["x", "y"], "task": {"kind": "anomaly"}})
        assert store.next_version("m") == 2
        store.set_stage("m:1", "production")
        assert store.in_stage("m", "production") == ["m:1"] and store.task_of("m:1") == {"kind": "anomaly"}
        store.add_edge("run:r1", "model:m:1", "trained")
        store.add_edge("run:r1", "model:m:1", "trained")              # twice: one edge
        assert store.parents("model:m:1") == [{"src": "run:r1", "relation": "trained"}]
        store.add_package({"sha256": "p1", "model_version": "m:1", "tier": "mcu", "target": "t", "length": 7})
        store.add_package({"sha256": "p1", "model_version": "m:1", "tier": "mcu", "target": "t", "length": 8})
        assert store.count_packages() == 1 and store.package("p1")["length"] == 8
        assert store.package_for("m:1", "mcu")["sha256"] == "p1" and store.packages_named("t") == ["p1"]
        store.upsert_update({"update_id": "u1", "model_version": "m:1", "tier": "mcu", "sha256": "p1", "length": 8,
                             "issued_at": 2.0})
        store.upsert_update({"update_id": "u1", "model_version": "m:1", "tier": "mcu", "sha256": "p1", "length": 9,
                             "issued_at": 3.0})
        assert [u["length"] for u in store.updates()] == [9]
        store.remember_pipeline_step("k", "train", {"out": 1})
        assert store.pipeline_step_output("k") == {"out": 1} and store.pipeline_step_outputs("train") == [{"out": 1}]
        store.record_pipeline_run({"run_id": "p", "name": "n", "status": "ok", "steps": ["a"], "started_at": 1.0})
        assert store.pipeline_runs()[0]["steps"] == ["a"]
    finally:
        store.close()


def test_fleet_operations_read_back_the_same_on_both_backends(store_location):
    store = open_store(store_location)
    try:
        store.record_statuses([{"device_id": "d1", "tier": "mcu", "state": "committed", "model_version": "m:1",
                                "update_id": "u1"},
                               {"device_id": "d2", "tier": "edge-gateway", "state": "offline"}],
                              installed=[("u1", "d1"), ("u1", "d1")])
        store.record_status({"device_id": "d1", "tier": "mcu", "state": "offline"})      # the last will
        assert store.devices("mcu")[0]["model_version"] == "m:1"      # kept over an offline status
        store.enroll_device("d3", {"tier": "mcu", "cert_serial": "s3", "cert_fingerprint": "f", "enrolled_at": 1.0,
                                   "tags": '{"site": "north"}', "groups": '["canary"]'})
        with pytest.raises(UserError, match="already enrolled"):
            store.enroll_device("d3", {"tier": "mcu", "cert_serial": "s4"})
        store.record_status({"device_id": "d3", "tier": "mcu", "state": "committed"})
        assert [d["device_id"] for d in store.fleet_devices(DeviceFilter(tags={"site": "north"}), 0.0)] == ["d3"]
        assert [d["device_id"] for d in store.fleet_devices(DeviceFilter(group="canary", online=True), 0.0)] == ["d3"]
        assert [d["device_id"] for d in store.fleet_devices(DeviceFilter(online=False), 0.0)] == ["d1", "d2"]
        assert store.enrolment(["d1", "d3"]) == ({"d3"}, set())
        store.mark_revoked("d3")
        assert store.fleet_devices(DeviceFilter(revoked=True), 0.0)[0]["revoked"] is True
        assert store.set_target(["d1", "d3", "nope"], "m:2") == 2
        # telemetry: a record delivered twice is stored once
        assert store.add_telemetry(_telemetry("d1", range(3))) == 3
        assert store.add_telemetry(_telemetry("d1", range(5))) == 2
        assert store.telemetry_count() == 5 and store.last_seqs(["d1", "d2"]) == {"d1": 4}
        totals = store.device_telemetry_totals("d1", seq_from=1, seq_to=3)
        assert totals == {"records": 2, "inferences": 20, "correct": 6, "labelled": 8}
        summary = store.telemetry_summary("m:1")
        assert (summary["inferences"], summary["labelled"], summary["errors"]) == (50, 20, 5)
        assert summary["accuracy"] == 0.75 and summary["anomaly_rate"] is None
        assert store.add_label_feedback([{"device_id": "d1", "seq": 0, "labelled": 10, "correct": 10},
                                         {"device_id": "d1", "seq": 99, "labelled": 1, "correct": 1}]) == 1
        rows = store.drift_rows()
        assert [(r["seq"], r["labelled"], r["correct"], r["tier"]) for r in rows][:2] == \
            [(0, 10, 10, "mcu"), (1, 4, 3, "mcu")]
        assert store.add_device_error({"device_id": "d1", "update_id": "u1", "code": "c", "message": "m",
                                       "report_id": "r1"})
        assert not store.add_device_error({"device_id": "d1", "update_id": "u1", "code": "c", "message": "m",
                                           "report_id": "r1"})
        assert store.latest_error_code("d1", "u1") == "c"
        assert store.fleet_devices(DeviceFilter(), 0.0, device_id="d1")[0]["last_error"] == "c: m"
        store.add_telemetry_rejects([{"device_id": "d9", "seq": 1, "reason": "schema", "detail": "x"}] * 2)
        assert [r["id"] for r in store.telemetry_rejects()] == [1, 2]
        store.add_alert({"kind": "drift", "cohort": "device", "key": "d1"})
        store.add_alert({"kind": "skew", "cohort": "device", "key": "d1"})
        assert [a["kind"] for a in store.alerts()] == ["drift", "skew"]
        assert store.add_token({"token_id": "t1", "name": "ops", "role": "admin", "sha256": "h",
                                "created_at": 1.0, "expires_at": None}, now=2.0)
        assert not store.add_token({"token_id": "t2", "name": "ops", "role": "admin", "sha256": "h2",
                                    "created_at": 1.0, "expires_at": None}, now=2.0)
        assert store.use_token("h", 3.0)["token_id"] == "t1"
        assert store.revoke_token("ops", 4.0)[1] is False and store.use_token("h", 5.0) is None
        store.forget_device("d2")
        assert [d["device_id"] for d in store.devices()] == ["d1", "d3"]
    finally:
        store.close()


def _rollout(store, rollout_id: str, n: int) -> list[str]:
    ids = [f"dev-{i:05d}" for i in range(n)]
    busy = store.insert_rollout(
        {"rollout_id": rollout_id, "model_version": "m:2", "target": "all", "spec": {"waves": [n]},
         "state": "waves", "created_at": 1.0, "updated_at": 1.0},
        [{"rollout_id": rollout_id, "kind": "update", "tier": "mcu", "prev_version": "", "attempt": 1,
          "grp": "g", "update_id": "u-1", "announce": "{}"}],
        [{"rollout_id": rollout_id, "device_id": d, "tier": "mcu", "prev_version": "m:1", "ord": f"{i:08d}",
          "state": "pending", "attempt": 0, "rb_attempt": 0} for i, d in enumerate(ids)])
    assert busy is None
    return ids


def test_rollout_steps_move_each_device_once_on_both_backends(store_location):
    store = open_store(store_location)
    try:
        ids = _rollout(store, "r1", 5)
        assert store.busy_devices(ids[:2]) == ("r1", 2)
        assert store.insert_rollout({"rollout_id": "r2", "model_version": "m:3", "target": "all", "spec": {},
                                     "state": "pending", "created_at": 2.0}, [], [
            {"rollout_id": "r2", "device_id": ids[0], "tier": "mcu", "prev_version": "", "ord": "0",
             "state": "pending", "attempt": 0, "rb_attempt": 0}]) == ("r1", 1)
        assert store.rollout_ids() == ["r1"] and store.rollout_ids(active_only=True) == ["r1"]
        assert store.assign_wave("r1", 0, 3, now=1.0, rate_limited=True) == ids[:3]
        assert store.rollout_row("r1")["waves_sent"] == 3
        commands = {("mcu", "", 1): ("u-1", {"update": "u-1"})}
        assert [d for d, _ in store.mark_sent("r1", "update", commands, {}, now=2.0)] == ids[:3]
        assert store.mark_sent("r1", "update", commands, {}, now=2.0) == []        # twice: nothing more
        assert store.in_flight("r1") == 3 and store.commands_sent("r1") == 3
        assert [r["device_id"] for r in store.overdue("r1", now=10_000.0)] == ids[:3]
        rows = {r["device_id"]: r for r in store.rollout_devices("r1")}
        ends = [AttemptEnd(rows[ids[0]], DeviceEvent.COMMIT, None, None),
                AttemptEnd(rows[ids[1]], DeviceEvent.RETRY, "timeout", "no answer")]
        assert store.end_attempts("r1", ends, now=3.0) == 2
        assert store.end_attempts("r1", ends, now=3.0) == 0                        # idempotent
        counts = store.rollout_device_counts("r1")
        assert (counts["committed"], counts["pending"], counts["sent"]) == (1, 3, 1)
        assert store.move_rollout("r1", "waves", {"state": "aborting", "updated_at": 4.0})
        assert not store.move_rollout("r1", "waves", {"state": "aborting", "updated_at": 4.0})
        store.set_rollout_health("r1", {"ok": True}, 5.0)
        assert store.rollout_row("r1")["health"] == {"ok": True}
        assert store.abort_devices("r1", "m:2", now=6.0) >= 3
        assert store.rollout_device_counts("r1")["cancelled"] == 3
    finally:
        store.close()


def test_two_controllers_on_one_database_send_each_device_exactly_once(store_location):
    """Two control-plane hosts (a store each) take the same rollout step at the same moment:
    every device is sent one command, by one of them."""
    first, second = open_store(store_location), open_store(store_location)
    try:
        ids = _rollout(first, "r1", 3000)
        first.assign_wave("r1", 0, len(ids), now=1.0, rate_limited=False)
        commands = {("mcu", "", 1): ("u-1", {"update": "u-1"})}
        barrier, sent = threading.Barrier(2), {}

        def step(name, store):
            barrier.wait()
            sent[name] = [d for d, _ in store.mark_sent("r1", "update", commands, {}, now=2.0)]
        threads = [threading.Thread(target=step, args=(n, s)) for n, s in (("a", first), ("b", second))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(sent["a"] + sent["b"]) == ids                # every device, none twice
        assert first.commands_sent("r1") == len(ids) and second.in_flight("r1") == len(ids)
    finally:
        first.close()
        second.close()


def test_two_hosts_opening_one_new_database_build_the_schema_once(store_location):
    errors, stores = [], []
    barrier = threading.Barrier(3)

    def open_one():
        barrier.wait()
        try:
            stores.append(open_store(store_location))
        except Exception as e:   # noqa: BLE001 - the test reports it
            errors.append(e)
    threads = [threading.Thread(target=open_one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in stores:
        s.close()
    assert errors == [] and len(stores) == 3
    assert query(store_location, "select value from meta where key = 'schema_version'") == \
        [{"value": str(SCHEMA_VERSION)}]


# -- PostgreSQL: bad URLs, logins and connections ----------------------------------------------------
def test_an_unreachable_server_is_one_line_naming_it_and_never_the_password(pg_server):
    url = f"postgresql://edgeloop:{PASSWORD}@127.0.0.1:{_free_port()}/edgeloop"
    with pytest.raises(ServiceUnavailable) as caught:
        open_store(url)
    message = str(caught.value)
    assert caught.value.exit_code == 3 and "cannot reach the store at postgresql://edgeloop:***@127.0.0.1" in message
    assert PASSWORD not in message and "\n" not in message


def test_a_wrong_password_or_database_is_bad_input_not_an_outage(pg_server):
    with pytest.raises(UserError, match="refused the login: .*password authentication failed") as caught:
        open_store(pg_server.url_of("edgeloop", password="wrong"))
    assert caught.value.exit_code == 2 and "wrong" not in str(caught.value)
    with pytest.raises(UserError, match='has no such database: .*"nowhere" does not exist'):
        open_store(pg_server.url_of("nowhere"))


def test_the_cli_on_a_workspace_whose_store_is_unreachable_exits_3_with_one_line(tmp_path, capsys, pg_server):
    ws = Workspace.init(tmp_path / "ws", mqtt="127.0.0.1:1")
    config = ws.root / "edgeloop.toml"
    config.write_text(f'store = "postgresql://edgeloop:{PASSWORD}@127.0.0.1:{_free_port()}/edgeloop"\n'
                      + config.read_text())
    code, _, err = run_cli(["models", "--workspace", str(ws.root)], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 3 and len(lines) == 1 and "cannot reach the store" in lines[0] and PASSWORD not in err
    assert not ws.registry_path.exists()               # no SQLite file made in its place
    config.write_text('store = "mysql://db/x"\n' + config.read_text().split("\n", 1)[1])
    code, _, err = run_cli(["models", "--workspace", str(ws.root)], capsys)
    assert code == 2 and "store is not a PostgreSQL URL" in err and "Traceback" not in err


def test_a_workspace_pointed_at_postgresql_keeps_its_data_there(tmp_path, pg_server):
    url = pg_server.fresh_database()
    ws = Workspace.init(tmp_path / "ws", mqtt="127.0.0.1:1")
    (ws.root / "edgeloop.toml").write_text(f'store = "{url}"\n' + (ws.root / "edgeloop.toml").read_text())
    ws = Workspace.open(ws.root)
    assert ws.store_location == url and ws.with_mqtt("127.0.0.1:2").store == url
    registry = Registry(ws.store_location)
    registry.add_telemetry(_telemetry("d1", range(2)))
    registry.close()
    assert not ws.registry_path.exists()
    assert query(url, "select count(*) as n from telemetry") == [{"n": 2}]


def _kill_mid_batch(url: str, at_seq: int, times: int) -> None:
    """A trigger that drops the inserting connection (its own backend) on the row with ``at_seq``,
    the first ``times`` times (a sequence counts them: it is not rolled back with the batch)."""
    _write(url, "create sequence kills")
    _write(url, "create function kill_mid_batch() returns trigger language plpgsql as $$ begin "
                f"if new.seq = {at_seq} and nextval('kills') <= {times} then "
                "perform pg_terminate_backend(pg_backend_pid()); end if; return new; end $$")
    _write(url, "create trigger kill_mid_batch before insert on telemetry for each row "
                "execute function kill_mid_batch()")


def test_a_connection_lost_mid_batch_stores_none_of_it_and_a_retry_stores_it_once(pg_server):
    url = pg_server.fresh_database()
    store = open_store(url)
    try:
        _kill_mid_batch(url, at_seq=50, times=1)
        # the first attempt dies at row 50 of 100 and is rolled back; the store reconnects and
        # retries (a record already stored would be skipped): every record once
        assert store.add_telemetry(_telemetry("d1", range(100))) == 100
        assert store.telemetry_count() == 100
    finally:
        store.close()


def test_a_connection_lost_on_every_try_raises_one_error_with_nothing_half_stored(pg_server):
    url = pg_server.fresh_database()
    store = open_store(url)
    try:
        _kill_mid_batch(url, at_seq=50, times=2)
        with pytest.raises(ConnectionLost, match="lost the connection to the store .* nothing of it is stored") \
                as caught:
            store.add_telemetry(_telemetry("d1", range(100)))
        assert caught.value.exit_code == 3 and PASSWORD not in str(caught.value)
        assert query(url, "select count(*) as n from telemetry") == [{"n": 0}]
        assert store.add_telemetry(_telemetry("d1", range(100))) == 100      # the store reconnected
    finally:
        store.close()


# -- drift aggregates: the database's merge is the monitor's merge ----------------------------------
def _reference_keys(row, by: str) -> list[str]:
    """The cohorts of a drift row, as the report defines them (docs/drift.md)."""
    import json
    if by in ("device", "tier", "model_version"):
        return [str(row[{"device": "device_id"}.get(by, by)])]
    if by == "fleet":
        return ["fleet"]
    tags = json.loads(row.get("tags") or "{}")
    if by == "site":
        return [str(tags.get("site", "?"))]
    return [f"{k}={v}" for k, v in sorted(tags.items())] or ["(untagged)"]


def _summary(i: int, residuals: bool) -> dict:
    out = {"hist": [[i, 2, 0], [0, 1, i + 2]], "n": [i + 2, i + 3], "missing": [0, i % 2],
           "sum": [0.5 * i, 1.5], "sumsq": [0.25 * i, 2.5], "min": [-float(i), 0.0], "max": [float(i), 3.0 + i],
           "edges": [[0, 1, 2, 3], [0, 1, 2, 3]]}
    if residuals:
        out.update(rn=i + 1, rsum=[0.1 * i, -0.2], rsumsq=[0.01 * i, 0.04])
    return out


def test_the_drift_aggregates_of_the_store_merge_as_the_monitor_merges_records(store_location):
    import numpy as np

    from edgeloop.cloud.drift.monitor import COHORTS, _cohort_summary, records_summary
    store = open_store(store_location)
    try:
        store.record_statuses([{"device_id": f"d{i}", "tier": ("mcu", "edge-gateway")[i % 2], "state": "committed"}
                               for i in range(4)])
        store.enroll_device("d0", {"cert_serial": "s0", "tags": '{"site": "north", "line": "a"}'})
        store.enroll_device("d1", {"cert_serial": "s1", "tags": '{"site": "south"}'})
        rows = []
        for i in range(24):
            device, mv = f"d{i % 5}", ("m:1", "m:2")[i % 3 == 0]      # d4 has no device row
            rows.append({"device_id": device, "seq": i, "model_version": mv, "window_end": float(i * 7 % 24),
                         "count": 10 + i, "labelled": i % 4, "correct": i % 3 if i % 4 else 0, "errors": 0,
                         "predictions": [i, 1, 2 * i], "abs_err_sum": 0.5 * i if i % 2 else None,
                         "features": _summary(i, residuals=device != "d3") if i % 7 else None})
        store.add_telemetry(rows)
        store.add_label_feedback([{"device_id": "d1", "seq": 1, "labelled": 9, "correct": 8},
                                  {"device_id": "d2", "seq": 2, "labelled": 5, "correct": 5, "abs_err_sum": 2.0}])
        for by in COHORTS:
            groups = {}
            for r in store.drift_rows():
                for key in _reference_keys(r, by):
                    groups.setdefault((key, r["model_version"]), []).append(r)
            totals = {(t["key"], t["model_version"]): t for t in store.drift_cohort_totals(by)}
            features = store.drift_cohort_features(by)
            assert set(totals) == set(groups), by
            firsts = {(r["key"], r["model_version"]): r for r in store.drift_cohort_rows(by, 8) if r["first"]}
            for cohort, members in groups.items():
                t = totals[cohort]
                assert (t["records"], t["inferences"], t["labelled"], t["correct"]) == (
                    len(members), sum(m["count"] for m in members), sum(m["labelled"] or 0 for m in members),
                    sum(m["correct"] or 0 for m in members)), (by, cohort)
                errs = [m for m in members if m["abs_err_sum"] is not None]
                assert t["err_records"] == len(errs) and t["err_labelled"] == sum(m["labelled"] for m in errs)
                assert t["abs_err_sum"] == pytest.approx(sum(m["abs_err_sum"] for m in errs) if errs else None)
                expected, preds = records_summary(members)
                assert t["predictions"] == preds, (by, cohort)
                got = _cohort_summary(features.get(cohort), t)
                assert (got is None) == (expected is None), (by, cohort)
                if expected is not None:
                    assert set(got) == set(expected), (by, cohort)
                    for k in expected:
                        assert np.allclose(np.asarray(got[k], dtype=float), np.asarray(expected[k], dtype=float)), \
                            (by, cohort, k)
                assert firsts[cohort]["device_id"] == members[0]["device_id"]
                assert firsts[cohort]["seq"] == members[0]["seq"]
            recent = [r for r in store.drift_cohort_rows("fleet", 4) if r["recent"] and r["model_version"] == "m:1"]
            assert [r["seq"] for r in recent] == [m["seq"] for m in groups.get(("fleet", "m:1"), [])][-4:] \
                if by == "fleet" else True
    finally:
        store.close()


def test_the_read_only_helper_cannot_write_on_postgresql_either(pg_server):
    import psycopg
    url = pg_server.fresh_database()
    open_store(url).close()
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        query(url, "delete from devices")
    assert query(url, "select value from meta where key = ?", ["schema_version"]) == [{"value": str(SCHEMA_VERSION)}]
