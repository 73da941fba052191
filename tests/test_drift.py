"""Mergeable feature summaries and drift/skew detection against the package baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from contracts.bundle import read_bundle
from contracts.errors import SchemaError
from contracts.messages import as_dict, encode, parse
from cloud.datasets import load_dataset
from cloud.drift import compare, drift_report, js, ks, merge, psi
from cloud.pipeline import package_model, train_model
from cloud.registry import Registry
from cloud.training import TrainParams
from cloud.workspace import Workspace
from device_sdk.telemetry import TelemetryWindow


def test_distances_are_zero_on_equal_and_large_on_different_histograms():
    a = np.array([100, 200, 300, 400], dtype=float)
    assert psi(a, a) == pytest.approx(0) and js(a, a) == pytest.approx(0) and ks(a, a)[0] == 0
    b = np.array([400, 300, 200, 100], dtype=float)
    assert psi(a, b) > 0.5 and 0 < js(a, b) <= 1 and ks(a, b)[1] < 1e-6


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    ws = Workspace.init(tmp_path_factory.mktemp("drift") / "ws")
    registry = Registry(ws.registry_path)
    mv = train_model(ws, registry, TrainParams(epochs=5))["model_version"]
    pkg = package_model(ws, registry, mv, "edge-gateway")
    _, _, test = load_dataset().split()
    return ws, registry, mv, read_bundle(pkg.data).manifest.baseline, test


def windows(baseline, x, mv, device, seqs, size=200, transform=lambda v: v, y=None):
    """Telemetry windows for ``x``; predictions are the true labels when given (a good model)."""
    y = load_dataset().split()[2].y if y is None else y
    out = []
    for w, seq in enumerate(seqs):
        win = TelemetryWindow(10, baseline)
        start = (w * size) % len(x)
        for row, label in zip(x[start:start + size], y[start:start + size]):
            win.record(int(label), 0.9, 0.1, int(label), transform(row.copy()))
        out.append(parse(encode(win.close(device, seq, mv))))     # through the wire format
    return out


def test_summaries_merge_exactly_by_addition(fleet):
    _, _, mv, baseline, test = fleet
    a = windows(baseline, test.x[:100], mv, "d", [0], 100)[0]
    b = windows(baseline, test.x[100:200], mv, "d", [1], 100, y=test.y[100:200])[0]
    both = windows(baseline, test.x[:200], mv, "d", [2], 200)[0]
    merged = merge([a.features, b.features])
    assert [list(h) for h in merged["hist"]] == both.features["hist"]
    assert list(merged["n"]) == both.features["n"] and np.allclose(merged["sum"], both.features["sum"])


def test_held_out_data_raises_no_alarm_and_a_shifted_sensor_does(fleet):
    _, _, mv, baseline, test = fleet
    calm = windows(baseline, test.x, mv, "d", range(1), 359)
    verdict = compare(baseline, merge([w.features for w in calm]), None)
    assert not verdict.drifted, verdict.drifted_features
    def gain(v):           # a sensor whose gain drifted: every pixel 60% brighter, saturating at 16
        return np.minimum(v * 1.6, 16)
    shifted = windows(baseline, test.x, mv, "d", range(1), 200, gain)
    verdict = compare(baseline, merge([w.features for w in shifted]), None)
    assert verdict.drifted and len(verdict.drifted_features) >= 5


def test_report_tells_skew_from_drift_and_stores_alerts(fleet):
    ws, registry, mv, baseline, test = fleet
    def stuck(v):          # one stuck sensor: feature 20 always reads 16
        v[20] = 16
        return v
    records = (windows(baseline, test.x, mv, "calm", range(3), 100)
               + windows(baseline, test.x, mv, "skewed", range(3), 100, stuck)
               + windows(baseline, test.x, mv, "drifting", range(3), 100)
               + windows(baseline, test.x, mv, "drifting", range(3, 9), 100, stuck))
    for device in ("calm", "skewed", "drifting"):
        registry.record_status({"device_id": device, "tier": "edge-gateway", "state": "committed",
                                "model_version": mv, "update_id": None, "reason": None})
    rows = [as_dict(r) for r in records]
    for r in rows:
        r.pop("extra")
    assert registry.add_telemetry(rows) == len(rows)
    report = {r["key"]: r for r in drift_report(registry, by="device")}
    assert report["calm"]["status"] == "ok"
    assert report["skewed"]["status"] == "skew" and 20 in report["skewed"]["drifted_features"]
    assert report["drifting"]["status"] == "drift" and 20 in report["drifting"]["drifted_features"]
    assert {(a["kind"], a["key"]) for a in registry.alerts()} >= {("skew", "skewed"), ("drift", "drifting")}


def test_feature_summaries_that_do_not_add_up_are_refused(fleet):
    _, _, mv, baseline, test = fleet
    record = windows(baseline, test.x[:50], mv, "d", [0], 50)[0]
    body = json.loads(encode(record))
    body["features"]["hist"][3][0] += 1                    # one more count than inputs
    with pytest.raises(SchemaError, match="do not add up"):
        parse(json.dumps(body))
    body = json.loads(encode(record))
    body["features"]["sum"] = body["features"]["sum"][:-1]   # wrong length
    with pytest.raises(SchemaError, match="features.sum"):
        parse(json.dumps(body))
