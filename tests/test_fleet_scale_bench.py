"""bench/fleet_scale.py at a small count: a private PostgreSQL and Mosquitto (two listeners, as a
large fleet needs), two swarm processes of real agents, one rollout over all of them, the drift
report by fleet; every device updated, none failed, one JSON object last. And the refusals that
come before anything starts: one line, exit 2. And the two store operations it reads, on
both backends: devices per state, and the bytes the store takes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeloop.cloud.registry import Registry
from tests.pg_server import available, pg_server, store_location  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "fleet_scale.py"


def _bench(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(BENCH), *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env, check=False)


@pytest.mark.skipif(not available() or not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()),
                    reason="needs PostgreSQL's binaries and mosquitto (make test installs them)")
def test_fifty_devices_in_two_swarms_on_two_listeners_all_update():
    done = _bench("--devices", "50", "--procs", "2", "--per-port", "30")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 50 and result["updated"] == 50 and result["failed"] == 0, result
    assert result["state"] == "completed" and result["procs"] == 2 and result["listeners"] == 2
    assert result["device_code"] == "edgeloop.device_sdk.agent.Agent"
    assert result["updates_per_min"] > 0 and result["drift_report_s"] >= 0
    assert result["store_bytes_per_device"] > result["store_bytes_per_device_fleet_only"] > 0
    assert result["telemetry_records"] == 100 and result["control_plane_cpu_s_per_1k_devices"] > 0


def test_a_fleet_the_machine_cannot_take_is_refused_in_one_line():
    done = _bench("--devices", "1000", "--per-port", "10000000")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "ephemeral ports" in done.stderr
    assert done.stdout == ""
    done = _bench("--devices", "1000", "--rss-kb-per-device", "100000000")
    assert done.returncode == 2 and "MiB are available" in done.stderr and "Traceback" not in done.stderr


def test_device_states_count_devices_per_state_and_stored_bytes_grow_with_telemetry(store_location):
    registry = Registry(store_location)
    try:
        assert registry.device_states() == {}
        registry.record_statuses([{"device_id": f"d{i}", "tier": "mcu", "state": "online" if i % 3 else "committed"}
                                  for i in range(30)])
        assert registry.device_states() == {"online": 20, "committed": 10}
        before = registry.stored_bytes()
        assert before > 0
        registry.add_telemetry([{"device_id": f"d{i}", "seq": 1, "model_version": "m:1", "window_start": 1.0,
                                 "window_end": 2.0, "count": 1, "features": {"x": "y" * 4000}} for i in range(200)])
        assert registry.stored_bytes() > before
    finally:
        registry.close()
