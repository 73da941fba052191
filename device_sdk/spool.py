"""Telemetry and error reports on their way into the outbox: held in memory while the disk refuses.

The agent hands every telemetry record and error report to a :class:`Spool`, never to the outbox
directly, so serving never depends on the disk:

- A telemetry record is numbered when it is persisted, not before: the spool takes the next
  number from the :class:`~device_sdk.ports.SequenceStore` (which persists it first and hands out
  nothing if that fails), then puts the record into the outbox. Numbers are contiguous and a
  restart never reuses one.
- While the state folder is full or read-only (a StorageError or OSError from either store), messages wait in memory in the order they came, and :attr:`fault` names the
  fault (``storage.full``, ``storage.readonly`` or ``storage.write``: the agent reports it on its
  status topic). Each later message, and :meth:`flush`, tries again (at most every
  ``retry_s`` unless forced); once the disk takes writes, everything held goes to the outbox in
  order, each record with its number.
- Memory is bounded by :class:`SpoolLimits` (1,024 messages and 4 MiB by default: at the default
  20 inferences a window, about 20,000 requests of telemetry). Past the bound the oldest
  telemetry goes first (error reports outrank it). Every drop is counted: :attr:`dropped`, the
  status fault's detail, and ``extra.held_dropped`` in the next record that is stored (as the
  outbox reports its own drops in ``extra.outbox_dropped``).

What is held in memory when the process dies is lost with it (the disk would not take it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from edgeloop.contracts.codes import ErrorCode
from edgeloop.contracts.messages import Telemetry, encode
from edgeloop.device_sdk.errors import StorageError
from edgeloop.device_sdk.outbox import PRIORITY_ERROR, PRIORITY_TELEMETRY
from edgeloop.device_sdk.storage import fault_code

if TYPE_CHECKING:
    from edgeloop.device_sdk.ports import OutboxStore, SequenceStore

log = logging.getLogger("edgeloop.agent.spool")

__all__ = ["Spool", "SpoolLimits"]

_REFUSED = (StorageError, OSError)     # the real stores raise StorageError; a bare OSError is a disk's too


@dataclass(frozen=True)
class SpoolLimits:
    max_messages: int = 1024            # held in memory while the disk refuses writes
    max_bytes: int = 4 * 1024 * 1024
    retry_s: float = 1.0                # between attempts to write again (unforced)


@dataclass(eq=False)
class _Held:
    topic: str
    priority: int
    size: int
    record: Telemetry | None = None     # a telemetry record (numbered when persisted)
    payload: bytes = b""                # an error report
    ref: str | None = None
    seq: int | None = None              # taken and persisted, but the outbox refused the record


class Spool:
    def __init__(self, outbox: OutboxStore, sequence: SequenceStore, limits: SpoolLimits = SpoolLimits(),
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.outbox = outbox
        self.sequence = sequence
        self.limits = limits
        self._monotonic = monotonic
        self._held: deque[_Held] = deque()
        self._bytes = 0
        self._lock = threading.RLock()
        self._fault: tuple[ErrorCode, str] | None = None
        self._retry_at = 0.0
        self.dropped = 0                    # messages dropped from memory, ever
        self._unreported = 0                # of which not yet reported in a stored record
        self._outbox_dropped = 0            # the outbox's drop count, taken but not yet stored

    @property
    def held(self) -> int:
        """Messages waiting in memory for the disk."""
        with self._lock:
            return len(self._held)

    @property
    def fault(self) -> tuple[ErrorCode, str] | None:
        """(code, detail) of the storage fault now holding messages in memory, or None."""
        with self._lock:
            if self._fault is None:
                return None
            code, detail = self._fault
            return code, f"{detail}; {len(self._held)} held in memory, {self.dropped} dropped"

    def telemetry(self, topic: str, record: Telemetry) -> None:
        """Store a closed window's record (its ``seq`` is replaced by the number it gets)."""
        self._hold(_Held(topic, PRIORITY_TELEMETRY, 0, record=record))      # sized only if it must wait

    def report(self, topic: str, payload: bytes, ref: str | None) -> None:
        """Store an error report (``ref``: its report_id)."""
        self._hold(_Held(topic, PRIORITY_ERROR, len(payload), payload=payload, ref=ref))

    def flush(self, force: bool = False) -> bool:
        """Hand what is held to the outbox, in order; True when nothing is held any more. Without
        ``force``, a spool whose disk refused the last write tries again after ``retry_s``."""
        with self._lock:
            if self._held and not force and self._fault is not None and self._monotonic() < self._retry_at:
                return False
            while self._held:
                try:
                    self._store(self._held[0])
                except _REFUSED as e:
                    if self._fault is None:
                        log.warning("storage refused a write (%s): telemetry is held in memory", e)
                    self._fault = (fault_code(e), str(e)[:300])
                    self._retry_at = self._monotonic() + self.limits.retry_s
                    return False
                self._bytes -= self._held.popleft().size
            if self._fault is not None:
                log.info("storage takes writes again: everything held in memory is in the outbox")
            self._fault = None
            return True

    def _hold(self, item: _Held) -> None:
        with self._lock:
            self._held.append(item)
            self._bytes += item.size
            if self.flush():
                return
            if item.record is not None:          # still held (the last in line): now it counts
                item.size = len(encode(item.record))
                self._bytes += item.size
            self._enforce_bounds()

    def _store(self, item: _Held) -> None:
        if item.record is None:
            self.outbox.put(item.topic, item.payload, item.priority, ref=item.ref)
            return
        if item.seq is None:
            item.seq = self.sequence.take()          # persisted before it is used
        self._outbox_dropped += self.outbox.take_dropped()
        extra = dict(item.record.extra)
        if self._outbox_dropped:
            extra["outbox_dropped"] = self._outbox_dropped
        if self._unreported:
            extra["held_dropped"] = self._unreported
        record = replace(item.record, seq=item.seq, extra=extra)
        self.outbox.put(item.topic, encode(record), item.priority, seq=item.seq)
        self._outbox_dropped = self._unreported = 0

    def _enforce_bounds(self) -> None:
        while len(self._held) > self.limits.max_messages or self._bytes > self.limits.max_bytes:
            victim = next((h for h in self._held if h.priority == PRIORITY_TELEMETRY), self._held[0])
            self._held.remove(victim)
            self._bytes -= victim.size
            self.dropped += 1
            self._unreported += 1
            log.warning("telemetry held in memory is over its bound: dropped one (%d so far)", self.dropped)
