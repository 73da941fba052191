"""Fleet-wide aggregates in the database, on both backends.

The per-device drift summaries the ingest keeps (cloud/store/drift_summary.py): a device's
summary is the merge of exactly its stored records, however its records arrive (one batch,
several, a record twice in a batch, re-delivered after it was stored); the summary is written
in the insert's transaction (a failure between the two stores neither); a database from before
the summaries gets them from its records on open (schema step 8). Rollout health's totals
(SQL aggregates) equal the rows added up as cloud.rollouts.health adds them."""

from __future__ import annotations

import numpy as np
import pytest

from edgeloop.cloud.drift.monitor import _cohort_summary, records_summary
from edgeloop.cloud.store import SCHEMA_VERSION, open_store
from edgeloop.cloud.store import drift_summary
from edgeloop.cloud.store.readonly import query
from tests.pg_server import pg_server, store_location  # noqa: F401 - fixtures


def _summary(i: int, residuals: bool) -> dict:
    """Two features, three bins; 70 features on device d0 (a second 64-column chunk)."""
    width = 70 if i % 3 == 0 else 2
    out = {"hist": [[i, 2, 0]] * width, "n": [i + 2] * width, "missing": [i % 2] * width,
           "sum": [0.5 * i] * width, "sumsq": [0.25 * i + j for j in range(width)],
           "min": [-float(i) - j for j in range(width)], "max": [float(i) + j for j in range(width)]}
    if residuals:
        out.update(rn=i + 1, rsum=[0.1 * i] * width, rsumsq=[0.01 * i] * width)
    return out


def _records(n: int) -> list[dict]:
    return [{"device_id": f"d{i % 3}", "seq": i, "model_version": ("m:1", "m:2")[i % 4 == 0], "count": 10,
             "window_end": float(i), "labelled": 2, "correct": 1, "predictions": [i, 1, 2 * i],
             "features": _summary(i, residuals=i != 7) if i % 6 else None} for i in range(n)]


def _check(store, records: list[dict]) -> None:
    """The store's per-device summaries against the monitor's merge of the records stored."""
    stored = store.drift_rows()
    assert len(stored) == len({(r["device_id"], r["seq"]) for r in records if r.get("model_version")})
    totals = {(t["key"], t["model_version"]): t for t in store.drift_cohort_totals("device")}
    features = store.drift_cohort_features("device")
    groups: dict = {}
    for r in stored:
        groups.setdefault((r["device_id"], r["model_version"]), []).append(r)
    assert set(totals) == set(groups)
    for cohort, members in groups.items():
        expected, preds = records_summary(members)
        t = totals[cohort]
        assert t["records"] == len(members)
        assert t["featured"] == sum(1 for m in members if m["features"])
        assert t["predictions"] == preds, cohort
        got = _cohort_summary(features.get(cohort), t)
        assert (got is None) == (expected is None), cohort
        if expected is not None:
            assert set(got) == set(expected), cohort
            for k in expected:
                if k == "hist":
                    assert [list(h) for h in got[k]] == [list(h) for h in expected[k]], cohort
                else:
                    assert np.allclose(np.asarray(got[k], dtype=float), np.asarray(expected[k], dtype=float)), \
                        (cohort, k)


def test_a_devices_summary_is_the_merge_of_its_stored_records_however_they_arrive(store_location):
    records = _records(24)
    store = open_store(store_location)
    try:
        assert store.add_telemetry(records[:10]) == 10                      # one batch
        assert store.add_telemetry(records[5:10] + records[10:12]) == 2     # re-delivered with new ones
        assert store.add_telemetry([records[12], records[12], records[13]]) == 2   # twice in one batch
        for r in records[14:]:
            assert store.add_telemetry([r]) == 1                           # one a batch
        assert store.add_telemetry(records) == 0                           # everything again
        _check(store, records)
    finally:
        store.close()


def test_the_summary_and_its_records_are_stored_together_or_not_at_all(store_location, monkeypatch):
    records = _records(12)
    store = open_store(store_location)
    try:
        store.add_telemetry(records[:6])

        def crash(conn, rows):
            raise RuntimeError("crash between the insert and the summary")
        monkeypatch.setattr(drift_summary, "apply", crash)
        with pytest.raises(RuntimeError):
            store.add_telemetry(records[6:])
        monkeypatch.undo()
        assert store.telemetry_count() == 6            # the batch's records rolled back with it
        _check(store, records[:6])
        assert store.add_telemetry(records[6:]) == 6   # delivered again: stored and summarised once
        _check(store, records)
    finally:
        store.close()


def test_a_database_from_before_the_summaries_gets_them_from_its_records(store_location):
    records = _records(30)
    store = open_store(store_location)
    try:
        store.add_telemetry(records)
        store.add_telemetry([{"device_id": "d9", "seq": 0, "model_version": None, "count": 1,
                              "features": _summary(1, True)}])          # no model version: not summarised
        expected = {by: (store.drift_cohort_totals(by), store.drift_cohort_features(by)) for by in ("device", "fleet")}
        with store._tx() as conn:                     # as version 7 left it: no summary tables
            conn.execute("drop table drift_summaries")
            conn.execute("drop table drift_devices")
            conn.execute("update meta set value = '7' where key = 'schema_version'")
    finally:
        store.close()
    again = open_store(store_location)
    try:
        assert query(store_location, "select value from meta where key = 'schema_version'") == \
            [{"value": str(SCHEMA_VERSION)}]
        for by, (totals, features) in expected.items():
            assert again.drift_cohort_totals(by) == totals
            assert again.drift_cohort_features(by) == features
        _check(again, records + [{"device_id": "d9", "seq": 0}])
        again.add_telemetry(_records(34)[30:])        # and the ingest goes on adding to them
        _check(again, _records(34) + [{"device_id": "d9", "seq": 0}])
    finally:
        again.close()


def test_rollout_health_totals_are_the_rows_added_up_on_both_backends(store_location):
    from edgeloop.cloud.rollouts.health import judge
    from health_reference import totals
    store = open_store(store_location)
    try:
        states = {"d0": ("committed", "m:1"), "d1": ("committed", "m:1"), "d2": ("committed", "m:0"),
                  "d3": ("committed", "m:2"), "d4": ("pending", "m:1")}      # d3 ran m:2 before, d4 not done
        assert store.insert_rollout({"rollout_id": "r1", "model_version": "m:2", "target": "all", "spec": {},
                                     "state": "waves", "created_at": 1.0}, [], [
            {"rollout_id": "r1", "device_id": d, "tier": "mcu", "prev_version": prev, "ord": str(i), "state": state,
             "attempt": 1, "rb_attempt": 0} for i, (d, (state, prev)) in enumerate(states.items())]) is None
        records = [{"device_id": f"d{i % 5}", "seq": i, "model_version": ("m:0", "m:1", "m:2", "m:3")[i % 4],
                    "count": 0 if i % 9 == 0 else 10 + i, "errors": i % 3, "latency_ms_p50": float(i * 37 % 11),
                    "labelled": i % 4, "correct": i % 2, "abs_err_sum": 0.5 * i if i % 3 else None,
                    "predictions": [i, 1, 2][: 2 + i % 2], "confidence_hist": [0] * (i % 5) + [i]}
                   for i in range(60)]
        store.add_telemetry(records)
        expected = []
        for r in records:
            state, prev = states[r["device_id"]]
            if state == "committed" and prev != "m:2" and r["model_version"] in ("m:2", prev):
                expected.append({**r, "new": r["model_version"] == "m:2"})
        want = totals(expected)
        got = store.health_totals("r1", "m:2")
        assert want[True]["records"] and want[False]["records"]
        for side in (True, False):
            assert set(got[side]) == set(want[side])
            for k, v in want[side].items():
                assert got[side][k] == pytest.approx(v), (side, k)
        limits = {"error_rate_increase": 0.0, "prediction_js": 0.0, "latency_p95_increase_ms": 0.0}
        verdict, reference = judge(got, limits, 10), judge(want, limits, 10)
        assert verdict["evaluated"] and verdict["breaches"] == reference["breaches"]
        for k in ("error_rate_increase", "latency_p95_increase_ms", "prediction_js", "confidence_drop"):
            assert verdict[k] == pytest.approx(reference[k]), k
        assert store.health_totals("r-none", "m:2")[True]["records"] == 0
    finally:
        store.close()
