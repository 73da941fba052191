"""Rollouts that never stall (cloud/rollouts/controller.py): a controller that dies between
marking a device sent and publishing its command, a wave with a device that never answers,
devices that were offline or appear later, and the director's metadata after many rollouts.

Unit tests drive the real controller on a real SQLite registry and real TUF signing with a fake
clock and a fake sender (tests/test_rollouts.py's harness); the last test runs real agents over a
real Mosquitto to show a device installs a re-sent update once."""

from __future__ import annotations

import time

import pytest

from edgeloop.cloud.rollouts.controller import RolloutController, RolloutSpec
from conftest import make_live, own_broker, wait_for
from test_rollouts import TIER, answer, fleet, make_unit

broker = pytest.fixture(scope="module", name="broker")(own_broker)


class Crash(BaseException):
    """The control plane dies (kill -9): nothing after this point of the step runs."""


@pytest.fixture
def unit(tmp_path):
    with make_unit(tmp_path) as u:
        yield u


def _assignments(u) -> list[str]:
    return [p for p in u.ws.director_repository().targets() if p.startswith("assignments/")]


def _answer_new(u) -> None:
    """Every device answers (committed) the last command it got, if it has not yet."""
    stored = {r["device_id"]: r["update_id"] for r in u.registry.devices()}
    for d, command in list(u.sent.commands):
        if stored.get(d) != command.announce.update_id:
            answer(u, d)
            stored[d] = command.announce.update_id


def test_controller_killed_after_marking_sent_before_publishing_resends_once_and_does_not_stall(unit):
    ids = fleet(unit, 6)
    published = []

    def dies(device_id, command):
        raise Crash()                    # marked sent in the store, never published

    ctl = RolloutController(unit.ws, unit.registry, dies, repository_url="http://127.0.0.1:9/repository",
                            clock=unit.clock)
    rid = ctl.create(RolloutSpec("m:2", f"tier={TIER}", strategy="all", resend_s=5))
    with pytest.raises(Crash):
        ctl.step()
    assert ctl.status(rid)["counts"]["sent"] == 6 and not unit.sent.commands   # every device waits for nothing
    started = unit.clock.now
    ctl = unit.controller()                                                    # the restart
    ctl.step()
    assert not unit.sent.commands                  # not before resend_s: a command may just be on its way
    while ctl.status(rid)["state"] != "completed":
        unit.clock.now += 1
        ctl.step()
        published += [d for d, _ in unit.sent.commands if d not in published]
        _answer_new(unit)
        assert unit.clock.now - started < 30, ctl.status(rid)          # the tier deadline is 300 s
    status = ctl.status(rid)
    assert status["counts"]["committed"] == 6 and status["commands_sent"] == 6   # one attempt each
    assert sorted(d for d, _ in unit.sent.commands) == sorted(ids)             # each sent again exactly once
    attempt_ids = {r["device_id"]: r["update_id"] for r in unit.registry.rollout_attempts(rid)}
    assert all(c.announce.update_id == attempt_ids[d] for d, c in unit.sent.commands)   # the same update id
    assert status["commands_resent"] == 6


def test_acknowledged_or_offline_devices_are_not_sent_again(unit):
    fleet(unit, 3)
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", f"tier={TIER}", resend_s=5))
    ctl.step()
    first = {d: c for d, c in unit.sent.commands}
    unit.device("d00", "downloading", "m:1", first["d00"].announce.update_id)   # acknowledged: installing it
    unit.device("d01", "offline", "m:1")                                       # gone: queued for it by the broker
    unit.clock.now += 6
    ctl.step()
    assert [d for d, _ in unit.sent.commands[3:]] == ["d02"]
    for _ in range(20):                 # unanswered: again after 10 and 20 more seconds, then no more
        unit.clock.now += 5
        ctl.step()
    assert len(unit.sent.to("d02")) == 1 + 3 and len(unit.sent.to("d00")) == 1 and len(unit.sent.to("d01")) == 1


def test_wave_with_a_straggler_ends_at_its_success_share_and_the_straggler_still_counts(unit):
    fleet(unit, 10)
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", f"tier={TIER}", strategy="waves", wave_size=5, growth=1.0,
                                 wave_success_pct=80, retries=0, max_failure_pct=50))
    ctl.step()
    wave0 = [d for d, _ in unit.sent.commands]
    straggler = wave0[-1]
    for d in wave0[:-1]:
        answer(unit, d)                   # 4 of 5: the straggler never answers
    unit.clock.now += 1
    ctl.step()
    assert len(unit.sent.commands) == 10, "the next wave waited for the straggler"
    for d, _ in unit.sent.commands[5:]:
        answer(unit, d)
    unit.clock.now += 1
    ctl.step()
    status = ctl.status(rid)
    assert status["state"] == "waves" and status["counts"]["sent"] == 1     # it holds the end, not the waves
    unit.clock.now += 301                 # its own deadline (the tier's)
    ctl.step()
    ctl.step()
    status = ctl.status(rid)
    assert status["state"] == "completed" and status["counts"]["timed_out"] == 1
    assert status["counts"]["committed"] == 9
    assert {r["device_id"]: r["state"] for r in unit.registry.rollout_devices(rid)}[straggler] == "timed_out"


def test_wave_below_its_success_share_ends_at_its_deadline_not_the_slowest_device(unit):
    fleet(unit, 4)
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", f"tier={TIER}", strategy="waves", wave_size=2, growth=1.0,
                                 wave_success_pct=100, wave_timeout_s=30, retries=2, max_failure_pct=100))
    ctl.step()
    wave0 = [d for d, _ in unit.sent.commands]
    answer(unit, wave0[0])
    waited = 0
    while len({d for d, _ in unit.sent.commands}) == 2:
        unit.clock.now += 1
        waited += 1
        ctl.step()
        assert waited < 100
    assert 30 <= waited <= 31              # the wave's deadline, not the straggler's 300 s (x3 attempts)
    assert ctl.status(rid)["counts"]["sent"] == 3                            # the straggler is still out


def test_devices_offline_at_the_start_or_registered_later_join_and_are_updated(unit):
    fleet(unit, 2)
    unit.device("late", "offline")
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", f"tier={TIER}", strategy="waves", wave_size=1, growth=1.0))
    assert ctl.status(rid)["total"] == 2 and ctl.status(rid)["skipped_offline"] == 1
    ctl.step()
    _answer_new(unit)
    unit.device("late", "online")             # it comes back
    unit.device("new", "online")              # and one registers now
    unit.device("other", "online", tier="gpu-server")   # another tier: not a target
    for _ in range(20):
        unit.clock.now += 1
        ctl.step()
        _answer_new(unit)
    status = ctl.status(rid)
    assert status["state"] == "completed", status
    assert status["total"] == 4 and status["counts"]["committed"] == 4 and status["skipped_offline"] == 0
    assert {d for d, _ in unit.sent.commands} == {"d00", "d01", "late", "new"}
    unit.device("after", "online")            # after the end: membership is closed
    unit.clock.now += 10
    ctl.step()
    assert ctl.status(rid)["total"] == 4 and not unit.sent.to("after")


def test_ended_rollouts_assignments_are_withdrawn_so_the_director_stays_bounded(unit):
    fleet(unit, 3)
    counts = []
    for n in range(6):
        ctl = unit.controller()
        rid = ctl.create(RolloutSpec("m:2" if n % 2 == 0 else "m:1", f"tier={TIER}"))
        assert any(p.startswith(f"assignments/{rid}-") for p in _assignments(unit))   # assigned while it runs
        for _ in range(5):
            ctl.step()
            _answer_new(unit)
            unit.clock.now += 1
        assert ctl.status(rid)["state"] == "completed"
        counts.append(len(unit.ws.director_repository().targets()))
    assert _assignments(unit) == [] and len(set(counts)) == 1, counts
    # an aborted rollout's too, and a controller that died between the end and the withdrawal
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", f"tier={TIER}"))
    unit.registry.move_rollout(rid, "pending", {"state": "aborted"})      # ended by a controller that died
    assert _assignments(unit)
    unit.controller().step()                                                # the restart sweeps
    assert _assignments(unit) == []


def test_a_restarted_controller_resends_to_real_agents_that_install_the_update_once(broker, tmp_path):
    env = make_live(broker, tmp_path, devices=3)
    try:
        v2 = env.new_version()
        ids = [a.device_id for a in env.agents]

        def registered() -> bool:
            env.cp.drain()
            rows = {d["device_id"]: d for d in env.registry.devices()}
            return all(i in rows for i in ids)
        wait_for(registered, what="every device in the registry")
        begun: dict[str, list[str]] = {i: [] for i in ids}
        for agent in env.agents:
            real = agent.installer.begin

            def counting(announce, real=real, device=agent.device_id):  # noqa: ANN001
                begun[device].append(announce.update_id)
                return real(announce)
            agent.installer.begin = counting
        sent = []

        def dies(device_id, command):
            raise Crash()

        def send(device_id, command):      # and the broker delivers each command twice (QoS 1 may)
            sent.append((device_id, command))
            env.cp.send_command(device_id, command)
            return env.cp.send_command(device_id, command)

        ctl = RolloutController(env.ws, env.registry, dies, repository_url=env.repository_url,
                                director_url=env.director_url)
        rid = ctl.create(RolloutSpec(v2, f"tier={TIER}", resend_s=0.5))
        with pytest.raises(Crash):
            ctl.step()
        ctl = RolloutController(env.ws, env.registry, send, repository_url=env.repository_url,
                                director_url=env.director_url)

        def done() -> bool:
            env.cp.drain(0.5)
            ctl.step()
            return ctl.status(rid)["state"] == "completed"
        wait_for(done, timeout=60, what="the rollout to complete after the restart", interval=0.1)
        assert all(a.model_version == v2 for a in env.agents)
        # the same command once more, to updated devices: ignored (they report committed, install nothing)
        for d, command in sent:
            env.cp.send_command(d, command)
        time.sleep(1.0)                    # what an agent would do with it, it does at once
        assert sorted(d for d, _ in sent) == sorted(ids)              # sent again once each, after the restart
        assert all(len(b) == 1 for b in begun.values()), begun       # installed once each
        assert ctl.status(rid)["commands_sent"] == 3
    finally:
        env.close()


class _Link:
    """The Link interface, nothing on the wire: what the agent publishes is kept."""

    def __init__(self) -> None:
        self.on_acked = self.on_connection_change = None
        self.published: list[tuple[str, bytes]] = []

    @property
    def connected(self) -> bool:
        return True

    def connect(self, timeout: float = 10.0) -> None: ...
    def subscribe(self, topic: str, qos: int = 1) -> None: ...
    def route(self, topic, handler) -> None: ...  # noqa: ANN001
    def receive(self, timeout: float = 0.0): return None  # noqa: ANN201
    def poll(self, timeout: float) -> None: ...
    def close(self, flush_s: float = 5.0) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False):  # noqa: ANN201
        self.published.append((topic, payload))
        return type("Sent", (), {"mid": len(self.published), "rc": 0})()


class _DownFetcher:
    """A repository that cannot be reached: every download is a transient failure."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def start(self, announce, base) -> None:  # noqa: ANN001
        self.started.append(announce.update_id)

    def result(self):  # noqa: ANN201
        from edgeloop.device_sdk.errors import TransientError
        raise TransientError("connection refused")

    def discard_partial(self) -> None: ...


def test_the_same_command_again_does_not_restart_an_install_that_is_backing_off(tmp_path):
    from edgeloop.contracts.messages import Announce, Command, encode
    from edgeloop.device_sdk.agent import Agent, AgentConfig

    fetcher = _DownFetcher()
    agent = Agent(AgentConfig(device_id="d-backoff", tier=TIER, state_dir=tmp_path, retry_delays_s=(30.0,)),
                  link=_Link(), fetcher=fetcher)
    announce = Announce(update_id="upd-1", model="m", model_version="m:2", tier=TIER, target="m/2/x.elpkg",
                        length=100, sha256="0" * 64, repository="http://unused", director="http://unused",
                        issued_at=time.time())
    command = encode(Command(command="install", rollout_id="ro-1", announce=announce, issued_at=time.time()))
    topic = agent.topics.command("d-backoff")
    agent.handle(topic, command)
    assert agent.installing and fetcher.started == ["upd-1"]
    agent.handle(topic, command)                        # again while it downloads: ignored
    agent.step()                                        # the download fails: a retry in 30 s
    assert agent.pending_retry is not None and not agent.installing
    agent.handle(topic, command)                        # again while it backs off: ignored too
    agent.step()
    assert fetcher.started == ["upd-1"] and agent.pending_retry is not None
