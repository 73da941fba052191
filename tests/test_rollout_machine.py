"""Every row of both rollout transition tables (cloud/rollout_machine.py) is taken by the real
controller on a real store, and nothing outside the tables is ever taken.

The controller's lookups are recorded while operator-shaped scenarios run (tests/test_rollouts.py's
fake clock and sender, real SQLite and TUF signing); the test then compares what was taken with
the tables, row by row."""

from __future__ import annotations

import pytest

import cloud.rollouts as controller_module
import cloud.store.rollouts as store_module
from cloud.rollout_machine import (DEVICE_TRANSITIONS, ROLLOUT_TRANSITIONS, DeviceEvent, DeviceRolloutState,
                                   IllegalTransition, RolloutEvent, RolloutState, device_next, rollout_next)
from cloud.rollouts import RolloutSpec
from tests import test_rollouts as scenarios
from tests.test_rollouts import TIER, answer, fleet, make_unit

D, V, R, E = DeviceRolloutState, DeviceEvent, RolloutState, RolloutEvent


def _record(monkeypatch: pytest.MonkeyPatch) -> tuple[set, set]:
    rollout_rows: set = set()
    device_rows: set = set()

    def rollout_recorded(state: str, event: str, paused_from: str | None = None) -> RolloutState:
        to = rollout_next(state, event, paused_from)
        rollout_rows.add((R(state), E(event)))
        return to

    def device_recorded(state: str, event: str) -> DeviceRolloutState:
        to = device_next(state, event)
        device_rows.add((D(state), V(event)))
        return to

    monkeypatch.setattr(controller_module, "rollout_next", rollout_recorded)
    monkeypatch.setattr(store_module, "device_next", device_recorded)
    return rollout_rows, device_rows


def _drive(u, ctl, rid: str, answers: str = "committed", steps: int = 20) -> None:  # noqa: ANN001
    """Step, answering every new command, until the rollout ends."""
    answered = 0
    for _ in range(steps):
        ctl.step()
        for d, _ in u.sent.commands[answered:]:
            answer(u, d, answers)
        answered = len(u.sent.commands)
        u.clock.now += 1
        if ctl.status(rid)["state"] in ("completed", "aborted"):
            return


def _pause_resume_abort_in_each_state(u) -> None:  # noqa: ANN001
    """Pause and resume a rollout in each pausable state, then abort one from paused."""
    fleet(u, 6)
    ctl = u.controller()
    rid = ctl.create(RolloutSpec("m:2", f"tier={TIER}", strategy="canary", canary="1", bake_s=5, wave_size=1,
                                 growth=1.0))
    ctl.pause(rid)                                            # pending
    ctl.resume(rid)
    ctl.step()                                                # canary
    ctl.pause(rid)
    ctl.resume(rid)
    answer(u, u.sent.commands[0][0])
    ctl.step()                                                # baking
    assert ctl.status(rid)["state"] == "baking"
    ctl.pause(rid)
    ctl.resume(rid)
    u.clock.now += 10
    ctl.step()
    ctl.step()                                                # waves
    assert ctl.status(rid)["state"] == "waves"
    ctl.pause(rid)
    ctl.abort(rid)                                            # paused -> aborting
    _drive(u, ctl, rid)
    assert ctl.status(rid)["state"] == "aborted"


def _abort_in(state: str):  # noqa: ANN202
    def scenario(u) -> None:  # noqa: ANN001
        fleet(u, 8)
        ctl = u.controller()
        rid = ctl.create(RolloutSpec("m:2", f"tier={TIER}", strategy="canary", canary="1", bake_s=5, wave_size=1,
                                     growth=1.0))
        while ctl.status(rid)["state"] != state:
            before = len(u.sent.commands)
            ctl.step()
            for d, _ in u.sent.commands[before:]:
                answer(u, d)
            u.clock.now += 10
        ctl.abort(rid)
        _drive(u, ctl, rid)
        assert ctl.status(rid)["state"] == "aborted", state
    return scenario


def _canary_is_every_device(u) -> None:  # noqa: ANN001
    fleet(u, 1)
    ctl = u.controller()
    rid = ctl.create(RolloutSpec("m:2", f"tier={TIER}", strategy="canary", canary="100%"))
    _drive(u, ctl, rid)
    assert ctl.status(rid)["state"] == "completed"


def _rollbacks_that_retry_fail_and_time_out(u) -> None:  # noqa: ANN001
    """A device times out twice but installs the update late: the rollout aborts itself on the
    timeout, and rolls back the committed devices (one retries its rollback after a download
    failure, one fails it, one never answers it), the late one too; one device has nothing to
    roll back to."""
    ids = fleet(u, 5)
    u.device("fresh", version=None)                           # nothing to roll back to
    ctl = u.controller()
    rid = ctl.create(RolloutSpec("m:2", f"tier={TIER}", retries=1, max_failure_pct=10, min_devices=1,
                                 timeout_s=50))
    ctl.step()
    late = ids[4]
    for d in [*ids[:4], "fresh"]:
        answer(u, d)
    first = u.sent.to(late)[0].announce.update_id
    u.clock.now += 60                                         # `late` times out: sent again
    ctl.step()
    assert len(u.sent.to(late)) == 2
    u.device(late, "committed", "m:2", first)                 # ... its first attempt lands after all
    u.clock.now += 60
    for _ in range(3):                                        # timed out for good: the rollout aborts
        ctl.step()
    status = ctl.status(rid)
    assert status["state"] == "aborting", status
    back = {d: u.sent.to(d)[-1] for d in [*ids[:4], late]}
    assert all(c.announce.model_version == "m:1" for c in back.values())
    answer(u, ids[0])                                         # rolled back
    answer(u, ids[1], "failed", "transport.download", "download failed: reset")   # retried
    answer(u, ids[2], "rolled_back", "health.golden", "golden outputs differ")   # failed
    answer(u, late)
    ctl.step()
    answer(u, ids[1])
    u.clock.now += 120                                        # ids[3] never answers its rollback
    for _ in range(4):
        ctl.step()
        u.clock.now += 60
    status = ctl.status(rid)
    assert status["state"] == "aborted", status
    assert status["counts"]["rolled_back"] == 3 and status["counts"]["rollback_failed"] == 3


SCENARIOS = [
    scenarios.test_canary_bake_then_growing_waves_reach_everyone_once,
    scenarios.test_install_failures_over_threshold_abort_and_roll_back_updated_devices,
    scenarios.test_health_failure_is_not_retried_but_a_download_failure_is,
    scenarios.test_silent_device_times_out_at_the_tier_deadline_and_is_retried_then_failed,
    scenarios.test_waves_respect_the_rate_limit,
    _pause_resume_abort_in_each_state,
    *(_abort_in(state) for state in ("pending", "canary", "baking", "waves")),
    _canary_is_every_device,
    _rollbacks_that_retry_fail_and_time_out,
]


def test_every_row_of_both_tables_is_taken_by_the_controller(tmp_path, monkeypatch) -> None:
    rollout_rows, device_rows = _record(monkeypatch)
    for i, scenario in enumerate(SCENARIOS):
        with make_unit(tmp_path / str(i)) as u:
            scenario(u)
    assert rollout_rows <= set(ROLLOUT_TRANSITIONS) and device_rows <= set(DEVICE_TRANSITIONS)
    assert sorted(set(ROLLOUT_TRANSITIONS) - rollout_rows) == []
    assert sorted(set(DEVICE_TRANSITIONS) - device_rows) == []


@pytest.mark.parametrize("state", list(RolloutState))
def test_a_rollout_pair_that_is_not_a_row_is_refused(state: RolloutState) -> None:
    for event in RolloutEvent:
        if (state, event) in ROLLOUT_TRANSITIONS:
            if event != E.RESUME:
                assert rollout_next(state, event) == ROLLOUT_TRANSITIONS[(state, event)]
        else:
            with pytest.raises(IllegalTransition):
                rollout_next(state, event)


@pytest.mark.parametrize("state", list(DeviceRolloutState))
def test_a_device_pair_that_is_not_a_row_is_refused(state: DeviceRolloutState) -> None:
    for event in DeviceEvent:
        if (state, event) in DEVICE_TRANSITIONS:
            assert device_next(state, event) == DEVICE_TRANSITIONS[(state, event)]
        else:
            with pytest.raises(IllegalTransition):
                device_next(state, event)


def test_resume_returns_to_the_state_it_was_paused_from_and_nothing_else() -> None:
    assert rollout_next(R.PAUSED, E.RESUME, "baking") == R.BAKING
    for bad in (None, "paused", "completed", "nonsense"):
        with pytest.raises(IllegalTransition):
            rollout_next(R.PAUSED, E.RESUME, bad)
