"""bench/faults.py's fault runs, at small counts: power cuts during an install and its recovery
(with what a power cut loses undone), kill -9 of the control plane mid-rollout (also right after
marking a wave sent, before publishing), kill -9 of the broker mid-stream, full and read-only
state folders (and ENOSPC at each state write of an install), and clocks two days ahead and
behind. Nothing may be bricked, duplicated, stalled, lost or wrongly accepted; and each fault must
really have happened."""

from __future__ import annotations

import os
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


def test_full_and_read_only_disks_cost_no_prediction_record_or_number(tmp_path):
    counts = faults.disks(tmp_path, devices=2, requests=12)
    runs = ["doubles_full", "doubles_readonly"]
    if os.geteuid() == 0:                             # root here: the real tmpfs runs must have run
        runs += ["tmpfs_full", "tmpfs_readonly"]
        assert counts["tmpfs_readonly"]["read_only_mounted"], counts
    else:
        assert counts["tmpfs"].startswith("skipped"), counts
    for name in runs:
        run = counts[name]
        assert run["held_in_memory"] >= 2 * 3, (name, run)                 # the refusal really held records
        assert run["faults_reported"] == 2 and run["faults_not_cleared"] == 0, (name, run)
        assert run["produced"] == 2 * (8 + 12) // 4, (name, run)           # 5 windows of 4 a device
        assert run["requests_uncounted"] == 0 and run["outbox_left"] == 0, (name, run)
    assert counts["doubles_full"]["writes_refused"] >= 2 and counts["doubles_readonly"]["writes_refused"] >= 2
    for key in faults.DISK_KEYS:
        assert counts[key] == 0, (key, counts)
    install = counts["install"]
    assert install["install_faults"] == install["state_writes"] >= 3, install    # ENOSPC at each state write
    assert install["not_installed_after"] == 0, install


def test_clocks_two_days_off_lose_nothing_accept_no_expired_metadata_and_show_the_skew(tmp_path):
    counts = faults.clocks(tmp_path, devices=1, windows=2)
    for name, skew in (("ahead", faults.DAY * 2), ("behind", -faults.DAY * 2)):
        assert counts[name]["own_clock_off_s"] == [skew], counts[name]          # really skewed
        assert counts[f"unsynced_{name}"]["own_clock_off_s"] == [skew]
        assert abs(counts[name]["learned_offset_s"][0] + skew) < 60, counts[name]   # and it learned so
        assert counts[name]["updates_refused"] == 0 and counts[name]["expired_accepted"] == 0, counts[name]
        assert counts[name]["expired_refused_as_expired"] == 1, counts[name]    # the expired update was offered
        assert counts[name]["produced"] >= 2 and counts[f"unsynced_{name}"]["synced"] == 0
    ahead = counts["unsynced_ahead"]
    assert ahead["produced"] == 2 and ahead["flagged"] == 2                    # impossible times: stored, flagged
    assert counts["clock_flagged"] >= 2 and counts["skew_reported"] == 2
    for key in ("telemetry_lost_clock", "telemetry_duplicated_clock", "updates_refused_clock_ahead",
                "expired_accepted_clock_behind"):
        assert counts[key] == 0, (key, counts)
