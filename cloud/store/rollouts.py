"""Store operations on rollouts: ``rollouts``, ``rollout_devices``, ``rollout_groups`` and
``rollout_attempts`` (private to cloud.store; see cloud.store.interface).

Every device transition is a conditional UPDATE keyed by (rollout, device, attempt, state,
update id), so two controllers on one database never apply one twice; the state each writes
is looked up in cloud.rollouts.machine's tables (:func:`device_next`, :func:`rollout_next`), so
a transition that is not a table row raises IllegalTransition before anything is written.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, NamedTuple

from edgeloop.contracts.codes import ErrorCode
from edgeloop.cloud.rollouts.machine import ACTIVE, DeviceEvent, DeviceRolloutState, device_next
from edgeloop.cloud.store._base import SqliteBase, marks
from edgeloop.cloud.store.drift_summary import WIDTH

__all__ = ["AttemptEnd", "RolloutOps"]

D, V = DeviceRolloutState, DeviceEvent
_ACTIVE = [s.value for s in ACTIVE]
MEMBERSHIP = "rollout-membership"      # the lock of every change to which active rollout holds a device


class AttemptEnd(NamedTuple):
    """One device attempt's end: the device row it was read as (device_id, state, attempt,
    rb_attempt, update_id), the event, and the code and reason to record."""

    row: dict[str, Any]
    event: DeviceEvent
    code: str | None
    reason: str | None


def _due(phase: str) -> str:
    """The devices due a command in ``phase``."""
    if phase == "rollback":
        return f"state = '{D.ROLLING_BACK}' and update_id is null"
    return f"state = '{D.PENDING}' and wave is not null"


class RolloutOps(SqliteBase):
    # -- rollouts ----------------------------------------------------------------------------
    def rollout_row(self, rollout_id: str) -> dict[str, Any] | None:
        """The rollout with ``spec`` and ``health`` decoded, or None."""
        row = self._one("select * from rollouts where rollout_id = ?", [rollout_id])
        if row is not None:
            row["spec"] = json.loads(row["spec"])
            row["health"] = json.loads(row["health"]) if row.get("health") else None
        return row

    def rollout_ids(self, active_only: bool = False) -> list[str]:
        """Active rollouts oldest first, or every rollout newest first."""
        if active_only:
            return [r["rollout_id"] for r in self._rows(f"select rollout_id from rollouts where state in "
                                                        f"({marks(_ACTIVE)}) order by created_at", _ACTIVE)]
        return [r["rollout_id"] for r in self._rows("select rollout_id from rollouts order by created_at desc")]

    def busy_devices(self, device_ids: list[str]) -> tuple[str, int] | None:
        """(an active rollout, how many of ``device_ids`` are in it), or None."""
        found: dict[str, int] = {}
        with self._lock:
            for chunk in self._chunks(device_ids):
                for r in self._rows(f"select d.rollout_id, count(*) as n from rollout_devices d join rollouts r "
                                    f"on r.rollout_id = d.rollout_id where r.state in ({marks(_ACTIVE)}) and "
                                    f"d.device_id in ({marks(chunk)}) group by d.rollout_id", [*_ACTIVE, *chunk]):
                    found[r["rollout_id"]] = found.get(r["rollout_id"], 0) + r["n"]
        return next(iter(found.items()), None)

    def insert_rollout(self, rollout: dict[str, Any], groups: list[dict[str, Any]],
                       devices: list[dict[str, Any]]) -> tuple[str, int] | None:
        """Store a new rollout (``spec`` a dict), its signed groups and its devices in one
        transaction, unless some of its devices are in an active rollout: then that rollout's
        (id, count) is returned and nothing is stored."""
        ids = [d["device_id"] for d in devices]
        with self._tx() as conn:
            # one transaction (nobody sees the rollout without its devices), and no other host's
            # membership change between the check and the insert: a device joins one active rollout
            self._exclusive(conn, MEMBERSHIP)
            busy = self.busy_devices(ids)        # checked inside the transaction
            if busy:
                return busy
            self._db["rollouts"].insert({**rollout, "spec": json.dumps(rollout["spec"])})
            self._db["rollout_groups"].insert_all(groups)
            self._db["rollout_devices"].insert_all(devices)
        return None

    def move_rollout(self, rollout_id: str, frm: str, sets: dict[str, Any]) -> bool:
        """Apply ``sets`` (its ``state`` the caller took from the transition table) if the
        rollout is still in ``frm``. Returns whether it was."""
        with self._tx() as conn:
            cur = conn.execute(f"update rollouts set {', '.join(f'{k} = ?' for k in sets)} "
                               "where rollout_id = ? and state = ?", [*sets.values(), rollout_id, frm])
        return bool(cur.rowcount)

    @contextmanager
    def rollout_step_lock(self, rollout_id: str) -> Iterator[bool]:
        """Whether this store's connection holds the rollout's step lock for the block (taken
        without waiting: False while another controller steps it). Several controllers on one
        PostgreSQL store each step a rollout only while they hold it (a session advisory lock:
        the server gives it back when the holder's session ends, a killed controller's too).
        SQLite: always True (one serve per store file)."""
        name = f"rollout-step/{rollout_id}"
        held = self.hold(name)
        try:
            yield held
        finally:
            if held:
                self.release(name)

    def set_rollout_health(self, rollout_id: str, health: dict[str, Any], now: float) -> None:
        with self._tx() as conn:
            conn.execute("update rollouts set health = ?, health_at = ? where rollout_id = ?",
                         [json.dumps(health), now, rollout_id])

    # -- signed groups -------------------------------------------------------------------------
    def rollout_group(self, rollout_id: str, kind: str, tier: str, prev: str, attempt: int) -> dict[str, Any] | None:
        return self._one("select * from rollout_groups where rollout_id = ? and kind = ? and tier = ? "
                         "and prev_version = ? and attempt = ?", [rollout_id, kind, tier, prev, attempt])

    def has_rollout_group(self, rollout_id: str, kind: str, tier: str, prev: str) -> bool:
        return bool(self._scalar("select 1 from rollout_groups where rollout_id = ? and kind = ? and tier = ? "
                                 "and prev_version = ? limit 1", [rollout_id, kind, tier, prev]))

    def add_rollout_groups(self, groups: list[dict[str, Any]]) -> None:
        """Store signed groups; one already stored (another controller signed it) is kept."""
        with self._tx():
            self._db["rollout_groups"].insert_all(groups, ignore=True)

    def rollout_update_ids(self, rollout_id: str, kind: str = "update") -> set[str]:
        return {r["update_id"] for r in self._rows("select update_id from rollout_groups where rollout_id = ? "
                                                    "and kind = ?", [rollout_id, kind])}

    # -- devices of a rollout: reads ---------------------------------------------------------------
    def rollout_device_counts(self, rollout_id: str) -> dict[str, int]:
        """Devices per state, every state present."""
        counts = {s.value: 0 for s in DeviceRolloutState}
        counts.update({r["state"]: r["n"] for r in self._rows(
            "select state, count(*) as n from rollout_devices where rollout_id = ? group by state", [rollout_id])})
        return counts

    def rollout_devices(self, rollout_id: str) -> list[dict[str, Any]]:
        """Every device row of the rollout, in dispatch order."""
        return self._rows("select * from rollout_devices where rollout_id = ? order by ord", [rollout_id])

    def rollout_attempts(self, rollout_id: str) -> list[dict[str, Any]]:
        return self._rows("select * from rollout_attempts where rollout_id = ? order by device_id, phase, attempt",
                          [rollout_id])

    def commands_sent(self, rollout_id: str) -> int:
        return int(self._scalar("select count(*) from rollout_attempts where rollout_id = ?", [rollout_id]))

    def rollout_waves(self, rollout_id: str) -> list[dict[str, Any]]:
        """(wave, n, first_sent, last_sent) per wave, in order."""
        return self._rows("select wave, count(*) as n, min(sent_at) as first_sent, max(sent_at) as last_sent "
                          "from rollout_devices where rollout_id = ? and wave is not null group by wave order by wave",
                          [rollout_id])

    def last_wave(self, rollout_id: str) -> int | None:
        return self._scalar("select max(wave) from rollout_devices where rollout_id = ?", [rollout_id])

    def wave_done(self, rollout_id: str) -> bool:
        """No device of a wave is waiting to be sent or for its result."""
        return self._scalar(f"select count(*) from rollout_devices where rollout_id = ? and "
                            f"(state = '{D.SENT}' or (state = '{D.PENDING}' and wave is not null))",
                            [rollout_id]) == 0

    def unassigned(self, rollout_id: str) -> int:
        """Devices not yet in any wave."""
        return int(self._scalar(f"select count(*) from rollout_devices where rollout_id = ? and "
                                f"state = '{D.PENDING}' and wave is null", [rollout_id]))

    def wave_progress(self, rollout_id: str, wave: int) -> dict[str, Any]:
        """One wave: its ``n`` devices, how many ``committed``, how many are ``open`` (waiting to
        be sent or for their result) and ``first_sent`` (its first command's time; None before)."""
        row = self._one(f"select count(*) as n, sum(case when state = '{D.COMMITTED}' then 1 else 0 end) as committed, "
                        f"sum(case when state in ('{D.SENT}', '{D.PENDING}') then 1 else 0 end) as open, "
                        "min(sent_at) as first_sent from rollout_devices where rollout_id = ? and wave = ?",
                        [rollout_id, wave]) or {}
        return {"n": int(row.get("n") or 0), "committed": int(row.get("committed") or 0),
                "open": int(row.get("open") or 0), "first_sent": row.get("first_sent")}

    def unacknowledged(self, rollout_id: str, now: float, after_s: float, most: int) -> list[dict[str, Any]]:
        """Devices out (sent, rolling back) whose status has never named the update they were
        sent, whose last word was not ``offline``, sent again fewer than ``most`` times in this
        attempt and last sent ``after_s`` (doubling with each resend) before ``now``: their
        row, with ``last_sent``, in dispatch order."""
        return self._rows(
            "select d.device_id, d.state, d.tier, d.prev_version, d.attempt, d.rb_attempt, d.update_id, "
            "coalesce(d.resent_at, d.sent_at) as last_sent from rollout_devices d left join devices v on "
            f"v.device_id = d.device_id where d.rollout_id = ? and d.state in ('{D.SENT}', '{D.ROLLING_BACK}') and "
            "d.update_id is not null and coalesce(d.resends, 0) < ? and coalesce(d.resent_at, d.sent_at) + ? * "
            "(case coalesce(d.resends, 0) when 0 then 1 when 1 then 2 when 2 then 4 else 8 end) <= ? and "
            "coalesce(v.update_id, '') != d.update_id and coalesce(v.state, '') != 'offline' order by d.ord",
            [rollout_id, most, after_s, now])

    def commands_resent(self, rollout_id: str) -> int:
        """Commands sent again in the devices' current attempts."""
        return int(self._scalar("select coalesce(sum(resends), 0) from rollout_devices where rollout_id = ?",
                                [rollout_id]) or 0)

    def in_flight(self, rollout_id: str) -> int:
        return int(self._scalar(f"select count(*) from rollout_devices where rollout_id = ? and "
                                f"state in ('{D.SENT}', '{D.ROLLING_BACK}')", [rollout_id]))

    def reported_results(self, rollout_id: str) -> list[dict[str, Any]]:
        """Devices out (sent, rolling back) whose status reports a final state for the very
        update they were sent: their row with the status's state ``vs`` and reason ``vr``."""
        return self._rows(
            "select d.device_id, d.state, d.attempt, d.rb_attempt, d.update_id, v.state as vs, v.reason as vr "
            "from rollout_devices d join devices v on v.device_id = d.device_id "
            f"where d.rollout_id = ? and d.state in ('{D.SENT}', '{D.ROLLING_BACK}') and d.update_id is not null "
            "and v.update_id = d.update_id and v.state in ('committed', 'failed', 'rolled_back')", [rollout_id])

    def overdue(self, rollout_id: str, now: float) -> list[dict[str, Any]]:
        """Devices out whose deadline passed before ``now``."""
        return self._rows("select device_id, state, attempt, rb_attempt, update_id from rollout_devices "
                          f"where rollout_id = ? and state in ('{D.SENT}', '{D.ROLLING_BACK}') and "
                          "update_id is not null and deadline < ?", [rollout_id, now])

    def health_totals(self, rollout_id: str, model_version: str, pct: int = 95) -> dict[bool, dict[str, Any]]:
        """The telemetry of the rollout's committed devices that ran another version before, added
        up under ``model_version`` (key True) and under that previous version (False), as
        tests/health_reference.py adds up rows: counts and sums per record (numeric columns),
        the ``pct`` percentile of the records' p50 latency (linear between the two ranks around
        it, records with inferences), and the prediction and confidence histograms from the
        devices' summaries (cloud/store/drift_summary.py). Aggregates only: no record is loaded."""
        on = (f"d.rollout_id = ? and d.state = '{D.COMMITTED}' and d.prev_version != ? and "
              "(t.model_version = ? or t.model_version = d.prev_version)")
        args = [model_version, rollout_id, model_version, model_version]
        out = {new: {"records": 0, "inferences": 0, "labelled": 0, "correct": 0, "errors": 0, "abs_err_sum": 0,
                     "err_labelled": 0, "latency_p95_ms": 0.0, "predictions": [], "confidence": []}
               for new in (True, False)}
        for r in self._rows(
                "select t.model_version = ? as new, count(*) as records, coalesce(sum(t.count), 0) as inferences, "
                "coalesce(sum(t.labelled), 0) as labelled, coalesce(sum(t.correct), 0) as correct, "
                "coalesce(sum(t.errors), 0) as errors, coalesce(sum(t.abs_err_sum), 0) as abs_err_sum, "
                "coalesce(sum(case when t.abs_err_sum is not null then t.labelled end), 0) as err_labelled "
                f"from telemetry t join rollout_devices d on d.device_id = t.device_id where {on} group by 1", args):
            out[bool(r.pop("new"))].update(r)
        ranks: dict[bool, tuple[int, dict[int, float]]] = {}
        for new, n, i, value in self._tuples(        # the ranks floor(k) and ceil(k), k = (n - 1) * pct / 100
                "select new, n, i, latency from (select t.model_version = ? as new, t.latency_ms_p50 as latency, "
                "row_number() over (partition by t.model_version = ? order by t.latency_ms_p50) - 1 as i, "
                "count(*) over (partition by t.model_version = ?) as n from telemetry t join rollout_devices d "
                f"on d.device_id = t.device_id where {on} and t.count != 0 and t.latency_ms_p50 is not null) r "
                f"where i * 100 > (n - 1) * {int(pct)} - 100 and i * 100 < (n - 1) * {int(pct)} + 100",
                [model_version, model_version, *args]):
            ranks.setdefault(bool(new), (int(n), {}))[1][int(i)] = value
        for new, (n, values) in ranks.items():
            k = (n - 1) * pct / 100
            lo, hi = values[math.floor(k)], values[math.ceil(k)]
            out[new]["latency_p95_ms"] = lo + (hi - lo) * (k - math.floor(k))
        cols = ", ".join(f"sum(t.v{j})" for j in range(WIDTH))
        hists: dict[tuple[bool, str], list[Any]] = {}
        for r in sorted(self._tuples(
                f"select t.model_version = ? as new, t.field, t.chunk, {cols} from drift_summaries t "
                f"join rollout_devices d on d.device_id = t.device_id where {on} and t.field in ('p', 'c') "
                "group by 1, 2, 3", args), key=lambda r: r[2]):
            values = hists.setdefault((bool(r[0]), r[1]), [])
            values.extend([None] * (int(r[2]) * WIDTH - len(values)))
            values.extend(r[3:])
        for (new, field), values in hists.items():
            while values and values[-1] is None:
                values.pop()
            out[new]["predictions" if field == "p" else "confidence"] = [v or 0 for v in values]
        return out

    # -- devices of a rollout: transitions -----------------------------------------------------------
    def assign_wave(self, rollout_id: str, wave: int, size: int, now: float, rate_limited: bool) -> list[str]:
        """Put the next ``size`` devices not yet in a wave (dispatch order) into ``wave``; with
        ``rate_limited``, count them into the rollout's waves (its rate limit), in the same
        transaction."""
        with self._tx() as conn:
            ids = [r[0] for r in conn.execute(f"select device_id from rollout_devices where rollout_id = ? and "
                                              f"state = '{D.PENDING}' and wave is null order by ord limit ?"
                                              f"{self.dialect.skip_locked}", [rollout_id, size])]
            for chunk in self._chunks(ids):
                conn.execute(f"update rollout_devices set wave = ? where rollout_id = ? and wave is null and "
                             f"device_id in ({marks(chunk)})", [wave, rollout_id, *chunk])
            if rate_limited:
                conn.execute("update rollouts set waves_sent = coalesce(waves_sent, 0) + ?, last_wave_at = ? "
                             "where rollout_id = ?", [len(ids), now, rollout_id])
        return ids

    def due(self, rollout_id: str, phase: str) -> list[dict[str, Any]]:
        """Devices due a command in ``phase`` ("update": pending in a wave; "rollback": rolling
        back, not yet sent), in dispatch order."""
        return self._rows(f"select device_id, tier, prev_version, attempt, rb_attempt from rollout_devices "
                          f"where rollout_id = ? and {_due(phase)} order by ord", [rollout_id])

    def mark_sent(self, rollout_id: str, phase: str, commands: dict[tuple[str, str, int], tuple[str, Any]],
                  timeouts: dict[str, float], now: float) -> list[tuple[str, Any]]:
        """The ``send`` transition for every device due a command in ``phase`` that ``commands``
        has one for, keyed by (tier, previous version or "" for updates, attempt): its attempt
        counted, its update id and deadline set, the attempt recorded, in one write transaction
        that no other writer can interleave. Returns the (device_id, command) pairs to publish
        (after this commit: a crash in between costs a resend of the same attempt, never a
        second attempt)."""
        rollback = phase == "rollback"
        column = "rb_attempt" if rollback else "attempt"
        frm = D.ROLLING_BACK if rollback else D.PENDING
        to = device_next(frm, V.SEND)
        sends: list[tuple[str, Any]] = []
        sent, attempts = [], []
        with self._tx() as conn:
            if not conn.in_transaction:
                conn.execute("begin immediate")     # no other writer between this read and the marks
            for device_id, tier, prev, attempt, rb_attempt in conn.execute(
                    f"select device_id, tier, prev_version, attempt, rb_attempt from rollout_devices "
                    f"where rollout_id = ? and {_due(phase)} order by ord{self.dialect.skip_locked}",
                    [rollout_id]).fetchall():
                n = (rb_attempt if rollback else attempt) + 1
                made = commands.get((tier, prev if rollback else "", n))
                if made is None:       # no rollback package, or a key that appeared since: the next step
                    continue
                update_id, command = made
                sent.append([to, n, update_id, now, now + float(timeouts.get(tier, 600.0)), rollout_id, device_id,
                             n - 1])
                attempts.append([rollout_id, device_id, phase, n, update_id, now])
                sends.append((device_id, command))
            conn.executemany(f"update rollout_devices set state = ?, {column} = ?, update_id = ?, sent_at = ?, "
                             f"deadline = ?, code = null, reason = null, resent_at = null, resends = 0 where rollout_id = ? and device_id = ? and "
                             f"{_due(phase)} and {column} = ?", sent)
            conn.executemany("insert into rollout_attempts (rollout_id, device_id, phase, attempt, "
                             "update_id, sent_at) values (?, ?, ?, ?, ?, ?) on conflict do nothing", attempts)
        return sends

    def mark_resent(self, rollout_id: str, rows: Iterable[dict[str, Any]], now: float) -> list[str]:
        """Record that each device's command goes out again (same attempt, same update id), if
        the row is still the one read (state, update id, last sent time): two controllers never
        resend one command twice. Returns the devices marked, whose command is to be published."""
        marked = []
        with self._tx() as conn:
            for row in rows:
                cur = conn.execute("update rollout_devices set resent_at = ?, resends = coalesce(resends, 0) + 1 "
                                   "where rollout_id = ? and device_id = ? and state = ? and update_id = ? and "
                                   "coalesce(resent_at, sent_at) = ?", [now, rollout_id, row["device_id"], row["state"],
                                                                        row["update_id"], row["last_sent"]])
                if cur.rowcount:
                    marked.append(row["device_id"])
        return marked

    def add_rollout_devices(self, rollout_id: str, groups: list[dict[str, Any]], devices: list[dict[str, Any]],
                            spec: dict[str, Any] | None = None) -> list[str]:
        """Add devices (and the signed groups they need; with ``spec``, the rollout's spec
        becomes it) to a rollout that is still active and not aborting, in one transaction; a
        device already in this rollout or in another active one is left out. Returns the ids
        added."""
        ids = [d["device_id"] for d in devices]
        live = [s for s in _ACTIVE if s != "aborting"]
        with self._tx() as conn:
            self._exclusive(conn, MEMBERSHIP)       # no other membership change between this read and the insert
            if not conn.execute(f"select 1 from rollouts where rollout_id = ? and state in ({marks(live)})",
                                [rollout_id, *live]).fetchone():
                return []
            taken: set[str] = set()
            for chunk in self._chunks(ids):
                taken.update(r[0] for r in conn.execute(
                    f"select d.device_id from rollout_devices d join rollouts r on r.rollout_id = d.rollout_id "
                    f"where (d.rollout_id = ? or r.state in ({marks(_ACTIVE)})) and d.device_id in ({marks(chunk)})",
                    [rollout_id, *_ACTIVE, *chunk]))
            added = [d for d in devices if d["device_id"] not in taken]
            if spec is not None:
                conn.execute("update rollouts set spec = ? where rollout_id = ?", [json.dumps(spec), rollout_id])
            self._db["rollout_groups"].insert_all(groups, ignore=True)
            self._db["rollout_devices"].insert_all(added)
        return [d["device_id"] for d in added]

    def ended_rollout_groups(self) -> list[str]:
        """The director groups signed for every rollout that has ended (completed or aborted)."""
        return [r["grp"] for r in self._rows(f"select g.grp from rollout_groups g join rollouts r on "
                                             f"r.rollout_id = g.rollout_id where r.state not in ({marks(_ACTIVE)})",
                                             _ACTIVE)]

    def end_attempts(self, rollout_id: str, ends: Iterable[AttemptEnd], now: float) -> int:
        """Devices' attempts end: each row moves to the state its event takes it to (a ``retry``
        clears its update id for the next send; any other event records ``finished_at``) and its
        attempt records the outcome, all in one transaction. Idempotent: keyed by (rollout,
        device, state, attempt, update id); an attempt already closed keeps its outcome. Returns
        how many devices moved. Raises IllegalTransition, writing nothing, for a pair that is not
        a row of the device table."""
        batches: dict[tuple[str, str], tuple[list[list[Any]], list[list[Any]]]] = {}
        for end in ends:
            row = end.row
            to = device_next(row["state"], end.event)
            retry = end.event == V.RETRY
            rollback = row["state"] == D.ROLLING_BACK
            phase, column = ("rollback", "rb_attempt") if rollback else ("update", "attempt")
            sets = "state = ?, code = ?, reason = ?, " + ("update_id = null" if retry else "finished_at = ?")
            sql = (f"update rollout_devices set {sets} where rollout_id = ? and device_id = ? and state = ? and "
                   f"{column} = ? and update_id = ?")
            devices, attempts = batches.setdefault((sql, phase), ([], []))
            devices.append([to, end.code, end.reason, *([] if retry else [now]), rollout_id, row["device_id"],
                            row["state"], row[column], row["update_id"]])
            attempts.append([("retry:" if retry else "") + (end.code or to), end.code, now, rollout_id,
                             row["device_id"], phase, row[column]])
        changes = 0
        with self._tx() as conn:
            for (sql, _), (devices, attempts) in batches.items():
                changes += conn.executemany(sql, devices).rowcount
                conn.executemany("update rollout_attempts set outcome = ?, code = ?, finished_at = ? where "
                                 "rollout_id = ? and device_id = ? and phase = ? and attempt = ? and "
                                 "outcome is null", attempts)
        return changes

    def abort_devices(self, rollout_id: str, model_version: str, now: float) -> int:
        """The abort transitions, in one transaction: devices never sent are cancelled; devices
        that committed roll back, or fail their rollback when there is nothing to roll back to
        (no previous version, or no package of it for their tier); devices that timed out but
        run ``model_version`` all the same roll back too. Returns how many devices moved."""
        cancel, none = device_next(D.PENDING, V.CANCEL), device_next(D.COMMITTED, V.NO_ROLLBACK)
        back, late = device_next(D.COMMITTED, V.ROLL_BACK), device_next(D.TIMED_OUT, V.ROLL_BACK)
        rid, mv = rollout_id, model_version
        has_rollback = ("exists (select 1 from rollout_groups g where g.rollout_id = ? and g.kind = 'rollback' and "
                        "g.tier = rollout_devices.tier and g.prev_version = rollout_devices.prev_version)")
        with self._tx() as conn:
            changes = conn.execute("update rollout_devices set state = ?, finished_at = ? where rollout_id = ? and "
                                   "state = ?", [cancel, now, rid, D.PENDING]).rowcount
            changes += conn.execute(
                "update rollout_devices set state = ?, finished_at = ?, code = ?, "
                "reason = 'no previous version to roll back to' where rollout_id = ? and state = ? "
                "and prev_version = ''", [none, now, ErrorCode.ROLLBACK_NONE, rid, D.COMMITTED]).rowcount
            changes += conn.execute(
                "update rollout_devices set state = ?, finished_at = ?, code = ?, "
                "reason = 'no package of the previous version for this tier' where rollout_id = ? and "
                f"state = ? and prev_version not in ('', ?) and not {has_rollback}",
                [none, now, ErrorCode.ROLLBACK_NONE, rid, D.COMMITTED, mv, rid]).rowcount
            changes += conn.execute(
                "update rollout_devices set state = ?, update_id = null where rollout_id = ? and "
                "state = ? and prev_version not in ('', ?)", [back, rid, D.COMMITTED, mv]).rowcount
            # a device that timed out but installed the update late runs it all the same: back with it
            changes += conn.execute(
                "update rollout_devices set state = ?, update_id = null where rollout_id = ? and "
                "state = ? and prev_version not in ('', ?) and exists (select 1 from devices v where "
                f"v.device_id = rollout_devices.device_id and v.model_version = ?) and {has_rollback}",
                [late, rid, D.TIMED_OUT, mv, mv, rid]).rowcount
        return changes
