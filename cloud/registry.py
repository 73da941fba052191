"""The registry: SQLite (through sqlite-utils) holding what the control plane knows.

Tables: ``datasets`` (named, versioned, by content hash), ``runs`` (the full run record),
``model_versions`` (with their stage), ``artifacts`` (content-addressed by sha256),
``packages``, ``updates``, ``lineage`` (edges ``kind:id -> kind:id``: data set -> run ->
model version -> package -> update -> device), ``devices``, ``telemetry`` (primary key
``(device_id, seq)``, so a record delivered twice is stored once) and ``device_errors``.
WAL mode, so readers never block the ingest writer. One :class:`Registry` may be shared by
threads: every operation holds its lock.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import sqlite_utils

from cloud.errors import NotFound

SCHEMA_VERSION = 1

__all__ = ["Registry"]


_RUN_JSON = ("params", "dist", "code", "environment", "hardware", "metrics", "history")


try:   # the ingest path stores a few KB of JSON per telemetry record: orjson is ~10x faster
    import orjson

    def _j(value: Any) -> str:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
except ImportError:  # pragma: no cover - orjson is in the cloud extra
    def _j(value: Any) -> str:
        return json.dumps(value, sort_keys=True)


_TELEMETRY_COLUMNS = ("device_id", "seq", "model_version", "window_start", "window_end", "count", "labelled", "correct",
                      "errors", "latency_ms_p50", "latency_ms_max", "predictions", "confidence_hist", "features",
                      "samples", "abs_err_sum", "received_at")
_INSERT_TELEMETRY = (f"INSERT OR IGNORE INTO telemetry ({', '.join(_TELEMETRY_COLUMNS)}) "
                     f"VALUES ({', '.join('?' * len(_TELEMETRY_COLUMNS))})")


def _decode(row: dict[str, Any], *keys: str) -> dict[str, Any]:
    for k in keys:
        if isinstance(row.get(k), str):
            row[k] = json.loads(row[k])
    return row


class Registry:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        self.db = sqlite_utils.Database(conn)
        with self._lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._create()

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    def _create(self) -> None:
        t = self.db.table
        t("meta", pk="key").create({"key": str, "value": str}, if_not_exists=True)
        t("meta").upsert({"key": "schema_version", "value": str(SCHEMA_VERSION)}, pk="key")
        t("datasets", pk="dataset_id").create({"dataset_id": str, "name": str, "version": int, "sha256": str,
                                               "path": str, "files": str, "schema": str, "added_at": float},
                                              if_not_exists=True)
        t("runs", pk="run_id").create({"run_id": str, "model": str, "status": str, "reason": str,
                                       "dataset_id": str, "dataset_sha256": str, "params": str, "dist": str,
                                       "code": str, "environment": str, "hardware": str, "metrics": str,
                                       "history": str, "weights_sha256": str, "reproduces": str,
                                       "started_at": float, "ended_at": float}, if_not_exists=True)
        t("lineage", pk=("src", "dst", "relation")).create({"src": str, "dst": str, "relation": str,
                                                             "created_at": float}, if_not_exists=True)
        t("model_versions", pk="model_version").create(
            {"model_version": str, "model": str, "version": int, "run_id": str, "stage": str,
             "onnx_sha256": str, "state_sha256": str, "arch": str, "features": str, "labels": str, "metrics": str,
             "created_at": float},
            if_not_exists=True)
        t("artifacts", pk="sha256").create({"sha256": str, "kind": str, "length": int, "path": str,
                                            "created_at": float}, if_not_exists=True)
        t("packages", pk="sha256").create({"sha256": str, "model_version": str, "tier": str, "target": str,
                                           "length": int, "created_at": float}, if_not_exists=True)
        t("updates", pk="update_id").create({"update_id": str, "model_version": str, "tier": str,
                                             "target": str, "sha256": str, "length": int, "issued_at": float},
                                            if_not_exists=True)
        t("devices", pk="device_id").create({"device_id": str, "tier": str, "state": str, "model_version": str,
                                             "update_id": str, "reason": str, "first_seen": float,
                                             "last_seen": float}, if_not_exists=True)
        t("telemetry", pk=("device_id", "seq")).create(
            {"device_id": str, "seq": int, "model_version": str, "window_start": float, "window_end": float,
             "count": int, "labelled": int, "correct": int, "errors": int, "latency_ms_p50": float,
             "latency_ms_max": float, "predictions": str, "confidence_hist": str, "features": str,
             "samples": str, "received_at": float},
            if_not_exists=True)
        t("device_errors", pk="id").create({"id": int, "device_id": str, "update_id": str, "code": str,
                                            "message": str, "ts": float, "received_at": float},
                                           if_not_exists=True)
        t("alerts", pk="id").create({"id": int, "kind": str, "cohort": str, "key": str, "model_version": str,
                                     "detail": str, "created_at": float}, if_not_exists=True)
        t("telemetry_rejects", pk="id").create({"id": int, "device_id": str, "seq": int, "reason": str,
                                                 "detail": str, "topic": str, "received_at": float},
                                                if_not_exists=True)
        t("label_feedback", pk=("device_id", "seq")).create({"device_id": str, "seq": int, "labelled": int,
                                                             "correct": int, "abs_err_sum": float, "source": str,
                                                             "added_at": float},
                                                            if_not_exists=True)
        # columns added after a table first shipped: older registries gain them on open
        for table, column in (("telemetry", "features"), ("telemetry", "samples"), ("model_versions", "state_sha256"),
                              ("model_versions", "arch"), ("device_errors", "report_id"),
                              ("model_versions", "task"), ("packages", "baseline_sha256")):
            if column not in t(table).columns_dict:
                t(table).add_column(column, str)
        for table in ("telemetry", "label_feedback"):
            if "abs_err_sum" not in t(table).columns_dict:
                t(table).add_column("abs_err_sum", float)
        # an error report sent again (its confirmation was lost) is stored once
        t("device_errors").create_index(["report_id"], unique=True, if_not_exists=True)

    # -- data sets and runs ----------------------------------------------------------------
    def add_dataset(self, name: str, sha256: str, path: str, files: list, schema: dict) -> tuple[str, bool]:
        """Register a data set version; the same content under the same name is not registered twice.
        Returns (dataset_id, created)."""
        with self._lock:
            latest = list(self.db.query("select dataset_id, sha256 from datasets where name = ? "
                                        "order by version desc limit 1", [name]))
            if latest and latest[0]["sha256"] == sha256:
                return latest[0]["dataset_id"], False
            version = int(list(self.db.query("select coalesce(max(version), 0) as v from datasets where name = ?",
                                             [name]))[0]["v"]) + 1
            dataset_id = f"{name}:{version}"
            self.db["datasets"].insert({"dataset_id": dataset_id, "name": name, "version": version,
                                        "sha256": sha256, "path": path, "files": _j(files), "schema": _j(schema),
                                        "added_at": time.time()}, pk="dataset_id")
            return dataset_id, True

    def dataset(self, ref: str) -> dict[str, Any]:
        """A data set by ``name`` (latest version) or ``name:version``."""
        name, _, version = ref.partition(":")
        sql, args = "select * from datasets where name = ?", [name]
        if version:
            sql, args = sql + " and version = ?", args + [version]
        with self._lock:
            rows = list(self.db.query(sql + " order by version desc limit 1", args))
        if not rows:
            raise NotFound(f"no registered data set {ref!r} (register one: edgeloop data add NAME PATH)")
        return _decode(rows[0], "files", "schema")

    def datasets(self) -> list[dict[str, Any]]:
        with self._lock:
            return [_decode(r, "files", "schema") for r in self.db.query("select * from datasets order by name, version")]

    def start_run(self, row: dict[str, Any]) -> None:
        with self._lock:
            self.db["runs"].insert({**row, "status": "running",
                                    **{k: _j(row[k]) for k in _RUN_JSON if k in row}}, pk="run_id")

    def finish_run(self, run_id: str, **fields: Any) -> None:
        with self._lock:
            self.db["runs"].update(run_id, {**fields, **{k: _j(fields[k]) for k in _RUN_JSON if k in fields},
                                            "ended_at": time.time()})

    def run(self, run_id: str) -> dict[str, Any]:
        with self._lock:
            rows = list(self.db.query("select * from runs where run_id = ?", [run_id]))
        if not rows:
            raise NotFound(f"no run {run_id!r} (see: edgeloop runs ls)")
        return _decode(rows[0], *_RUN_JSON)

    def runs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [_decode(r, *_RUN_JSON) for r in self.db.query("select * from runs order by started_at")]

    # -- lineage ---------------------------------------------------------------------------
    def add_edge(self, src: str, dst: str, relation: str) -> None:
        with self._lock:
            self.db["lineage"].upsert({"src": src, "dst": dst, "relation": relation, "created_at": time.time()},
                                      pk=("src", "dst", "relation"))

    def parents(self, node: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db.query("select src, relation from lineage where dst = ? order by created_at desc",
                                      [node]))

    # -- models ----------------------------------------------------------------------------
    def set_stage(self, model_version: str, stage: str) -> None:
        with self._lock:
            self.db["model_versions"].update(model_version, {"stage": stage})

    def in_stage(self, model: str, stage: str) -> list[str]:
        with self._lock:
            return [r["model_version"] for r in self.db.query(
                "select model_version from model_versions where model = ? and stage = ? order by version",
                [model, stage])]

    def next_version(self, model: str) -> int:
        with self._lock:
            rows = list(self.db.query("select max(version) as v from model_versions where model = ?", [model]))
        return int(rows[0]["v"] or 0) + 1

    def add_model_version(self, row: dict[str, Any]) -> None:
        with self._lock:
            self.db["model_versions"].insert(
                {**row, **{k: _j(row[k]) for k in ("features", "labels", "metrics", "arch", "task") if k in row},
                 "created_at": time.time()}, pk="model_version")

    def model_version(self, model_version: str) -> dict[str, Any]:
        with self._lock:
            rows = list(self.db.query("select * from model_versions where model_version = ?", [model_version]))
        if not rows:
            raise NotFound(f"no model version {model_version!r} (see: edgeloop models)")
        return _decode(rows[0], "features", "labels", "metrics", "arch", "task")

    def latest_model_version(self) -> str | None:
        with self._lock:
            rows = list(self.db.query("select model_version from model_versions order by created_at desc limit 1"))
        return rows[0]["model_version"] if rows else None

    def model_versions(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db.query("select model_version, model, version, stage, run_id, metrics, created_at "
                                      "from model_versions order by created_at"))

    def add_artifact(self, sha256: str, kind: str, length: int, path: str) -> None:
        with self._lock:
            self.db["artifacts"].upsert({"sha256": sha256, "kind": kind, "length": length, "path": path,
                                         "created_at": time.time()}, pk="sha256")

    def artifact_path(self, sha256: str) -> str:
        with self._lock:
            rows = list(self.db.query("select path from artifacts where sha256 = ?", [sha256]))
        if not rows:
            raise NotFound(f"no artifact {sha256[:12]}")
        return rows[0]["path"]

    def add_package(self, row: dict[str, Any]) -> None:
        with self._lock:
            self.db["packages"].upsert({**row, "created_at": time.time()}, pk="sha256")

    def package_for(self, model_version: str, tier: str) -> dict[str, Any]:
        with self._lock:
            rows = list(self.db.query("select * from packages where model_version = ? and tier = ? "
                                      "order by created_at desc limit 1", [model_version, tier]))
        if not rows:
            raise NotFound(f"no {tier} package for {model_version} (run: edgeloop package {model_version} --tier {tier})")
        return rows[0]

    def package_by_sha(self, sha256: str) -> dict[str, Any] | None:
        with self._lock:
            rows = list(self.db.query("select * from packages where sha256 = ?", [sha256]))
        return rows[0] if rows else None

    def packages_of(self, model_version: str) -> list[dict[str, Any]]:
        """Every package of a model version, newest first."""
        with self._lock:
            return list(self.db.query("select * from packages where model_version = ? order by created_at desc",
                                      [model_version]))

    def packages_named(self, target: str) -> list[str]:
        """The sha256 of every package registered under this target name."""
        with self._lock:
            return [r["sha256"] for r in self.db.query("select sha256 from packages where target = ?", [target])]

    def add_update(self, row: dict[str, Any]) -> None:
        """Record an update; one with the same update id (the same release signed again) replaces it."""
        with self._lock:
            self.db["updates"].upsert(row, pk="update_id")

    def updates(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db.query("select * from updates order by issued_at"))

    # -- fleet -----------------------------------------------------------------------------
    def record_status(self, row: dict[str, Any]) -> None:
        """Store a device's latest status. First seen is set by the first status (also for a device
        enrolled before it ever spoke); an ``offline`` status without a model version (the last
        will) keeps the last known model version and update."""
        now = time.time()
        with self._lock:
            existing = list(self.db.query("select first_seen, model_version, update_id from devices "
                                          "where device_id = ?", [row["device_id"]]))
            old = existing[0] if existing else {}
            if row.get("state") == "offline" and row.get("model_version") is None:
                row = {**row, "model_version": old.get("model_version"),
                       "update_id": row.get("update_id") or old.get("update_id")}
            first = old.get("first_seen") or now
            self.db["devices"].upsert({**row, "first_seen": first, "last_seen": now}, pk="device_id")

    _STATUS_UPSERT = (
        "insert into devices (device_id, tier, state, model_version, update_id, reason, first_seen, last_seen) "
        "values (:device_id, :tier, :state, :model_version, :update_id, :reason, :now, :now) "
        "on conflict(device_id) do update set tier = excluded.tier, state = excluded.state, "
        "model_version = case when excluded.state = 'offline' and excluded.model_version is null "
        "then devices.model_version else excluded.model_version end, "
        "update_id = case when excluded.state = 'offline' and excluded.model_version is null "
        "then coalesce(excluded.update_id, devices.update_id) else excluded.update_id end, "
        "reason = excluded.reason, first_seen = coalesce(devices.first_seen, excluded.first_seen), "
        "last_seen = excluded.last_seen")

    def record_statuses(self, rows: list[dict[str, Any]], installed: Iterable[tuple[str, str]] = ()) -> None:
        """:meth:`record_status` for many statuses, applied in order, and the ``installed`` lineage
        edges of (update_id, device_id) pairs, all in one transaction: what the control plane's
        ingest stores per batch (one commit per status costs the fleet-scale ingest its time)."""
        installed = list(installed)
        if not rows and not installed:
            return
        now = time.time()
        keys = ("device_id", "tier", "state", "model_version", "update_id", "reason")
        with self._lock, self.db.conn:
            self.db.conn.executemany(self._STATUS_UPSERT, [{**{k: r.get(k) for k in keys}, "now": now} for r in rows])
            self.db.conn.executemany(
                "insert into lineage (src, dst, relation, created_at) values (?, ?, 'installed', ?) "
                "on conflict(src, dst, relation) do update set created_at = excluded.created_at",
                [(f"update:{u}", f"device:{d}", now) for u, d in installed])

    def devices(self, tier: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        sql, args = "select * from devices where 1=1", []
        if tier:
            sql, args = sql + " and tier = ?", args + [tier]
        if state:
            sql, args = sql + " and state = ?", args + [state]
        with self._lock:
            return list(self.db.query(sql + " order by device_id", args))

    def add_telemetry(self, rows: Iterable[dict[str, Any]]) -> int:
        """Insert records, ignoring (device_id, seq) already stored, in one transaction. Returns how
        many were new. (Plain executemany: the ingest's hot path, ~3x cheaper than insert_all.)"""
        now = time.time()
        values = [(r["device_id"], r["seq"], r.get("model_version"), r.get("window_start"), r.get("window_end"),
                   r.get("count"), r.get("labelled"), r.get("correct"), r.get("errors", 0), r.get("latency_ms_p50"),
                   r.get("latency_ms_max"), _j(r.get("predictions")), _j(r.get("confidence_hist")),
                   _j(r["features"]) if r.get("features") else None,
                   _j(r["samples"]) if r.get("samples") else None, r.get("abs_err_sum"), now) for r in rows]
        with self._lock:
            conn = self.db.conn
            before = conn.total_changes
            with conn:
                conn.executemany(_INSERT_TELEMETRY, values)
            return conn.total_changes - before

    def device_samples(self, since: float | None = None, devices: Iterable[str] | None = None,
                       labelled_only: bool = True) -> tuple[list[list[float]], list[int | None], list[str]]:
        """Raw inputs that devices sampled into their telemetry (opt-in on the device), stored once
        per record like the record itself: (rows, labels, device ids), in (device, seq) order."""
        sql, args = "select device_id, samples from telemetry where samples is not null", []
        if since is not None:
            sql, args = sql + " and received_at >= ?", [since]
        wanted = set(devices) if devices is not None else None
        xs: list[list[float]] = []
        ys: list[int | None] = []
        ids: list[str] = []
        with self._lock:
            rows = list(self.db.query(sql + " order by device_id, seq", args))
        for row in rows:
            if wanted is not None and row["device_id"] not in wanted:
                continue
            s = json.loads(row["samples"])
            for x, y in zip(s["x"], s["y"]):
                if labelled_only and y is None:
                    continue
                xs.append(x)
                ys.append(y)
                ids.append(row["device_id"])
        return xs, ys, ids

    def add_device_error(self, row: dict[str, Any]) -> bool:
        """Store an error report; one whose ``report_id`` is already stored is not stored again.
        Returns whether it was new."""
        with self._lock:
            before = self.db.conn.total_changes
            self.db["device_errors"].insert({**row, "received_at": time.time()}, ignore=True)
            return self.db.conn.total_changes > before

    def add_telemetry_rejects(self, rows: list[dict[str, Any]]) -> None:
        """Telemetry ingest refused (reason, detail; docs/contracts/telemetry.md): never stored as data."""
        now = time.time()
        with self._lock:
            self.db["telemetry_rejects"].insert_all([{**r, "received_at": now} for r in rows])

    def telemetry_rejects(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db.query("select * from telemetry_rejects order by id"))

    def add_label_feedback(self, rows: list[dict[str, Any]], source: str = "operator") -> int:
        """Delayed ground truth for stored telemetry windows: per (device_id, seq), how many of the
        window's inferences are now labelled, how many of those were right and (regression, optional
        ``abs_err_sum``) their summed absolute error. Replaces the device's own label counts for
        that window in accuracy and MAE (a later feedback for a window replaces an earlier one).
        Returns how many windows it names that are stored."""
        now = time.time()
        with self._lock:
            self.db["label_feedback"].upsert_all([{"abs_err_sum": None, **r, "source": source, "added_at": now}
                                                  for r in rows],
                                                 pk=("device_id", "seq"))
            known = 0
            for r in rows:
                known += bool(list(self.db.query("select 1 from telemetry where device_id = ? and seq = ?",
                                                 [r["device_id"], r["seq"]])))
            return known

    def add_alert(self, row: dict[str, Any]) -> None:
        with self._lock:
            self.db["alerts"].insert({**row, "created_at": time.time()})

    def alerts(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db.query("select * from alerts order by id"))

    def device_errors(self, device_id: str | None = None) -> list[dict[str, Any]]:
        sql, args = "select * from device_errors", []
        if device_id:
            sql, args = sql + " where device_id = ?", [device_id]
        with self._lock:
            return list(self.db.query(sql + " order by id", args))

    def telemetry_summary(self, model_version: str | None = None) -> dict[str, Any]:
        sql = ("select count(*) as records, coalesce(sum(count),0) as inferences, "
               "coalesce(sum(labelled),0) as labelled, coalesce(sum(correct),0) as correct, "
               "coalesce(sum(errors),0) as errors, sum(abs_err_sum) as abs_err_sum, "
               "sum(case when abs_err_sum is not null then labelled else 0 end) as regression_labelled, "
               "coalesce(sum(json_extract(predictions, '$[1]')), 0) as second_bin from telemetry")
        args: list[Any] = []
        if model_version:
            sql, args = sql + " where model_version = ?", [model_version]
        with self._lock:
            row = list(self.db.query(sql, args))[0]
        row["accuracy"] = row["correct"] / row["labelled"] if row["labelled"] else None
        # regression: mean absolute error over the labelled rows of records that carry it
        row["mae"] = (row["abs_err_sum"] / row["regression_labelled"]) if row["regression_labelled"] else None
        share = row.pop("second_bin")
        row["anomaly_rate"] = None
        if model_version:
            task = self._task_of(model_version)
            if task.get("kind") == "anomaly":
                row["anomaly_rate"] = share / row["inferences"] if row["inferences"] else None
        return row

    def _task_of(self, model_version: str) -> dict[str, Any]:
        with self._lock:
            rows = list(self.db.query("select task from model_versions where model_version = ?", [model_version]))
        return json.loads(rows[0]["task"]) if rows and rows[0].get("task") else {}
