"""bench/faults.py's fault runs, at small counts: power cuts during an install and its recovery
(with what a power cut loses undone), kill -9 of the control plane mid-rollout (also right after
marking a wave sent, before publishing), and kill -9 of the broker mid-stream. Nothing may be
bricked, duplicated, stalled or lost; and each fault must really have happened."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import faults  # noqa: E402


def test_power_cuts_at_install_and_recovery_operations_brick_nothing(tmp_path):
    counts = faults.power_cuts(tmp_path, share=0.1, recovery_share=0.05)
    assert counts["install_cuts"] >= 5 and counts["recovery_cuts"] >= 5, counts
    assert counts["power_cuts"] == counts["install_cuts"] + counts["recovery_cuts"]
    assert counts["bricked"] == 0, counts
    assert sum(counts["finals"].values()) > 0         # every uncut recovery ended on a healthy model


def test_control_plane_killed_mid_rollout_sends_no_duplicate_and_stalls_no_device(tmp_path):
    # a 20 s deadline: a device left waiting for a command that never went out would time out here
    counts = faults.rollout_crashes(tmp_path, kills=2, devices=3, kills_per_rollout=2, deadline_s=20)
    assert counts["rollout_crashes"] >= 2 and counts["kills_after_mark"] >= 1, counts
    assert counts["commands_resent"] >= 1                # the killed one's marked wave went out again
    assert counts["duplicate_commands"] == 0 and counts["stalled_devices"] == 0, counts


def test_broker_killed_mid_stream_loses_and_duplicates_no_telemetry(tmp_path):
    counts = faults.broker_kills(tmp_path, kills=1, devices=3, records=12)
    assert counts["telemetry_produced"] == 36
    assert counts["telemetry_lost"] == 0 and counts["telemetry_duplicated"] == 0, counts
    assert counts["reports_lost"] == 0 and counts["reports_duplicated"] == 0, counts
