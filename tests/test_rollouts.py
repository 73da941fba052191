"""Staged rollouts (cloud/rollouts/controller.py). Unit tests drive the real controller on a real SQLite
registry and real TUF signing, with a fake clock and a fake sender standing in for MQTT;
integration tests run it against real agents over a real Mosquitto."""

from __future__ import annotations

import contextlib
import json
import threading

import pytest

from edgeloop.contracts.messages import Command, encode, parse
from edgeloop.cloud.errors import UserError
from edgeloop.cloud.package.packaging import store_blob
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.rollouts.controller import RolloutController, RolloutEvent, RolloutSpec, js_distance, parse_selector
from edgeloop.cloud.workspace import Workspace
from conftest import wait_for

TIER = "edge-gateway"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Sent:
    """The fake sender: records each command (round-tripped through the wire format)."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, Command]] = []

    def __call__(self, device_id: str, command: Command) -> None:
        self.commands.append((device_id, parse(encode(command), Command)))

    def to(self, device_id: str) -> list[Command]:
        return [c for d, c in self.commands if d == device_id]


@pytest.fixture
def unit(tmp_path):
    with make_unit(tmp_path) as u:
        yield u


@contextlib.contextmanager
def make_unit(tmp_path):
    """A workspace with m:1 and m:2 packaged for two tiers, a fake clock and a fake sender."""
    ws = Workspace.init(tmp_path / "ws", mqtt="127.0.0.1:1")
    registry = Registry(ws.registry_path)
    ws.image_repository().init()
    ws.director_repository().init()
    for v in (1, 2):
        mv = f"m:{v}"
        registry.add_model_version({"model_version": mv, "model": "m", "version": v, "run_id": "r",
                                    "stage": "candidate"})
        for tier in (TIER, "gpu-server"):
            data = f"package {mv} {tier}".encode()
            sha, path = store_blob(ws.artifacts_dir, data)
            registry.add_artifact(sha, f"package:{tier}", len(data), str(path))
            registry.add_package({"sha256": sha, "model_version": mv, "tier": tier, "target": f"m/{v}/{tier}.elpkg",
                                  "length": len(data)})
    clock, sent = Clock(), Sent()

    def controller() -> RolloutController:
        return RolloutController(ws, registry, sent, repository_url="http://127.0.0.1:9/repository", clock=clock)

    def device(device_id: str, state: str = "online", version: str | None = "m:1", update_id: str | None = None,
               tier: str = TIER, reason: str | None = None) -> None:
        registry.record_status({"device_id": device_id, "tier": tier, "state": state, "model_version": version,
                                "update_id": update_id, "reason": reason})

    yield type("Unit", (), {"ws": ws, "registry": registry, "clock": clock, "sent": sent, "controller": controller,
                            "device": device})
    registry.close()


def fleet(u, n: int, prefix: str = "d") -> list[str]:
    ids = [f"{prefix}{i:02d}" for i in range(n)]
    for d in ids:
        u.device(d)
    return ids


def answer(u, device_id: str, state: str = "committed", code: str | None = None, reason: str | None = None) -> None:
    """The device's answer to the last command it got, as the control plane would store it."""
    cmd = u.sent.to(device_id)[-1]
    version = cmd.announce.model_version if state == "committed" else "m:1"
    u.device(device_id, state, version, cmd.announce.update_id, reason=reason)
    if code:
        u.registry.add_device_error({"device_id": device_id, "code": code, "message": reason or code,
                                     "update_id": cmd.announce.update_id, "ts": 0.0})


def test_canary_bake_then_growing_waves_reach_everyone_once(unit):
    ids = fleet(unit, 10)
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", f"tier={TIER}", strategy="canary", canary="20%", bake_s=30, growth=2.0))
    assert ctl.status(rid)["state"] == "pending" and not unit.sent.commands
    ctl.step()
    assert ctl.status(rid)["state"] == "canary"
    canary = [d for d, _ in unit.sent.commands]
    assert len(canary) == 2
    # while it runs, the director signs exactly this assignment, with this update id
    cmd = unit.sent.to(canary[0])[0]
    assigned = f"assignments/{cmd.announce.group}/{cmd.announce.target}"
    signed = unit.ws.director_repository().targets()[assigned]
    assert signed.unrecognized_fields["custom"]["update_id"] == cmd.announce.update_id
    for d in canary:
        answer(unit, d)
    ctl.step()
    assert ctl.status(rid)["state"] == "baking"
    unit.clock.now += 10
    ctl.step()
    assert ctl.status(rid)["state"] == "baking" and len(unit.sent.commands) == 2   # still baking
    unit.clock.now += 25
    waves = []
    while ctl.status(rid)["state"] != "completed":
        before = len(unit.sent.commands)
        ctl.step()
        new = [d for d, _ in unit.sent.commands[before:]]
        if new:
            waves.append(len(new))
        for d in new:
            answer(unit, d)
        unit.clock.now += 1
        assert len(waves) < 10
    assert waves == [2, 4, 2]                      # base = canary size, doubling, then what is left
    status = ctl.status(rid)
    assert status["counts"]["committed"] == 10 and status["progress"] == 1.0
    assert sorted(d for d, _ in unit.sent.commands) == sorted(ids)   # each device exactly once
    cmd = unit.sent.to(ids[0])[0]
    assert cmd.rollout_id == rid and cmd.announce.model_version == "m:2" and cmd.announce.group.startswith(rid)
    # once it ended, the rollout assigns nothing any more: its assignments are withdrawn
    assert assigned not in unit.ws.director_repository().targets()


def test_waves_respect_the_rate_limit(unit):
    fleet(unit, 6)
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", "tier=edge-gateway", strategy="waves", wave_size=2, growth=1.0,
                                 rate_per_min=6))        # 6 devices/min: a wave of 2 every 20 s
    times = []
    for _ in range(80):
        before = len(unit.sent.commands)
        ctl.step()
        for d, _ in unit.sent.commands[before:]:
            times.append(unit.clock.now)
            answer(unit, d)
        unit.clock.now += 1
    assert ctl.status(rid)["state"] == "completed"
    t0 = times[0]
    assert [t - t0 for t in times] == [0, 0, 20, 20, 40, 40]


def test_install_failures_over_threshold_abort_and_roll_back_updated_devices(unit):
    ids = fleet(unit, 10)
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", "tier=edge-gateway", strategy="waves", wave_size=4, max_failure_pct=25,
                                 min_devices=4))
    ctl.step()
    first = [d for d, _ in unit.sent.commands]
    assert len(first) == 4
    answer(unit, first[0])
    answer(unit, first[1])
    answer(unit, first[2], "rolled_back", "health.golden", "golden outputs differ")
    answer(unit, first[3], "rolled_back", "health.golden", "golden outputs differ")
    ctl.step()
    status = ctl.status(rid)
    assert status["state"] == "aborting" and "install failures: 2 of 4" in status["reason"]
    assert status["counts"]["cancelled"] == 6 and status["counts"]["failed"] == 2
    assert status["counts"]["rolling_back"] == 2
    for d in first[:2]:
        rb = unit.sent.to(d)[-1]
        assert rb.announce.model_version == "m:1" and rb.announce.update_id != unit.sent.to(d)[0].announce.update_id
        answer(unit, d)                              # the device installs m:1 again
    ctl.step()
    status = ctl.status(rid)
    assert status["state"] == "aborted" and status["counts"]["rolled_back"] == 2
    assert not any(unit.sent.to(d) for d in ids if d not in first)   # never sent to the cancelled ones
    # the devices are free for a new rollout
    ctl.create(RolloutSpec("m:2", "tier=edge-gateway"))


def test_health_failure_is_not_retried_but_a_download_failure_is(unit):
    fleet(unit, 2)
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", "tier=edge-gateway", retries=1, max_failure_pct=100))
    ctl.step()
    answer(unit, "d00", "failed", "transport.download", "download failed 6 times: reset")
    answer(unit, "d01", "rolled_back", "health.golden", "golden outputs differ")
    ctl.step()
    assert len(unit.sent.to("d00")) == 2 and len(unit.sent.to("d01")) == 1
    second = unit.sent.to("d00")[1]
    assert second.announce.update_id != unit.sent.to("d00")[0].announce.update_id   # a fresh assignment
    answer(unit, "d00", "failed", "transport.download", "download failed 6 times: reset")
    ctl.step()
    status = ctl.status(rid)
    assert len(unit.sent.to("d00")) == 2                 # retries=1: one retry only
    assert status["state"] == "completed" and status["counts"]["failed"] == 2
    rows = [(a["device_id"], a["attempt"], a["outcome"]) for rid in unit.registry.rollout_ids()
            for a in unit.registry.rollout_attempts(rid)]
    assert rows == [("d00", 1, "retry:transport.download"), ("d00", 2, "transport.download"),
                    ("d01", 1, "health.golden")]


def test_silent_device_times_out_at_the_tier_deadline_and_is_retried_then_failed(unit):
    fleet(unit, 2)
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", "tier=edge-gateway", retries=1, max_failure_pct=100))
    deadline = ctl.status(rid)["spec"]["timeouts"][TIER]
    assert deadline == 300.0                               # cloud/package/tiers/edge-gateway.toml
    ctl.step()
    answer(unit, "d00")
    unit.clock.now += deadline - 1
    ctl.step()
    assert ctl.status(rid)["counts"]["sent"] == 1
    unit.clock.now += 2
    ctl.step()
    # timed out once: a second attempt (its first one was also sent again once, never acknowledged)
    assert len({c.announce.update_id for c in unit.sent.to("d01")}) == 2
    unit.clock.now += deadline + 1
    ctl.step()
    status = ctl.status(rid)
    assert status["state"] == "completed" and status["counts"]["timed_out"] == 1
    assert status["counts"]["committed"] == 1


def test_restarted_controller_carries_on_without_resending_or_double_counting(unit):
    ids = fleet(unit, 8)
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", "tier=edge-gateway", strategy="waves", wave_size=2, growth=2.0))
    ctl.step()
    for d, _ in list(unit.sent.commands):
        answer(unit, d)
    del ctl                                           # the process dies here
    ctl = unit.controller()
    ctl.step()                                        # counts the answers, sends wave 2
    ctl2 = unit.controller()                          # and a second controller on the same db
    ctl2.step()
    assert ctl.status(rid)["counts"]["committed"] == 2 and len(unit.sent.commands) == 2 + 4
    for _ in range(5):
        stored = {r["device_id"]: r["update_id"] for r in unit.registry.devices()}
        for d, command in list(unit.sent.commands):
            if stored[d] != command.announce.update_id:
                answer(unit, d)
        unit.controller().step()                      # a fresh controller every time
    status = unit.controller().status(rid)
    assert status["state"] == "completed" and status["counts"]["committed"] == 8
    assert sorted(d for d, _ in unit.sent.commands) == sorted(ids) and status["commands_sent"] == 8


def test_crash_between_starting_the_canary_and_sending_it_still_sends_the_canary(unit):
    fleet(unit, 5)
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", "tier=edge-gateway", strategy="canary", canary="2"))
    assert ctl._move(rid, "pending", RolloutEvent.START_CANARY, None)   # the step that did this died before sending
    unit.controller().step()
    status = ctl.status(rid)
    assert status["state"] == "canary" and status["counts"]["sent"] == 2 and len(unit.sent.commands) == 2


def test_two_controllers_stepping_at_once_send_each_device_one_command(unit):
    ids = fleet(unit, 30)
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", "tier=edge-gateway", strategy="waves", wave_size=3, growth=2.0))
    stop = threading.Event()

    def drive() -> None:
        c = unit.controller()
        while not stop.is_set():
            c.step()

    threads = [threading.Thread(target=drive) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        def all_answered() -> bool:
            stored = {r["device_id"]: r["update_id"] for r in unit.registry.devices()}
            for d, command in list(unit.sent.commands):
                if stored[d] != command.announce.update_id:
                    answer(unit, d)
            return ctl.status(rid)["state"] == "completed"
        wait_for(all_answered, timeout=30, what="the rollout to complete")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert sorted(d for d, _ in unit.sent.commands) == sorted(ids)
    assert ctl.status(rid)["commands_sent"] == 30


def test_pause_holds_new_waves_and_resume_continues(unit):
    fleet(unit, 4)
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", "tier=edge-gateway", strategy="waves", wave_size=1, growth=1.0))
    ctl.step()
    ctl.pause(rid)
    answer(unit, unit.sent.commands[0][0])
    for _ in range(3):
        ctl.step()
    status = ctl.status(rid)
    assert status["state"] == "paused" and status["counts"]["committed"] == 1 and len(unit.sent.commands) == 1
    ctl.resume(rid)
    with pytest.raises(UserError, match="not paused"):
        ctl.resume(rid)
    ctl.step()
    assert len(unit.sent.commands) == 2


def test_model_health_breach_aborts_and_rolls_back(unit):
    ids = fleet(unit, 4)
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", "tier=edge-gateway", strategy="canary", canary="2", bake_s=60,
                                 max_prediction_js=0.3, max_error_rate=0.05, health_min_inferences=20))
    seq = {d: 0 for d in ids}

    def telemetry(d: str, version: str, predictions: list[int], errors: int = 0) -> None:
        seq[d] += 1
        unit.registry.add_telemetry([{"device_id": d, "seq": seq[d], "model_version": version, "window_start": 0.0,
                                      "window_end": 1.0, "count": sum(predictions) + errors, "labelled": 0,
                                      "correct": 0, "predictions": predictions, "confidence_hist": [0] * 9 + [20],
                                      "latency_ms_p50": 1.0, "latency_ms_max": 2.0, "errors": errors}])
    for d in ids:
        telemetry(d, "m:1", [10, 10, 0])                 # before: two classes, evenly
    ctl.step()
    canary = [d for d, _ in unit.sent.commands]
    for d in canary:
        answer(unit, d)
    ctl.step()
    assert ctl.status(rid)["state"] == "baking"
    for d in canary:
        telemetry(d, "m:2", [10, 10, 0])                 # same behaviour: healthy
    unit.clock.now += 10
    ctl.step()
    health = ctl.status(rid)["health"]
    assert health["evaluated"] and health["prediction_js"] < 0.01 and not health["breaches"]
    for d in canary:
        telemetry(d, "m:2", [0, 0, 40])                  # now it predicts one other class only
    unit.clock.now += 10
    ctl.step()
    status = ctl.status(rid)
    assert status["state"] == "aborting" and "prediction JS distance" in status["reason"]
    assert status["counts"]["rolling_back"] == 2 and status["counts"]["cancelled"] == 2


def test_regression_mae_rise_on_labelled_canary_aborts_with_the_task_metric(unit):
    """A regression model's health is its MAE on labelled inferences, against the previous
    version on the same devices: predictions and confidence can look the same while it is worse."""
    task = {"kind": "regression", "tolerance": 5.0}
    for mv in unit.registry.model_versions():
        unit.registry.set_task(mv["model_version"], task)
    ids = fleet(unit, 4)
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", "tier=edge-gateway", strategy="canary", canary="2", bake_s=60,
                                 max_quality_drop=0.2, health_min_inferences=20))
    seq = {d: 0 for d in ids}

    def telemetry(d: str, version: str, labelled: int, mae: float) -> None:
        seq[d] += 1
        unit.registry.add_telemetry([{"device_id": d, "seq": seq[d], "model_version": version, "window_start": 0.0,
                                      "window_end": 1.0, "count": 20, "labelled": labelled, "correct": labelled,
                                      "abs_err_sum": mae * labelled, "predictions": [10, 10],
                                      "confidence_hist": [0] * 9 + [20], "latency_ms_p50": 1.0,
                                      "latency_ms_max": 2.0, "errors": 0}])
    for d in ids:
        telemetry(d, "m:1", 10, 3.0)
    ctl.step()
    canary = [d for d, _ in unit.sent.commands]
    for d in canary:
        answer(unit, d)
    ctl.step()
    for d in canary:
        telemetry(d, "m:2", 5, 9.0)          # 10 labelled on the new side: too few to judge
    unit.clock.now += 10
    ctl.step()
    health = ctl.status(rid)["health"]
    assert health["evaluated"] and health["quality_drop"] is None and health["metric"] == "mae"
    assert ctl.status(rid)["state"] == "baking"
    for d in canary:
        telemetry(d, "m:2", 10, 3.3)         # MAE (5*9 + 10*3.3)/15 = 5.2 against 3.0
    unit.clock.now += 10
    ctl.step()
    status = ctl.status(rid)
    assert status["health"]["quality_drop"] == pytest.approx(5.2 / 3.0 - 1)
    assert status["state"] == "aborting" and "task metric worse" in status["reason"]


@pytest.mark.parametrize("task,old,new,drop", [
    ("classification", (40, 36, None), (40, 30, None), 0.15),     # accuracy .9 -> .75
    ("anomaly", (40, 38, None), (40, 38, None), 0.0),
    ("regression", (40, 40, 80.0), (40, 40, 60.0), -0.25),       # MAE 2.0 -> 1.5: better, negative
])
def test_quality_drop_reads_the_tasks_metric(task, old, new, drop):
    from health_reference import compare

    def row(is_new: int, labelled: int, correct: int, abs_err: float | None) -> dict:
        return {"new": is_new, "count": 50, "errors": 0, "latency_ms_p50": 1.0, "predictions": [25, 25],
                "confidence_hist": [0] * 9 + [50], "labelled": labelled, "correct": correct, "abs_err_sum": abs_err}
    out = compare([row(0, *old), row(1, *new)], {"quality_drop": 0.1}, 20, task=task)
    assert out["quality_drop"] == pytest.approx(drop)
    assert bool(out["breaches"]) == (drop > 0.1)


def test_js_distance_bounds():
    assert js_distance([1, 0], [1, 0]) == 0.0
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    assert 0 < js_distance([3, 1], [1, 3]) < 1


@pytest.mark.parametrize("target, message", [
    ("colour=red", "unknown selector key 'colour'"),
    ("tier", "is not KEY=VALUE"),
    ("tier=mcu", "matches no devices"),
    ("tag=site=nowhere", "matches no devices"),
])
def test_bad_selector_is_refused_and_nothing_changes(unit, target, message):
    fleet(unit, 2)
    ctl = unit.controller()
    with pytest.raises(UserError, match=message):
        ctl.create(RolloutSpec("m:2", target))
    assert ctl.list() == [] and not unit.sent.commands


def test_devices_offline_at_the_start_are_skipped_not_failed(unit):
    ids = fleet(unit, 4)
    unit.device(ids[3], state="offline")           # its last will
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", f"tier={TIER}"))
    status = ctl.status(rid)
    assert status["total"] == 3 and status["skipped_offline"] == 1
    ctl.step()
    assert sorted(d for d, _ in unit.sent.commands) == sorted(ids[:3])
    for g in ("g0", "g1"):                           # another tier, every device offline
        unit.device(g, state="offline", tier="gpu-server")
    with pytest.raises(UserError, match="all 2 devices .* are offline"):
        ctl.create(RolloutSpec("m:2", "tier=gpu-server"))
    rid2 = ctl.create(RolloutSpec("m:2", "tier=gpu-server", include_offline=True))
    assert ctl.status(rid2)["total"] == 2 and ctl.status(rid2)["skipped_offline"] == 0


def test_version_not_packaged_for_a_targeted_tier_is_refused(unit):
    fleet(unit, 1)
    unit.device("g0", tier="mobile")
    ctl = unit.controller()
    before = unit.ws.director_repository().targets()
    with pytest.raises(UserError, match="not packaged for tier mobile"):
        ctl.create(RolloutSpec("m:2", "device=g0"))
    with pytest.raises(UserError, match="no model version"):
        ctl.create(RolloutSpec("m:9", "tier=edge-gateway"))
    assert ctl.list() == [] and unit.ws.director_repository().targets() == before


def test_second_rollout_on_the_same_devices_is_refused(unit):
    fleet(unit, 3)
    ctl = unit.controller()
    first = ctl.create(RolloutSpec("m:2", "tier=edge-gateway"))
    with pytest.raises(UserError, match=f"in active rollout {first}"):
        ctl.create(RolloutSpec("m:2", "device=d01"))
    assert len(ctl.list()) == 1


def test_selector_terms_combine_with_and():
    assert parse_selector("tier=edge-gateway,tag=site=berlin,group=g1") == {
        "tier": ["edge-gateway"], "tag": ["site=berlin"], "group": ["g1"]}


# -- integration: real Mosquitto, real agents (simulators/fleet.py), real TUF, real onnxruntime ----
from conftest import make_live  # noqa: E402

from conftest import own_broker  # noqa: E402

# this module's own broker: rollouts select devices from the statuses a broker retains
broker = pytest.fixture(scope="module", name="broker")(own_broker)

DEVICES = 8


class Recorder:
    """The control plane's real sender, counting what it sends per device."""

    def __init__(self, cp) -> None:  # noqa: ANN001
        self.cp, self.sent = cp, []
        self._lock = threading.Lock()

    def __call__(self, device_id: str, command: Command):  # noqa: ANN204
        with self._lock:
            self.sent.append((device_id, command))
        return self.cp.send_command(device_id, command)

    def count(self, device_id: str) -> int:
        return sum(1 for d, _ in self.sent if d == device_id)


@pytest.fixture(scope="module")
def rig(broker, tmp_path_factory):
    env = make_live(broker, tmp_path_factory.mktemp("rollouts"), devices=DEVICES)
    env.v2 = env.new_version()
    env.ids = [a.device_id for a in env.agents]
    wait_for(lambda: _registered(env), what="every device in the registry")
    yield env
    env.close()


def _registered(env) -> bool:
    env.cp.drain()
    rows = {d["device_id"]: d for d in env.registry.devices()}
    return all(i in rows and rows[i]["model_version"] == a.model_version for i, a in zip(env.ids, env.agents))


def _controller(env, sender) -> RolloutController:  # noqa: ANN001
    return RolloutController(env.ws, env.registry, sender, repository_url=env.repository_url,
                             director_url=env.director_url)


def _drive(env, ctl: RolloutController, rid: str, until: tuple[str, ...] = ("completed", "aborted"),
           timeout: float = 60.0) -> dict:
    def done() -> bool:
        env.cp.drain(1.0)
        ctl.step()
        return ctl.status(rid)["state"] in until
    wait_for(done, timeout=timeout, what=f"rollout {rid} to reach {until}", interval=0.1)
    return ctl.status(rid)


def _other_version(env) -> str:
    current = {a.model_version for a in env.agents}
    assert len(current) == 1, current
    return env.v2 if env.v1 in current else env.v1


def test_canary_then_waves_update_every_real_device_once(rig):
    target = _other_version(rig)
    rec = Recorder(rig.cp)
    ctl = _controller(rig, rec)
    rid = ctl.create(RolloutSpec(target, "tier=edge-gateway", strategy="canary", canary="25%", bake_s=0.5,
                                 growth=2.0, max_failure_pct=0))
    status = _drive(rig, ctl, rid)
    assert status["state"] == "completed", status
    assert status["counts"]["committed"] == DEVICES and status["failure_pct"] == 0.0
    assert all(a.model_version == target for a in rig.agents)
    assert all(rec.count(d) == 1 for d in rig.ids) and status["commands_sent"] == DEVICES
    waves = [w["n"] for w in rig.registry.rollout_waves(rid)]
    assert waves == [2, 2, 4]                      # canary, then doubling waves


def test_health_check_failures_abort_at_threshold_and_updated_devices_roll_back(rig, monkeypatch):
    from edgeloop.device_sdk.errors import UpdateRefused

    before = {a.device_id: a.model_version for a in rig.agents}
    target = _other_version(rig)
    rec = Recorder(rig.cp)
    ctl = _controller(rig, rec)
    rid = ctl.create(RolloutSpec(target, "tier=edge-gateway", strategy="waves", wave_size=4, growth=2.0,
                                 max_failure_pct=30, min_devices=4))
    first_wave = [d["device_id"] for d in rig.registry.rollout_devices(rid)][:4]
    bad = set(first_wave[:2])                      # half of the first wave fails its health check
    from edgeloop.device_sdk.runtime import DEFAULT_LOADER

    class Flaky:       # the agent's runtime loader (device_sdk.ports.RuntimeLoader), failing on the target
        def load(self, bundle, package_sha256):  # noqa: ANN001, ANN202
            return DEFAULT_LOADER.load(bundle, package_sha256)

        def check(self, runtime, bundle):  # noqa: ANN001, ANN202
            if bundle.manifest.model_version == target:
                raise UpdateRefused("health.golden", "injected: golden outputs differ")
            return DEFAULT_LOADER.check(runtime, bundle)
    for a in rig.agents:
        if a.device_id in bad:
            monkeypatch.setattr(a.installer, "runtimes", Flaky())

    status = _drive(rig, ctl, rid)
    assert status["state"] == "aborted", status
    assert status["reason"].startswith("install failures: 2 of 4")
    assert status["counts"] == {**status["counts"], "failed": 2, "rolled_back": 2, "cancelled": DEVICES - 4,
                                "committed": 0, "sent": 0}
    wait_for(lambda: all(a.model_version == before[a.device_id] for a in rig.agents), timeout=30,
             what="every device back on its previous version")
    for a in rig.agents:
        assert rec.count(a.device_id) == (0 if a.device_id not in first_wave else
                                          1 if a.device_id in bad else 2)      # update, then rollback
        assert a.infer(rig.test.x[:1]) is not None
    codes = {d["device_id"]: d["code"] for d in rig.registry.rollout_devices(rid) if d["state"] == "failed"}
    assert codes == {d: "health.golden" for d in bad}


def _serve_requests(rig, agents, xs) -> None:  # noqa: ANN001
    for a in agents:
        for x in xs:
            assert a.infer(x[None, :]) is not None
        a.flush_telemetry()


def test_prediction_shift_in_canary_telemetry_aborts_and_rolls_the_canary_back(rig):
    """Model health from real telemetry: the canary devices' predictions under the new version
    move far from their own predictions under the previous one (here because they are fed a
    single class), so the rollout stops during the bake and rolls the canary back."""
    before = {a.device_id: a.model_version for a in rig.agents}
    target = _other_version(rig)
    _serve_requests(rig, rig.agents, rig.test.x[:40])              # a mix of classes, previous version
    ctl = _controller(rig, Recorder(rig.cp))
    rid = ctl.create(RolloutSpec(target, "tier=edge-gateway", strategy="canary", canary="2", bake_s=120,
                                 max_prediction_js=0.3, health_min_inferences=40, health_interval_s=0.2))
    _drive(rig, ctl, rid, until=("baking",))
    canary = {d["device_id"] for d in rig.registry.rollout_devices(rid) if d["state"] == "committed"}
    assert len(canary) == 2
    agents = [a for a in rig.agents if a.device_id in canary]
    wait_for(lambda: all(a.model_version == target for a in agents), what="the canary on the new version")
    status = _drive(rig, ctl, rid, until=("baking",))
    assert status["state"] == "baking" and not (status["health"] or {}).get("breaches")
    _serve_requests(rig, agents, rig.test.x[rig.test.y == 0][:40])   # now it predicts one class
    status = _drive(rig, ctl, rid)
    assert status["state"] == "aborted", status
    assert status["reason"].startswith("model health: prediction JS distance"), status["reason"]
    assert status["counts"]["rolled_back"] == 2 and status["counts"]["cancelled"] == DEVICES - 2
    assert status["health"]["prediction_js"] > 0.3
    wait_for(lambda: all(a.model_version == before[a.device_id] for a in rig.agents), timeout=30,
             what="the canary back on its previous version")


def test_control_plane_restart_mid_rollout_resends_nothing(rig):
    target = _other_version(rig)
    rec = Recorder(rig.cp)
    ctl = _controller(rig, rec)
    rid = ctl.create(RolloutSpec(target, "tier=edge-gateway", strategy="waves", wave_size=2, growth=1.0))
    _drive(rig, ctl, rid, until=("waves",))

    def first_waves_done() -> bool:
        rig.cp.drain(1.0)
        ctl.step()
        return ctl.status(rid)["counts"]["committed"] >= 2 and len(rec.sent) == 4
    wait_for(first_waves_done, timeout=60, what="two waves out, the first committed")
    del ctl                                         # the control plane dies here
    ctl = _controller(rig, rec)                     # and starts again on the same registry
    status = _drive(rig, ctl, rid)
    assert status["state"] == "completed" and status["counts"]["committed"] == DEVICES
    assert all(rec.count(d) == 1 for d in rig.ids), rec.sent
    assert status["commands_sent"] == DEVICES
    assert all(a.model_version == target for a in rig.agents)


def test_device_that_never_answers_times_out_at_the_tier_deadline(rig):
    ghost = "ghost-never-answers"
    rig.registry.record_status({"device_id": ghost, "tier": TIER, "state": "online", "model_version": rig.v1,
                                "update_id": None, "reason": None})
    override = rig.ws.root / "tiers" / f"{TIER}.toml"
    override.parent.mkdir(exist_ok=True)
    shipped = (__import__("pathlib").Path(__import__("edgeloop.cloud.package", fromlist=["tiers"]).__file__).parent / "tiers" / f"{TIER}.toml").read_text()
    override.write_text(shipped.replace("in_progress_timeout_s = 300.0", "in_progress_timeout_s = 1.0"))
    try:
        rec = Recorder(rig.cp)
        ctl = _controller(rig, rec)
        rid = ctl.create(RolloutSpec(rig.v2, f"device={ghost}", retries=1))
        override.unlink()
        assert ctl.status(rid)["spec"]["timeouts"][TIER] == 1.0
        status = _drive(rig, ctl, rid, timeout=30)
        assert status["state"] == "aborted" and status["counts"]["timed_out"] == 1
        assert rec.count(ghost) == 2                  # the first try and one retry
    finally:
        override.unlink(missing_ok=True)
        rig.registry.forget_device(ghost)   # the other tests' fleet is the real agents only


def test_cli_rollout_bad_input_is_one_line_and_changes_nothing(rig, capsys):
    from edgeloop.fleet.cli import main

    base = ["-w", str(rig.ws.root)]
    before = _controller(rig, Recorder(rig.cp)).list()
    for argv, message in [
        (["rollout", "start", rig.v2, "--target", "colour=red"], "unknown selector key 'colour'"),
        (["rollout", "start", rig.v2, "--target", "tier=mcu"], "matches no devices"),
        (["rollout", "start", "digits-mlp:99", "--target", "tier=edge-gateway"], "no model version"),
        (["rollout", "start", rig.v2, "--target", "tier=edge-gateway", "--strategy", "canary"], "needs --canary"),
        (["rollout", "status", "ro-nope"], "no rollout 'ro-nope'"),
        (["rollout", "resume", "ro-nope"], "no rollout 'ro-nope'"),
    ]:
        code = main([*argv, *base, "--repository-url", rig.repository_url] if argv[1] == "start" else [*argv, *base])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert "Traceback" not in err
    assert _controller(rig, Recorder(rig.cp)).list() == before
    assert main(["rollout", "ls", "--json", *base]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rollouts"]
    assert [r["rollout_id"] for r in listed] == [r["rollout_id"] for r in before]


def test_edgeloop_serve_drives_a_rollout_started_from_the_cli(rig, capsys):
    import signal
    import subprocess
    import sys

    from edgeloop.fleet.cli import main

    target = _other_version(rig)
    serve_file = rig.ws.root / "serve.json"
    serve_file.unlink(missing_ok=True)
    log = (rig.ws.root / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "edgeloop.fleet.cli", "serve", "-w", str(rig.ws.root), "--duration", "90",
                             "--json", "--debug"], stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: serve_file.exists() or proc.poll() is not None, 30, "serve to start")
        assert proc.poll() is None, (rig.ws.root / "serve.log").read_text()[-3000:]
        base = ["-w", str(rig.ws.root), "--json"]
        assert main(["rollout", "start", target, "--target", "tier=edge-gateway", "--strategy", "waves",
                     "--wave-size", "4", *base]) == 0
        rid = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rollout_id"]
        wait_for(lambda: all(a.model_version == target for a in rig.agents), 45, "serve to roll out to every device")

        def completed() -> bool:
            assert main(["rollout", "status", rid, *base]) == 0
            return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["state"] == "completed"
        try:
            wait_for(completed, 30, "the rollout to complete", interval=0.5)
        except AssertionError:
            lines = [ln for ln in (rig.ws.root / "serve.log").read_text().splitlines() if "rollout" in ln]
            raise AssertionError("\n".join(lines[-40:])) from None
        assert main(["rollout", "ls", "-w", str(rig.ws.root)]) == 0
        assert rid in capsys.readouterr().out                # the table, for people
        # the same through the control plane's HTTP API: a viewer may look, not steer
        from edgeloop.cloud.api.server import TokenStore
        api = ["--server", json.loads(serve_file.read_text())["api_url"], "--json"]
        viewer = TokenStore(rig.registry).create("rollout-viewer", "viewer")[1]
        assert main(["rollout", "status", rid, *api, "--token", viewer]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["counts"]["committed"] == DEVICES
        assert main(["rollout", "abort", rid, *api, "--token", viewer]) == 2
        assert "HTTP 403" in capsys.readouterr().err
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


def test_health_compare_flags_each_measure_against_the_previous_version():
    from health_reference import compare

    def row(new: int, errors: int, latency: float, confidence_bin: int) -> dict:
        hist = [0] * 10
        hist[confidence_bin] = 50
        return {"new": new, "count": 50, "errors": errors, "latency_ms_p50": latency,
                "predictions": json.dumps([25, 25]), "confidence_hist": hist}
    limits = {"error_rate_increase": 0.05, "latency_p95_increase_ms": 5.0, "prediction_js": 0.2,
              "confidence_drop": 0.1}
    same = compare([row(0, 0, 2.0, 9), row(1, 0, 2.0, 9)], limits, 20)
    assert same["evaluated"] and same["breaches"] == []
    worse = compare([row(0, 0, 2.0, 9), row(1, 10, 9.0, 5)], limits, 20)
    assert [b.split(" ")[0] for b in worse["breaches"]] == ["error", "latency", "mean"]
    assert worse["error_rate_increase"] == pytest.approx(10 / 50) and worse["confidence_drop"] == pytest.approx(0.4)
    assert not compare([row(0, 0, 2.0, 9), row(1, 10, 9.0, 5)], limits, 100)["evaluated"]   # too little data


def test_tier_deadline_must_be_positive(tmp_path):
    from edgeloop.cloud.package.tiers import tier

    shipped = (__import__("pathlib").Path(__import__("edgeloop.cloud.package", fromlist=["tiers"]).__file__).parent / "tiers" / f"{TIER}.toml").read_text()
    (tmp_path / "tiers").mkdir()
    (tmp_path / "tiers" / f"{TIER}.toml").write_text(shipped.replace("in_progress_timeout_s = 300.0",
                                                                       "in_progress_timeout_s = 0"))
    with pytest.raises(UserError, match="in_progress_timeout_s must be positive"):
        tier(TIER, tmp_path)
