"""The control plane's MQTT 5 client (cloud/ingest/mqtt_session.py) against a real Mosquitto, with the
Mosquitto command-line clients on the other side: batches in, manual PUBACKs, QoS 1 out,
reconnects, refusals."""

from __future__ import annotations

import socket
import subprocess
import threading

import pytest

from edgeloop.cloud.ingest.mqtt_session import ConnectRefused, Incoming, MqttSession
from conftest import Broker, mosquitto_binary, wait_for


class Rx:
    def __init__(self, session: MqttSession, ack: bool = True) -> None:
        self.got: list[Incoming] = []
        self.batches = 0
        self.subacks: list[list[int]] = []
        self.connects = 0
        self._lock = threading.Lock()
        self.ack = ack
        session.on_messages = self._messages
        session.on_subscribed = lambda mid, codes: self.subacks.append(codes)
        self.session = session

    def _messages(self, batch: list[Incoming]) -> None:
        with self._lock:
            self.got += batch
            self.batches += 1
        if self.ack:
            self.session.ack([m.packet_id for m in batch if m.qos])


def _pub(broker: Broker, topic: str, *args: str) -> None:
    """mosquitto_pub, MQTT 5."""
    subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-t", topic, "-V", "5", *args],
                   check=True, timeout=30)


@pytest.fixture
def own(tmp_path):
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


def test_receives_batches_in_order_and_publishes_at_qos_1(own, tmp_path):
    s = MqttSession("sess-a", own.host, own.port)
    rx = Rx(s)
    s.on_connect = lambda: s.subscribe([("t/#", 1), ("$share/g/s/#", 1)])
    s.start()
    try:
        wait_for(lambda: rx.subacks == [[1, 1]], what="SUBACK")
        lines = tmp_path / "lines.txt"
        lines.write_text("".join(f"m{i:04d}-" + "x" * 3000 + "\n" for i in range(2000)))
        with lines.open("rb") as stdin:                 # one line, one message
            subprocess.run(["mosquitto_pub", "-h", own.host, "-p", str(own.port), "-t", "t/a", "-q", "1", "-l"],
                           stdin=stdin, check=True, timeout=60)
        _pub(own, "s/b", "-m", "shared", "-q", "1")
        wait_for(lambda: len(rx.got) == 2001, what="every message")
        body = [m.payload[:5] for m in rx.got if m.topic == "t/a"]
        assert body == [f"m{i:04d}".encode() for i in range(2000)]          # in order, none twice
        assert rx.batches < 2000                                            # more than one a batch under load
        assert {(m.topic, m.qos) for m in rx.got} == {("t/a", 1), ("s/b", 1)}
        out = s.publish("t/back", b"hello", qos=1)
        out.wait_for_publish(5)
        assert out.is_published() and out.rc == 0
    finally:
        s.close()
    assert not s.alive


def test_unacknowledged_messages_come_again_to_a_persistent_session(own):
    s = MqttSession("sess-b", own.host, own.port, clean_start=False, session_expiry_s=600)
    rx = Rx(s, ack=False)                           # a worker that dies before storing
    s.on_connect = lambda: s.subscribe([("q/#", 1)])
    s.start()
    wait_for(lambda: rx.subacks, what="SUBACK")
    _pub(own, "q/1", "-m", "one", "-q", "1")
    wait_for(lambda: len(rx.got) == 1, what="first delivery")
    s.close()
    s2 = MqttSession("sess-b", own.host, own.port, clean_start=False, session_expiry_s=600)
    rx2 = Rx(s2)
    s2.start()                                      # no subscribe: the session has it
    try:
        wait_for(lambda: len(rx2.got) == 1, what="redelivery")
        assert rx2.got[0].payload == b"one"
    finally:
        s2.close()


def test_reconnects_resubscribes_and_resends_after_the_broker_restarts(own):
    s = MqttSession("sess-c", own.host, own.port)
    rx = Rx(s)

    def connected() -> None:
        rx.connects += 1
        s.subscribe([("r/#", 1)])
    s.on_connect = connected
    s.start()
    try:
        wait_for(lambda: rx.subacks, what="SUBACK")
        own.stop()
        wait_for(lambda: not s.is_connected(), what="the loss noticed")
        pending = s.publish("r/queued", b"while-down", qos=1)   # kept, sent on the next connection
        assert not pending.is_published()
        own.start()
        wait_for(lambda: rx.connects == 2, timeout=30, what="reconnect")
        pending.wait_for_publish(10)
        assert pending.is_published()
        wait_for(lambda: any(m.payload == b"while-down" for m in rx.got), what="own message back")
        _pub(own, "r/after", "-m", "after", "-q", "1")
        wait_for(lambda: any(m.payload == b"after" for m in rx.got), what="subscription restored")
        assert s.publish("r/x", b"q0", qos=0).rc == 0
    finally:
        s.close()


def _listening(b: Broker) -> bool:
    try:
        socket.create_connection((b.host, b.port), timeout=0.2).close()
        return True
    except OSError:
        return False


def test_refused_connection_is_an_error_not_a_hang(tmp_path):
    b = Broker(tmp_path)
    b.start()
    conf = (tmp_path / "mosquitto.conf").read_text().replace("allow_anonymous true", "allow_anonymous false")
    b.stop()
    (tmp_path / "mosquitto.conf").write_text(conf)
    b.proc = subprocess.Popen([mosquitto_binary(), "-c", str(tmp_path / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _listening(b), what="the broker listening")
        with pytest.raises(ConnectRefused, match="refused"):
            MqttSession("sess-d", b.host, b.port).start()
    finally:
        b.stop()
    with pytest.raises(OSError):
        MqttSession("sess-e", b.host, b.port).start()           # nobody listening
