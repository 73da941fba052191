"""Telemetry is never lost or double-counted: the device's outbox holds records while the broker
is down and across agent restarts; a persistent ingest session holds them while the control plane
is down; the store keeps each (device, seq) once."""

from __future__ import annotations

import time

import pytest

from cloud.control_plane import ControlPlane
from cloud.datasets import load_dataset
from cloud.export import export_onnx
from cloud.packaging import build_package
from cloud.registry import Registry
from cloud.training import TrainParams, train
from conftest import Broker, wait_for
from contracts.messages import Announce
from device_sdk.agent import Agent, AgentConfig
from device_sdk.ota import Installer
from device_sdk.outbox import Outbox, OutboxConfig


@pytest.fixture(scope="module")
def package():
    ds = load_dataset()
    _, _, test = ds.split()
    r = train(ds, TrainParams(epochs=1))
    return build_package("m", 1, "edge-gateway", export_onnx(r.model, 64), r.features, [str(i) for i in range(10)],
                         test.x[:8], {}), test


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
        # Mosquitto 2.0.11 does not restore shared subscriptions from its persistence file: the
        # ingest worker must be subscribed again before devices flush (see docs/contracts/telemetry.md)
        wait_for(lambda: cp.client.is_connected() and cp._connected.is_set(), timeout=60, what="ingest back")
        time.sleep(0.5)
        agent = _agent(tmp_path / "dev", broker, package)
        wait_for(lambda: (agent.pump(), registry.telemetry_summary()["records"] == 10)[1], what="10 records")
        cp.stop()                                                # the ingest worker goes down
        _serve(agent, test, 5)
        wait_for(lambda: (agent.pump(), len(agent.outbox) == 0)[1], what="the broker to take them")
        cp = ControlPlane(registry, broker.host, broker.port, session="ingest-saf").start()   # and comes back
        wait_for(lambda: registry.telemetry_summary()["records"] == 15, what="all 15 records")
        time.sleep(0.5)
        cp.drain()
        seqs = [r["seq"] for r in registry.db.query("select seq from telemetry order by seq")]
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
