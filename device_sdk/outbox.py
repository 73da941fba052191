"""Store-and-forward: what a device must send survives disconnects and restarts.

Telemetry records and error reports go into a bounded SQLite outbox first (WAL, one row per
message, in order). A message with neither a sequence number nor a report id leaves it when
the broker acknowledges it (QoS 1 PUBACK). A telemetry record (it has ``seq``) or an error
report (it has ``ref``, its report_id) is kept after the PUBACK, marked with when the broker
took it, until the ingest confirms it stored it
(:meth:`Outbox.confirm`, from an ``edgeloop.telemetry_ack/1``): the broker taking a message is not
the store having it (a broker restarted before any ingest worker subscribed again delivers it
to nobody). :mod:`edgeloop.device_sdk.delivery` sends, resends and deletes.

While offline the outbox grows up to ``max_bytes`` and ``max_age_s``; beyond that the oldest
lowest-priority messages are dropped first, and the number dropped is kept so the next
telemetry record can report it. On reconnect, or after a restart, the outbox is flushed in
order. A message may be sent twice (acknowledgement lost); receivers deduplicate on
(device_id, seq).

A write the disk refuses (full, read-only) raises :class:`~device_sdk.errors.StorageError` with
the fault's code and changes nothing; the agent then holds the message in memory
(device_sdk/spool.py) and hands it over again, in order, once the disk takes writes.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from edgeloop.contracts.codes import ErrorCode
from edgeloop.device_sdk.errors import StorageError
from edgeloop.device_sdk.storage import fault_code

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
    seq: int | None = None        # a telemetry record's sequence number (waits for the ingest's confirmation)
    ref: str | None = None        # an error report's report_id (waits for confirmation too)
    resend: bool = False          # taken by the broker before, never confirmed: this is a resend

    @property
    def awaits_confirmation(self) -> bool:
        """Deleted only when the ingest confirms it (a telemetry record, or an error report with an id)."""
        return self.seq is not None or self.ref is not None


def _fault(error: sqlite3.Error) -> ErrorCode:
    """What SQLite's refusal says about the disk (its primary result code)."""
    code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
    if code == sqlite3.SQLITE_FULL:
        return ErrorCode.STORAGE_FULL
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_CANTOPEN):
        return ErrorCode.STORAGE_READONLY
    return ErrorCode.STORAGE_WRITE


class Outbox:
    def __init__(self, path: Path, config: OutboxConfig = OutboxConfig()) -> None:
        """``path``: the SQLite file (``Path(":memory:")``: the same outbox, lost on exit; for
        simulated devices that never restart). Raises StorageError when the disk will not open
        or create it (full, read-only)."""
        self.config = config
        self._lock = threading.Lock()
        try:
            self._open(path)
        except sqlite3.Error as e:
            raise StorageError(f"cannot open the outbox {path}: {e}", _fault(e)) from e
        except OSError as e:
            raise StorageError(f"cannot open the outbox {path}: {e}", fault_code(e)) from e

    def _open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT, "
                         "payload BLOB, priority INTEGER, created REAL, size INTEGER)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
        for name, kind in (("seq", "INTEGER"), ("taken_at", "REAL"), ("ref", "TEXT")):   # older outboxes
            if name not in columns:
                self._db.execute(f"ALTER TABLE outbox ADD COLUMN {name} {kind}")
        self._db.execute("CREATE INDEX IF NOT EXISTS outbox_seq ON outbox (seq) WHERE seq IS NOT NULL")
        self._db.execute("CREATE INDEX IF NOT EXISTS outbox_ref ON outbox (ref) WHERE ref IS NOT NULL")

    def put(self, topic: str, payload: bytes, priority: int = PRIORITY_TELEMETRY, seq: int | None = None,
            ref: str | None = None) -> None:
        """Keep a message to send. ``seq`` (a telemetry record's sequence number) or ``ref`` (an
        error report's id) makes it wait for the ingest's confirmation after the broker took it."""
        with self._writing("keep a message"):
            self._db.execute("INSERT INTO outbox (topic, payload, priority, created, size, seq, ref) VALUES "
                             "(?, ?, ?, ?, ?, ?, ?)", (topic, payload, priority, time.time(), len(payload), seq, ref))
            self._enforce_bounds()

    def pending(self, limit: int, after: int = 0, resend_before: float | None = None) -> list[Pending]:
        """In order: messages after id ``after`` (not yet sent on this connection), and, with
        ``resend_before``, messages the broker took before that time that are still unconfirmed."""
        sql = "SELECT id, topic, payload, seq, ref, taken_at IS NOT NULL AND id <= ? FROM outbox WHERE id > ?"
        args: list[float | int] = [after, after]
        if resend_before is not None:
            sql += " OR (taken_at IS NOT NULL AND taken_at < ?)"
            args.append(resend_before)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        return [Pending(i, t, p, s, ref, bool(r)) for i, t, p, s, ref, r in rows]

    def ack(self, message_id: int) -> None:
        """The message is done with: delete it."""
        with self._writing("delete a sent message"):
            self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))

    def taken(self, message_id: int) -> None:
        """The broker took the message (or it is being sent again): it waits for confirmation
        from now on (the resend clock restarts)."""
        with self._writing("mark a message taken"):
            self._db.execute("UPDATE outbox SET taken_at = ? WHERE id = ?", (time.time(), message_id))

    def confirm(self, seqs: list[int], refs: list[str] | None = None) -> int:
        """The ingest stored these telemetry records (and error reports): delete them. Returns how
        many were here."""
        if not seqs and not refs:
            return 0
        with self._writing("delete confirmed messages"):
            before = self._db.total_changes
            self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])
            self._db.executemany("DELETE FROM outbox WHERE ref = ?", [(r,) for r in refs or ()])
            return self._db.total_changes - before

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]

    def unsent(self) -> int:
        """Messages the broker has not taken yet (not counting those waiting for confirmation)."""
        with self._lock:
            return self._db.execute("SELECT count(*) FROM outbox WHERE taken_at IS NULL").fetchone()[0]

    def take_dropped(self) -> int:
        """How many messages were dropped since the last call (and reset the count)."""
        with self._writing("reset the drop count"):
            row = self._db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('dropped', 0)")
        return int(row[0]) if row else 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Under the lock; an sqlite error (the disk full or read-only) becomes StorageError."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as e:
                raise StorageError(f"outbox cannot {what}: {e}", _fault(e)) from e

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
