"""Store operations on the fleet: devices (status, enrolment, certificates, rollout target),
telemetry, error reports, refused telemetry and label feedback (private to cloud.store; see
cloud.store.interface and cloud.fleet_registry for the rules the device queries follow)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from edgeloop.cloud.errors import UserError
from edgeloop.cloud.store import drift_summary
from edgeloop.cloud.store._base import Dialect, SqliteBase, dumps, marks

__all__ = ["DeviceFilter", "FleetOps"]

_TELEMETRY_COLUMNS = ("device_id", "seq", "model_version", "window_start", "window_end", "count", "labelled", "correct",
                      "errors", "latency_ms_p50", "latency_ms_max", "predictions", "confidence_hist", "features",
                      "samples", "abs_err_sum", "received_at", "clock_suspect", "device_window_start",
                      "device_window_end")
_INSERT_TELEMETRY = (f"insert into telemetry ({', '.join(_TELEMETRY_COLUMNS)}) "
                     f"values ({', '.join('?' * len(_TELEMETRY_COLUMNS))}) on conflict do nothing")

_STATUS_UPSERT = (
    "insert into devices (device_id, tier, state, model_version, update_id, reason, faults, clock_offset_s, "
    "first_seen, last_seen) "
    "values (:device_id, :tier, :state, :model_version, :update_id, :reason, :faults, :clock_offset_s, :now, :now) "
    "on conflict(device_id) do update set tier = excluded.tier, state = excluded.state, "
    "model_version = case when excluded.state = 'offline' and excluded.model_version is null "
    "then devices.model_version else excluded.model_version end, "
    "update_id = case when excluded.state = 'offline' and excluded.model_version is null "
    "then coalesce(excluded.update_id, devices.update_id) else excluded.update_id end, "
    "reason = excluded.reason, first_seen = coalesce(devices.first_seen, excluded.first_seen), "
    # the last will says nothing of faults or the clock: what the device said last stays
    "faults = case when excluded.state = 'offline' then devices.faults else excluded.faults end, "
    "clock_offset_s = coalesce(excluded.clock_offset_s, devices.clock_offset_s), "
    "last_seen = excluded.last_seen")
_STATUS_KEYS = ("device_id", "tier", "state", "model_version", "update_id", "reason", "faults", "clock_offset_s")


@dataclass(frozen=True)
class DeviceFilter:
    """Which devices to list; None or empty means "any"."""

    tier: str | None = None
    state: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    group: str | None = None
    online: bool | None = None
    revoked: bool | None = None


_ONLINE = "(d.state is not null and d.state != 'offline' and coalesce(d.last_seen, 0) >= ?)"


def _select(dialect: Dialect, since: float, where: DeviceFilter,
            device_id: str | None = None) -> tuple[str, list[Any]]:
    sql = (f"select d.*, {_ONLINE} as online, "
           "(select e.code || ': ' || e.message from device_errors e where e.device_id = d.device_id "
           "order by e.id desc limit 1) as last_error, "
           "(select coalesce(e.ts, e.received_at) from device_errors e where e.device_id = d.device_id "
           "order by e.id desc limit 1) as last_error_at "
           "from devices d where 1=1")
    args: list[Any] = [since]
    for column, value in (("device_id", device_id), ("tier", where.tier), ("state", where.state)):
        if value:
            sql, args = sql + f" and d.{column} = ?", args + [value]
    for key, value in where.tags.items():
        sql, args = sql + f" and exists (select 1 from {dialect.json_pairs('d.tags')} where key = ? and value = ?)", \
            args + [key, value]
    if where.group:
        sql, args = sql + f" and exists (select 1 from {dialect.json_values('d.groups')} where value = ?)", \
            args + [where.group]
    if where.online is not None:
        sql, args = sql + f" and (case when {_ONLINE} then 1 else 0 end) = ?", args + [since, int(where.online)]
    if where.revoked is not None:
        sql, args = sql + " and coalesce(d.revoked, 0) = ?", args + [int(where.revoked)]
    return sql + " order by d.device_id", args


def _fleet_row(row: dict[str, Any]) -> dict[str, Any]:
    row["tags"] = json.loads(row["tags"]) if row.get("tags") else {}
    row["faults"] = json.loads(row["faults"]) if row.get("faults") else {}
    row["groups"] = json.loads(row["groups"]) if row.get("groups") else []
    row["online"] = bool(row["online"])
    row["revoked"] = bool(row.get("revoked"))
    row["enrolled"] = row.get("cert_serial") is not None
    return row


class FleetOps(SqliteBase):
    # -- device status ---------------------------------------------------------------------
    def record_status(self, row: dict[str, Any]) -> None:
        """Store a device's latest status. First seen is set by the first status (also for a device
        enrolled before it ever spoke); an ``offline`` status without a model version (the last
        will) keeps the last known model version and update. Columns ``row`` does not name keep
        their stored values."""
        now = time.time()
        with self._lock:
            old = self._one("select first_seen, model_version, update_id from devices where device_id = ?",
                            [row["device_id"]]) or {}
            if row.get("state") == "offline" and row.get("model_version") is None:
                row = {**row, "model_version": old.get("model_version"),
                       "update_id": row.get("update_id") or old.get("update_id")}
            self._db["devices"].upsert({**row, "first_seen": old.get("first_seen") or now, "last_seen": now},
                                       pk="device_id")

    def record_statuses(self, rows: list[dict[str, Any]], installed: Iterable[tuple[str, str]] = ()) -> None:
        """:meth:`record_status` for many statuses, applied in order, and the ``installed`` lineage
        edges of (update_id, device_id) pairs, all in one transaction: what the control plane's
        ingest stores per batch (one commit per status costs the fleet-scale ingest its time)."""
        installed = list(installed)
        if not rows and not installed:
            return
        now = time.time()
        with self._tx() as conn:
            conn.executemany(_STATUS_UPSERT, [{**{k: r.get(k) for k in _STATUS_KEYS}, "now": now,
                                               "faults": dumps(r["faults"]) if r.get("faults") else None}
                                              for r in rows])
            conn.executemany(
                "insert into lineage (src, dst, relation, created_at) values (?, ?, 'installed', ?) "
                "on conflict(src, dst, relation) do update set created_at = excluded.created_at",
                [(f"update:{u}", f"device:{d}", now) for u, d in installed])

    def devices(self, tier: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        """The raw device rows, by device id (cloud.fleet_registry adds online, errors, tags)."""
        sql, args = "select * from devices where 1=1", []
        if tier:
            sql, args = sql + " and tier = ?", args + [tier]
        if state:
            sql, args = sql + " and state = ?", args + [state]
        return self._rows(sql + " order by device_id", args)

    def device_states(self) -> dict[str, int]:
        """How many devices are in each stored state (one count, not the rows: fleet-scale waits)."""
        return {r["state"]: r["n"] for r in self._rows("select state, count(*) as n from devices group by state")}

    def forget_device(self, device_id: str) -> None:
        """Delete a device's row (its telemetry and reports stay)."""
        with self._tx() as conn:
            conn.execute("delete from devices where device_id = ?", [device_id])

    # -- enrolment and rollout targets -----------------------------------------------------------
    def enroll_device(self, device_id: str, values: dict[str, Any]) -> None:
        """Record an enrolled device's certificate fields. Raises UserError if it is already
        enrolled; then nothing changed."""
        with self._tx() as conn:          # one transaction: check and write together
            # a device already known from its status keeps its state and tier if none is given
            sets = ", ".join(f"{k} = coalesce(?, {k})" if k == "tier" else f"{k} = ?" for k in values)
            cur = conn.execute(f"update devices set {sets} where device_id = ? and cert_serial is null",
                               [*values.values(), device_id])
            if cur.rowcount:
                return
            columns = ["device_id", "state", *values]
            try:
                conn.execute(f"insert into devices ({', '.join(columns)}) values ({marks(columns)})",
                             [device_id, "offline", *values.values()])
            except self.dialect.duplicate_key:
                raise UserError(f"device {device_id!r} is already enrolled") from None

    def mark_revoked(self, device_id: str) -> None:
        with self._tx() as conn:
            conn.execute("update devices set revoked = 1, revoked_at = ? where device_id = ?", [time.time(), device_id])

    def set_target(self, device_ids: Iterable[str], model_version: str | None) -> int:
        """Record the model version a rollout wants these devices to run. Returns how many exist."""
        with self._tx() as conn:
            return sum(conn.execute("update devices set target_model_version = ? where device_id = ?",
                                    [model_version, d]).rowcount for d in device_ids)

    def enrolled(self, device_id: str) -> dict[str, Any] | None:
        """The device's certificate fields if it is enrolled, else None."""
        return self._one("select device_id, cert_serial, cert_fingerprint, cert_not_after, revoked, revoked_at "
                         "from devices where device_id = ? and cert_serial is not null", [device_id])

    def fleet_devices(self, where: DeviceFilter, online_since: float,
                      device_id: str | None = None) -> list[dict[str, Any]]:
        """Devices matching ``where`` (and ``device_id``), by id, with ``online`` (heard from since
        ``online_since``, last status not offline), ``last_error`` and decoded tags and groups."""
        sql, args = _select(self.dialect, online_since, where, device_id)
        return [_fleet_row(r) for r in self._rows(sql, args)]

    def enrolment(self, device_ids: list[str]) -> tuple[set[str] | None, set[str]]:
        """(enrolled ids among ``device_ids``, or None when the fleet enrols no one; revoked ids)."""
        with self._lock:
            any_enrolled = self._scalar("select 1 from devices where cert_serial is not null and cert_serial != '' "
                                        "limit 1")
            rows = self._rows(f"select device_id, cert_serial, coalesce(revoked, 0) as revoked from devices "
                              f"where device_id in ({marks(device_ids)})", device_ids)
        revoked = {r["device_id"] for r in rows if r["revoked"]}
        if not any_enrolled:
            return None, revoked
        return {r["device_id"] for r in rows if r["cert_serial"]}, revoked

    # -- telemetry -------------------------------------------------------------------------------
    def add_telemetry(self, rows: Iterable[dict[str, Any]]) -> int:
        """Insert records, ignoring (device_id, seq) already stored, and add the new ones into
        their devices' drift summaries (cloud/store/drift_summary.py), in one transaction.
        Returns how many were new. (Plain statements: the ingest's hot path, ~3x cheaper than
        insert_all.)"""
        now = time.time()
        # in key order: two PostgreSQL workers given overlapping batches (a re-delivery) then
        # take the rows' locks in the same order and wait for each other instead of deadlocking
        rows = sorted(rows, key=lambda r: (r["device_id"], r["seq"]))
        values = [(r["device_id"], r["seq"], r.get("model_version"), r.get("window_start"), r.get("window_end"),
                   r.get("count"), r.get("labelled"), r.get("correct"), r.get("errors", 0), r.get("latency_ms_p50"),
                   r.get("latency_ms_max"), dumps(r.get("predictions")), dumps(r.get("confidence_hist")),
                   dumps(r["features"]) if r.get("features") else None,
                   dumps(r["samples"]) if r.get("samples") else None, r.get("abs_err_sum"), now,
                   1 if r.get("clock_suspect") else None, r.get("device_window_start"), r.get("device_window_end"))
                  for r in rows]

        def insert() -> int:          # safe to run again: a record already stored is skipped
            with self._tx() as conn:
                new = self._insert_new(conn, values)
                # the per-device drift summaries get exactly the records this transaction stored
                drift_summary.apply(conn, [rows[i] for i in new])
                return len(new)
        return self._retrying(insert)

    def _insert_new(self, conn: Any, values: list[tuple[Any, ...]]) -> list[int]:
        """Insert ``values`` (telemetry rows), skipping keys already stored; the positions of the
        rows this statement stored (a key twice in ``values``: its first). PostgreSQL: one
        pipelined ``executemany`` with ``returning``; SQLite: one ``execute`` a row (in-process,
        as cheap), its ``rowcount`` saying whether it stored the row."""
        if self.dialect.name == "postgresql":
            stored = {(d, int(s)) for d, s in conn.executemany_returning(_INSERT_TELEMETRY + " returning device_id, seq",
                                                                       values)}
            new, seen = [], set()
            for i, v in enumerate(values):
                key = (v[0], int(v[1]))
                if key in stored and key not in seen:
                    seen.add(key)
                    new.append(i)
            return new
        return [i for i, v in enumerate(values) if conn.execute(_INSERT_TELEMETRY, v).rowcount > 0]

    def last_seqs(self, device_ids: list[str]) -> dict[str, int]:
        """The highest stored telemetry seq of each of ``device_ids`` that has any."""
        rows = self._rows(f"select device_id, max(seq) as seq from telemetry where device_id in ({marks(device_ids)}) "
                          "group by device_id", device_ids)
        return {r["device_id"]: int(r["seq"]) for r in rows}

    def telemetry_records(self, device_id: str | None = None, model_version: str | None = None,
                          seq_from: int | None = None, seq_to: int | None = None) -> list[dict[str, Any]]:
        """Stored telemetry records (JSON fields as stored text), by (device_id, seq); ``seq_to``
        is exclusive."""
        sql, args = "select * from telemetry where 1=1", []
        for cond, value in (("device_id = ?", device_id), ("model_version = ?", model_version),
                            ("seq >= ?", seq_from), ("seq < ?", seq_to)):
            if value is not None:
                sql, args = sql + f" and {cond}", args + [value]
        return self._rows(sql + " order by device_id, seq", args)

    def telemetry_count(self, device_ids: Iterable[str] | None = None) -> int:
        """How many records are stored (of ``device_ids``, if given)."""
        if device_ids is None:
            return int(self._scalar("select count(*) from telemetry"))
        ids = sorted(device_ids)
        return int(self._scalar(f"select count(*) from telemetry where device_id in ({marks(ids)})", ids))

    def device_telemetry_totals(self, device_id: str, seq_from: int | None = None,
                                seq_to: int | None = None) -> dict[str, Any]:
        """records, inferences, correct and labelled of a device's telemetry (seq range optional,
        ``seq_to`` exclusive); sums are None when it has none."""
        sql, args = ("select count(*) as records, sum(count) as inferences, sum(correct) as correct, "
                     "sum(labelled) as labelled from telemetry where device_id = ?", [device_id])
        for cond, value in (("seq >= ?", seq_from), ("seq < ?", seq_to)):
            if value is not None:
                sql, args = sql + f" and {cond}", args + [value]
        return self._rows(sql, args)[0]

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
        for row in self._rows(sql + " order by device_id, seq", args):
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

    def telemetry_summary(self, model_version: str | None = None) -> dict[str, Any]:
        """records, inferences, labelled, correct, errors, accuracy, mae and (anomaly models)
        anomaly_rate over the stored telemetry (of ``model_version``, if given)."""
        sql = ("select count(*) as records, coalesce(sum(count),0) as inferences, "
               "coalesce(sum(labelled),0) as labelled, coalesce(sum(correct),0) as correct, "
               "coalesce(sum(errors),0) as errors, sum(abs_err_sum) as abs_err_sum, "
               "sum(case when abs_err_sum is not null then labelled else 0 end) as regression_labelled, "
               f"coalesce(sum({self.dialect.json_item('predictions', 1)}), 0) as second_bin from telemetry")
        args: list[Any] = []
        if model_version:
            sql, args = sql + " where model_version = ?", [model_version]
        row = self._rows(sql, args)[0]
        row["accuracy"] = row["correct"] / row["labelled"] if row["labelled"] else None
        # regression: mean absolute error over the labelled rows of records that carry it
        row["mae"] = (row["abs_err_sum"] / row["regression_labelled"]) if row["regression_labelled"] else None
        share = row.pop("second_bin")
        row["anomaly_rate"] = None
        if model_version and self.task_of(model_version).get("kind") == "anomaly":  # type: ignore[attr-defined]
            row["anomaly_rate"] = share / row["inferences"] if row["inferences"] else None
        return row

    def drift_rows(self) -> list[dict[str, Any]]:
        """Telemetry with a model version, with the device's tier and tags, and operator label
        feedback in place of the device's own label counts where the operator sent some for that
        window; by (window_end, device_id, seq)."""
        # a feedback row replaces the window's label counts; its error sum only where it gave one
        err = ("case when l.seq is null then t.abs_err_sum when l.abs_err_sum is not null then l.abs_err_sum "
               "when t.abs_err_sum is not null and t.labelled > 0 then t.abs_err_sum * l.labelled / t.labelled "
               "else null end")
        return self._rows(
            f"select t.device_id, t.seq, t.model_version, t.window_end, t.count, t.predictions, t.features, "
            f"{err} as abs_err_sum, coalesce(l.labelled, t.labelled) as labelled, "
            f"coalesce(l.correct, t.correct) as correct, coalesce(d.tier, '?') as tier, d.tags as tags "
            f"from telemetry t left join devices d on d.device_id = t.device_id "
            f"left join label_feedback l on l.device_id = t.device_id and l.seq = t.seq "
            "where t.model_version is not null order by t.window_end, t.device_id, t.seq")

    # -- error reports, refused telemetry, label feedback ----------------------------------------
    def add_device_error(self, row: dict[str, Any]) -> bool:
        """Store an error report; one whose ``report_id`` is already stored is not stored again.
        Returns whether it was new."""
        return self._db["device_errors"].insert({**row, "received_at": time.time()}, ignore=True) > 0

    def device_errors(self, device_id: str | None = None) -> list[dict[str, Any]]:
        sql, args = "select * from device_errors", []
        if device_id:
            sql, args = sql + " where device_id = ?", [device_id]
        return self._rows(sql + " order by id", args)

    def latest_error_code(self, device_id: str, update_id: str) -> str | None:
        """The code of the newest error report a device sent about an update, or None."""
        return self._scalar("select code from device_errors where device_id = ? and update_id = ? "
                            "order by id desc limit 1", [device_id, update_id])

    def add_telemetry_rejects(self, rows: list[dict[str, Any]]) -> None:
        """Telemetry ingest refused (reason, detail; docs/contracts/telemetry.md): never stored as data."""
        now = time.time()
        with self._lock:
            self._db["telemetry_rejects"].insert_all([{**r, "received_at": now} for r in rows])

    def telemetry_rejects(self) -> list[dict[str, Any]]:
        return self._rows("select * from telemetry_rejects order by id")

    def add_label_feedback(self, rows: list[dict[str, Any]], source: str = "operator") -> int:
        """Delayed ground truth for stored telemetry windows: per (device_id, seq), how many of the
        window's inferences are now labelled, how many of those were right and (regression, optional
        ``abs_err_sum``) their summed absolute error. Replaces the device's own label counts for
        that window in accuracy and MAE (a later feedback for a window replaces an earlier one).
        Returns how many windows it names that are stored."""
        now = time.time()
        with self._lock:
            self._db["label_feedback"].upsert_all([{"abs_err_sum": None, **r, "source": source, "added_at": now}
                                                   for r in rows], pk=("device_id", "seq"))
            return sum(bool(self._scalar("select 1 from telemetry where device_id = ? and seq = ?",
                                         [r["device_id"], r["seq"]])) for r in rows)
