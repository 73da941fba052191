"""Malformed MQTT input, sent over a real broker: the control plane and an agent log and drop
it, keep running, and still handle the next valid message. Duplicated telemetry is stored once."""

from __future__ import annotations

import json
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeloop.contracts.topics import DEFAULT_FLEET, Fleet
from edgeloop.contracts.messages import MAX_PAYLOAD_BYTES, Telemetry, encode
from edgeloop.cloud.ingest.control_plane import ControlPlane
from edgeloop.cloud.registry import Registry
from edgeloop.device_sdk.agent import Agent, AgentConfig

topics = Fleet(DEFAULT_FLEET)      # the fleet a ControlPlane or agent built without one is in


def wait_for(predicate, timeout=15.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def publisher(broker):
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"attacker-{uuid.uuid4().hex[:6]}",
                         protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    yield lambda topic, payload: client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def telemetry(device: str, seq: int) -> Telemetry:
    return Telemetry(device_id=device, seq=seq, model_version="m:1", window_start=1.0, window_end=2.0, count=3,
                     labelled=2, correct=1, predictions=[1, 2], confidence_hist=[0] * 9 + [3],
                     latency_ms_p50=0.5, latency_ms_max=1.0)


JUNK = [
    b"not json at all",
    b"\xff\xfe\x00 not utf-8",
    b"[1, 2, 3]",
    b'{"schema": "edgeloop.telemetry/1"}',                       # missing every field
    b'{"schema": "edgeloop.bogus/9", "x": 1}',                   # unknown schema
    json.dumps({"schema": "edgeloop.telemetry/1", "device_id": "d", "seq": True}).encode(),
    b"{" + b'"a":' * 10 + b"1" + b"}" * 1,                        # broken nesting
    b"x" * (MAX_PAYLOAD_BYTES + 1),                              # over the size bound
]


def test_control_plane_drops_malformed_payloads_and_keeps_ingesting(broker, tmp_path, publisher):
    registry = Registry(tmp_path / "registry.db")
    cp = ControlPlane(registry, broker.host, broker.port).start()
    try:
        device = f"dev-{uuid.uuid4().hex[:6]}"
        for payload in JUNK:
            publisher(topics.telemetry(device), payload)
        publisher(topics.status(device), b"{}")
        publisher(topics.errors(device), b"nope")
        # a valid record under another device's topic is spoofing: dropped too
        publisher(topics.telemetry(device), encode(telemetry("someone-else", 0)))
        publisher(topics.telemetry(device), encode(telemetry(device, 0)))
        wait_for(lambda: cp.stats.telemetry_stored == 1, what="the valid record")
        cp.drain()
        assert cp.stats.malformed == len(JUNK) + 3
        assert registry.telemetry_summary()["records"] == 1
        assert cp.client.is_connected()
    finally:
        cp.stop()
        registry.close()


def test_duplicated_telemetry_is_stored_once(broker, tmp_path, publisher):
    registry = Registry(tmp_path / "registry.db")
    cp = ControlPlane(registry, broker.host, broker.port).start()
    try:
        device = f"dup-{uuid.uuid4().hex[:6]}"
        for seq in (0, 1, 1, 0, 2, 2):   # QoS 1 redelivery and device resends look like this
            publisher(topics.telemetry(device), encode(telemetry(device, seq)))
        wait_for(lambda: cp.stats.telemetry_stored + cp.stats.telemetry_duplicates == 6, what="all six")
        rows = registry.telemetry_records(device_id=device)
        assert [r["seq"] for r in rows] == [0, 1, 2]
        assert cp.stats.telemetry_duplicates == 3
        assert registry.telemetry_summary()["inferences"] == 9
    finally:
        cp.stop()
        registry.close()


def test_agent_drops_malformed_payloads_and_keeps_running(broker, tmp_path, publisher):
    device = f"agent-{uuid.uuid4().hex[:6]}"
    agent = Agent(AgentConfig(device_id=device, tier="junk-tier", state_dir=tmp_path / device,
                              mqtt_host=broker.host, mqtt_port=broker.port))
    from edgeloop.cloud.release.signing import Repository
    from edgeloop.device_sdk.tuf_fetch import provision
    repo = Repository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    provision(tmp_path / device / "tuf", repo.trusted_root(), repo.trusted_root())
    agent.start()
    try:
        wait_for(lambda: agent.link.client.is_connected(), what="connection")
        for payload in JUNK:
            publisher(topics.announce("junk-tier"), payload)
        publisher(topics.command(device), b'{"schema": "edgeloop.status/1"}')
        handled = 0
        deadline = time.time() + 10
        while handled < len(JUNK) + 1 and time.time() < deadline:
            handled += agent.step(timeout=0.1)
        # the oversized payload is dropped by the parser like the rest
        assert agent.malformed == len(JUNK) + 1
        assert agent.model_version is None and agent.installer.state == "idle"
        assert agent.link.client.is_connected()
        # an announcement for an update that cannot be fetched is reported, not fatal
        good = {"schema": "edgeloop.announce/1", "update_id": "u1", "model": "m", "model_version": "m:1",
                "tier": "junk-tier", "target": "m/1/junk-tier.elpkg", "length": 10, "sha256": "0" * 64,
                "repository": "http://127.0.0.1:9/repository", "director": "http://127.0.0.1:9/director",
                "issued_at": time.time()}
        publisher(topics.announce("junk-tier"), json.dumps(good).encode())
        # the repository is unreachable: postponed and retried later, nothing installed
        wait_for(lambda: (agent.step(timeout=0.05), agent.pending_retry)[1] is not None, what="the postponement")
        assert agent.pending_retry.update_id == "u1"
        assert agent.installer.state == "idle" and agent.model_version is None
    finally:
        agent.stop()
