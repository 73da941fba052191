"""Several rollout controllers on one PostgreSQL store (issue 16): each rollout step is taken by
exactly one of them (the rollout's step lock, cloud/store/rollouts.py ``rollout_step_lock``), so
two controllers stepping the same rollouts at once never send a device a command twice, never
assign a wave twice and never apply a transition twice; a controller that dies holding the lock
(its session ended, as kill -9 ends it) or between marking a device sent and publishing leaves
nothing stuck: the other carries on at its next step, and the unpublished claim goes out again
after ``resend_s``, once.

Real components: a private PostgreSQL (tests/pg_server.py), real TUF signing; a fake sender per
controller stands in for MQTT, and the devices answer in it as the ingest would store them."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import replace

import pytest

from edgeloop.cloud.registry import Registry
from edgeloop.cloud.rollouts.controller import RolloutController, RolloutSpec
from edgeloop.cloud.workspace import Workspace
from tests.pg_server import pg_server  # noqa: F401 - fixture
from test_rollout_machine import add_two_versions

TIER = "edge-gateway"
DEVICES = 16
ROUNDS = 6
URL = "http://127.0.0.1:9/repository"


class Fleet:
    """A PostgreSQL workspace with m:1 and m:2 packaged, DEVICES devices, and what each
    controller sent (one list for all, under a lock)."""

    def __init__(self, tmp_path, url: str) -> None:
        self.ws = replace(Workspace.init(tmp_path / "ws", mqtt="127.0.0.1:1"), store=url)
        self.ws.image_repository().init()
        self.ws.director_repository().init()
        self.registry = Registry(url)          # the devices' side: what the ingest stores
        add_two_versions(self.registry, self.ws.artifacts_dir, TIER)
        self.ids = [f"d{i:02d}" for i in range(DEVICES)]
        for d in self.ids:
            self.status(d, "m:1", None)
        self.sent: list[tuple[str, str, str]] = []     # (controller, device, update id)
        self._lock = threading.Lock()
        self.stores: list[Registry] = [self.registry]     # closed at the end of the test

    def close(self) -> None:
        for store in self.stores:
            store.close()

    def status(self, device_id: str, version: str, update_id: str | None) -> None:
        self.registry.record_status({"device_id": device_id, "tier": TIER, "state": "committed" if update_id else
                                     "online", "model_version": version, "update_id": update_id})

    def controller(self, name: str, answer: bool = True, clock=time.time) -> RolloutController:  # noqa: ANN001
        """A controller on its own connection, whose devices answer every command at once."""
        def send(device_id: str, command) -> None:  # noqa: ANN001
            with self._lock:
                self.sent.append((name, device_id, command.announce.update_id))
            if answer:
                self.status(device_id, command.announce.model_version, command.announce.update_id)
        store = Registry(self.ws.store_location)
        self.stores.append(store)
        return RolloutController(self.ws, store, send, repository_url=URL, clock=clock)


@pytest.fixture
def fleet(tmp_path, pg_server):  # noqa: F811 - the fixture
    f = Fleet(tmp_path, pg_server.fresh_database())
    yield f
    f.close()


def _run_both(ctls: list[RolloutController], rid: str, timeout: float = 60.0) -> None:
    """Both controllers step every rollout as fast as they can until ``rid`` ends."""
    done = threading.Event()
    errors: list[BaseException] = []

    def loop(ctl: RolloutController) -> None:
        try:
            while not done.is_set():
                ctl.step()
                if ctl.status(rid)["state"] in ("completed", "aborted"):
                    done.set()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            done.set()
    threads = [threading.Thread(target=loop, args=(c,)) for c in ctls]
    for t in threads:
        t.start()
    done.wait(timeout)
    done.set()
    for t in threads:
        t.join(30)
    assert not errors, errors


def test_two_controllers_stepping_the_same_rollouts_send_each_command_once(fleet, caplog):
    caplog.set_level(logging.WARNING, logger="edgeloop.rollouts")
    a, b = fleet.controller("a"), fleet.controller("b")
    for round_ in range(ROUNDS):
        version = "m:2" if round_ % 2 == 0 else "m:1"
        strategy = ("waves", "canary", "all")[round_ % 3]
        rid = (a if round_ % 2 else b).create(RolloutSpec(version, f"tier={TIER}", strategy=strategy, canary="2",
                                                          wave_size=2, growth=1.5, resend_s=1000))
        _run_both([a, b], rid)
        status = a.status(rid)
        assert status["state"] == "completed", status
        assert status["counts"]["committed"] == DEVICES
        update_ids = a.registry.rollout_update_ids(rid)
        sends = Counter(d for _, d, u in fleet.sent if u in update_ids)
        assert sends == Counter({d: 1 for d in fleet.ids}), sends       # every device, exactly once
        rows = a.registry.rollout_devices(rid)
        assert {r["attempt"] for r in rows} == {1} and {r["resends"] for r in rows} == {0}
        assert len(a.registry.rollout_attempts(rid)) == DEVICES         # one attempt recorded per device
        # each wave as one controller sizes it: never two controllers assigning the same wave
        waves = [w["n"] for w in a.registry.rollout_waves(rid)]
        if strategy == "waves":
            assert waves == [2, 3, 5, 6], waves
        elif strategy == "canary":
            assert waves[:2] == [2, 2], waves
        else:
            assert waves == [DEVICES], waves
    assert {name for name, _, _ in fleet.sent} == {"a", "b"}      # both took steps
    assert not [r.getMessage() for r in caplog.records if r.name == "edgeloop.rollouts"]   # and no step failed


def test_a_rollout_another_controller_holds_is_left_alone_until_its_session_ends(fleet):
    a, b = fleet.controller("a"), fleet.controller("b")
    rid = a.create(RolloutSpec("m:2", f"tier={TIER}", resend_s=1000))
    holder = Registry(fleet.ws.store_location)          # a controller in the middle of its step
    fleet.stores.append(holder)
    lock = holder.rollout_step_lock(rid)
    assert lock.__enter__() is True
    b.step()
    assert b.status(rid)["state"] == "pending" and not fleet.sent     # not b's to step
    with b.registry.rollout_step_lock(rid) as mine:
        assert mine is False
    holder.close()                           # its session ends, as a kill -9 of its process ends it
    b.step()                                 # at once: b's next step takes it
    assert b.status(rid)["state"] == "waves" and len(fleet.sent) == DEVICES
    b.step()
    assert b.status(rid)["state"] == "completed"
    lock.__exit__(None, None, None)          # (nothing left to give back)
    holder.close()
    assert Counter(d for _, d, _ in fleet.sent) == Counter({d: 1 for d in fleet.ids})


def test_a_claim_never_published_by_a_dead_controller_goes_out_once_after_resend_s(fleet):
    clock = [1_000_000.0]
    dead = fleet.controller("dead", clock=lambda: clock[0])
    dead.send = lambda device_id, command: None      # marked sent, then killed before publishing
    rid = dead.create(RolloutSpec("m:2", f"tier={TIER}", resend_s=5))
    dead.step()
    assert dead.status(rid)["counts"]["sent"] == DEVICES and not fleet.sent
    dead.registry.close()
    b = fleet.controller("b", clock=lambda: clock[0])
    clock[0] += 4.0
    b.step()
    assert not fleet.sent                            # not before resend_s
    clock[0] += 1.0
    b.step()                                         # resend_s after the claim: out again, same update
    b.step()
    status = b.status(rid)
    assert status["state"] == "completed" and status["commands_resent"] == DEVICES
    assert Counter(d for _, d, _ in fleet.sent) == Counter({d: 1 for d in fleet.ids})
    assert {r["attempt"] for r in b.registry.rollout_devices(rid)} == {1}   # the same attempt, not a second


def test_a_device_that_appears_joins_one_of_two_active_rollouts_however_their_controllers_race(fleet):
    a, b = fleet.controller("a"), fleet.controller("b")
    rids = [a.create(RolloutSpec("m:2", f"device={d}", resend_s=1000)) for d in fleet.ids[:2]]
    stores = [a.registry, b.registry]

    def join(store: Registry, rid: str, device_id: str, barrier: threading.Barrier, out: list) -> None:  # noqa: ANN001
        row = {"rollout_id": rid, "device_id": device_id, "tier": TIER, "prev_version": "m:1", "state": "pending",
               "attempt": 0, "rb_attempt": 0, "ord": device_id}
        barrier.wait()
        out.extend(store.add_rollout_devices(rid, [], [row]))
    for i in range(30):                  # a device both rollouts' targets match appears; both grow at once
        device_id, barrier, added = f"new{i:02d}", threading.Barrier(2), []
        threads = [threading.Thread(target=join, args=(s, rid, device_id, barrier, added)) for s, rid in zip(stores, rids)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert added == [device_id], (i, added)         # in exactly one of them
