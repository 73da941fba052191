"""Outbox -> broker -> store: the device side of "no telemetry lost or counted twice".

A message's life, per outbox row::

    unsent --publish--> in flight --PUBACK--> taken --ingest confirms--> deleted
                           |                    |
                           | disconnect         | no confirmation within confirm_timeout_s,
                           v                    v or a reconnect
                        unsent               sent again (same seq)

- Messages leave the outbox in id order, at most ``max_in_flight`` without a PUBACK.
- Telemetry records (``seq``) and error reports (``ref``: their report_id) are deleted only when
  the ingest confirms that their batch is stored (``edgeloop.telemetry_ack/1`` on
  ``devices/<id>/telemetry/ack``); a message with neither is deleted on its PUBACK. A record the broker took but
  never delivered (a broker restarted before any ingest worker subscribed again, an ingest
  worker that failed to store) is sent again after ``confirm_timeout_s``; the store deduplicates
  on (device_id, seq), so a lost confirmation costs one resend and nothing else.
- After a reconnect everything still in the outbox is sent again, in order.

``confirm_timeout_s=None`` turns confirmations off: telemetry is then deleted on its PUBACK, as
for a control plane that sends no confirmations.

A disk that refuses the outbox's bookkeeping writes (full, read-only) costs at most a resend:
a record not marked taken or not deleted is sent again later and deduplicated by the store.

Threads: :meth:`pump` runs on the device's work loop; :meth:`puback` and :meth:`confirm` may be
called on the link's network thread. Paho is never called while this class's lock is held.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol

from edgeloop.device_sdk.errors import StorageError

if TYPE_CHECKING:
    from edgeloop.device_sdk.ports import OutboxStore

__all__ = ["Delivery"]

log = logging.getLogger("edgeloop.agent.delivery")


class _Sent(Protocol):     # paho's MQTTMessageInfo, as far as this needs it
    mid: int
    rc: int


class Delivery:
    def __init__(self, outbox: OutboxStore, publish: Callable[[str, bytes], _Sent], connected: Callable[[], bool], *,
                 max_in_flight: int = 64, confirm_timeout_s: float | None = 60.0) -> None:
        """``publish(topic, payload)``: a QoS 1 publish returning paho's MQTTMessageInfo;
        ``connected()``: whether the link is up now."""
        self.outbox = outbox
        self._publish = publish
        self._connected = connected
        self.max_in_flight = max_in_flight
        self.confirm_timeout_s = confirm_timeout_s
        self.resent = 0                               # telemetry records sent again for lack of confirmation
        self.confirmed = 0                            # records the ingest confirmed that were still here
        self.write_failures = 0                       # outbox writes the disk refused (a resend each, at most)
        self._lock = threading.Lock()
        self._in_flight: dict[int, tuple[int, bool]] = {}   # paho mid -> (outbox id, waits for confirmation)
        self._early: set[int] = set()                 # PUBACKed before pump recorded the mid
        self._sent_up_to = 0                          # highest outbox id sent on this connection
        self._epoch = 0                               # +1 per reset: a pump from before stops
        self._was_connected = False

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def reset(self) -> None:
        """The connection went (or came back): nothing in flight will be acknowledged on it, so
        everything still in the outbox goes again, in order."""
        with self._lock:
            self._in_flight.clear()
            self._early.clear()
            self._sent_up_to = 0
            self._epoch += 1

    def pump(self) -> int:
        """Send what is due, in order, up to the in-flight bound. Returns how many were sent."""
        up = self._connected()
        if up != self._was_connected:
            self._was_connected = up
            self.reset()
        if not up:
            return 0
        with self._lock:
            epoch, room, after = self._epoch, self.max_in_flight - len(self._in_flight), self._sent_up_to
        if room <= 0:
            return 0
        resend_before = None if self.confirm_timeout_s is None else time.time() - self.confirm_timeout_s
        sent = 0
        for item in self.outbox.pending(room, after=after, resend_before=resend_before):
            if item.resend:
                self._write(self.outbox.taken, item.id)   # restart its clock first: one resend per timeout
                self.resent += 1
            info = self._publish(item.topic, item.payload)
            if info.rc != 0:                        # not connected any more: the reconnect resends
                return sent
            with self._lock:
                if epoch != self._epoch:            # reconnected meanwhile: everything goes again anyway
                    return sent
                self._sent_up_to = max(self._sent_up_to, item.id)
                early = info.mid in self._early
                if early:
                    self._early.discard(info.mid)
                else:
                    self._in_flight[info.mid] = (item.id, item.awaits_confirmation)
            if early:
                self._taken(item.id, item.awaits_confirmation)
            sent += 1
        return sent

    def puback(self, mid: int) -> None:
        """The broker acknowledged message ``mid`` (paho's network thread)."""
        with self._lock:
            entry = self._in_flight.pop(mid, None)
            if entry is None:
                self._early.add(mid)
        if entry is not None:
            self._taken(*entry)

    def confirm(self, seqs: list[int], errors: list[str] | None = None) -> None:
        """The ingest is done with these telemetry records (stored, duplicates, or refused) and
        error reports (by report_id)."""
        self.confirmed += self._write(self.outbox.confirm, seqs, errors) or 0

    def _taken(self, outbox_id: int, waits: bool) -> None:
        if not waits or self.confirm_timeout_s is None:
            self._write(self.outbox.ack, outbox_id)
        else:
            self._write(self.outbox.taken, outbox_id)

    def _write(self, op: Callable[..., Any], *args: Any) -> Any:
        """An outbox bookkeeping write; a refusing disk costs a resend, never the caller."""
        try:
            return op(*args)
        except (StorageError, OSError) as e:
            self.write_failures += 1
            log.warning("outbox bookkeeping write failed (%s): the message may be sent again", e)
            return None
