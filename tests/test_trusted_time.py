"""Time a device can trust: a device whose clock runs two days off loses no telemetry, says it is
skewed, shows the skew to the operator, and verifies updates at the control plane's signed time
(so it refuses metadata that expired, though its own clock says it has not). Real agents, a real
Mosquitto, real TUF repositories, the real ingest and store."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest

from conftest import edge_gateway_package, make_live, run_cli, settled, wait_for
from edgeloop.cloud.ingest.control_plane import ControlPlane
from edgeloop.cloud.ingest.time_server import TimeServer
from edgeloop.cloud.registry import Registry
from edgeloop.contracts.messages import Announce, SignedTime
from edgeloop.device_sdk.agent import Agent, AgentConfig
from edgeloop.device_sdk.clock import TrustedClock
from edgeloop.device_sdk.ota import Installer

DAY = 86400.0
TIER = "edge-gateway"


def test_telemetry_from_a_clock_two_days_ahead_is_all_stored_flagged_never_deleted_unstored(tmp_path, broker):
    """No signed time to be had (a control plane without a time server): the ingest stores every
    record at its receive time, flagged, and only then lets the device delete it."""
    pkg, test = edge_gateway_package(epochs=1)
    state = tmp_path / "dev"
    m = pkg.manifest
    Installer(state, TIER, 1 << 22).install(Announce("u1", "m", m.model_version, TIER, pkg.target_path, len(pkg.data),
                                                     pkg.sha256, "http://unused", "http://unused", time.time()),
                                            lambda a: pkg.data)
    registry = Registry(tmp_path / "registry.db")
    cp = ControlPlane(registry, broker.host, broker.port).start()
    agent = Agent(AgentConfig(device_id="clock-ahead", tier=TIER, state_dir=state, mqtt_host=broker.host,
                              mqtt_port=broker.port, telemetry_window=10, clock_skew_s=2 * DAY))
    try:
        agent.start()
        for i in range(200):
            assert agent.infer(test.x[i % len(test.x)][None, :], int(test.y[i % len(test.y)])) is not None
        wait_for(lambda: (agent.pump(), cp.drain(), registry.telemetry_count(["clock-ahead"]) == 20)[2],
                 what="20 records stored")
        rows = registry.telemetry_records("clock-ahead")
        assert sorted(r["seq"] for r in rows) == list(range(20))                    # 20 of 20 stored
        assert all(r["clock_suspect"] == 1 for r in rows)                          # flagged
        assert all(r["window_end"] <= time.time() + 1 for r in rows)               # at the receive time
        assert all(r["device_window_end"] > time.time() + 1.9 * DAY for r in rows)  # the device's own kept
        assert registry.telemetry_rejects() == [] and cp.stats.clock_suspect == 20
        wait_for(lambda: (agent.pump(), len(agent.outbox) == 0)[1], what="deleted only once stored")
        assert agent.clock.offset_s is None                                         # it never learned better
    finally:
        agent.stop(drain_s=0)
        cp.stop()
        registry.close()


def _device_row(env, device_id: str) -> dict:
    env.cp.drain()
    return next((d for d in env.registry.devices() if d["device_id"] == device_id), {})


def test_a_device_two_days_ahead_learns_signed_time_reports_skew_and_verifies_updates(broker, tmp_path, capsys):
    # make_live's v1 install is the first proof: a +2 d device judging expiry by its own clock
    # refuses the fresh timestamp (it looks expired), so v1 would never land
    env = make_live(broker, tmp_path, devices=1, agent_overrides={"clock_skew_s": 2 * DAY})
    try:
        agent = env.agents[0]
        assert agent.clock.synced and agent.clock.offset_s == pytest.approx(-2 * DAY, abs=30)
        assert "clock.skewed" in agent._faults()
        wait_for(lambda: "clock.skewed" in json.loads(_device_row(env, agent.device_id).get("faults") or "{}"),
                 what="the skew on the device's status")
        assert _device_row(env, agent.device_id)["clock_offset_s"] == pytest.approx(-2 * DAY, abs=30)
        code, out, _ = run_cli(["devices", "-w", str(env.ws.root), "--json"], capsys)
        assert code == 0
        listed = {d["device_id"]: d for d in json.loads(out.strip().splitlines()[-1])["devices"]}
        assert listed[agent.device_id]["clock_offset_s"] == pytest.approx(-2 * DAY, abs=30)
        code, out, _ = run_cli(["devices", "-w", str(env.ws.root)], capsys)
        assert code == 0 and "+2.0d" in out                                        # the operator's column
        v2 = env.new_version()
        msg = env.sign_and_announce(v2)
        wait_for(lambda: settled(env, msg.update_id), timeout=60, what="the update")
        assert agent.model_version == v2 and str(agent.last_result.state) == "committed"
        # its telemetry now carries the signed time, not its own: stored unflagged
        for i in range(agent.config.telemetry_window):
            agent.infer(env.test.x[i][None, :])
        wait_for(lambda: any(r["model_version"] == v2 for r in env.registry.telemetry_records(agent.device_id)),
                 what="telemetry of v2")
        latest = [r for r in env.registry.telemetry_records(agent.device_id) if r["model_version"] == v2]
        assert not any(r["clock_suspect"] for r in latest)
        assert all(abs(r["window_end"] - time.time()) < 120 for r in latest)
    finally:
        env.close()


def test_a_device_two_days_behind_refuses_metadata_that_expired_by_signed_time(broker, tmp_path):
    # expiry is transient (metadata.stale: a mirror may catch up), so it is retried: short delays here
    env = make_live(broker, tmp_path, devices=1, agent_overrides={"clock_skew_s": -2 * DAY,
                                                                   "retry_delays_s": (0.1, 0.2)})
    try:
        agent = env.agents[0]
        assert agent.clock.synced and agent.clock.offset_s == pytest.approx(2 * DAY, abs=30)
        v2 = env.new_version()
        # the director's timestamp expired a day ago: by the device's own clock (2 days behind)
        # it has another day to live
        msg = env.sign_and_announce(v2, after_signing=lambda target: env.director.refresh_timestamp(
            lifetime=timedelta(days=-1)))
        wait_for(lambda: settled(env, msg.update_id), timeout=60, what="the refusal")
        assert str(agent.last_result.state) == "failed" and agent.last_result.code == "metadata.stale"   # expiry: transient
        assert "xpired" in (agent.last_result.reason or "")
        assert agent.model_version == env.v1 and agent.infer(env.test.x[:1]) is not None
    finally:
        env.close()


def test_signed_time_is_refused_unless_it_answers_our_nonce_in_time_signed_by_trusted_keys(tmp_path):
    from edgeloop.cloud.release.signing import Repository

    director = Repository(tmp_path / "director", tmp_path / "keys")
    director.init()
    other = Repository(tmp_path / "other", tmp_path / "other-keys")
    other.init()
    root = tmp_path / "root.json"
    root.write_bytes(director.trusted_root())
    mono = [100.0]
    clock = TrustedClock("dev-t", root, tmp_path / "clock.json", wall=lambda: 1_800_000_000.0,
                         monotonic=lambda: mono[0], max_rtt_s=5.0)
    server = TimeServer.for_director(director)
    forger = TimeServer.for_director(other)
    t0 = time.time()
    server.clock = forger.clock = lambda: t0

    def forged(answer: SignedTime, **changes) -> SignedTime:
        return SignedTime(**{**answer.__dict__, **changes})

    req = clock.request()
    assert not clock.accept(forger.answer(req))                                  # keys this device does not trust
    req = clock.request()
    assert not clock.accept(forged(server.answer(req), time=t0 + DAY))            # signature over another time
    assert not clock.accept(server.answer(clock.request().__class__("dev-t", "ab" * 16)))   # a nonce never sent
    req = clock.request()
    mono[0] += 6.0
    assert not clock.accept(server.answer(req))                                  # too late: time not bounded
    assert not clock.synced and clock.refused == 4 and clock.now() == 1_800_000_000.0
    req = clock.request()
    answer = server.answer(req)
    assert clock.accept(answer) and clock.now() == pytest.approx(t0)
    assert not clock.accept(answer)                                              # a replay
    req = clock.request()
    assert not clock.accept(server.answer(req).__class__(**{**server.answer(req).__dict__, "device_id": "other"}))
    # never backwards: an older (validly signed) time does not move the clock back
    mono[0] += 10.0
    req = clock.request()
    server.clock = lambda: t0 - DAY
    assert clock.accept(server.answer(req)) and clock.now() == pytest.approx(t0 + 10.0)
    # and across a restart the last trusted time is a floor
    again = TrustedClock("dev-t", root, tmp_path / "clock.json", wall=lambda: 1_000_000_000.0,
                         monotonic=lambda: 0.0)
    assert again.now() == pytest.approx(t0) and again.now() > 1_000_000_000.0


@pytest.mark.parametrize("payload", [
    {"device_id": "d", "nonce": "short"},
    {"device_id": "d", "nonce": "G" * 32},
    {"device_id": 7, "nonce": "ab" * 16},
    {"device_id": "d", "nonce": ["ab" * 16]},
    {"device_id": "d", "nonce": "ab" * 16, "time": 1e400, "signatures": []},
    {"device_id": "d", "nonce": "ab" * 16, "time": -1, "signatures": []},
    {"device_id": "d", "nonce": "ab" * 16, "time": True, "signatures": []},
    {"device_id": "d", "nonce": "ab" * 16, "time": 1.0, "signatures": [{"keyid": "zz", "sig": "00"}]},
    {"device_id": "d", "nonce": "ab" * 16, "time": 1.0, "signatures": [{"keyid": "aa", "sig": "00", "x": "1"}]},
    {"device_id": "d", "nonce": "ab" * 16, "time": 1.0, "signatures": [{"keyid": "aa", "sig": "00"}] * 17},
    {"device_id": "d", "nonce": "ab" * 16, "time": 1.0, "signatures": [[[[[]]]]]},
    {"device_id": "d", "nonce": "ab" * 16, "time": 1.0},
])
@pytest.mark.parametrize("schema", ["edgeloop.time_request/1", "edgeloop.time/1"])
def test_malformed_time_messages_are_refused_as_schema_errors(payload, schema):
    from edgeloop.contracts.errors import SchemaError
    from edgeloop.contracts.messages import parse

    body = json.dumps({"schema": schema, **payload})
    if schema == "edgeloop.time_request/1" and "time" in payload and payload["nonce"] == "ab" * 16 \
            and payload["device_id"] == "d":
        assert parse(body).nonce == "ab" * 16          # extra fields are tolerated on a request
        return
    with pytest.raises(SchemaError):
        parse(body)


def test_status_faults_and_clock_offset_round_trip_and_are_bounded():
    from edgeloop.contracts.errors import SchemaError
    from edgeloop.contracts.messages import DeviceState, Status, encode, parse

    status = Status("d", DeviceState.ONLINE, "edge-gateway", faults={"storage.full": "12 held"}, clock_offset_s=-172800.0)
    assert parse(encode(status)) == status
    assert parse(encode(Status("d", DeviceState.ONLINE, "edge-gateway"))).faults == {}
    for faults in ({str(i): "x" for i in range(17)}, {"storage.full": 1}, {"x" * 65: "y"}, ["storage.full"]):
        with pytest.raises(SchemaError):
            parse(json.dumps({"schema": "edgeloop.status/1", "device_id": "d", "state": "online",
                              "tier": "edge-gateway", "faults": faults}))
    with pytest.raises(SchemaError):
        parse(json.dumps({"schema": "edgeloop.status/1", "device_id": "d", "state": "online", "tier": "t",
                          "clock_offset_s": "soon"}))


def test_after_a_timestamp_key_rotation_the_time_is_signed_with_the_new_keys(tmp_path):
    from edgeloop.cloud.release.signing import Repository

    director = Repository(tmp_path / "director", tmp_path / "keys")
    director.init()
    root = tmp_path / "root.json"
    root.write_bytes(director.trusted_root())
    clock = TrustedClock("dev-r", root, None)
    server = TimeServer.for_director(director)
    assert clock.accept(server.answer(clock.request()))
    old = TimeServer(list(server.signers))                                     # keeps the key about to retire
    version = director.rotate("timestamp")
    root.write_bytes((director.meta_dir / f"{version}.root.json").read_bytes())   # what TUF's refresh brings
    assert clock.accept(server.answer(clock.request()))                        # signed with the new key
    assert server.signers[0].public_key.keyid != old.signers[0].public_key.keyid
    assert not clock.accept(old.answer(clock.request()))                        # the retired key: refused
