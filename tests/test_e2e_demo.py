"""End to end: the demo path on real components (Mosquitto over TCP, python-tuf, onnxruntime,
SQLite), with simulated devices running the real agent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgeloop.contracts.package import read_package
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.workspace import Workspace
from edgeloop.cloud.store.readonly import query as raw_rows
from edgeloop.fleet.demo import DemoOptions, run_demo

REPO = Path(__file__).resolve().parent.parent


def test_demo_updates_every_device_and_stores_all_telemetry(broker, tmp_path):
    ws = Workspace.init(tmp_path / "ws", mqtt=broker.address)
    result = run_demo(ws, DemoOptions(devices=6, samples=40, epochs=10, timeout_s=90, prefix="e2e"))

    assert result["model_version"] == "digits-mlp:1"
    assert (result["devices"], result["updated"], result["failed"]) == (6, 6, 0)
    # 40 requests per device in windows of 20: exactly 2 records each, none lost or doubled
    assert result["telemetry_records"] == 12
    assert result["inferences"] == 240
    assert result["accuracy"] > 0.85

    registry = Registry(ws.registry_path)
    package = registry.package_for("digits-mlp:1", "edge-gateway")
    devices = [d for d in registry.devices() if d["device_id"].startswith("e2e-")]
    assert len(devices) == 6
    for device in devices:
        assert device["model_version"] == "digits-mlp:1"
        state = json.loads((ws.fleet_dir / device["device_id"] / "state.json").read_text())
        installed = (ws.fleet_dir / device["device_id"] / "slots" / state["active_slot"] / "package.elpkg").read_bytes()
        assert read_package(installed).manifest.model_version == "digits-mlp:1"
        assert len(installed) == package["length"]
    per_device = raw_rows(registry.path, "select device_id, count(*) as n, min(seq) as lo, max(seq) as hi "
                                         "from telemetry where device_id like 'e2e-%' group by device_id")
    assert len(per_device) == 6
    assert all((r["n"], r["lo"], r["hi"]) == (2, 0, 1) for r in per_device)


def test_second_demo_upgrades_the_same_devices(broker, tmp_path):
    ws = Workspace.init(tmp_path / "ws", mqtt=broker.address)
    first = run_demo(ws, DemoOptions(devices=3, samples=20, epochs=5, prefix="upgrade"))
    second = run_demo(ws, DemoOptions(devices=3, samples=20, epochs=5, seed=1, prefix="upgrade"))
    assert (first["model_version"], second["model_version"]) == ("digits-mlp:1", "digits-mlp:2")
    assert second["updated"] == 3 and second["failed"] == 0
    devices = [d for d in Registry(ws.registry_path).devices() if d["device_id"].startswith("upgrade-")]
    assert len(devices) == 3
    for device in devices:
        state = json.loads((ws.fleet_dir / device["device_id"] / "state.json").read_text())
        assert state["model_version"] == "digits-mlp:2"
        # the previous package is still in the other slot
        other = "b" if state["active_slot"] == "a" else "a"
        assert read_package((ws.fleet_dir / device["device_id"] / "slots" / other / "package.elpkg")
                           .read_bytes()).manifest.model_version == "digits-mlp:1"


def test_demo_command_prints_one_json_summary(broker, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edgeloop.fleet.cli", "demo", "--json", "--devices", "3", "--samples", "20",
         "--epochs", "5", "--prefix", "cli", "-w", str(tmp_path / "ws"), "--mqtt", broker.address],
        capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("devices", "updated", "failed", "model_version", "telemetry_records", "accuracy", "seconds"):
        assert key in summary
    assert (summary["devices"], summary["updated"], summary["failed"]) == (3, 3, 0)
    assert summary["telemetry_records"] == 3
    assert "Traceback" not in proc.stderr
