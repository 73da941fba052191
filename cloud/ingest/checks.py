"""Which telemetry records are good data: the checks ingest runs on every batch.

A record that passed the wire schema (``edgeloop.contracts.messages.Telemetry``) is still refused when:

===================== ==========================================================================
reason                rule
===================== ==========================================================================
``unknown-device``    the fleet has enrolled devices (certificate serials in ``devices``) and
                      this id is not one of them
``revoked``           the device's certificate was revoked
``future-seq``        ``seq`` is more than ``max_seq_jump`` past the highest stored for the device
``baseline-mismatch`` the feature summary was counted on other bin edges than the baseline of the
                      record's model version (``features.edges`` digest, or the histogram shape)
===================== ==========================================================================

Refused records are never stored as telemetry; ingest counts them and keeps one row per refusal
in ``telemetry_rejects`` (reason and detail), so an operator sees what was refused and why. The
checks read the registry once per batch, never per record.

A record with an impossible time (its window ends more than ``max_clock_skew_s`` after the
control plane's now, or starts before :data:`EARLIEST_TIME`: a device clock that runs ahead or
was reset) is good data from a bad clock: it is *stored*, never refused, with its window moved
to end at the ingest's receive time (its length kept), flagged ``clock_suspect`` and the device's
own times kept in ``device_window_start`` / ``device_window_end`` (:data:`RETIMED` keys of
``extra``, which the ingest turns into those columns). Only then is it confirmed to the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

from edgeloop.contracts.baseline_digest import edges_digest
from edgeloop.contracts.messages import Telemetry
from edgeloop.cloud.registry import Registry

__all__ = ["EARLIEST_TIME", "IngestLimits", "RETIMED", "Reject", "TelemetryGate"]

EARLIEST_TIME = 1_577_836_800.0     # 2020-01-01 UTC: no edgeloop device recorded a window before it
RETIMED = ("clock_suspect", "device_window_start", "device_window_end")   # extra keys the gate sets


@dataclass(frozen=True)
class IngestLimits:
    max_seq_jump: int = 1_000_000       # an outbox holds ~5,000 records; gaps come from its drops
    max_clock_skew_s: float = 24 * 3600.0


@dataclass(frozen=True)
class Reject:
    device_id: str | None
    seq: int | None
    reason: str
    detail: str


class TelemetryGate:
    def __init__(self, registry: Registry, limits: IngestLimits = IngestLimits(),
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.limits = limits
        self.clock = clock
        self._baselines: dict[str, tuple[str, list[int]]] = {}   # model version -> (digest, bins per feature)
        self._missing: set[str] = set()                           # looked up in vain during this batch

    def check(self, records: list[Telemetry]) -> tuple[list[Telemetry], list[Reject]]:
        """Split a batch into records to store and refusals."""
        self._missing: set[str] = set()
        if not records:
            return [], []
        ids = sorted({r.device_id for r in records})
        enrolled, revoked = self._enrolment(ids)
        last = self._last_seq(ids)
        good, rejects = [], []
        now = self.clock()
        for r in records:
            reason = self._reason(r, enrolled, revoked, last, now)
            if reason:
                rejects.append(Reject(r.device_id, r.seq, *reason))
            else:
                good.append(self._retimed(r, now))
                last[r.device_id] = max(last.get(r.device_id, -1), r.seq)
        return good, rejects

    def _retimed(self, r: Telemetry, now: float) -> Telemetry:
        """The record, or, when its time is impossible, the same record at the receive time,
        flagged, with the device's own times kept (a device cannot set these keys itself)."""
        extra = {k: v for k, v in r.extra.items() if k not in RETIMED}
        if r.window_end <= now + self.limits.max_clock_skew_s and r.window_start >= EARLIEST_TIME:
            return replace(r, extra=extra) if len(extra) != len(r.extra) else r
        length = min(max(0.0, r.window_end - r.window_start), self.limits.max_clock_skew_s)
        extra.update(clock_suspect=True, device_window_start=r.window_start, device_window_end=r.window_end)
        return replace(r, window_start=now - length, window_end=now, extra=extra)

    def _reason(self, r: Telemetry, enrolled: set[str] | None, revoked: set[str], last: dict[str, int],
                now: float) -> tuple[str, str] | None:
        if r.device_id in revoked:
            return "revoked", "the device's certificate is revoked"
        if enrolled is not None and r.device_id not in enrolled:
            return "unknown-device", "not enrolled in this fleet"
        if r.device_id in last and r.seq > last[r.device_id] + self.limits.max_seq_jump:
            return "future-seq", f"seq {r.seq} is far past the last stored {last[r.device_id]}"
        if r.features is not None and r.model_version:
            expected = self._baseline(r.model_version)
            if expected is not None:
                digest, bins = expected
                got = r.features.get("edges")
                if (got is not None and got != digest) or [len(h) for h in r.features["hist"]] != bins:
                    return "baseline-mismatch", f"feature summary not on {r.model_version}'s baseline bins"
        return None

    def _enrolment(self, ids: list[str]) -> tuple[set[str] | None, set[str]]:
        """(enrolled ids among ``ids``, or None when the fleet enrols no one; revoked ids)."""
        return self.registry.enrolment(ids)

    def _last_seq(self, ids: list[str]) -> dict[str, int]:
        return self.registry.last_seqs(ids)

    def _baseline(self, model_version: str) -> tuple[str, list[int]] | None:
        """Known baselines are kept; an unknown one is looked up again (at most once per batch)."""
        if model_version in self._missing:
            return None
        if model_version not in self._baselines:
            found = self._load_baseline(model_version)
            if found is None:
                self._missing.add(model_version)
                return None
            self._baselines[model_version] = found
        return self._baselines[model_version]

    def _load_baseline(self, model_version: str) -> tuple[str, list[int]] | None:
        """The baseline every tier's package of this model version carries (stored once:
        cloud/drift/baselines.py); None if unknown here. A missing or corrupt one raises IntegrityError
        (the batch is not stored; devices send it again)."""
        from edgeloop.cloud.drift.baselines import model_baseline
        baseline = model_baseline(self.registry, model_version)
        if not baseline or not baseline.get("features"):
            return None
        return edges_digest(baseline["features"]), [len(f["counts"]) for f in baseline["features"]]
