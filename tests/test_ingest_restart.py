"""Exactly once in the store across a killed ingest worker and a restarted broker.

Sixteen devices (real paho clients, each with the device SDK's SQLite outbox and per-device
sequence numbers) stream telemetry through a real Mosquitto (persistence on) into an ingest
worker that runs in its own process with a persistent MQTT session. Mid-stream the worker is
killed with SIGKILL (no chance to drain) while it holds received but unstored messages (its
store is slowed down to 0.2 s a batch) and started again, then the broker is stopped and
started again. Every record, and every error report the devices send among them, must be
stored exactly once.

Then, the hard case: the broker comes back while no ingest worker runs, and devices reconnect
and flush first.

What makes it hold: devices delete a record from the outbox only when the ingest confirms it
stored it (``edgeloop.telemetry_ack/1``, device_sdk/delivery.py), send again what stays
unconfirmed for CONFIRM_S, and send everything again after a reconnect (duplicates are dropped
on (device, seq)); the worker acknowledges a message to the broker only after its batch is
stored (manual acks), so messages a killed worker had received but not stored are delivered
again to its session. With shared ingest, Mosquitto 2.0.11 does not restore a persistent
session's *shared* subscription after a broker restart, so what devices flush before the worker
subscribes again is taken by the broker and delivered to nobody: the confirmations are what
bring it back. With exclusive ingest the restored plain subscription queues it instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeloop.cloud.registry import Registry
from conftest import Broker, wait_for
from edgeloop.contracts.topics import DEFAULT_FLEET, Fleet
from edgeloop.contracts.messages import ErrorReport, Telemetry, TelemetryAck, encode, parse
from edgeloop.device_sdk.delivery import Delivery
from edgeloop.device_sdk.outbox import PRIORITY_ERROR, Outbox

ROOT = Path(__file__).resolve().parent.parent
DEVICES = 16
RECORDS = 40            # per device
CONFIRM_S = 2.0         # a record the ingest has not confirmed is sent again after this

WORKER = """
import sys, time
from pathlib import Path
from edgeloop.cloud.ingest.control_plane import ControlPlane
from edgeloop.cloud.registry import Registry
store = Registry.add_telemetry
def slow_store(self, rows):          # a slow disk: the worker holds received, unstored messages
    time.sleep(0.2)
    return store(self, rows)
Registry.add_telemetry = slow_store
cp = ControlPlane(Registry(Path(sys.argv[1])), "127.0.0.1", int(sys.argv[2]), session="ingest-restart",
                  shared=sys.argv[3] == "shared").start(30)
subscribed = False
while True:
    if cp._connected.is_set() != subscribed:
        subscribed = cp._connected.is_set()
        print("subscribed" if subscribed else "disconnected", flush=True)
    time.sleep(0.02)
"""

topics = Fleet(DEFAULT_FLEET)      # the fleet a ControlPlane or agent built without one is in


class Worker:
    """An ingest worker process; ``subscribed`` mirrors what it last printed."""

    def __init__(self, db: Path, port: int, mode: str = "shared") -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.mode = mode
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(db), str(port), mode], stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT, env=env)
        self.subscribed = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip() == "subscribed":
                self.subscribed.set()
            elif line.strip() == "disconnected":
                self.subscribed.clear()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


class Device:
    """A device's telemetry path as the agent runs it: the SDK's outbox and delivery (QoS 1, a
    record deleted only when the ingest confirms it stored it, resent after CONFIRM_S without)."""

    def __init__(self, device_id: str, root: Path, port: int) -> None:
        self.device_id, self.port = device_id, port
        self.outbox = Outbox(root / f"{device_id}.db")
        self.seq = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=device_id)
        self.delivery = Delivery(self.outbox, lambda t, p: self.client.publish(t, p, qos=1),
                                 self.client.is_connected, confirm_timeout_s=CONFIRM_S)
        self.client.on_publish = lambda c, u, mid, rc, props: self.delivery.puback(mid)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.delivery.reset()
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        client.subscribe(topics.telemetry_ack(self.device_id), qos=0)
        self.delivery.reset()

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        ack = parse(message.payload, expect=TelemetryAck)
        self.delivery.confirm(ack.seqs, ack.errors)

    def connect(self) -> None:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        wait_for(self.client.is_connected, what=f"{self.device_id} connected")

    def disconnect(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        self.delivery.reset()

    def produce(self) -> None:
        record = Telemetry(device_id=self.device_id, seq=self.seq, model_version="m:1", window_start=time.time(),
                           window_end=time.time(), count=10, labelled=10, correct=9, predictions=[5, 5],
                           confidence_hist=[0] * 9 + [10], latency_ms_p50=1.0, latency_ms_max=2.0)
        if record.seq % 10 == 3:                 # now and then an error report, confirmed by its id
            report = ErrorReport(self.device_id, "health.golden", "x", None, time.time(), f"{self.device_id}-r{self.seq}")
            self.outbox.put(topics.errors(self.device_id), encode(report), PRIORITY_ERROR, ref=report.report_id)
        self.seq += 1
        self.outbox.put(topics.telemetry(self.device_id), encode(record), seq=record.seq)

    def pump(self) -> None:
        self.delivery.pump()


def _reports(db: Path) -> list[str]:
    registry = Registry(db)
    try:
        return sorted(r["report_id"] for r in registry.device_errors())
    finally:
        registry.close()


def _stored(db: Path) -> dict[str, list[int]]:
    registry = Registry(db)
    try:
        rows = registry.telemetry_records()
    finally:
        registry.close()
    out: dict[str, list[int]] = {}
    for r in rows:
        out.setdefault(r["device_id"], []).append(r["seq"])
    return out


@pytest.mark.parametrize("mode", ["shared", "exclusive"])
def test_killed_worker_and_restarted_broker_store_every_record_exactly_once(tmp_path, mode):
    broker = Broker(tmp_path / "broker")
    broker.root.mkdir()
    broker.persistent = True
    broker.start()
    db = tmp_path / "registry.db"
    Registry(db).close()
    worker = Worker(db, broker.port, mode)
    devices = [Device(f"restart-dev-{i:02d}", tmp_path, broker.port) for i in range(DEVICES)]
    try:
        assert worker.subscribed.wait(60), "the ingest worker never subscribed"
        for d in devices:
            d.connect()

        def stream(steps: int) -> None:
            for _ in range(steps):
                for d in devices:
                    d.produce()
                    d.pump()
                time.sleep(0.01)

        stream(10)
        worker.kill()                                    # SIGKILL mid-stream: no drain, no goodbye
        stream(10)                                       # the broker queues for its session
        worker = Worker(db, broker.port, mode)
        assert worker.subscribed.wait(60), "the restarted worker never subscribed"
        stream(10)
        worker.kill()                                    # and the worker is not there when the broker returns
        broker.stop()                                    # the broker goes down mid-stream
        for d in devices:
            d.disconnect()
        stream(5)                                        # held in the devices' outboxes
        broker.start()
        # devices reconnect and flush (the broker takes every record) with no worker running at all.
        # exclusive: the restored plain subscription queues them for the worker's session.
        # shared: Mosquitto 2.0.11 does not restore a shared subscription from persistence, so the
        # broker delivers them to nobody; only the missing confirmations make the devices resend
        for d in devices:
            d.connect()
        stream(3)
        for d in devices:
            wait_for(lambda d=d: (d.pump(), d.outbox.unsent() == 0)[1], timeout=60, what=f"{d.device_id} flushed early")
        worker = Worker(db, broker.port, mode)
        assert worker.subscribed.wait(60), "the worker did not subscribe after the broker restart"
        stream(RECORDS - 38)
        for d in devices:
            wait_for(lambda d=d: (d.pump(), len(d.outbox) == 0)[1], timeout=60, what=f"{d.device_id} flushed")
        expected = {d.device_id: list(range(RECORDS)) for d in devices}
        wait_for(lambda: _stored(db) == expected, timeout=60, what="every record stored")
        time.sleep(1.0)                                  # late redeliveries must not add rows
        assert _stored(db) == expected
        reports = _reports(db)                           # error reports: each stored once as well
        assert reports == sorted(f"{d.device_id}-r{s}" for d in devices for s in range(RECORDS) if s % 10 == 3)
        if mode == "shared":        # the records the broker dropped came back only as resends
            assert sum(d.delivery.resent for d in devices) > 0
    finally:
        for d in devices:
            d.disconnect()
        worker.kill()
        broker.stop()
