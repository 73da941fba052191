"""Telemetry is never lost or double-counted: the device's outbox holds records while the broker
is down and across agent restarts; a persistent ingest session holds them while the control plane
is down; the store keeps each (device, seq) once."""

from __future__ import annotations

import time

import pytest

from edgeloop.cloud.ingest.control_plane import ControlPlane
from edgeloop.cloud.registry import Registry
from conftest import Broker, edge_gateway_package, wait_for
from edgeloop.contracts.messages import Announce
from edgeloop.device_sdk.agent import Agent, AgentConfig
from edgeloop.device_sdk.ota import Installer
from edgeloop.device_sdk.outbox import Outbox, OutboxConfig


@pytest.fixture(scope="module")
def package():
    return edge_gateway_package(epochs=1)


def _agent(state, broker, package) -> Agent:
    pkg, _ = package
    if not (state / "state.json").exists():
        m = pkg.manifest
        Installer(state, "edge-gateway", 1 << 22).install(
            Announce("u1", "m", m.model_version, "edge-gateway", pkg.target_path, len(pkg.data), pkg.sha256,
                     "http://unused", "http://unused", time.time()), lambda a: pkg.data)
    agent = Agent(AgentConfig(device_id="saf-device", tier="edge-gateway", state_dir=state, mqtt_host=broker.host,
                              mqtt_port=broker.port, telemetry_window=10))
    agent.start()
    return agent


def _serve(agent, test, windows: int) -> None:
    for i in range(windows * 10):
        agent.infer(test.x[i % len(test.x)][None, :], int(test.y[i % len(test.y)]))


def test_broker_agent_and_ingest_restarts_lose_and_duplicate_nothing(tmp_path, package):
    _, test = package
    broker = Broker(tmp_path / "broker")
    broker.root.mkdir()
    broker.persistent = True
    broker.start()
    registry = Registry(tmp_path / "registry.db")
    cp = ControlPlane(registry, broker.host, broker.port, session="ingest-saf").start()
    agent = _agent(tmp_path / "dev", broker, package)
    try:
        _serve(agent, test, 5)                                   # all up
        wait_for(lambda: registry.telemetry_summary()["records"] == 5, what="first 5 records")
        broker.stop()                                            # the broker goes down
        _serve(agent, test, 5)
        assert len(agent.outbox) >= 5                            # held on the device, on disk
        agent.link.client.loop_stop()
        agent.outbox.close()                                     # and the agent restarts, too
        broker.start()
        # (devices flushing before the ingest subscribes again: tests/test_ingest_restart.py)
        wait_for(lambda: cp.client.is_connected() and cp._connected.is_set(), timeout=60, what="ingest back")
        time.sleep(0.5)
        agent = _agent(tmp_path / "dev", broker, package)
        wait_for(lambda: (agent.pump(), registry.telemetry_summary()["records"] == 10)[1], what="10 records")
        cp.stop()                                                # the ingest worker goes down
        _serve(agent, test, 5)
        wait_for(lambda: (agent.pump(), agent.outbox.unsent() == 0)[1], what="the broker to take them")
        assert len(agent.outbox) == 5                            # kept until the ingest confirms them
        cp = ControlPlane(registry, broker.host, broker.port, session="ingest-saf").start()   # and comes back
        wait_for(lambda: registry.telemetry_summary()["records"] == 15, what="all 15 records")
        time.sleep(0.5)
        cp.drain()
        wait_for(lambda: len(agent.outbox) == 0, what="the ingest's confirmations")
        seqs = sorted(r["seq"] for r in registry.telemetry_records())
        assert seqs == list(range(15))                           # every record exactly once
        assert registry.telemetry_summary()["inferences"] == 150
    finally:
        agent.stop()
        cp.stop()
        broker.stop()


def test_outbox_bound_drops_oldest_low_priority_first_and_counts_it(tmp_path):
    box = Outbox(tmp_path / "o.db", OutboxConfig(max_bytes=1000))
    for i in range(10):
        box.put("t", bytes([i]) * 200, priority=0)
    box.put("e", b"E" * 200, priority=1)                          # an error report outranks telemetry
    kept = box.pending(100)
    assert [p.topic for p in kept].count("e") == 1 and len(kept) == 5
    assert [p.payload[0] for p in kept if p.topic == "t"] == [6, 7, 8, 9]   # the newest telemetry stays
    assert box.take_dropped() == 6 and box.take_dropped() == 0


# -- bad input on ingest: refused, counted, never stored, never a crash ------------------------------
def _record(device_id: str, seq: int, window_end: float | None = None):
    from edgeloop.contracts.messages import Telemetry
    now = time.time()
    return Telemetry(device_id=device_id, seq=seq, model_version="m:1", window_start=now - 1,
                     window_end=window_end or now, count=4, labelled=4, correct=3, predictions=[2, 2],
                     confidence_hist=[0] * 9 + [4], latency_ms_p50=1.0, latency_ms_max=1.0)


def test_unknown_revoked_future_and_malformed_telemetry_is_refused_and_counted(tmp_path, broker):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edgeloop.cloud.fleet_registry import EnrolledDevice, FleetRegistry
    from edgeloop.contracts.topics import DEFAULT_FLEET, Fleet
    from edgeloop.contracts.messages import TelemetryAck, encode, parse

    registry = Registry(tmp_path / "registry.db")
    topics = Fleet(DEFAULT_FLEET)          # the fleet a ControlPlane built without one serves
    fleet = FleetRegistry(registry)
    for name in ("bad-in-ok", "bad-in-revoked"):
        fleet.enroll(EnrolledDevice(name, f"serial-{name}", "f" * 64, time.time() + 3600, tier="edge-gateway"))
    fleet.mark_revoked("bad-in-revoked")
    cp = ControlPlane(registry, broker.host, broker.port).start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id="bad-in-publisher")
    confirmations: list[TelemetryAck] = []
    pub.on_message = lambda c, u, m: confirmations.append(parse(m.payload, expect=TelemetryAck))
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    pub.subscribe(topics.telemetry_ack("bad-in-ok"), qos=0)
    try:
        sends = [("bad-in-ok", _record("bad-in-ok", 0)),                          # good
                 ("bad-in-stranger", _record("bad-in-stranger", 0)),              # unknown-device
                 ("bad-in-revoked", _record("bad-in-revoked", 0)),                # revoked
                 ("bad-in-ok", _record("bad-in-ok", 5_000_000)),                  # future-seq
                 ("bad-in-ok", _record("bad-in-ok", 1, time.time() + 30 * 86400)),  # impossible time: stored, flagged
                 ("bad-in-ok", _record("bad-in-ok", 2))]                          # good
        for device, record in sends:
            pub.publish(topics.telemetry(device), encode(record), qos=1).wait_for_publish(10)
            cp.drain()     # in order: the future-seq check needs seq 0 stored first
        pub.publish(topics.telemetry("bad-in-ok"), b"{not json", qos=1).wait_for_publish(10)
        pub.publish(topics.telemetry("bad-in-ok"), encode(_record("bad-in-other", 9)), qos=1).wait_for_publish(10)
        wait_for(lambda: (cp.drain(), cp.stats.rejected + cp.stats.telemetry_stored == 8)[1], what="all judged")
        stored = {(r["device_id"], r["seq"]): r for r in registry.telemetry_records()}
        assert sorted(stored) == [("bad-in-ok", 0), ("bad-in-ok", 1), ("bad-in-ok", 2)]
        suspect = stored[("bad-in-ok", 1)]        # a clock 30 days ahead: kept, at the receive time, flagged
        assert suspect["clock_suspect"] == 1 and suspect["window_end"] <= time.time() + 1
        assert suspect["device_window_end"] > time.time() + 29 * 86400
        assert not stored[("bad-in-ok", 0)]["clock_suspect"] and cp.stats.clock_suspect == 1
        assert cp.stats.rejects == {"unknown-device": 1, "revoked": 1, "future-seq": 1, "schema": 1, "wrong-topic": 1}
        reasons = sorted(r["reason"] for r in registry.telemetry_rejects())
        assert reasons == sorted(cp.stats.rejects)
        assert cp.alive                                                    # never a crash
        # the device is told what the store is done with (stored or refused: no use sending again);
        # the unparseable record and the one naming another device carry no seq it could be told of
        wait_for(lambda: len({s for a in confirmations for s in a.seqs}) == 4, what="confirmations")
        assert sorted(s for a in confirmations for s in a.seqs) == [0, 1, 2, 5_000_000]
        assert sorted(s for a in confirmations for s in a.refused) == [5_000_000]
    finally:
        pub.loop_stop()
        pub.disconnect()
        cp.stop()
        registry.close()
