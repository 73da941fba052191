"""The store interface: what the rest of edgeloop may ask of the control plane's database.

Domain operations only (insert a telemetry batch, upsert device statuses, move a rollout's
devices through their transitions, ...), never SQL: :class:`edgeloop.cloud.store.SqliteStore`
implements it over SQLite and PostgreSQL with the same SQL. One
Protocol per table family; :class:`Store` is all of them. Rows are plain dicts keyed by column
name (JSON columns decoded where the operation says so). Lookups of one named thing raise
:class:`~cloud.errors.NotFound`; every operation is atomic and safe to call from several
threads.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Iterable, Protocol

from edgeloop.cloud.store.fleet import DeviceFilter
from edgeloop.cloud.store.rollouts import AttemptEnd

__all__ = ["AccessStore", "CatalogStore", "DriftStore", "FleetStore", "RolloutStore", "Store"]


class CatalogStore(Protocol):
    """Data sets, runs, lineage, model versions, artifacts, packages, updates, pipeline runs."""

    def add_dataset(self, name: str, sha256: str, path: str, files: list, schema: dict) -> tuple[str, bool]:
        """Register a data set version; the same content under the same name is not registered twice.
        Returns (dataset_id, created)."""

    def dataset(self, ref: str) -> dict[str, Any]:
        """A data set by ``name`` (latest version) or ``name:version``. Raises NotFound."""

    def datasets(self) -> list[dict[str, Any]]: ...

    def start_run(self, row: dict[str, Any]) -> None:
        """Record a run as ``running`` (``pid`` and ``host``: the process training it)."""

    def finish_run(self, run_id: str, **fields: Any) -> None:
        """End a running run (status succeeded, failed or interrupted). Raises NotFound, or
        IntegrityError for a move the run status table does not allow."""

    def interrupt_run(self, run_id: str, reason: str) -> bool:
        """Mark a running run interrupted; False when it was not running any more."""

    def running_runs(self) -> list[dict[str, Any]]:
        """The runs recorded as running: run_id, pid, host, started_at."""

    def run(self, run_id: str) -> dict[str, Any]:
        """Raises NotFound."""

    def runs(self) -> list[dict[str, Any]]: ...

    def count_runs(self) -> int: ...

    def add_edge(self, src: str, dst: str, relation: str) -> None: ...

    def parents(self, node: str) -> list[dict[str, Any]]: ...

    def set_stage(self, model_version: str, stage: str) -> None: ...

    def set_task(self, model_version: str, task: dict[str, Any]) -> None:
        """Replace a model version's task description (``{"kind": ...}``)."""

    def in_stage(self, model: str, stage: str) -> list[str]: ...

    def next_version(self, model: str) -> int: ...

    def add_model_version(self, row: dict[str, Any]) -> None: ...

    def model_version(self, model_version: str) -> dict[str, Any]:
        """Raises NotFound."""

    def latest_model_version(self) -> str | None: ...

    def model_versions(self) -> list[dict[str, Any]]: ...

    def count_model_versions(self) -> int: ...

    def task_of(self, model_version: str) -> dict[str, Any]:
        """The model version's task (``{}`` when unknown)."""

    def add_artifact(self, sha256: str, kind: str, length: int, path: str) -> None: ...

    def artifact_path(self, sha256: str) -> str:
        """Raises NotFound."""

    def add_package(self, row: dict[str, Any]) -> None: ...

    def package(self, sha256: str) -> dict[str, Any]:
        """Raises NotFound."""

    def package_for(self, model_version: str, tier: str) -> dict[str, Any]:
        """The newest package of ``model_version`` for ``tier``. Raises NotFound."""

    def count_packages(self) -> int: ...

    def set_package_length(self, sha256: str, length: int) -> None:
        """Record another length for a package (what an operator's mistake or an attacker with
        the database would do; the release path must not trust it)."""

    def packages_of(self, model_version: str) -> list[dict[str, Any]]:
        """Every package of ``model_version``, newest first."""

    def packages_named(self, target: str) -> list[str]:
        """The sha256 of every package registered under this target name."""

    def upsert_update(self, row: dict[str, Any]) -> None:
        """Record an update, replacing one with the same id (signing the same update again)."""

    def updates(self) -> list[dict[str, Any]]: ...

    def update(self, update_id: str) -> dict[str, Any] | None: ...

    def pipeline_step_output(self, key: str) -> dict[str, Any] | None: ...

    def pipeline_step_outputs(self, step: str) -> list[dict[str, Any]]: ...

    def remember_pipeline_step(self, key: str, step: str, output: dict[str, Any]) -> None: ...

    def record_pipeline_run(self, row: dict[str, Any]) -> None:
        """Insert or replace a pipeline run (``steps`` a list, stored as JSON)."""

    def pipeline_runs(self) -> list[dict[str, Any]]: ...



class FleetStore(Protocol):
    """Devices, enrolment, telemetry, error reports, refused telemetry, label feedback."""

    def record_status(self, row: dict[str, Any]) -> None:
        """Store a device's latest status. First seen is set by the first status (also for a device
        enrolled before it ever spoke); an ``offline`` status without a model version (the last
        will) keeps the last known model version and update."""

    def record_statuses(self, rows: list[dict[str, Any]], installed: Iterable[tuple[str, str]] = ()) -> None:
        """:meth:`record_status` for many statuses, applied in order, and the ``installed`` lineage
        edges of (update_id, device_id) pairs, all in one transaction: what the control plane's
        ingest stores per batch (one commit per status costs the fleet-scale ingest its time)."""

    def devices(self, tier: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        """The raw device rows, by device id (cloud.fleet_registry adds online, errors, tags)."""

    def device_states(self) -> dict[str, int]:
        """How many devices are in each stored state (one count, not the rows: fleet-scale waits)."""

    def forget_device(self, device_id: str) -> None:
        """Delete a device's row (its telemetry and reports stay)."""

    def enroll_device(self, device_id: str, values: dict[str, Any]) -> None:
        """Record an enrolled device's certificate fields. Raises UserError if it is already
        enrolled; then nothing changed."""

    def mark_revoked(self, device_id: str) -> None: ...

    def set_target(self, device_ids: Iterable[str], model_version: str | None) -> int:
        """Record the model version a rollout wants these devices to run. Returns how many exist."""

    def enrolled(self, device_id: str) -> dict[str, Any] | None:
        """The device's certificate fields if it is enrolled, else None."""

    def fleet_devices(self, where: DeviceFilter, online_since: float,
                      device_id: str | None = None) -> list[dict[str, Any]]:
        """Devices matching ``where`` (and ``device_id``), by id, with ``online`` (heard from since
        ``online_since``, last status not offline), ``last_error`` and decoded tags and groups."""

    def enrolment(self, device_ids: list[str]) -> tuple[set[str] | None, set[str]]:
        """(enrolled ids among ``device_ids``, or None when the fleet enrols no one; revoked ids)."""

    def add_telemetry(self, rows: Iterable[dict[str, Any]]) -> int:
        """Insert records, ignoring (device_id, seq) already stored, and add the new ones into
        their devices' drift summaries (cloud/store/drift_summary.py), in one transaction.
        Returns how many were new. (Plain statements: the ingest's hot path, ~3x cheaper than
        insert_all.)"""

    def last_seqs(self, device_ids: list[str]) -> dict[str, int]:
        """The highest stored telemetry seq of each of ``device_ids`` that has any."""

    def telemetry_records(self, device_id: str | None = None, model_version: str | None = None,
                          seq_from: int | None = None, seq_to: int | None = None) -> list[dict[str, Any]]:
        """Stored telemetry records (JSON fields as stored text), by (device_id, seq); ``seq_to``
        is exclusive."""

    def telemetry_count(self, device_ids: Iterable[str] | None = None) -> int:
        """How many records are stored (of ``device_ids``, if given)."""

    def device_telemetry_totals(self, device_id: str, seq_from: int | None = None,
                                seq_to: int | None = None) -> dict[str, Any]:
        """records, inferences, correct and labelled of a device's telemetry (seq range optional,
        ``seq_to`` exclusive); sums are None when it has none."""

    def device_samples(self, since: float | None = None, devices: Iterable[str] | None = None,
                       labelled_only: bool = True) -> tuple[list[list[float]], list[int | None], list[str]]:
        """Raw inputs that devices sampled into their telemetry (opt-in on the device), stored once
        per record like the record itself: (rows, labels, device ids), in (device, seq) order."""

    def telemetry_summary(self, model_version: str | None = None) -> dict[str, Any]:
        """records, inferences, labelled, correct, errors, accuracy, mae and (anomaly models)
        anomaly_rate over the stored telemetry (of ``model_version``, if given)."""

    def drift_rows(self) -> list[dict[str, Any]]:
        """Telemetry with a model version, with the device's tier and tags, and operator label
        feedback in place of the device's own label counts where the operator sent some for that
        window; by (window_end, device_id, seq)."""

    def add_device_error(self, row: dict[str, Any]) -> bool:
        """Store an error report; one whose ``report_id`` is already stored is not stored again.
        Returns whether it was new."""

    def device_errors(self, device_id: str | None = None) -> list[dict[str, Any]]: ...

    def latest_error_code(self, device_id: str, update_id: str) -> str | None:
        """The code of the newest error report a device sent about an update, or None."""

    def add_telemetry_rejects(self, rows: list[dict[str, Any]]) -> None:
        """Telemetry ingest refused (reason, detail; docs/contracts/telemetry.md): never stored as data."""

    def telemetry_rejects(self) -> list[dict[str, Any]]: ...

    def add_label_feedback(self, rows: list[dict[str, Any]], source: str = "operator") -> int:
        """Delayed ground truth for stored telemetry windows: per (device_id, seq), how many of the
        window's inferences are now labelled, how many of those were right and (regression, optional
        ``abs_err_sum``) their summed absolute error. Replaces the device's own label counts for
        that window in accuracy and MAE (a later feedback for a window replaces an earlier one).
        Returns how many windows it names that are stored."""



class DriftStore(Protocol):
    """The drift report's per-cohort aggregates (cloud/store/drift.py): ``by`` is one of device,
    tier, tag, site, model_version, fleet; every result is per (cohort key, model version)."""

    def drift_cohort_totals(self, by: str) -> list[dict[str, Any]]:
        """records, inferences, labelled, correct, err_records, abs_err_sum, err_labelled,
        featured, residual, rn and the summed ``predictions`` of each cohort (``key``,
        ``model_version``), over its whole history."""

    def drift_cohort_features(self, by: str) -> dict[tuple[str, str], dict[str, Any]]:
        """The merged feature summary (hist, n, missing, sum, sumsq, min, max, rsum, rsumsq) of each
        cohort's records that carry one."""

    def drift_cohort_rows(self, by: str, newest: int) -> list[dict[str, Any]]:
        """Each cohort's first record (``first``) and its newest ``newest`` short of all of
        them (``recent``, with their summaries), as drift_rows gives them plus ``key``."""


class AccessStore(Protocol):
    """Alerts, API tokens and the audit log of operator actions."""

    def add_alert(self, row: dict[str, Any]) -> None: ...

    def alerts(self) -> list[dict[str, Any]]: ...

    def add_token(self, row: dict[str, Any], now: float) -> bool:
        """Store a token (token_id, name, role, sha256, created_at, expires_at) unless an active
        one (not revoked, not expired at ``now``) has its name. Returns whether it was stored."""

    def tokens(self) -> list[dict[str, Any]]: ...

    def revoke_token(self, ref: str, now: float) -> tuple[dict[str, Any], bool] | None:
        """Revoke the token with this id or name (an active one first, else the newest). Returns
        (its row as it was, whether it was already revoked), or None if there is none."""

    def add_audit(self, row: dict[str, Any]) -> None:
        """Append one operator action: ``ts``, ``actor``, ``action``, ``subject``, ``detail`` (a dict)."""

    def audit(self, since: float | None = None, action: str | None = None) -> list[dict[str, Any]]:
        """The recorded actions oldest first (``since``: at or after; ``action``: only that one),
        ``detail`` decoded."""

    def use_token(self, sha256: str, now: float) -> dict[str, Any] | None:
        """The active token with this hash, its last use set to ``now``; None if there is none."""



class RolloutStore(Protocol):
    """Rollouts, their devices, signed groups and attempts; device transitions."""

    def rollout_row(self, rollout_id: str) -> dict[str, Any] | None:
        """The rollout with ``spec`` and ``health`` decoded, or None."""

    def rollout_ids(self, active_only: bool = False) -> list[str]:
        """Active rollouts oldest first, or every rollout newest first."""

    def busy_devices(self, device_ids: list[str]) -> tuple[str, int] | None:
        """(an active rollout, how many of ``device_ids`` are in it), or None."""

    def insert_rollout(self, rollout: dict[str, Any], groups: list[dict[str, Any]],
                       devices: list[dict[str, Any]]) -> tuple[str, int] | None:
        """Store a new rollout (``spec`` a dict), its signed groups and its devices in one
        transaction, unless some of its devices are in an active rollout: then that rollout's
        (id, count) is returned and nothing is stored."""

    def move_rollout(self, rollout_id: str, frm: str, sets: dict[str, Any]) -> bool:
        """Apply ``sets`` (its ``state`` the caller took from the transition table) if the
        rollout is still in ``frm``. Returns whether it was."""

    def rollout_step_lock(self, rollout_id: str) -> AbstractContextManager[bool]:
        """Whether this store holds the rollout's step lock for the block (never waits: False
        while another controller steps it; given back by the server when the holder dies)."""

    def set_rollout_health(self, rollout_id: str, health: dict[str, Any], now: float) -> None: ...

    def rollout_group(self, rollout_id: str, kind: str, tier: str, prev: str, attempt: int) -> dict[str, Any] | None: ...

    def has_rollout_group(self, rollout_id: str, kind: str, tier: str, prev: str) -> bool: ...

    def add_rollout_groups(self, groups: list[dict[str, Any]]) -> None:
        """Store signed groups; one already stored (another controller signed it) is kept."""

    def rollout_update_ids(self, rollout_id: str, kind: str = "update") -> set[str]: ...

    def rollout_device_counts(self, rollout_id: str) -> dict[str, int]:
        """Devices per state, every state present."""

    def rollout_devices(self, rollout_id: str) -> list[dict[str, Any]]:
        """Every device row of the rollout, in dispatch order."""

    def rollout_attempts(self, rollout_id: str) -> list[dict[str, Any]]: ...

    def commands_sent(self, rollout_id: str) -> int: ...

    def rollout_waves(self, rollout_id: str) -> list[dict[str, Any]]:
        """(wave, n, first_sent, last_sent) per wave, in order."""

    def last_wave(self, rollout_id: str) -> int | None: ...

    def wave_done(self, rollout_id: str) -> bool:
        """No device of a wave is waiting to be sent or for its result."""

    def unassigned(self, rollout_id: str) -> int:
        """Devices not yet in any wave."""

    def wave_progress(self, rollout_id: str, wave: int) -> dict[str, Any]:
        """One wave: ``n`` devices, ``committed``, ``open`` (not yet final) and ``first_sent``."""

    def unacknowledged(self, rollout_id: str, now: float, after_s: float, most: int) -> list[dict[str, Any]]:
        """Devices out whose status never named the update they were sent, not offline, sent
        again fewer than ``most`` times this attempt, last sent ``after_s`` (doubling) ago."""

    def commands_resent(self, rollout_id: str) -> int: ...

    def mark_resent(self, rollout_id: str, rows: Iterable[dict[str, Any]], now: float) -> list[str]:
        """Record a command sent again (same attempt) for rows still as read; returns those marked."""

    def add_rollout_devices(self, rollout_id: str, groups: list[dict[str, Any]], devices: list[dict[str, Any]],
                            spec: dict[str, Any] | None = None) -> list[str]:
        """Add devices to an active rollout unless they are in it or in another active one."""

    def ended_rollout_groups(self) -> list[str]:
        """The director groups of every ended rollout."""

    def in_flight(self, rollout_id: str) -> int: ...

    def reported_results(self, rollout_id: str) -> list[dict[str, Any]]:
        """Devices out (sent, rolling back) whose status reports a final state for the very
        update they were sent: their row with the status's state ``vs`` and reason ``vr``."""

    def overdue(self, rollout_id: str, now: float) -> list[dict[str, Any]]:
        """Devices out whose deadline passed before ``now``."""

    def health_totals(self, rollout_id: str, model_version: str, pct: int = 95) -> dict[bool, dict[str, Any]]:
        """Telemetry of the rollout's committed devices that ran another version before, added up
        (SQL aggregates) under ``model_version`` (True) and under that previous version (False),
        in the shape cloud.rollouts.health.judge takes (tests/health_reference.py adds rows up the same way)."""

    def assign_wave(self, rollout_id: str, wave: int, size: int, now: float, rate_limited: bool) -> list[str]:
        """Put the next ``size`` devices not yet in a wave (dispatch order) into ``wave``; with
        ``rate_limited``, count them into the rollout's waves (its rate limit), in the same
        transaction."""

    def due(self, rollout_id: str, phase: str) -> list[dict[str, Any]]:
        """Devices due a command in ``phase`` ("update": pending in a wave; "rollback": rolling
        back, not yet sent), in dispatch order."""

    def mark_sent(self, rollout_id: str, phase: str, commands: dict[tuple[str, str, int], tuple[str, Any]],
                  timeouts: dict[str, float], now: float) -> list[tuple[str, Any]]:
        """The ``send`` transition for every device due a command in ``phase`` that ``commands``
        has one for, keyed by (tier, previous version or "" for updates, attempt): its attempt
        counted, its update id and deadline set, the attempt recorded, in one write transaction
        that no other writer can interleave. Returns the (device_id, command) pairs to publish
        (after this commit: a crash in between costs a timeout, never a duplicate)."""

    def end_attempts(self, rollout_id: str, ends: Iterable[AttemptEnd], now: float) -> int:
        """Devices' attempts end: each row moves to the state its event takes it to (a ``retry``
        clears its update id for the next send; any other event records ``finished_at``) and its
        attempt records the outcome, all in one transaction. Idempotent: keyed by (rollout,
        device, state, attempt, update id); an attempt already closed keeps its outcome. Returns
        how many devices moved. Raises IllegalTransition, writing nothing, for a pair that is not
        a row of the device table."""

    def abort_devices(self, rollout_id: str, model_version: str, now: float) -> int:
        """The abort transitions, in one transaction: devices never sent are cancelled; devices
        that committed roll back, or fail their rollback when there is nothing to roll back to
        (no previous version, or no package of it for their tier); devices that timed out but
        run ``model_version`` all the same roll back too. Returns how many devices moved."""


class Store(CatalogStore, FleetStore, DriftStore, AccessStore, RolloutStore, Protocol):
    """The whole store: every table family, on one database."""

    path: Path

    def checkpoint(self) -> None:
        """Make everything committed durable in the database itself (SQLite: empty the WAL)."""

    def hold(self, name: str) -> bool:
        """Take the lock on ``name`` for as long as this store's connection lives (closing it, or
        the process ending, gives it back); False if another store holds it. SQLite: True."""

    def release(self, name: str) -> None:
        """Give back a lock :meth:`hold` took."""

    def stored_bytes(self) -> int:
        """The bytes the store's tables and their indexes take (SQLite: the file's pages;
        PostgreSQL: the tables of its schema, TOAST and indexes included)."""

    def close(self) -> None: ...
