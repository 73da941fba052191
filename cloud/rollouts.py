"""Staged rollouts: send a model version to a selected part of the fleet, carefully.

Public API (everything else is private)::

    spec = RolloutSpec(model_version="digits-mlp:2", target="tier=edge-gateway,tag=site=berlin",
                       strategy="canary", canary="10%", bake_s=60, rate_per_min=1000, growth=2.0,
                       max_failure_pct=10, min_devices=5)
    ctl = RolloutController(ws, registry, send=cp.send_command, repository_url=url)
    rollout_id = ctl.create(spec)          # validates, signs, persists: state "pending"
    ctl.step()                             # advance every active rollout; call it in a loop
    ctl.pause(rollout_id); ctl.resume(rollout_id); ctl.abort(rollout_id, reason="...")
    ctl.status(rollout_id) -> dict         # state, counts per device state, progress, health
    ctl.list() -> list[dict]               # every rollout, newest first
    ctl.run(stop_event)                    # step() every second until stopped (edgeloop serve)

- ``send(device_id, Command)`` is the only way out (the control plane publishes it QoS 1 on
  ``devices/<id>/cmd``); a test passes a fake. ``clock`` (default ``time.time``) is the only
  time source, so tests drive it. ``step(now=None)`` returns the number of transitions made.
- State lives in the registry's SQLite db (WAL): tables ``rollouts``, ``rollout_devices``,
  ``rollout_groups`` and ``rollout_attempts``. A controller built again on the same db
  carries on where the last one stopped: every transition is an idempotent conditional
  UPDATE keyed by (rollout, device, attempt), counts are derived from the rows, and a device
  is marked ``sent`` before its command is published (a crash in between costs a timeout and
  a retry, never a duplicate).

Rollout states (:class:`RolloutState`; :data:`TRANSITIONS` is the table)::

    pending -> canary -> baking -> waves -> completed        (strategy "canary")
    pending -> waves -> completed                             ("waves"; "all" is one wave)
    any active state -> paused -> (back where it was)         (pause / resume)
    any active state -> aborting -> aborted                   (abort criteria, or abort())

Device states per rollout (:class:`DeviceRolloutState`)::

    pending -> sent -> committed | failed | timed_out         (attempt counted on each send)
    sent -> pending (next attempt)       transient failure (download, timeout), attempts left
    pending -> cancelled                 never sent before the rollout was aborted
    committed -> rolling_back -> rolled_back | rollback_failed    (on abort)
    timed_out -> rolling_back            on abort, if it installed the update late after all

Abort criteria: install failures (failed + timed_out, final ones only) over
``max_failure_pct`` percent of the finished devices, once ``min_devices`` finished; and model
health, from the telemetry of the committed devices against their own previous version:
error-rate increase over ``max_error_rate``, p95 latency increase over ``max_latency_p95_ms``,
Jensen-Shannon distance of the prediction histograms over ``max_prediction_js``, mean
confidence drop over ``max_confidence_drop``, the task's metric worse by more than
``max_quality_drop`` on labelled inferences (accuracy drop; regression: relative MAE rise) (each
None: not checked), once both versions have ``health_min_inferences`` inferences. See
docs/rollouts.md.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable

from tuf.api.metadata import TargetFile

from contracts.messages import Announce, Command
from contracts.topics import assignment_path
from cloud.errors import NotFound, UserError
from cloud.registry import Registry
from cloud.rollout_health import compare, js_distance
from cloud.tiers import tier as tier_profile
from cloud.workspace import Workspace

log = logging.getLogger("edgeloop.rollouts")

__all__ = ["ACTIVE", "DEVICE_STATES", "ROLLOUT_STATES", "DeviceRolloutState", "RolloutController", "RolloutSpec",
           "RolloutState", "Sender",
           "js_distance", "parse_selector"]

Sender = Callable[[str, Command], Any]



class RolloutState(StrEnum):
    """A rollout's state (stable names, stored in ``rollouts.state``)."""

    PENDING = "pending"        # created; the next step starts it
    CANARY = "canary"          # the canary wave is out
    BAKING = "baking"          # the canary finished; watching it for ``bake_s``
    WAVES = "waves"            # growing waves, rate-limited
    PAUSED = "paused"          # nothing new is sent; results still count
    ABORTING = "aborting"      # rolling the updated devices back
    COMPLETED = "completed"
    ABORTED = "aborted"


class DeviceRolloutState(StrEnum):
    """One device's state in one rollout (``rollout_devices.state``)."""

    PENDING = "pending"                  # not sent yet, or waiting for its next attempt
    SENT = "sent"                        # command published; waiting for its result or deadline
    COMMITTED = "committed"
    FAILED = "failed"                    # refused, failed its health check, or out of retries
    TIMED_OUT = "timed_out"              # no result within the tier's deadline, out of retries
    CANCELLED = "cancelled"              # never sent before the rollout was aborted
    ROLLING_BACK = "rolling_back"        # rollback command due or out
    ROLLED_BACK = "rolled_back"          # back on its previous version
    ROLLBACK_FAILED = "rollback_failed"


ROLLOUT_STATES = tuple(s.value for s in RolloutState)
ACTIVE = ("pending", "canary", "baking", "waves", "paused", "aborting")
DEVICE_STATES = tuple(s.value for s in DeviceRolloutState)
STEP_INTERVAL_S = 1.0
_FINAL_INSTALL = ("committed", "failed", "timed_out")
STRATEGIES = ("all", "canary", "waves")
SELECTOR_KEYS = ("tier", "tag", "group", "device")
_TRANSIENT_PREFIXES = ("transport.", "agent.internal")

# rollout state machine: (from, to) pairs a transition may take
TRANSITIONS = {
    ("pending", "canary"), ("pending", "waves"), ("canary", "baking"), ("baking", "waves"),
    ("waves", "completed"), ("canary", "completed"),
    *((s, "paused") for s in ("pending", "canary", "baking", "waves")),
    *(("paused", s) for s in ("pending", "canary", "baking", "waves")),
    *((s, "aborting") for s in ("pending", "canary", "baking", "waves", "paused")),
    ("aborting", "aborted"),
}


@dataclass(frozen=True)
class RolloutSpec:
    """What to roll out where, and how carefully. ``canary``: a device count ("5") or a share
    ("10%"). ``rate_per_min``: waves never send faster than this (None: no limit). ``growth``:
    each wave is this many times the previous one, starting from ``wave_size`` (default: the
    canary's size, or 1). ``timeout_s``: per-device deadline (None: the tier's
    ``in_progress_timeout_s``). ``retries``: extra attempts after a transient failure."""

    model_version: str
    target: str
    strategy: str = "all"
    canary: str | None = None
    bake_s: float = 0.0
    rate_per_min: float | None = None
    growth: float = 2.0
    wave_size: int | None = None
    max_failure_pct: float = 10.0
    min_devices: int = 1
    retries: int = 2
    timeout_s: float | None = None
    max_error_rate: float | None = None
    max_latency_p95_ms: float | None = None
    max_prediction_js: float | None = None
    max_confidence_drop: float | None = None
    max_quality_drop: float | None = None   # the task's metric: accuracy drop, or relative MAE rise
    health_min_inferences: int = 20
    health_interval_s: float = 5.0
    include_offline: bool = False      # also select devices whose last word was "offline" (they time out)

    def validate(self) -> None:
        """Raises UserError naming the first bad field."""
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown strategy {self.strategy!r}; use one of: {', '.join(STRATEGIES)}")
        if self.strategy == "canary" and not self.canary:
            raise UserError("the canary strategy needs --canary N or --canary P%")
        if self.canary is not None:
            _canary_count(self.canary, 100)   # checks the syntax
        checks = [("bake_s", self.bake_s >= 0), ("growth", self.growth >= 1.0),
                  ("rate_per_min", self.rate_per_min is None or self.rate_per_min > 0),
                  ("wave_size", self.wave_size is None or self.wave_size >= 1),
                  ("max_failure_pct", 0 <= self.max_failure_pct <= 100), ("min_devices", self.min_devices >= 1),
                  ("retries", 0 <= self.retries <= 100), ("timeout_s", self.timeout_s is None or self.timeout_s > 0),
                  ("health_min_inferences", self.health_min_inferences >= 1)]
        checks += [(name, getattr(self, name) is None or getattr(self, name) >= 0)
                   for name in ("max_error_rate", "max_latency_p95_ms", "max_prediction_js", "max_confidence_drop",
                                "max_quality_drop")]
        for name, ok in checks:
            if not ok:
                raise UserError(f"invalid rollout setting {name} = {getattr(self, name)!r}")

    def to_obj(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> RolloutSpec:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in names})


def _canary_count(canary: str, total: int) -> int:
    text = str(canary).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", text)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise UserError(f"canary share {text} must be over 0% and at most 100%")
        return max(1, math.ceil(total * pct / 100))
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"invalid canary {text!r}: give a device count (5) or a share (10%)")
    return min(int(text), total)


def parse_selector(text: str) -> dict[str, list[str]]:
    """``tier=edge-gateway,tag=site=berlin,group=g1`` -> {"tier": [...], ...}; terms combine with
    AND. ``tag=K=V`` matches tag K with value V; ``tag=X`` a tag named X or with value X."""
    terms: dict[str, list[str]] = {}
    if not text or not text.strip():
        raise UserError("empty target selector; use for example --target tier=edge-gateway")
    for term in text.split(","):
        key, sep, value = term.strip().partition("=")
        if not sep or not value:
            raise UserError(f"selector term {term.strip()!r} is not KEY=VALUE (keys: {', '.join(SELECTOR_KEYS)})")
        if key not in SELECTOR_KEYS:
            raise UserError(f"unknown selector key {key!r}; use: {', '.join(SELECTOR_KEYS)}")
        terms.setdefault(key, []).append(value)
    return terms


def _matches(device: dict[str, Any], terms: dict[str, list[str]]) -> bool:
    tags = device.get("tags") or {}
    for key, values in terms.items():
        for value in values:
            if key == "tier" and device.get("tier") != value:
                return False
            if key == "device" and device["device_id"] != value:
                return False
            if key == "group" and value not in (device.get("groups") or []):
                return False
            if key == "tag":
                k, sep, v = value.partition("=")
                if sep and tags.get(k) != v:
                    return False
                if not sep and value not in tags and value not in tags.values():
                    return False
    return True


class RolloutController:
    """The rollout state machine over the registry db; see the module docstring."""

    def __init__(self, ws: Workspace, registry: Registry, send: Sender, repository_url: str | None = None,
                 director_url: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.ws, self.registry, self.send, self.clock = ws, registry, send, clock
        self.repository_url = repository_url
        self.director_url = director_url or (repository_url.rstrip("/").rsplit("/", 1)[0] + "/director"
                                             if repository_url else None)
        self.db = registry.db
        self._lock = registry._lock
        self._sign_lock = threading.Lock()     # one signer of the repositories in this process
        self._create_tables()

    def run(self, stop: threading.Event, interval_s: float = STEP_INTERVAL_S, until: float | None = None) -> None:
        """Call :meth:`step` every ``interval_s`` until ``stop`` is set or ``until`` (a time) passes."""
        while not stop.is_set() and (until is None or time.time() < until):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a busy or failing db must not stop the control plane
                log.exception("rollout step failed; retrying in %.1f s", interval_s)
            stop.wait(interval_s if until is None else max(0.0, min(interval_s, until - time.time())))

    # -- schema ---------------------------------------------------------------------------
    def _create_tables(self) -> None:
        with self._lock:
            t = self.db.table
            t("rollouts", pk="rollout_id").create(
                {"rollout_id": str, "model_version": str, "target": str, "spec": str, "state": str,
                 "paused_from": str, "reason": str, "created_at": float, "updated_at": float,
                 "bake_until": float, "waves_started_at": float, "waves_sent": int, "last_wave_at": float,
                 "health": str, "health_at": float, "finished_at": float}, if_not_exists=True)
            t("rollout_devices", pk=("rollout_id", "device_id")).create(
                {"rollout_id": str, "device_id": str, "tier": str, "prev_version": str, "ord": str,
                 "state": str, "attempt": int, "wave": int, "update_id": str, "sent_at": float,
                 "deadline": float, "code": str, "reason": str, "finished_at": float, "rb_attempt": int},
                if_not_exists=True)
            t("rollout_devices").create_index(["rollout_id", "state"], if_not_exists=True)
            t("rollout_devices").create_index(["device_id"], if_not_exists=True)
            t("rollout_groups", pk=("rollout_id", "kind", "tier", "prev_version", "attempt")).create(
                {"rollout_id": str, "kind": str, "tier": str, "prev_version": str, "attempt": int,
                 "grp": str, "update_id": str, "announce": str}, if_not_exists=True)
            t("rollout_attempts", pk=("rollout_id", "device_id", "phase", "attempt")).create(
                {"rollout_id": str, "device_id": str, "phase": str, "attempt": int, "update_id": str,
                 "sent_at": float, "outcome": str, "code": str, "finished_at": float}, if_not_exists=True)

    # -- create ---------------------------------------------------------------------------
    def create(self, spec: RolloutSpec, now: float | None = None) -> str:
        """Validate, sign the update (and the rollback of each device's current version), and
        persist a ``pending`` rollout. Raises UserError with nothing changed for bad input."""
        from cloud.fleet_registry import FleetRegistry

        now = self.clock() if now is None else now
        spec.validate()
        if self.repository_url is None:
            raise UserError("no repository URL for the devices to download from (start: edgeloop serve)")
        self.registry.model_version(spec.model_version)            # NotFound if unknown
        terms = parse_selector(spec.target)
        fleet = FleetRegistry(self.registry)
        devices = [d for d in fleet.devices() if _matches(d, terms) and not d["revoked"] and d.get("tier")]
        if not devices:
            raise UserError(f"selector {spec.target!r} matches no devices (see: edgeloop devices)")
        # a device whose last will said "offline" cannot answer before its deadline: selected, it
        # would count as a failure and could abort the rollout for everyone else
        skipped = [] if spec.include_offline else sorted(d["device_id"] for d in devices if d.get("state") == "offline")
        if skipped:
            devices = [d for d in devices if d.get("state") != "offline"]
            if not devices:
                raise UserError(f"all {len(skipped)} devices {spec.target!r} matches are offline; "
                                "roll out when they are back, or select them anyway with --include-offline")
        tiers = sorted({d["tier"] for d in devices})
        for tier in tiers:
            try:
                self.registry.package_for(spec.model_version, tier)
            except NotFound:
                raise UserError(f"{spec.model_version} is not packaged for tier {tier} "
                                f"(run: edgeloop package {spec.model_version} --tier {tier})") from None
        ids = [d["device_id"] for d in devices]
        busy = self._busy(ids)
        if busy:
            rid, n = busy
            raise UserError(f"{n} of these devices are in active rollout {rid}; wait for it, or: "
                            f"edgeloop rollout abort {rid}")
        rid = f"ro-{uuid.uuid4().hex[:10]}"
        profiles = {tier: tier_profile(tier, self.ws.root) for tier in tiers}
        # sign: the update per tier, and a rollback per (tier, previous version) that has a package
        wanted = [("update", tier, "", spec.model_version) for tier in tiers]
        prevs = sorted({(d["tier"], d["model_version"]) for d in devices
                        if d.get("model_version") and d["model_version"] != spec.model_version})
        for tier, prev in prevs:
            try:
                self.registry.package_for(prev, tier)
                wanted.append(("rollback", tier, prev, prev))
            except NotFound:
                log.warning("rollout %s: no %s package of %s to roll back to", rid, tier, prev)
        groups = self._sign(rid, [(kind, tier, prev, mv, 1) for kind, tier, prev, mv in wanted], now,
                            self._delta_bases(spec.model_version, devices))
        rows = [{"rollout_id": rid, "device_id": d["device_id"], "tier": d["tier"],
                 "prev_version": d.get("model_version") or "", "state": "pending", "attempt": 0, "rb_attempt": 0,
                 "ord": sha256(f"{rid}/{d['device_id']}".encode()).hexdigest()[:16]} for d in devices]
        obj = spec.to_obj()
        obj["timeouts"] = {t: spec.timeout_s or p.in_progress_timeout_s for t, p in profiles.items()}
        obj["skipped_offline"] = skipped
        with self._lock, self.db.conn:
            busy = self._busy(ids)                 # checked again inside the transaction
            if busy:
                raise UserError(f"{busy[1]} of these devices are in active rollout {busy[0]}")
            self.db["rollouts"].insert({"rollout_id": rid, "model_version": spec.model_version,
                                        "target": spec.target, "spec": json.dumps(obj), "state": "pending",
                                        "created_at": now, "updated_at": now, "waves_sent": 0})
            self.db["rollout_groups"].insert_all(groups)
            self.db["rollout_devices"].insert_all(rows)
        fleet.set_target(ids, spec.model_version)
        return rid

    def _busy(self, ids: list[str]) -> tuple[str, int] | None:
        active = ",".join("?" * len(ACTIVE))
        with self._lock:
            found: dict[str, int] = {}
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                for r in self.db.query(
                        f"select d.rollout_id, count(*) as n from rollout_devices d join rollouts r "
                        f"on r.rollout_id = d.rollout_id where r.state in ({active}) and d.device_id in "
                        f"({','.join('?' * len(chunk))}) group by d.rollout_id", [*ACTIVE, *chunk]):
                    found[r["rollout_id"]] = found.get(r["rollout_id"], 0) + r["n"]
        return next(iter(found.items()), None)

    def _sign(self, rid: str, wanted: list[tuple[str, str, str, str, int]], now: float,
              bases: dict[tuple[str, str, str], str] | None = None) -> list[dict[str, Any]]:
        """Release the update and rollback groups through the one release path (cloud/release.py:
        image repository, delta from ``bases[(kind, tier, prev)]``, director, updates), in one
        director signing; returns the rollout_groups rows. Raises IntegrityError, with nothing
        assigned, for a package the two repositories would disagree on."""
        from cloud.release import Assignment, Releaser

        assignments = []
        for kind, tier, prev, mv, attempt in wanted:
            group = f"{rid}-{'u' if kind == 'update' else 'r'}{attempt}-{tier}"[:64]
            if kind == "rollback":
                group = f"{rid}-r{attempt}-{sha256(f'{tier}/{prev}'.encode()).hexdigest()[:8]}"
            # derived, not random: two control-plane workers signing the same retry sign the same thing
            assignments.append(Assignment(group, mv, tier, f"{rid}/{kind}/{tier}/{prev}/{attempt}",
                                          delta_base=(bases or {}).get((kind, tier, prev))))
        releaser = Releaser(self.ws, self.registry, self.repository_url or "", self.director_url)
        released = releaser.release(assignments, now)
        return [{"rollout_id": rid, "kind": kind, "tier": tier, "prev_version": prev, "attempt": attempt,
                 "grp": r.announce.group, "update_id": r.announce.update_id, "announce": json.dumps(asdict(r.announce))}
                for (kind, tier, prev, _, attempt), r in zip(wanted, released)]

    def _delta_bases(self, model_version: str, devices: list[dict[str, Any]]) -> dict[tuple[str, str, str], str]:
        """What each group's devices run now: an update group's most common previous package in
        its tier, a rollback group's the package it rolls back from."""
        bases: dict[tuple[str, str, str], str] = {}
        runs: dict[str, dict[str, int]] = {}
        for d in devices:
            if d.get("model_version") and d["model_version"] != model_version:
                counts = runs.setdefault(d["tier"], {})
                counts[d["model_version"]] = counts.get(d["model_version"], 0) + 1
        for tier, counts in runs.items():
            try:
                bases[("update", tier, "")] = self.registry.package_for(max(counts, key=counts.get), tier)["sha256"]
                new = self.registry.package_for(model_version, tier)["sha256"]
            except NotFound:
                continue
            bases.update({("rollback", tier, prev): new for prev in counts})
        return bases

    def _group(self, rid: str, kind: str, tier: str, prev: str, attempt: int, mv: str, now: float) -> dict | None:
        """The signed group for this attempt, signing it now if it is a retry's first use."""
        with self._lock:
            rows = list(self.db.query("select * from rollout_groups where rollout_id = ? and kind = ? and tier = ? "
                                      "and prev_version = ? and attempt = ?", [rid, kind, tier, prev, attempt]))
        if rows:
            return rows[0]
        if kind == "rollback" and not self._has_group(rid, kind, tier, prev):
            return None
        made = self._sign(rid, [(kind, tier, prev, mv, attempt)], now)
        with self._lock, self.db.conn:
            self.db["rollout_groups"].insert_all(made, ignore=True)
        return self._group(rid, kind, tier, prev, attempt, mv, now)

    def _has_group(self, rid: str, kind: str, tier: str, prev: str) -> bool:
        with self._lock:
            return bool(list(self.db.query("select 1 from rollout_groups where rollout_id = ? and kind = ? and "
                                           "tier = ? and prev_version = ? limit 1", [rid, kind, tier, prev])))

    # -- operator actions -------------------------------------------------------------------
    def rollout(self, rollout_id: str) -> dict[str, Any]:
        with self._lock:
            rows = list(self.db.query("select * from rollouts where rollout_id = ?", [rollout_id]))
        if not rows:
            raise NotFound(f"no rollout {rollout_id!r} (see: edgeloop rollout ls)")
        row = rows[0]
        row["spec"] = json.loads(row["spec"])
        row["health"] = json.loads(row["health"]) if row.get("health") else None
        return row

    def pause(self, rollout_id: str, now: float | None = None) -> None:
        r = self.rollout(rollout_id)
        if r["state"] not in ("pending", "canary", "baking", "waves"):
            raise UserError(f"rollout {rollout_id} is {r['state']}; only an active rollout can be paused")
        self._move(rollout_id, r["state"], "paused", now, paused_from=r["state"])

    def resume(self, rollout_id: str, now: float | None = None) -> None:
        r = self.rollout(rollout_id)
        if r["state"] != "paused":
            raise UserError(f"rollout {rollout_id} is {r['state']}, not paused")
        now = self.clock() if now is None else now
        extra = {"paused_from": None}
        if r["paused_from"] == "baking" and r["bake_until"]:   # the bake time restarts
            extra["bake_until"] = now + float(r["spec"]["bake_s"])
        self._move(rollout_id, "paused", r["paused_from"], now, **extra)

    def abort(self, rollout_id: str, reason: str = "aborted by the operator", now: float | None = None) -> None:
        r = self.rollout(rollout_id)
        if r["state"] not in ("pending", "canary", "baking", "waves", "paused"):
            raise UserError(f"rollout {rollout_id} is {r['state']}; it cannot be aborted")
        self._move(rollout_id, r["state"], "aborting", now, reason=reason)

    def _move(self, rid: str, frm: str, to: str, now: float | None, **extra: Any) -> bool:
        """One rollout transition, applied only if the rollout is still in ``frm``."""
        if (frm, to) not in TRANSITIONS:
            raise ValueError(f"no rollout transition {frm} -> {to}")
        now = self.clock() if now is None else now
        sets = {"state": to, "updated_at": now, **extra}
        if to in ("completed", "aborted"):
            sets["finished_at"] = now
        with self._lock, self.db.conn:
            cur = self.db.execute(f"update rollouts set {', '.join(f'{k} = ?' for k in sets)} "
                                  "where rollout_id = ? and state = ?", [*sets.values(), rid, frm])
        if cur.rowcount:
            log.info("rollout %s: %s -> %s", rid, frm, to)
        return bool(cur.rowcount)

    # -- reading ----------------------------------------------------------------------------
    def counts(self, rollout_id: str) -> dict[str, int]:
        with self._lock:
            rows = list(self.db.query("select state, count(*) as n from rollout_devices where rollout_id = ? "
                                      "group by state", [rollout_id]))
        counts = {s: 0 for s in DEVICE_STATES}
        counts.update({r["state"]: r["n"] for r in rows})
        return counts

    def status(self, rollout_id: str) -> dict[str, Any]:
        """The rollout row with ``counts`` per device state, ``total``, ``progress`` (share of
        devices in a final state), ``failure_pct`` and the last ``health`` evaluation."""
        r = self.rollout(rollout_id)
        counts = self.counts(rollout_id)
        total = sum(counts.values())
        done = sum(counts[s] for s in ("committed", "failed", "timed_out", "cancelled", "rolled_back",
                                       "rollback_failed"))
        finished = counts["committed"] + counts["failed"] + counts["timed_out"] + counts["rolled_back"] \
            + counts["rollback_failed"] + counts["rolling_back"]
        failed = counts["failed"] + counts["timed_out"]
        with self._lock:
            attempts = list(self.db.query("select count(*) as n from rollout_attempts where rollout_id = ?",
                                          [rollout_id]))[0]["n"]
        return {**r, "counts": counts, "total": total, "progress": done / total if total else 1.0,
                "skipped_offline": len(r["spec"].get("skipped_offline", [])),
                "failure_pct": 100.0 * failed / finished if finished else 0.0, "commands_sent": attempts}

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            ids = [r["rollout_id"] for r in self.db.query("select rollout_id from rollouts order by created_at desc")]
        return [self.status(rid) for rid in ids]

    # -- the loop -----------------------------------------------------------------------------
    def step(self, now: float | None = None) -> int:
        """Advance every active rollout once: read device results, apply deadlines and retries,
        check the abort criteria, send the next wave. Returns the number of transitions."""
        now = self.clock() if now is None else now
        with self._lock:
            rids = [r["rollout_id"] for r in self.db.query(
                f"select rollout_id from rollouts where state in ({','.join('?' * len(ACTIVE))}) "
                "order by created_at", list(ACTIVE))]
        changes = 0
        for rid in rids:
            try:
                changes += self._step_one(rid, now)
            except Exception:  # noqa: BLE001 - one rollout's trouble never stops the others
                log.exception("rollout %s: step failed", rid)
        return changes

    def _step_one(self, rid: str, now: float) -> int:
        r = self.rollout(rid)
        spec = RolloutSpec.from_obj(r["spec"])
        state = r["state"]
        changes = self._ingest(rid, r, spec, now)
        changes += self._deadlines(rid, r, now)
        if state == "aborting":
            changes += self._abort_step(rid, r, now)
            return changes
        reason = self._abort_reason(rid, r, spec, now)
        if reason:
            self._move(rid, state, "aborting", now, reason=reason)
            return changes + 1 + self._abort_step(rid, self.rollout(rid), now)
        if state == "paused":
            return changes
        changes += self._send_pending(rid, r, now)        # retries of devices already in a wave
        if state == "pending":
            to = "canary" if spec.strategy == "canary" else "waves"
            if self._move(rid, "pending", to, now, **({"waves_started_at": now} if to == "waves" else {})):
                r = self.rollout(rid)
                changes += 1 + self._dispatch(rid, r, spec, now)
            return changes
        if state == "canary" and self._last_wave(rid) is None:     # a crash came between the move and the send
            return changes + self._dispatch(rid, r, spec, now)
        if state == "canary" and self._wave_done(rid):
            if self._remaining(rid) == 0:
                return changes + self._move(rid, "canary", "completed", now)
            return changes + self._move(rid, "canary", "baking", now, bake_until=now + spec.bake_s)
        if state == "baking" and now >= (r["bake_until"] or 0):
            if self._move(rid, "baking", "waves", now, waves_started_at=now):
                changes += 1 + self._dispatch(rid, self.rollout(rid), spec, now)
            return changes
        if state == "waves":
            if self._remaining(rid) == 0 and self._wave_done(rid):
                return changes + self._move(rid, "waves", "completed", now)
            changes += self._dispatch(rid, r, spec, now)
        return changes

    # -- device results -----------------------------------------------------------------------
    def _ingest(self, rid: str, r: dict[str, Any], spec: RolloutSpec, now: float) -> int:
        """Apply the final statuses devices reported for the update they were sent."""
        with self._lock:
            rows = list(self.db.query(
                "select d.device_id, d.state, d.attempt, d.rb_attempt, d.update_id, v.state as vs, v.reason as vr "
                "from rollout_devices d join devices v on v.device_id = d.device_id "
                "where d.rollout_id = ? and d.state in ('sent', 'rolling_back') and d.update_id is not null "
                "and v.update_id = d.update_id and v.state in ('committed', 'failed', 'rolled_back')", [rid]))
        ends = []
        for row in rows:
            rollback = row["state"] == "rolling_back"
            attempt = row["rb_attempt"] if rollback else row["attempt"]
            if row["vs"] == "committed":
                ends.append((row, "rolled_back" if rollback else "committed", None, None, False))
                continue
            code = self._error_code(row["device_id"], row["update_id"], row["vs"], row["vr"])
            if code.startswith(_TRANSIENT_PREFIXES) and attempt <= spec.retries:
                ends.append((row, "rolling_back" if rollback else "pending", code, row["vr"], True))
            else:
                ends.append((row, "rollback_failed" if rollback else "failed", code, row["vr"], False))
        return self._finish(rid, ends, now) if ends else 0

    def _error_code(self, device_id: str, update_id: str, state: str, reason: str | None) -> str:
        with self._lock:
            rows = list(self.db.query("select code from device_errors where device_id = ? and update_id = ? "
                                      "order by id desc limit 1", [device_id, update_id]))
        if rows and rows[0]["code"]:
            return rows[0]["code"]
        if reason and reason.startswith("download failed"):
            return "transport.download"
        return "health.unknown" if state == "rolled_back" else "install.unknown"

    def _finish(self, rid: str, ends: list[tuple[dict[str, Any], str, str | None, str | None, bool]],
                now: float) -> int:
        """Devices' attempts end, as (row, new state, code, reason, retry): idempotent updates keyed
        by (rollout, device, attempt, state, update id), all in one transaction."""
        batches: dict[tuple[str, str], tuple[list[list[Any]], list[list[Any]]]] = {}
        for row, to, code, reason, retry in ends:
            rollback = row["state"] == "rolling_back"
            phase, attempt = ("rollback", row["rb_attempt"]) if rollback else ("update", row["attempt"])
            sets = "state = ?, code = ?, reason = ?, " + ("update_id = null" if retry else "finished_at = ?")
            sql = (f"update rollout_devices set {sets} where rollout_id = ? and device_id = ? and state = ? and "
                   f"{'rb_attempt' if rollback else 'attempt'} = ? and update_id = ?")
            devices, attempts = batches.setdefault((sql, phase), ([], []))
            devices.append([to, code, reason, *([] if retry else [now]), rid, row["device_id"], row["state"], attempt,
                            row["update_id"]])
            attempts.append([("retry:" if retry else "") + (code or to), code, now, rid, row["device_id"], phase,
                             attempt])
        changes = 0
        with self._lock, self.db.conn:
            for (sql, _), (devices, attempts) in batches.items():
                changes += self.db.conn.executemany(sql, devices).rowcount
                # an attempt already closed (by a controller that got here first) keeps its outcome
                self.db.conn.executemany("update rollout_attempts set outcome = ?, code = ?, finished_at = ? where "
                                         "rollout_id = ? and device_id = ? and phase = ? and attempt = ? and "
                                         "outcome is null", attempts)
        return changes

    def _deadlines(self, rid: str, r: dict[str, Any], now: float) -> int:
        spec = RolloutSpec.from_obj(r["spec"])
        with self._lock:
            rows = list(self.db.query("select device_id, state, attempt, rb_attempt, update_id from rollout_devices "
                                      "where rollout_id = ? and state in ('sent', 'rolling_back') and "
                                      "update_id is not null and deadline < ?", [rid, now]))
        ends = []
        for row in rows:
            rollback = row["state"] == "rolling_back"
            attempt = row["rb_attempt"] if rollback else row["attempt"]
            reason = f"no result within the deadline (attempt {attempt})"
            if attempt <= spec.retries:
                ends.append((row, row["state"] if rollback else "pending", "timeout", reason, True))
            else:
                ends.append((row, "rollback_failed" if rollback else "timed_out", "timeout", reason, False))
        return self._finish(rid, ends, now) if ends else 0

    # -- abort ----------------------------------------------------------------------------------
    def _abort_reason(self, rid: str, r: dict[str, Any], spec: RolloutSpec, now: float) -> str | None:
        counts = self.counts(rid)
        finished = counts["committed"] + counts["failed"] + counts["timed_out"]
        failed = counts["failed"] + counts["timed_out"]
        if finished >= spec.min_devices and finished and 100.0 * failed / finished > spec.max_failure_pct:
            return (f"install failures: {failed} of {finished} finished devices "
                    f"({100.0 * failed / finished:.1f}% > {spec.max_failure_pct:g}%)")
        limits = (spec.max_error_rate, spec.max_latency_p95_ms, spec.max_prediction_js, spec.max_confidence_drop,
                  spec.max_quality_drop)
        if all(v is None for v in limits) or counts["committed"] == 0:
            return None
        if r.get("health_at") and now - r["health_at"] < spec.health_interval_s:
            return None
        health = self.health(rid)
        with self._lock, self.db.conn:
            self.db.execute("update rollouts set health = ?, health_at = ? where rollout_id = ?",
                            [json.dumps(health), now, rid])
        if health["breaches"]:
            return "model health: " + "; ".join(health["breaches"])
        return None

    def health(self, rollout_id: str) -> dict[str, Any]:
        """Model health of the committed devices: their telemetry under the new version against
        their telemetry under the version they ran before, and which thresholds it breaks."""
        r = self.rollout(rollout_id)
        spec = RolloutSpec.from_obj(r["spec"])
        with self._lock:
            rows = list(self.db.query(
                "select t.model_version = ? as new, t.count, t.errors, t.latency_ms_p50, t.predictions, "
                "t.confidence_hist, t.labelled, t.correct, t.abs_err_sum from telemetry t join rollout_devices d on d.device_id = t.device_id "
                "where d.rollout_id = ? and d.state = 'committed' and d.prev_version != ? and "
                "(t.model_version = ? or t.model_version = d.prev_version)",
                [r["model_version"], rollout_id, r["model_version"], r["model_version"]]))
        return compare(rows, {"error_rate_increase": spec.max_error_rate,
                              "latency_p95_increase_ms": spec.max_latency_p95_ms,
                              "prediction_js": spec.max_prediction_js, "confidence_drop": spec.max_confidence_drop,
                              "quality_drop": spec.max_quality_drop},
                       spec.health_min_inferences, task=self._task_kind(r["model_version"]))

    def _task_kind(self, model_version: str) -> str:
        task = self.registry.model_version(model_version).get("task") or {}
        return task.get("kind", "classification")

    def _abort_step(self, rid: str, r: dict[str, Any], now: float) -> int:
        """Cancel what was never sent, roll back what committed, finish once nothing is in flight."""
        with self._lock, self.db.conn:
            changes = self.db.execute("update rollout_devices set state = 'cancelled', finished_at = ? where "
                                      "rollout_id = ? and state = 'pending'", [now, rid]).rowcount
            changes += self.db.execute(
                "update rollout_devices set state = 'rollback_failed', finished_at = ?, code = 'rollback.none', "
                "reason = 'no previous version to roll back to' where rollout_id = ? and state = 'committed' "
                "and prev_version = ''", [now, rid]).rowcount
            changes += self.db.execute(
                "update rollout_devices set state = 'rollback_failed', finished_at = ?, code = 'rollback.none', "
                "reason = 'no package of the previous version for this tier' where rollout_id = ? and "
                "state = 'committed' and prev_version not in ('', ?) and not exists (select 1 from rollout_groups "
                "g where g.rollout_id = ? and g.kind = 'rollback' and g.tier = rollout_devices.tier and "
                "g.prev_version = rollout_devices.prev_version)", [now, rid, r["model_version"], rid]).rowcount
            changes += self.db.execute(
                "update rollout_devices set state = 'rolling_back', update_id = null where rollout_id = ? and "
                "state = 'committed' and prev_version not in ('', ?)", [rid, r["model_version"]]).rowcount
            # a device that timed out but installed the update late runs it all the same: back with it
            changes += self.db.execute(
                "update rollout_devices set state = 'rolling_back', update_id = null where rollout_id = ? and "
                "state = 'timed_out' and prev_version not in ('', ?) and exists (select 1 from devices v where "
                "v.device_id = rollout_devices.device_id and v.model_version = ?) and exists (select 1 from "
                "rollout_groups g where g.rollout_id = ? and g.kind = 'rollback' and g.tier = rollout_devices.tier "
                "and g.prev_version = rollout_devices.prev_version)",
                [rid, r["model_version"], r["model_version"], rid]).rowcount
        changes += self._send(rid, r, "rollback", now)
        with self._lock:
            in_flight = list(self.db.query("select count(*) as n from rollout_devices where rollout_id = ? and "
                                           "state in ('sent', 'rolling_back')", [rid]))[0]["n"]
        if not in_flight:
            from cloud.fleet_registry import FleetRegistry
            with self._lock:
                ids = [x["device_id"] for x in self.db.query(
                    "select device_id from rollout_devices where rollout_id = ?", [rid])]
            FleetRegistry(self.registry).set_target(ids, None)
            changes += self._move(rid, "aborting", "aborted", now)
        return changes

    # -- sending --------------------------------------------------------------------------------
    def _send_pending(self, rid: str, r: dict[str, Any], now: float) -> int:
        return self._send(rid, r, "update", now)

    def _send(self, rid: str, r: dict[str, Any], phase: str, now: float) -> int:
        """Send every device due a command in this phase: marked sent (next attempt) first, then
        published, so a crash in between can cost a timeout but never a duplicate."""
        rollback = phase == "rollback"
        where = ("state = 'rolling_back' and update_id is null" if rollback
                 else "state = 'pending' and wave is not null")
        with self._lock:
            rows = list(self.db.query(f"select device_id, tier, prev_version, attempt, rb_attempt from "
                                      f"rollout_devices where rollout_id = ? and {where} order by ord", [rid]))
        if not rows:
            return 0
        timeouts = r["spec"].get("timeouts", {})
        column = "rb_attempt" if rollback else "attempt"
        commands: dict[tuple[str, str, int], tuple[str, Command] | None] = {}
        for row in rows:      # signing (a retry's first use of its attempt) happens outside the transaction
            key = (row["tier"], row["prev_version"] if rollback else "", row[column] + 1)
            if key not in commands:
                g = self._group(rid, phase, key[0], key[1], key[2], key[1] if rollback else r["model_version"], now)
                commands[key] = None if g is None else (g["update_id"], Command(
                    command="install", rollout_id=rid, announce=Announce.from_obj(json.loads(g["announce"])),
                    issued_at=now))
        sends: list[tuple[str, Command]] = []
        marks, attempts = [], []
        with self._lock, self.db.conn:      # one write transaction, committed before publishing
            if not self.db.conn.in_transaction:
                self.db.conn.execute("begin immediate")     # no other writer between this read and the marks
            for row in self.db.conn.execute(f"select device_id, tier, prev_version, attempt, rb_attempt from "
                                            f"rollout_devices where rollout_id = ? and {where} order by ord", [rid]):
                device_id, tier = row[0], row[1]
                prev, attempt = row[2] if rollback else "", row[4 if rollback else 3] + 1
                made = commands.get((tier, prev, attempt))
                if made is None:       # no rollback package, or a key that appeared since: the next step
                    continue
                update_id, command = made
                marks.append([attempt, update_id, now, now + float(timeouts.get(tier, 600.0)), rid, device_id,
                              attempt - 1])
                attempts.append([rid, device_id, phase, attempt, update_id, now])
                sends.append((device_id, command))
            self.db.conn.executemany(
                f"update rollout_devices set {'' if rollback else 'state = ' + repr('sent') + ', '}"
                f"{column} = ?, update_id = ?, sent_at = ?, deadline = ?, code = null, reason = null "
                f"where rollout_id = ? and device_id = ? and {where} and {column} = ?", marks)
            self.db.conn.executemany("insert or ignore into rollout_attempts (rollout_id, device_id, phase, attempt, "
                                     "update_id, sent_at) values (?, ?, ?, ?, ?, ?)", attempts)
        for device_id, command in sends:
            try:
                self.send(device_id, command)
            except Exception as e:  # noqa: BLE001 - the deadline retries it
                log.warning("rollout %s: could not send to %s: %s", rid, device_id, e)
        return len(sends)

    def _dispatch(self, rid: str, r: dict[str, Any], spec: RolloutSpec, now: float) -> int:
        """Put the next wave's devices in it (and send them), when the previous wave is done and
        the rate limit allows."""
        total = sum(self.counts(rid).values())
        remaining = self._remaining(rid)
        if remaining == 0 or not self._wave_done(rid):
            return 0
        last = self._last_wave(rid)
        wave = 0 if last is None else last + 1
        canary = _canary_count(spec.canary, total) if spec.canary else None
        if r["state"] == "canary":
            size = canary or 1
        elif spec.strategy == "all":
            size = remaining
        else:
            first = 1 if spec.strategy == "canary" else 0       # the canary was wave 0
            base = spec.wave_size or canary or 1
            size = math.ceil(base * spec.growth ** max(0, wave - first))
            if spec.rate_per_min:
                due = (r["waves_started_at"] or now) + 60.0 * (r["waves_sent"] or 0) / spec.rate_per_min
                if now < due:
                    return 0
        size = min(size, remaining)
        with self._lock, self.db.conn:
            ids = [x["device_id"] for x in self.db.query(
                "select device_id from rollout_devices where rollout_id = ? and state = 'pending' and wave is null "
                "order by ord limit ?", [rid, size])]
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                self.db.execute(f"update rollout_devices set wave = ? where rollout_id = ? and wave is null and "
                                f"device_id in ({','.join('?' * len(chunk))})", [wave, rid, *chunk])
            if r["state"] == "waves":
                self.db.execute("update rollouts set waves_sent = coalesce(waves_sent, 0) + ?, last_wave_at = ? "
                                "where rollout_id = ?", [len(ids), now, rid])
        log.info("rollout %s: wave %d, %d devices", rid, wave, len(ids))
        return self._send(rid, r, "update", now)

    def _last_wave(self, rid: str) -> int | None:
        with self._lock:
            return list(self.db.query("select max(wave) as w from rollout_devices where rollout_id = ?", [rid]))[0]["w"]

    def _wave_done(self, rid: str) -> bool:
        with self._lock:
            return list(self.db.query("select count(*) as n from rollout_devices where rollout_id = ? and "
                                      "(state = 'sent' or (state = 'pending' and wave is not null))",
                                      [rid]))[0]["n"] == 0

    def _remaining(self, rid: str) -> int:
        with self._lock:
            return list(self.db.query("select count(*) as n from rollout_devices where rollout_id = ? and "
                                      "state = 'pending' and wave is null", [rid]))[0]["n"]
