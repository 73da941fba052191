"""The device's delivery rules (device_sdk/delivery.py) on its real SQLite outbox, with a double
of paho's publish in place of the network: what is deleted when, what goes again and in which
order. The same code against a real broker and ingest: tests/test_ingest_restart.py,
tests/test_store_and_forward.py."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeloop.device_sdk.delivery import Delivery
from edgeloop.device_sdk.outbox import PRIORITY_ERROR, Outbox


@dataclass
class Info:
    mid: int
    rc: int = 0


class Link:
    """paho's publish as Delivery sees it: a mid per message, and a switch for the connection."""

    def __init__(self) -> None:
        self.up = True
        self.sent: list[tuple[int, str, bytes]] = []
        self._mid = 0

    def publish(self, topic: str, payload: bytes) -> Info:
        if not self.up:
            return Info(0, rc=4)          # MQTT_ERR_NO_CONN
        self._mid += 1
        self.sent.append((self._mid, topic, payload))
        return Info(self._mid)

    def payloads(self) -> list[bytes]:
        return [p for _, _, p in self.sent]


@pytest.fixture
def rig(tmp_path: Path):
    outbox = Outbox(tmp_path / "outbox.db")
    link = Link()
    delivery = Delivery(outbox, link.publish, lambda: link.up, max_in_flight=4, confirm_timeout_s=0.3)
    yield outbox, link, delivery
    outbox.close()


def _telemetry(outbox: Outbox, seqs: range) -> None:
    for s in seqs:
        outbox.put("t", f"r{s}".encode(), seq=s)


def test_telemetry_stays_after_the_puback_until_the_ingest_confirms_it(rig):
    outbox, link, delivery = rig
    _telemetry(outbox, range(3))
    outbox.put("e", b"error", PRIORITY_ERROR)          # no seq: done at its PUBACK
    assert delivery.pump() == 4
    for mid, _, _ in link.sent:
        delivery.puback(mid)
    assert len(outbox) == 3 and outbox.unsent() == 0   # the error report is gone, the records wait
    delivery.confirm([0, 2])
    assert len(outbox) == 1 and delivery.confirmed == 2
    delivery.confirm([0])                              # a repeated confirmation deletes nothing more
    assert len(outbox) == 1 and delivery.confirmed == 2


def test_an_error_report_with_a_report_id_waits_for_its_confirmation_too(rig):
    outbox, link, delivery = rig
    outbox.put("e", b"error-1", PRIORITY_ERROR, ref="rep-1")
    outbox.put("e", b"error-2", PRIORITY_ERROR)                  # no report id: done at its PUBACK
    delivery.pump()
    for mid, _, _ in link.sent:
        delivery.puback(mid)
    assert [p.ref for p in outbox.pending(10)] == ["rep-1"]
    delivery.confirm([], ["rep-1"])
    assert len(outbox) == 0


def test_in_flight_bound_and_order(rig):
    outbox, link, delivery = rig
    _telemetry(outbox, range(6))
    assert delivery.pump() == 4 and delivery.pump() == 0   # four without a PUBACK, no more
    delivery.puback(link.sent[0][0])
    assert delivery.pump() == 1
    assert link.payloads() == [b"r0", b"r1", b"r2", b"r3", b"r4"]


def test_unconfirmed_records_go_again_after_the_timeout_once_per_timeout(rig):
    outbox, link, delivery = rig
    _telemetry(outbox, range(2))
    delivery.pump()
    for mid, _, _ in link.sent:
        delivery.puback(mid)
    assert delivery.pump() == 0                        # taken, waiting: nothing is due yet
    time.sleep(0.35)
    assert delivery.pump() == 2 and delivery.resent == 2
    assert link.payloads()[-2:] == [b"r0", b"r1"]      # the same records, same seqs
    assert delivery.pump() == 0                        # not again before another timeout
    delivery.confirm([0, 1])
    time.sleep(0.35)
    assert delivery.pump() == 0 and len(outbox) == 0


def test_a_reconnect_sends_everything_not_confirmed_again_in_order(rig):
    outbox, link, delivery = rig
    _telemetry(outbox, range(3))
    delivery.pump()
    delivery.puback(link.sent[0][0])                   # r0 taken; r1, r2 in flight when the link drops
    link.up = False
    assert delivery.pump() == 0
    delivery.puback(link.sent[1][0])                   # a late PUBACK from the old connection
    link.up = True
    assert delivery.pump() == 3
    assert link.payloads()[-3:] == [b"r0", b"r1", b"r2"]


def test_a_puback_before_pump_recorded_the_mid_still_counts(rig, monkeypatch):
    outbox, link, delivery = rig
    outbox.put("e", b"error", PRIORITY_ERROR)
    publish = link.publish

    def racing(topic: str, payload: bytes) -> Info:    # paho's thread acknowledges before publish returns
        info = publish(topic, payload)
        delivery.puback(info.mid)
        return info

    delivery._publish = racing
    assert delivery.pump() == 1
    assert len(outbox) == 0 and delivery.in_flight == 0


def test_without_confirmations_telemetry_is_deleted_at_its_puback(tmp_path):
    outbox, link = Outbox(tmp_path / "o.db"), Link()
    delivery = Delivery(outbox, link.publish, lambda: link.up, confirm_timeout_s=None)
    _telemetry(outbox, range(2))
    delivery.pump()
    for mid, _, _ in link.sent:
        delivery.puback(mid)
    assert len(outbox) == 0


def test_an_outbox_from_before_confirmations_is_upgraded_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(str(path))
    db.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT, payload BLOB, "
               "priority INTEGER, created REAL, size INTEGER)")
    db.execute("INSERT INTO outbox (topic, payload, priority, created, size) VALUES ('t', x'01', 0, ?, 1)",
               (time.time(),))
    db.commit()
    db.close()
    outbox = Outbox(path)
    try:
        pending = outbox.pending(10)
        assert [(p.topic, p.payload, p.seq) for p in pending] == [("t", b"\x01", None)]
        outbox.put("t", b"new", seq=7)
        assert [p.seq for p in outbox.pending(10)] == [None, 7]
    finally:
        outbox.close()


def test_a_refused_bookkeeping_write_costs_a_resend_never_the_network_thread(rig):
    """SQLite refusing a write (the disk full or read-only) reaches Delivery as StorageError,
    on every write the outbox makes: its PUBACK handling runs on paho's network thread, which
    an escaping sqlite3 error would kill."""
    from edgeloop.device_sdk.storage import StorageError

    outbox, link, delivery = rig
    _telemetry(outbox, range(2))
    assert delivery.pump() == 2
    outbox._db.execute("PRAGMA query_only = 1")        # every write now fails: SQLITE_READONLY
    for write in (lambda: outbox.taken(1), lambda: outbox.ack(1), lambda: outbox.confirm([0]),
                  lambda: outbox.put("t", b"x", seq=9), outbox.take_dropped):
        with pytest.raises(StorageError):
            write()
    for mid, _, _ in link.sent:
        delivery.puback(mid)                           # taken() refused: counted, not raised
    assert delivery.write_failures == 2
    outbox._db.execute("PRAGMA query_only = 0")
    delivery.confirm([0, 1])
    assert len(outbox) == 0
