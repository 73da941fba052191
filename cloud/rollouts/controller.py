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
- State lives in the store (cloud.store.rollouts): tables ``rollouts``, ``rollout_devices``,
  ``rollout_groups`` and ``rollout_attempts``. A controller built again on the same store
  carries on where the last one stopped: every transition is an idempotent conditional
  update keyed by (rollout, device, attempt), counts are derived from the rows, and a device
  is marked ``sent`` before its command is published; a command no status has acknowledged
  within ``resend_s`` goes out again, same attempt and update id (a crash in between costs
  seconds, never a second attempt; devices ignore an update id they have). Several controllers
  (one per host, docs/multihost.md) may step one store: each steps a rollout only while it
  holds the rollout's step lock (``Store.rollout_step_lock``), which the database gives back
  when the holder dies, so another carries its rollouts on at its next step.
- A wave ends at its success share (``wave_success_pct``) or deadline (``wave_timeout_s``), not
  with its slowest device; stragglers keep their own deadlines and still count. Membership is
  dynamic until the rollout ends: target devices that appear or come back online join the next
  wave. An ended rollout's director assignments are withdrawn (Releaser.withdraw).
- The two machines are tables (cloud.rollouts.machine: ``StrEnum`` states and events,
  :data:`ROLLOUT_TRANSITIONS`, :data:`DEVICE_TRANSITIONS`); every state written is looked up
  in them, so a transition that is not a row raises IllegalTransition. :meth:`step` applies
  device results and deadlines, checks the abort criteria, then runs one small handler per
  rollout state (``_on_pending``, ``_on_canary``, ...). Retries follow
  ``edgeloop.contracts.codes.retryable`` of the code the device reported.

Rollout states (:class:`RolloutState`)::

    pending -> canary -> baking -> waves -> completed        (strategy "canary")
    pending -> waves -> completed                             ("waves"; "all" is one wave)
    any active state -> paused -> (back where it was)         (pause / resume)
    any active state -> aborting -> aborted                   (abort criteria, or abort())

Device states per rollout (:class:`DeviceRolloutState`; events :class:`DeviceEvent`)::

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

import json
import logging
import math
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields
from hashlib import sha256
from typing import Any, Callable, Protocol

from edgeloop.contracts.codes import ErrorCode, retryable
from edgeloop.contracts.messages import Announce, Command
from edgeloop.cloud import audit
from edgeloop.cloud.errors import NotFound, UserError
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.rollouts.health import js_distance, judge
from edgeloop.cloud.rollouts.machine import (ACTIVE, DEVICE_TRANSITIONS, FINAL_DEVICE_STATES, PAUSABLE, ROLLOUT_TRANSITIONS,
                                   DeviceEvent, DeviceRolloutState, IllegalTransition, RolloutEvent, RolloutState,
                                   rollout_next)
from edgeloop.cloud.store import AttemptEnd
from edgeloop.cloud.package.tiers import tier as tier_profile
from edgeloop.cloud.workspace import Workspace

log = logging.getLogger("edgeloop.rollouts")

__all__ = ["ACTIVE", "DEVICE_STATES", "DEVICE_TRANSITIONS", "ROLLOUT_STATES", "ROLLOUT_TRANSITIONS",
           "DeviceEvent", "DeviceRolloutState", "IllegalTransition", "RolloutController", "RolloutEvent", "RolloutSpec",
           "RolloutState", "Sender", "js_distance", "parse_selector"]

Sender = Callable[[str, Command], Any]
Rows = list[dict[str, Any]]       # (RolloutController.list shadows the builtin in its class body)

ROLLOUT_STATES = tuple(s.value for s in RolloutState)
DEVICE_STATES = tuple(s.value for s in DeviceRolloutState)
STEP_INTERVAL_S = 1.0
MAX_RESENDS = 3                  # per attempt, after resend_s, then twice and four times that
MEMBERSHIP_INTERVAL_S = 5.0      # how often an active rollout looks for target devices that appeared or came back
STRATEGIES = ("all", "canary", "waves")
SELECTOR_KEYS = ("tier", "tag", "group", "device")
S, D, E, V = RolloutState, DeviceRolloutState, RolloutEvent, DeviceEvent


class StopFlag(Protocol):
    """What :meth:`RolloutController.run` polls: a ``threading.Event``, or the CLI's signal flag."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


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
    wave_success_pct: float = 90.0     # a wave ends once this share of it committed ...
    wave_timeout_s: float | None = None    # ... or this long after its first command (None: the tier deadline)
    resend_s: float = 10.0             # a command no status has acknowledged goes out again after this long
    force: bool = False                # roll out a version that failed or skipped its promotion gate

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
                  ("health_min_inferences", self.health_min_inferences >= 1),
                  ("wave_success_pct", 0 < self.wave_success_pct <= 100), ("resend_s", self.resend_s > 0),
                  ("wave_timeout_s", self.wave_timeout_s is None or self.wave_timeout_s > 0)]
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
    m = re.fullmatch(r"([0-9]{1,9}(?:\.[0-9]{1,9})?)%", text)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise UserError(f"canary share {text} must be over 0% and at most 100%")
        return max(1, math.ceil(total * pct / 100))
    if not re.fullmatch(r"[0-9]{1,9}", text) or int(text) < 1:   # ASCII digits ("➈".isdigit() is True)
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
    """The rollout state machine over the store; see the module docstring."""

    def __init__(self, ws: Workspace, registry: Registry, send: Sender, repository_url: str | None = None,
                 director_url: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.ws, self.registry, self.send, self.clock = ws, registry, send, clock
        self.repository_url = repository_url
        self.director_url = director_url or (repository_url.rstrip("/").rsplit("/", 1)[0] + "/director"
                                             if repository_url else None)
        # one small handler per rollout state, run after results, deadlines and abort criteria
        self._handlers: dict[RolloutState, Callable[[str, dict[str, Any], RolloutSpec, float], int]] = {
            S.PENDING: self._on_pending, S.CANARY: self._on_canary, S.BAKING: self._on_baking,
            S.WAVES: self._on_waves, S.PAUSED: self._on_paused, S.ABORTING: self._on_aborting}
        self._grown_at: dict[str, float] = {}   # rollout -> when its membership was last looked at
        self._swept = False                     # the ended rollouts' assignments withdrawn since this start

    def run(self, stop: StopFlag, interval_s: float = STEP_INTERVAL_S, until: float | None = None) -> None:
        """Call :meth:`step` every ``interval_s`` until ``stop`` is set or ``until`` (a time) passes."""
        while not stop.is_set() and (until is None or time.time() < until):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a busy or failing db must not stop the control plane
                log.exception("rollout step failed; retrying in %.1f s", interval_s)
            stop.wait(interval_s if until is None else max(0.0, min(interval_s, until - time.time())))

    # -- create ---------------------------------------------------------------------------
    def create(self, spec: RolloutSpec, now: float | None = None, actor: str | None = None) -> str:
        """Validate, sign the update (and the rollback of each device's current version), and
        persist a ``pending`` rollout, recorded in the audit log as ``actor``'s (None: the local
        user; cloud/audit.py). Raises UserError with nothing changed for bad input."""
        from edgeloop.cloud.fleet_registry import FleetRegistry

        now = self.clock() if now is None else now
        spec.validate()
        if self.repository_url is None:
            raise UserError("no repository URL for the devices to download from (start: edgeloop serve)")
        self.registry.model_version(spec.model_version)            # NotFound if unknown
        self._check_gate(spec)
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
        busy = self.registry.busy_devices(ids)
        if busy:
            rid, n = busy
            raise UserError(f"{n} of these devices are in active rollout {rid}; wait for it, or: "
                            f"edgeloop rollout abort {rid}")
        rid = f"ro-{uuid.uuid4().hex[:10]}"
        profiles = {tier: tier_profile(tier, self.ws.root) for tier in tiers}
        groups = self._sign_release(rid, spec, tiers, devices, now)
        rows = [{"rollout_id": rid, "device_id": d["device_id"], "tier": d["tier"],
                 "prev_version": d.get("model_version") or "", "state": D.PENDING.value, "attempt": 0,
                 "rb_attempt": 0, "ord": sha256(f"{rid}/{d['device_id']}".encode()).hexdigest()[:16]}
                for d in devices]
        obj = spec.to_obj()
        obj["timeouts"] = {t: spec.timeout_s or p.in_progress_timeout_s for t, p in profiles.items()}
        obj["skipped_offline"] = skipped
        busy = self.registry.insert_rollout({"rollout_id": rid, "model_version": spec.model_version,
                                             "target": spec.target, "spec": obj, "state": S.PENDING.value,
                                             "created_at": now, "updated_at": now, "waves_sent": 0}, groups, rows)
        if busy:
            raise UserError(f"{busy[1]} of these devices are in active rollout {busy[0]}")
        fleet.set_target(ids, spec.model_version)
        audit.record(self.registry, actor, "rollout.start", rid,
                     {"model_version": spec.model_version, "target": spec.target, "strategy": spec.strategy,
                      "devices": len(ids)}, now)
        return rid

    def _check_gate(self, spec: RolloutSpec) -> None:
        """Refuse (UserError) a version that failed or skipped its promotion gate, unless forced."""
        from edgeloop.cloud.models import gate_result

        gate = gate_result(self.registry, spec.model_version)
        if gate.blocks and not spec.force:
            raise UserError(f"{spec.model_version} {gate.verdict} its promotion gate: {gate.reason}; roll out a "
                            f"version that passed it (edgeloop models promote VERSION), or start anyway with --force")

    # -- signing and assigning updates (one unit: see cloud/release/releaser.py) ----------------------------
    def _sign_release(self, rid: str, spec: RolloutSpec, tiers: list[str], devices: list[dict[str, Any]],
                      now: float) -> list[dict[str, Any]]:
        """Sign the update per tier, and a rollback per (tier, previous version) that has a
        package; returns the rollout_groups rows."""
        wanted = [("update", tier, "", spec.model_version) for tier in tiers]
        prevs = sorted({(d["tier"], d["model_version"]) for d in devices
                        if d.get("model_version") and d["model_version"] != spec.model_version})
        for tier, prev in prevs:
            try:
                self.registry.package_for(prev, tier)
                wanted.append(("rollback", tier, prev, prev))
            except NotFound:
                log.warning("rollout %s: no %s package of %s to roll back to", rid, tier, prev)
        return self._sign(rid, [(kind, tier, prev, mv, 1) for kind, tier, prev, mv in wanted], now,
                          self._delta_bases(spec.model_version, devices))

    def _sign(self, rid: str, wanted: list[tuple[str, str, str, str, int]], now: float,
              bases: dict[tuple[str, str, str], str] | None = None) -> list[dict[str, Any]]:
        """Release the update and rollback groups through the one release path (cloud/release/releaser.py:
        image repository, delta from ``bases[(kind, tier, prev)]``, director, updates), in one
        director signing; returns the rollout_groups rows. Raises IntegrityError, with nothing
        assigned, for a package the two repositories would disagree on."""
        from edgeloop.cloud.release.releaser import Assignment, Releaser

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
        row = self.registry.rollout_group(rid, kind, tier, prev, attempt)
        if row is not None:
            return row
        if kind == "rollback" and not self.registry.has_rollout_group(rid, kind, tier, prev):
            return None
        self.registry.add_rollout_groups(self._sign(rid, [(kind, tier, prev, mv, attempt)], now))
        return self._group(rid, kind, tier, prev, attempt, mv, now)

    # -- operator actions -------------------------------------------------------------------
    def rollout(self, rollout_id: str) -> dict[str, Any]:
        row = self.registry.rollout_row(rollout_id)
        if row is None:
            raise NotFound(f"no rollout {rollout_id!r} (see: edgeloop rollout ls)")
        return row

    def pause(self, rollout_id: str, now: float | None = None, actor: str | None = None) -> None:
        """Operator actions (pause, resume, abort) are recorded in the audit log as ``actor``'s
        (None: the local user) when they change the rollout."""
        r = self.rollout(rollout_id)
        if r["state"] not in PAUSABLE:
            raise UserError(f"rollout {rollout_id} is {r['state']}; only an active rollout can be paused")
        if self._move(rollout_id, r["state"], E.PAUSE, now, paused_from=r["state"]):
            audit.record(self.registry, actor, "rollout.pause", rollout_id, {"from": r["state"]}, now)

    def resume(self, rollout_id: str, now: float | None = None, actor: str | None = None) -> None:
        r = self.rollout(rollout_id)
        if r["state"] != S.PAUSED:
            raise UserError(f"rollout {rollout_id} is {r['state']}, not paused")
        now = self.clock() if now is None else now
        extra: dict[str, Any] = {"paused_from": None}
        if r["paused_from"] == S.BAKING and r["bake_until"]:   # the bake time restarts
            extra["bake_until"] = now + float(r["spec"]["bake_s"])
        if self._move(rollout_id, S.PAUSED, E.RESUME, now, resume_to=r["paused_from"], **extra):
            audit.record(self.registry, actor, "rollout.resume", rollout_id, {"to": r["paused_from"]}, now)

    def abort(self, rollout_id: str, reason: str = "aborted by the operator", now: float | None = None,
              actor: str | None = None) -> None:
        r = self.rollout(rollout_id)
        if (RolloutState(r["state"]), E.ABORT) not in ROLLOUT_TRANSITIONS:
            raise UserError(f"rollout {rollout_id} is {r['state']}; it cannot be aborted")
        if self._move(rollout_id, r["state"], E.ABORT, now, reason=reason):
            audit.record(self.registry, actor, "rollout.abort", rollout_id, {"from": r["state"], "reason": reason}, now)

    def _move(self, rid: str, frm: str, event: RolloutEvent, now: float | None, resume_to: str | None = None,
              **extra: Any) -> bool:
        """One rollout transition, the table's row for (``frm``, ``event``), applied only if the
        rollout is still in ``frm``. Raises IllegalTransition for a pair that is not a row."""
        to = rollout_next(frm, event, resume_to)
        now = self.clock() if now is None else now
        sets = {"state": to.value, "updated_at": now, **extra}
        if to in (S.COMPLETED, S.ABORTED):
            sets["finished_at"] = now
        moved = self.registry.move_rollout(rid, frm, sets)
        if moved:
            log.info("rollout %s: %s -> %s", rid, frm, to)
            if to in (S.COMPLETED, S.ABORTED):
                self._prune()
        return moved

    # -- reading ----------------------------------------------------------------------------
    def counts(self, rollout_id: str) -> dict[str, int]:
        return self.registry.rollout_device_counts(rollout_id)

    def status(self, rollout_id: str) -> dict[str, Any]:
        """The rollout row with ``counts`` per device state, ``total``, ``progress`` (share of
        devices in a final state), ``failure_pct`` and the last ``health`` evaluation."""
        r = self.rollout(rollout_id)
        counts = self.counts(rollout_id)
        total = sum(counts.values())
        done = sum(counts[s] for s in FINAL_DEVICE_STATES)
        finished = counts["committed"] + counts["failed"] + counts["timed_out"] + counts["rolled_back"] \
            + counts["rollback_failed"] + counts["rolling_back"]
        failed = counts["failed"] + counts["timed_out"]
        skipped = set(r["spec"].get("skipped_offline", []))     # those that have not joined since
        if skipped:
            skipped -= {d["device_id"] for d in self.registry.rollout_devices(rollout_id)}
        return {**r, "counts": counts, "total": total, "progress": done / total if total else 1.0,
                "skipped_offline": len(skipped),
                "failure_pct": 100.0 * failed / finished if finished else 0.0,
                "commands_sent": self.registry.commands_sent(rollout_id),
                "commands_resent": self.registry.commands_resent(rollout_id)}

    def list(self) -> list[dict[str, Any]]:
        return [self.status(rid) for rid in self.registry.rollout_ids()]

    # -- the loop -----------------------------------------------------------------------------
    def step(self, now: float | None = None) -> int:
        """Advance every active rollout once: read device results, apply deadlines and retries,
        check the abort criteria, then run its state's handler. Returns the number of transitions."""
        now = self.clock() if now is None else now
        changes = 0
        if not self._swept:           # a crash may have come between a rollout's end and its pruning
            self._swept = self._prune() is not None
        for rid in self.registry.rollout_ids(active_only=True):
            try:
                with self.registry.rollout_step_lock(rid) as mine:
                    if mine:          # else another controller is stepping it right now
                        changes += self._step_one(rid, now)
            except Exception:  # noqa: BLE001 - one rollout's trouble never stops the others
                log.exception("rollout %s: step failed", rid)
        return changes

    def _step_one(self, rid: str, now: float) -> int:
        r = self.rollout(rid)
        spec = RolloutSpec.from_obj(r["spec"])
        state = RolloutState(r["state"])
        if state not in ACTIVE:       # another controller ended it since the list was read
            return 0
        if state in (*PAUSABLE, S.PAUSED) and self._grow(rid, r, spec, now):
            r = self.rollout(rid)
        changes = self._ingest(rid, spec, now) + self._deadlines(rid, r, now)
        self._resend(rid, spec, now)
        if state != S.ABORTING:
            reason = self._abort_reason(rid, r, spec, now)
            if reason:
                self._move(rid, state, E.ABORT, now, reason=reason)
                return changes + 1 + self._on_aborting(rid, self.rollout(rid), spec, now)
        if state in PAUSABLE:
            changes += self._send(rid, r, "update", now)        # retries of devices already in a wave
        return changes + self._handlers[state](rid, r, spec, now)

    # -- one handler per rollout state ------------------------------------------------------------
    def _on_pending(self, rid: str, r: dict[str, Any], spec: RolloutSpec, now: float) -> int:
        """Start: the canary wave, or the first wave."""
        if spec.strategy == "canary":
            moved = self._move(rid, S.PENDING, E.START_CANARY, now)
        else:
            moved = self._move(rid, S.PENDING, E.START_WAVES, now, waves_started_at=now)
        return 1 + self._dispatch(rid, self.rollout(rid), spec, now) if moved else 0

    def _on_canary(self, rid: str, r: dict[str, Any], spec: RolloutSpec, now: float) -> int:
        """Send the canary (again, if a crash came between the move and the send); once it is
        done, bake it, or complete if it was every device."""
        if self.registry.last_wave(rid) is None:
            return self._dispatch(rid, r, spec, now)
        if not self._wave_ended(rid, r, spec, now):
            return 0
        if self.registry.unassigned(rid) == 0:    # the canary was every device: complete once all are final
            if not self.registry.wave_done(rid) or self._grow(rid, r, spec, now, fresh=True):
                return 0
            return int(self._move(rid, S.CANARY, E.COMPLETE, now))
        return int(self._move(rid, S.CANARY, E.CANARY_DONE, now, bake_until=now + spec.bake_s))

    def _on_baking(self, rid: str, r: dict[str, Any], spec: RolloutSpec, now: float) -> int:
        """Once the bake time is over, start the waves."""
        if now < (r["bake_until"] or 0) or not self._move(rid, S.BAKING, E.BAKED, now, waves_started_at=now):
            return 0
        return 1 + self._dispatch(rid, self.rollout(rid), spec, now)

    def _on_waves(self, rid: str, r: dict[str, Any], spec: RolloutSpec, now: float) -> int:
        """The next wave when it is due; complete once every device is final (stragglers of
        earlier waves included)."""
        if self.registry.unassigned(rid) == 0 and self.registry.wave_done(rid) \
                and not self._grow(rid, r, spec, now, fresh=True):     # a last look for devices that came back
            return int(self._move(rid, S.WAVES, E.COMPLETE, now))
        return self._dispatch(rid, r, spec, now)

    def _on_paused(self, rid: str, r: dict[str, Any], spec: RolloutSpec, now: float) -> int:
        """Nothing new is sent; results and deadlines still count (applied before the handler)."""
        return 0

    def _on_aborting(self, rid: str, r: dict[str, Any], spec: RolloutSpec, now: float) -> int:
        """Cancel what was never sent, roll back what committed, finish once nothing is in flight."""
        changes = self.registry.abort_devices(rid, r["model_version"], now)
        changes += self._send(rid, r, "rollback", now)
        if not self.registry.in_flight(rid):
            from edgeloop.cloud.fleet_registry import FleetRegistry
            FleetRegistry(self.registry).set_target([d["device_id"] for d in self.registry.rollout_devices(rid)], None)
            changes += self._move(rid, S.ABORTING, E.ROLLED_BACK, now)
        return changes

    # -- device results -----------------------------------------------------------------------
    def _ingest(self, rid: str, spec: RolloutSpec, now: float) -> int:
        """Apply the final statuses devices reported for the update they were sent."""
        ends = []
        for row in self.registry.reported_results(rid):
            attempt = row["rb_attempt"] if row["state"] == D.ROLLING_BACK else row["attempt"]
            if row["vs"] == "committed":
                ends.append(AttemptEnd(row, V.COMMIT, None, None))
                continue
            code = self._error_code(row["device_id"], row["update_id"], row["vs"], row["vr"])
            retry = retryable(code) and attempt <= spec.retries
            ends.append(AttemptEnd(row, V.RETRY if retry else V.FAIL, code, row["vr"]))
        return self.registry.end_attempts(rid, ends, now) if ends else 0

    def _error_code(self, device_id: str, update_id: str, state: str, reason: str | None) -> str:
        code = self.registry.latest_error_code(device_id, update_id)
        if code:
            return code
        return ErrorCode.HEALTH_UNKNOWN if state == "rolled_back" else ErrorCode.INSTALL_UNKNOWN

    def _deadlines(self, rid: str, r: dict[str, Any], now: float) -> int:
        spec = RolloutSpec.from_obj(r["spec"])
        ends = []
        for row in self.registry.overdue(rid, now):
            attempt = row["rb_attempt"] if row["state"] == D.ROLLING_BACK else row["attempt"]
            event = V.RETRY if attempt <= spec.retries else V.TIME_OUT
            ends.append(AttemptEnd(row, event, "timeout", f"no result within the deadline (attempt {attempt})"))
        return self.registry.end_attempts(rid, ends, now) if ends else 0

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
        self.registry.set_rollout_health(rid, health, now)
        if health["breaches"]:
            return "model health: " + "; ".join(health["breaches"])
        return None

    def health(self, rollout_id: str) -> dict[str, Any]:
        """Model health of the committed devices: their telemetry under the new version against
        their telemetry under the version they ran before, and which thresholds it breaks."""
        r = self.rollout(rollout_id)
        spec = RolloutSpec.from_obj(r["spec"])
        sides = self.registry.health_totals(rollout_id, r["model_version"])
        return judge(sides, {"error_rate_increase": spec.max_error_rate,
                              "latency_p95_increase_ms": spec.max_latency_p95_ms,
                              "prediction_js": spec.max_prediction_js, "confidence_drop": spec.max_confidence_drop,
                              "quality_drop": spec.max_quality_drop},
                       spec.health_min_inferences, task=self._task_kind(r["model_version"]))

    def _task_kind(self, model_version: str) -> str:
        task = self.registry.model_version(model_version).get("task") or {}
        return task.get("kind", "classification")

    # -- sending --------------------------------------------------------------------------------
    def _send(self, rid: str, r: dict[str, Any], phase: str, now: float) -> int:
        """Send every device due a command in this phase: marked sent (next attempt) first, then
        published, so a crash in between never costs a second attempt; the command nobody
        acknowledged goes out again (:meth:`_resend`)."""
        rollback = phase == "rollback"
        rows = self.registry.due(rid, phase)
        if not rows:
            return 0
        column = "rb_attempt" if rollback else "attempt"
        commands: dict[tuple[str, str, int], tuple[str, Command]] = {}
        for row in rows:      # signing (a retry's first use of its attempt) happens outside the transaction
            key = (row["tier"], row["prev_version"] if rollback else "", row[column] + 1)
            if key not in commands:
                g = self._group(rid, phase, key[0], key[1], key[2], key[1] if rollback else r["model_version"], now)
                if g is not None:
                    commands[key] = (g["update_id"], _command(rid, g, now))
        sends = self.registry.mark_sent(rid, phase, commands, r["spec"].get("timeouts", {}), now)
        for device_id, command in sends:
            try:
                self.send(device_id, command)
            except Exception as e:  # noqa: BLE001 - the deadline retries it
                log.warning("rollout %s: could not send to %s: %s", rid, device_id, e)
        return len(sends)

    def _dispatch(self, rid: str, r: dict[str, Any], spec: RolloutSpec, now: float) -> int:
        """Put the next wave's devices in it (and send them), when the previous wave has ended
        (:meth:`_wave_ended`) and the rate limit allows."""
        total = sum(self.counts(rid).values())
        remaining = self.registry.unassigned(rid)
        if remaining == 0 or not self._wave_ended(rid, r, spec, now):
            return 0
        last = self.registry.last_wave(rid)
        wave = 0 if last is None else last + 1
        canary = _canary_count(spec.canary, total) if spec.canary else None
        if r["state"] == S.CANARY:
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
        ids = self.registry.assign_wave(rid, wave, min(size, remaining), now, rate_limited=r["state"] == S.WAVES)
        log.info("rollout %s: wave %d, %d devices", rid, wave, len(ids))
        return self._send(rid, r, "update", now)

    def _resend(self, rid: str, spec: RolloutSpec, now: float) -> int:
        """Send the same command again (same attempt, same update id) to every device out whose
        status has not named its update within ``resend_s`` of the last send (then twice and
        four times that; at most MAX_RESENDS per attempt) and that is not offline: a controller that died between marking a device sent and publishing, or a
        publish the broker never took, costs ``resend_s``, not the device's deadline. Devices
        ignore an update id they are installing or have installed. Returns how many went out."""
        rows = self.registry.unacknowledged(rid, now, spec.resend_s, MAX_RESENDS)
        commands: dict[str, Command] = {}
        made: dict[tuple[str, str, str, int], tuple[str, Command] | None] = {}   # one per signed group
        for row in rows:
            rollback = row["state"] == D.ROLLING_BACK
            key = ("rollback" if rollback else "update", row["tier"], row["prev_version"] if rollback else "",
                   row["rb_attempt"] if rollback else row["attempt"])
            if key not in made:
                g = self.registry.rollout_group(rid, *key)
                made[key] = None if g is None else (g["update_id"], _command(rid, g, now))
            entry = made[key]
            if entry is not None and entry[0] == row["update_id"]:
                commands[row["device_id"]] = entry[1]
        marked = self.registry.mark_resent(rid, [r for r in rows if r["device_id"] in commands], now) if commands else []
        for device_id in marked:
            log.info("rollout %s: %s has not acknowledged %s; sending it again", rid, device_id,
                     commands[device_id].announce.update_id)
            try:
                self.send(device_id, commands[device_id])
            except Exception as e:  # noqa: BLE001 - the next resend, or the deadline
                log.warning("rollout %s: could not send to %s again: %s", rid, device_id, e)
        return len(marked)

    def _wave_ended(self, rid: str, r: dict[str, Any], spec: RolloutSpec, now: float) -> bool:
        """The last wave is over when every device of it is final, or ``wave_success_pct`` of it
        committed, or ``wave_timeout_s`` (default: the longest tier deadline of the rollout)
        passed since its first command. Its stragglers keep their own deadlines and still
        count (abort criteria, completion); the wave just stops holding the next one back."""
        last = self.registry.last_wave(rid)
        if last is None:
            return True
        w = self.registry.wave_progress(rid, last)
        if w["open"] == 0 or w["committed"] >= math.ceil(w["n"] * spec.wave_success_pct / 100 - 1e-9):
            return True
        timeout = spec.wave_timeout_s or max(r["spec"].get("timeouts", {}).values(), default=600.0)
        return w["first_sent"] is not None and now >= w["first_sent"] + timeout

    # -- membership and pruning ----------------------------------------------------------------------
    def _grow(self, rid: str, r: dict[str, Any], spec: RolloutSpec, now: float, fresh: bool = False) -> int:
        """Add the target devices that appeared or came back online since the rollout started
        (membership is dynamic until it ends), every MEMBERSHIP_INTERVAL_S: they join the next
        wave. A device in another active rollout, revoked, offline, or of a tier the version is
        not packaged for is left out. ``fresh``: look now (before the rollout completes).
        Returns how many were added."""
        from edgeloop.cloud.fleet_registry import FleetRegistry

        if not fresh and now - self._grown_at.get(rid, -math.inf) < MEMBERSHIP_INTERVAL_S:
            return 0
        self._grown_at[rid] = now
        members = {d["device_id"] for d in self.registry.rollout_devices(rid)}
        terms = parse_selector(r["target"])
        fleet = FleetRegistry(self.registry)
        new = [d for d in fleet.devices() if d["device_id"] not in members and _matches(d, terms)
               and not d["revoked"] and d.get("tier") and d.get("state") != "offline"]
        packaged = {}
        for tier in sorted({d["tier"] for d in new}):
            try:
                self.registry.package_for(spec.model_version, tier)
                packaged[tier] = True
            except NotFound:
                log.warning("rollout %s: %s is not packaged for tier %s; its new devices wait", rid,
                            spec.model_version, tier)
        new = [d for d in new if d["tier"] in packaged]
        if not new:
            return 0
        groups, obj = self._groups_for(rid, r, spec, new, now)
        rows = [{"rollout_id": rid, "device_id": d["device_id"], "tier": d["tier"],
                 "prev_version": d.get("model_version") or "", "state": D.PENDING.value, "attempt": 0,
                 "rb_attempt": 0, "ord": sha256(f"{rid}/{d['device_id']}".encode()).hexdigest()[:16]} for d in new]
        added = self.registry.add_rollout_devices(rid, groups, rows, spec=obj)
        if added:
            fleet.set_target(added, spec.model_version)
            log.info("rollout %s: %d devices joined (appeared or came back): %s", rid, len(added),
                     ", ".join(added[:10]))
        return len(added)

    def _groups_for(self, rid: str, r: dict[str, Any], spec: RolloutSpec, devices: Rows,
                    now: float) -> tuple[Rows, dict[str, Any] | None]:
        """The signed groups joining ``devices`` need that the rollout has not signed yet (an
        update for a new tier, a rollback from a new previous version), and the spec with the
        new tiers' deadlines (None when no tier is new)."""
        wanted = []
        obj = dict(r["spec"])
        timeouts = dict(obj.get("timeouts", {}))
        for tier in sorted({d["tier"] for d in devices} - set(timeouts)):
            timeouts[tier] = spec.timeout_s or tier_profile(tier, self.ws.root).in_progress_timeout_s
            if not self.registry.has_rollout_group(rid, "update", tier, ""):
                wanted.append(("update", tier, "", spec.model_version, 1))
        for tier, prev in sorted({(d["tier"], d["model_version"]) for d in devices
                                  if d.get("model_version") and d["model_version"] != spec.model_version}):
            if self.registry.has_rollout_group(rid, "rollback", tier, prev):
                continue
            try:
                self.registry.package_for(prev, tier)
                wanted.append(("rollback", tier, prev, prev, 1))
            except NotFound:
                log.warning("rollout %s: no %s package of %s to roll back to", rid, tier, prev)
        groups = self._sign(rid, wanted, now, self._delta_bases(spec.model_version, devices)) if wanted else []
        if timeouts == obj.get("timeouts", {}):
            return groups, None
        obj["timeouts"] = timeouts
        return groups, obj

    def _prune(self) -> int | None:
        """Withdraw the director assignments of every rollout that ended, through the release
        path (Releaser.withdraw), so the director's metadata stays bounded. Returns how many
        were removed, or None if it could not (logged; the next start tries again)."""
        from edgeloop.cloud.release.releaser import Releaser

        try:
            if not self.ws.director_repository().initialized:
                return 0
            groups = self.registry.ended_rollout_groups()
            removed = Releaser(self.ws, self.registry, self.repository_url or "", self.director_url).withdraw(groups)
        except Exception:  # noqa: BLE001 - pruning never stops a rollout
            log.exception("could not withdraw the assignments of ended rollouts")
            return None
        if removed:
            log.info("withdrew %d director assignments of ended rollouts", removed)
        return removed


def _command(rid: str, group: dict[str, Any], now: float) -> Command:
    """The install command of one signed group (its announcement, this rollout)."""
    return Command(command="install", rollout_id=rid, announce=Announce.from_obj(json.loads(group["announce"])),
                   issued_at=now)
