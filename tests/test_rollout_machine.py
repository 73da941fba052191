"""Every row of both rollout transition tables, driven through the controller and the store;
and every pair that is not a row refused, with nothing written.

The store is watched at its write operations (each applies at most one transition per device
or rollout): before and after each call the rows are read (read-only) and every change is
named by its (state, event) row, which must give the state observed. The scenarios together
must exercise every row of ROLLOUT_TRANSITIONS and DEVICE_TRANSITIONS."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from edgeloop.contracts.messages import Command, encode, parse
from edgeloop.cloud.package.packaging import store_blob
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.rollouts.machine import (DEVICE_TRANSITIONS, ROLLOUT_TRANSITIONS, DeviceEvent, DeviceRolloutState,
                                   IllegalTransition, RolloutEvent, RolloutState, device_next, rollout_next)
from edgeloop.cloud.rollouts.controller import RolloutController, RolloutSpec
from edgeloop.cloud.store import AttemptEnd
from edgeloop.cloud.store.readonly import query
from edgeloop.cloud.workspace import Workspace

TIER = "edge-gateway"
DEADLINE = 300.0                 # cloud/package/tiers/edge-gateway.toml in_progress_timeout_s
S, D, E, V = RolloutState, DeviceRolloutState, RolloutEvent, DeviceEvent
Seen = set[tuple[str, str, str]]



def add_two_versions(registry: Registry, artifacts_dir: Path, tier: str = TIER) -> None:
    """Model versions m:1 and m:2, each with a stored (stand-in) package for ``tier``."""
    for v in (1, 2):
        mv = f"m:{v}"
        registry.add_model_version({"model_version": mv, "model": "m", "version": v, "run_id": "r",
                                    "stage": "candidate"})
        data = f"package {mv}".encode()
        sha, path = store_blob(artifacts_dir, data)
        registry.add_artifact(sha, f"package:{tier}", len(data), str(path))
        registry.add_package({"sha256": sha, "model_version": mv, "tier": tier,
                              "target": f"m/{v}/{tier}.elpkg", "length": len(data)})

class Rig:
    """A workspace with m:1 and m:2 packaged, a fake sender, a driven clock, and the store's
    transition writes watched."""

    def __init__(self, root: Path, seen: Seen) -> None:
        self.ws = Workspace.init(root, mqtt="127.0.0.1:1")
        self.registry = Registry(self.ws.registry_path)
        self.ws.image_repository().init()
        self.ws.director_repository().init()
        add_two_versions(self.registry, self.ws.artifacts_dir)
        self.now = 1_000_000.0
        self.sent: list[tuple[str, Command]] = []
        self.seen = seen
        self._watch()
        self.ctl = RolloutController(self.ws, self.registry, lambda d, c: self.sent.append((d, parse(encode(c), Command))),
                                     repository_url="http://127.0.0.1:9/repository", clock=lambda: self.now)

    def device(self, device_id: str, state: str = "online", version: str | None = "m:1",
               update_id: str | None = None) -> None:
        self.registry.record_status({"device_id": device_id, "tier": TIER, "state": state, "model_version": version,
                                     "update_id": update_id, "reason": None})

    def answer(self, device_id: str, state: str = "committed", code: str | None = None) -> None:
        """The device's answer to the last command it got."""
        cmd = [c for d, c in self.sent if d == device_id][-1]
        self.device(device_id, state, cmd.announce.model_version if state == "committed" else "m:1",
                    cmd.announce.update_id)
        if code:
            self.registry.add_device_error({"device_id": device_id, "code": code, "message": code,
                                            "update_id": cmd.announce.update_id, "ts": 0.0})

    def state(self, rid: str) -> str:
        return self.ctl.status(rid)["state"]

    def devices(self, rid: str) -> dict[str, str]:
        return {d["device_id"]: d["state"] for d in self.registry.rollout_devices(rid)}

    def step(self, advance: float = 0.0) -> None:
        self.now += advance
        self.ctl.step()

    # -- watching the store's transition writes ---------------------------------------------------------
    def _snapshot(self) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[str, str]]:
        devices = {(r["rollout_id"], r["device_id"]): r for r in query(self.registry.path,
                                                                       "select * from rollout_devices")}
        rollouts = {r["rollout_id"]: r["state"] for r in query(self.registry.path, "select * from rollouts")}
        return devices, rollouts

    def _watch(self) -> None:
        for name in ("mark_sent", "end_attempts", "abort_devices", "move_rollout"):
            original = getattr(self.registry, name)

            def watched(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
                before = self._snapshot()
                result = _original(*args, **kw)
                self._note(_name, args, before, self._snapshot())
                return result
            setattr(self.registry, name, watched)

    def _note(self, name: str, args: tuple, before: tuple, after: tuple) -> None:
        key = ("state", "attempt", "rb_attempt", "update_id")
        events = {e.row["device_id"]: e.event for e in args[1]} if name == "end_attempts" else {}
        for k, row in after[0].items():
            old = before[0].get(k)
            if old is None or tuple(old[c] for c in key) == tuple(row[c] for c in key):
                continue
            if name == "mark_sent":
                event = V.SEND
            elif name == "end_attempts":
                event = events[k[1]]
            else:
                (event,) = [e for (s, e), t in DEVICE_TRANSITIONS.items() if s == old["state"] and t == row["state"]]
            assert device_next(old["state"], event) == row["state"], (k, old["state"], event, row["state"])
            self.seen.add(("device", str(old["state"]), str(event)))
        for rid, state in after[1].items():
            old = before[1].get(rid)
            if old is None or old == state:
                continue
            if old == S.PAUSED and state != S.ABORTING:
                event = E.RESUME
            else:
                (event,) = [e for (s, e), t in ROLLOUT_TRANSITIONS.items() if s == old and t == state]
            self.seen.add(("rollout", str(old), str(event)))


def _canary_path_with_pauses(rig: Rig) -> None:
    """pending -> canary -> baking -> waves -> completed, paused and resumed in each."""
    for i in range(8):
        rig.device(f"c{i}")
    rid = rig.ctl.create(RolloutSpec("m:2", f"tier={TIER}", strategy="canary", canary="2", bake_s=10, growth=2.0))

    def pause_resume(expected: str) -> None:
        assert rig.state(rid) == expected
        rig.ctl.pause(rid)
        assert rig.state(rid) == "paused"
        rig.ctl.resume(rid)
        assert rig.state(rid) == expected

    pause_resume("pending")
    rig.step()
    pause_resume("canary")
    for d in [d for d, s in rig.devices(rid).items() if s == "sent"]:
        rig.answer(d)
    rig.step()
    pause_resume("baking")
    rig.step(advance=11)
    pause_resume("waves")
    for _ in range(10):
        for d in [d for d, s in rig.devices(rid).items() if s == "sent"]:
            rig.answer(d)
        rig.step(advance=1)
        if rig.state(rid) == "completed":
            break
    assert rig.state(rid) == "completed" and set(rig.devices(rid).values()) == {"committed"}


def _canary_of_everyone(rig: Rig) -> None:
    """A canary that is every device completes from the canary state."""
    for i in range(2):
        rig.device(f"e{i}")
    rid = rig.ctl.create(RolloutSpec("m:2", f"tier={TIER}", strategy="canary", canary="100%"))
    rig.step()
    for d in rig.devices(rid):
        rig.answer(d)
    rig.step()
    assert rig.state(rid) == "completed"


def _retry_then_fail(rig: Rig) -> None:
    """A retryable failure goes back to pending and is sent again; a final one fails."""
    rig.device("f0")
    rig.device("f1")
    rid = rig.ctl.create(RolloutSpec("m:2", f"tier={TIER}", retries=1, max_failure_pct=100))
    rig.step()
    rig.answer("f0", "failed", code="transport.download")
    rig.answer("f1")
    rig.step()
    assert rig.devices(rid) == {"f0": "sent", "f1": "committed"}        # retried at once
    rig.answer("f0", "failed", code="health.golden")
    rig.step()
    assert rig.devices(rid) == {"f0": "failed", "f1": "committed"} and rig.state(rid) == "completed"


def _aborts_before_and_while_baking(rig: Rig) -> None:
    """Aborted while pending, paused, canary and baking: never-sent devices are cancelled,
    committed ones rolled back."""
    ids = [f"a{i}" for i in range(3)]
    for d in ids:
        rig.device(d)
    rid = rig.ctl.create(RolloutSpec("m:2", f"tier={TIER}"))
    rig.ctl.abort(rid)
    rig.step()
    assert rig.state(rid) == "aborted" and set(rig.devices(rid).values()) == {"cancelled"}

    rid = rig.ctl.create(RolloutSpec("m:2", f"tier={TIER}"))
    rig.ctl.pause(rid)
    rig.ctl.abort(rid)
    rig.step()
    assert rig.state(rid) == "aborted"

    for until in ("canary", "baking"):
        rid = rig.ctl.create(RolloutSpec("m:2", f"tier={TIER}", strategy="canary", canary="1", bake_s=100))
        rig.step()
        (canary,) = [d for d, s in rig.devices(rid).items() if s == "sent"]
        if until == "baking":
            rig.answer(canary)
            rig.step()
        assert rig.state(rid) == until
        rig.ctl.abort(rid)
        if until == "canary":
            rig.answer(canary)                   # its result still counts while aborting
        rig.step()
        assert rig.devices(rid)[canary] == "rolling_back"
        rig.answer(canary)                       # the rollback
        rig.step()
        assert rig.state(rid) == "aborted" and rig.devices(rid)[canary] == "rolled_back"


def _abort_in_waves_with_every_rollback_outcome(rig: Rig) -> None:
    """Aborted in waves: committed devices roll back (committed, failed, retried, timed out),
    one with no previous version cannot, one that timed out but installed late rolls back."""
    for d in ("r0", "r1", "r2", "r3", "r4"):
        rig.device(d)
    rig.device("nv", version=None)
    rid = rig.ctl.create(RolloutSpec("m:2", f"tier={TIER}", retries=1, max_failure_pct=100))
    rig.step()
    for d in ("r0", "r1", "r2", "r3", "nv"):
        rig.answer(d)
    rig.step()
    rig.step(advance=DEADLINE + 1)               # r4: no result, attempts left: sent again
    assert rig.devices(rid)["r4"] == "sent" and rig.state(rid) == "waves"
    rig.ctl.abort(rid)
    rig.device("r4", version="m:2")              # it installed the update late, without a result
    rig.step(advance=DEADLINE + 1)               # r4 times out; the abort rolls back what runs m:2
    states = rig.devices(rid)
    assert states == {"r0": "rolling_back", "r1": "rolling_back", "r2": "rolling_back", "r3": "rolling_back",
                      "r4": "rolling_back", "nv": "rollback_failed"}
    rig.answer("r0")
    rig.answer("r1", "failed", code="health.load")
    rig.answer("r3")
    rig.answer("r4")
    rig.step()
    rig.step(advance=DEADLINE + 1)               # r2's rollback: no result, attempts left: sent again
    assert rig.devices(rid)["r2"] == "rolling_back" and rig.state(rid) == "aborting"
    rig.step(advance=DEADLINE + 1)               # and then out of attempts
    assert rig.devices(rid) == {"r0": "rolled_back", "r1": "rollback_failed", "r2": "rollback_failed",
                                "r3": "rolled_back", "r4": "rolled_back", "nv": "rollback_failed"}
    assert rig.state(rid) == "aborted"


SCENARIOS = (_canary_path_with_pauses, _canary_of_everyone, _retry_then_fail, _aborts_before_and_while_baking,
             _abort_in_waves_with_every_rollback_outcome)


def test_every_row_of_both_transition_tables_is_driven_through_the_controller(tmp_path):
    seen: Seen = set()
    for scenario in SCENARIOS:
        rig = Rig(tmp_path / scenario.__name__.strip("_"), seen)
        try:
            scenario(rig)
        finally:
            rig.registry.close()
    rows = {("rollout", str(s), str(e)) for s, e in ROLLOUT_TRANSITIONS} | \
        {("device", str(s), str(e)) for s, e in DEVICE_TRANSITIONS}
    assert rows - seen == set(), "rows no scenario exercised"
    assert seen <= rows


def test_every_pair_that_is_not_a_row_is_refused():
    for s, e in itertools.product(RolloutState, RolloutEvent):
        if (s, e) not in ROLLOUT_TRANSITIONS:
            with pytest.raises(IllegalTransition):
                rollout_next(s, e)
    for s, e in itertools.product(DeviceRolloutState, DeviceEvent):
        if (s, e) not in DEVICE_TRANSITIONS:
            with pytest.raises(IllegalTransition):
                device_next(s, e)
    with pytest.raises(IllegalTransition):
        rollout_next("paused", "resume", paused_from="completed")     # only back to where it was paused
    with pytest.raises(IllegalTransition):
        rollout_next("shipping", "pause")                             # not a state at all


def test_a_transition_not_in_the_table_writes_nothing(tmp_path):
    rig = Rig(tmp_path / "ws", set())
    try:
        rig.device("x0")
        rig.device("x1")
        rid = rig.ctl.create(RolloutSpec("m:2", f"tier={TIER}"))
        rig.step()
        before = query(rig.registry.path, "select * from rollout_devices order by device_id")
        rows = {r["device_id"]: r for r in before}
        ends = [AttemptEnd(rows["x0"], V.COMMIT, None, None),          # a row: sent -> committed
                AttemptEnd({**rows["x1"], "state": "pending"}, V.COMMIT, None, None)]   # not a row
        with pytest.raises(IllegalTransition, match="from 'pending' on 'commit'"):
            rig.registry.end_attempts(rid, ends, rig.now)
        assert query(rig.registry.path, "select * from rollout_devices order by device_id") == before
        with pytest.raises(IllegalTransition):
            rig.ctl._move(rid, "waves", E.START_CANARY, None)
        assert rig.state(rid) == "waves"
    finally:
        rig.registry.close()
