"""The package baseline is stored once when the package is built and read through one function
(cloud/drift/baselines.py); a missing or corrupt one is an error, never a silent "no baseline"."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from edgeloop.contracts.package import read_package, sha256_hex
from edgeloop.contracts.messages import as_dict, encode, parse
from edgeloop.cloud.drift.baselines import NO_BASELINE, model_baseline, package_baseline, store_baseline
from edgeloop.cloud.train.datasets import load_dataset
from edgeloop.cloud.drift.monitor import drift_report
from edgeloop.cloud.errors import IntegrityError
from edgeloop.cloud.ingest.checks import TelemetryGate
from edgeloop.cloud.loop.pipeline import package_model, train_model
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.train.training import TrainParams
from edgeloop.cloud.workspace import Workspace
from edgeloop.device_sdk.telemetry import TelemetryWindow

TIER = "edge-gateway"


@pytest.fixture
def packaged(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    registry = Registry(ws.registry_path)
    mv = train_model(ws, registry, TrainParams(epochs=1))["model_version"]
    result = package_model(ws, registry, mv, TIER)
    yield ws, registry, mv, result
    registry.close()


def _telemetry(registry: Registry, baseline: dict, mv: str) -> list:
    _, _, test = load_dataset().split()
    win = TelemetryWindow(10, baseline)
    for row, label in zip(test.x[:100], test.y[:100]):
        win.record(int(label), 0.9, 0.1, int(label), row.copy())
    msg = parse(encode(win.close("d1", 0, mv)))
    registry.record_status({"device_id": "d1", "tier": TIER, "state": "committed", "model_version": mv,
                            "update_id": None, "reason": None})
    row = as_dict(msg)
    row.pop("extra")
    registry.add_telemetry([row])
    return [msg]


def _corrupt_baseline(registry: Registry, mv: str) -> Path:
    path = Path(registry.artifact_path(registry.package_for(mv, TIER)["baseline_sha256"]))
    path.write_bytes(path.read_bytes()[:-10])
    return path


def test_the_baseline_is_stored_once_keyed_by_the_package_and_equals_the_shipped_one(packaged):
    ws, registry, mv, result = packaged
    shipped = read_package(result.data).manifest.baseline
    row = registry.package_for(mv, TIER)
    assert row["baseline_sha256"] == sha256_hex(json.dumps(shipped, sort_keys=True, separators=(",", ":")).encode())
    assert package_baseline(registry, row) == shipped == model_baseline(registry, mv, TIER)
    assert model_baseline(registry, mv, "mcu") == shipped           # any tier's package: the same baseline
    assert model_baseline(registry, "digits-mlp:99") is None          # never packaged here: nothing to compare


def test_drift_report_reads_the_stored_baseline_not_the_package_tar(packaged):
    ws, registry, mv, result = packaged
    _telemetry(registry, read_package(result.data).manifest.baseline, mv)
    Path(registry.artifact_path(result.sha256)).write_bytes(b"not a tar any more")   # the package itself
    (entry,) = drift_report(registry, by="device", store_alerts=False)
    assert entry["status"] == "ok" and entry.get("max_psi") is not None, entry     # judged, not "no-baseline"


def test_a_corrupt_stored_baseline_is_an_error_in_the_drift_report_and_at_ingest(packaged, capsys):
    from edgeloop.fleet.cli import main

    ws, registry, mv, result = packaged
    records = _telemetry(registry, read_package(result.data).manifest.baseline, mv)
    path = _corrupt_baseline(registry, mv)
    with pytest.raises(IntegrityError, match="drift baseline .* is corrupt"):
        drift_report(registry, by="device", store_alerts=False)
    assert main(["drift", "-w", str(ws.root)]) == IntegrityError.exit_code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(path) in err and "Traceback" not in err
    with pytest.raises(IntegrityError, match="corrupt"):
        TelemetryGate(registry).check(records)
    assert registry.alerts() == []                       # nothing judged against a broken baseline


def test_a_package_recorded_without_its_baseline_is_an_error_until_packaged_again(packaged):
    ws, registry, mv, result = packaged
    with sqlite3.connect(ws.registry_path) as db:       # as a registry from before baselines were stored
        db.execute("update packages set baseline_sha256 = null")
    with pytest.raises(IntegrityError, match=f"no stored drift baseline.*edgeloop package {mv} --tier {TIER}"):
        model_baseline(registry, mv, TIER)
    again = package_model(ws, registry, mv, TIER)       # the fix the error names: the same bytes, recorded again
    assert again.sha256 == result.sha256
    assert model_baseline(registry, mv, TIER) == read_package(result.data).manifest.baseline


def test_a_missing_stored_baseline_is_an_error(packaged):
    ws, registry, mv, _ = packaged
    Path(registry.artifact_path(registry.package_for(mv, TIER)["baseline_sha256"])).unlink()
    with pytest.raises(IntegrityError, match="drift baseline .* is missing"):
        model_baseline(registry, mv, TIER)


def test_a_package_without_a_baseline_says_so_in_its_record(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    registry = Registry(ws.registry_path)
    assert store_baseline(ws, registry, {}) == NO_BASELINE
    row = {"sha256": "0" * 64, "model_version": "m:1", "tier": TIER, "baseline_sha256": NO_BASELINE}
    assert package_baseline(registry, row) is None
