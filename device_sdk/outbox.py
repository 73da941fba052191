"""Store-and-forward: what a device must send survives disconnects and restarts.

Telemetry records and error reports go into a bounded SQLite outbox first (WAL, one row per
message, in order) and leave it only when the broker acknowledges them (QoS 1 PUBACK). While
offline the outbox grows up to ``max_bytes`` and ``max_age_s``; beyond that the oldest
lowest-priority messages are dropped first, and the number dropped is kept so the next
telemetry record can report it. On reconnect, or after a restart, the outbox is flushed in
order. A message may be sent twice (acknowledgement lost); receivers deduplicate on
(device_id, seq).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Outbox", "OutboxConfig", "Pending"]

PRIORITY_TELEMETRY = 0
PRIORITY_ERROR = 1


@dataclass(frozen=True)
class OutboxConfig:
    max_bytes: int = 16 * 1024 * 1024
    max_age_s: float = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Pending:
    id: int
    topic: str
    payload: bytes


class Outbox:
    def __init__(self, path: Path, config: OutboxConfig = OutboxConfig()) -> None:
        self.config = config
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT, "
                         "payload BLOB, priority INTEGER, created REAL, size INTEGER)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")

    def put(self, topic: str, payload: bytes, priority: int = PRIORITY_TELEMETRY) -> None:
        with self._lock:
            self._db.execute("INSERT INTO outbox (topic, payload, priority, created, size) VALUES (?, ?, ?, ?, ?)",
                             (topic, payload, priority, time.time(), len(payload)))
            self._enforce_bounds()

    def pending(self, limit: int, after: int = 0) -> list[Pending]:
        with self._lock:
            rows = self._db.execute("SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                                    (after, limit)).fetchall()
        return [Pending(*r) for r in rows]

    def ack(self, message_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]

    def take_dropped(self) -> int:
        """How many messages were dropped since the last call (and reset the count)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', 0)")
        return int(row[0]) if row else 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _enforce_bounds(self) -> None:
        dropped = self._db.execute("DELETE FROM outbox WHERE created < ?",
                                   (time.time() - self.config.max_age_s,)).rowcount
        total = self._db.execute("SELECT coalesce(sum(size), 0) FROM outbox").fetchone()[0]
        while total > self.config.max_bytes:
            victim = self._db.execute("SELECT id, size FROM outbox ORDER BY priority, id LIMIT 1").fetchone()
            if victim is None:
                break
            self._db.execute("DELETE FROM outbox WHERE id = ?", (victim[0],))
            total -= victim[1]
            dropped += 1
        if dropped:
            self._db.execute("INSERT INTO meta VALUES ('dropped', ?) ON CONFLICT(key) DO UPDATE SET "
                             "value = value + excluded.value", (dropped,))
