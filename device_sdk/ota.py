"""Installing an update on the device: an explicit, persisted state machine over two slots.

::

    idle/committed/failed/rolled_back ──start──▶ downloading ──fetched──▶ verifying
         verifying ──verified──▶ installing ──written──▶ testing ──passed──▶ committed
         downloading/verifying/installing ──refused──▶ failed        (definitive, or retries ran out)
         testing ──unhealthy──▶ rolled_back                           (health check failed)
         any in-flight state ──postponed──▶ idle                      (transient: retry)

The state (with the announcement being installed) is persisted in ``state.json`` (a
:class:`~device_sdk.ports.StateStore`, atomic writes) before each step, and the state in memory
changes only once that write succeeded: a write that fails (a full or read-only disk) raises
StorageError (``storage.full``, ``storage.readonly``, ``storage.write``) and leaves memory and
disk in agreement, on the last state that was written, with the serving model unchanged. The install is a sequence of steps
(:meth:`Installer.begin`, then :meth:`Installer.complete` or :meth:`Installer.fetch_failed`) that
its driver takes when it is ready, so it needs no thread; the download between them is the
fetcher's. The package is written to the *inactive* slot (fsynced,
atomic rename); the new model is loaded and health-checked *beside* the serving one; the
switch is the single atomic write of ``state.json`` that names the new active slot, so a
power cut at any point leaves the device on its previous verified model or on the new one.

On start-up :meth:`Installer.recover` looks at what it finds: an update cut off before
``testing`` is resumed (downloads resume from their partial bytes), one cut off in
``testing`` is rolled back, and one interrupted :data:`MAX_RESUMES` times is given up as
failed (loop detection).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from edgeloop.contracts.codes import ErrorCode
from edgeloop.contracts.package import Package, read_package, sha256_hex
from edgeloop.contracts.errors import ContractError
from edgeloop.contracts.messages import Announce, as_dict
from edgeloop.device_sdk.errors import TransientError, UpdateRefused
from edgeloop.device_sdk.runtime import DEFAULT_LOADER, HealthReport, ModelRuntime
from edgeloop.device_sdk.storage import JsonFile, atomic_write

if TYPE_CHECKING:
    from edgeloop.device_sdk.ports import RuntimeLoader, StateStore

STATE_SCHEMA = "edgeloop.agent-state/1"
SLOTS = ("a", "b")
MAX_RESUMES = 3

__all__ = ["Installer", "InstallState", "InstallResult", "Fetch", "TRANSITIONS", "Event", "MAX_RESUMES"]

Fetch = Callable[[Announce], bytes]


class InstallState(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    TESTING = "testing"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class Event(StrEnum):
    START = "start"
    FETCHED = "fetched"
    VERIFIED = "verified"
    WRITTEN = "written"
    PASSED = "passed"
    REFUSED = "refused"        # verification failed: this update is never installed
    UNHEALTHY = "unhealthy"    # the new model failed its health check: back to the old slot
    POSTPONED = "postponed"    # a transient failure: back to idle, the update may be retried


S = InstallState
_IN_FLIGHT = (S.DOWNLOADING, S.VERIFYING, S.INSTALLING, S.TESTING)
_DONE = (S.IDLE, S.COMMITTED, S.FAILED, S.ROLLED_BACK)
TRANSITIONS: dict[tuple[InstallState, Event], InstallState] = {
    **{(s, Event.START): S.DOWNLOADING for s in _DONE},
    # a resumed update starts again from the state it was cut off in
    **{(s, Event.START): s for s in (S.DOWNLOADING, S.VERIFYING, S.INSTALLING)},
    (S.DOWNLOADING, Event.FETCHED): S.VERIFYING,
    (S.VERIFYING, Event.VERIFIED): S.INSTALLING,
    (S.INSTALLING, Event.WRITTEN): S.TESTING,
    (S.TESTING, Event.PASSED): S.COMMITTED,
    **{(s, Event.REFUSED): S.FAILED for s in _IN_FLIGHT},
    (S.TESTING, Event.UNHEALTHY): S.ROLLED_BACK,
    **{(s, Event.POSTPONED): S.IDLE for s in _IN_FLIGHT},
}


@dataclass(frozen=True)
class InstallResult:
    state: InstallState
    update_id: str
    model_version: str | None      # now serving
    reason: str | None = None
    code: ErrorCode | None = None
    health: HealthReport | None = None


class Installer:
    """Owns the install state and the two slots of one device.

    One update runs as three calls, each a step the agent takes when it is ready for it (so an
    install needs no thread): :meth:`begin` (``downloading``, or the state a resumed update was
    cut off in), then, once a fetcher has the bytes, :meth:`complete` (verify, write the slot,
    load and health-check, switch) or, if it could not get them, :meth:`fetch_failed`.
    :meth:`install` runs the three in a row around a blocking fetch.
    """

    def __init__(self, root: Path, tier: str, max_package_bytes: int,
                 on_state: Callable[[InstallState, str], None] | None = None, *,
                 store: StateStore | None = None, runtimes: RuntimeLoader | None = None) -> None:
        self.root = Path(root)
        self.tier = tier
        self.max_package_bytes = max_package_bytes
        self._on_state = on_state or (lambda state, update_id: None)
        # told every transition with its reason and code, after it is persisted (Agent.observe)
        self.observer: Callable[[InstallState, str, str | None, ErrorCode | None], None] | None = None
        self._store: StateStore = store if store is not None else JsonFile(self.root / "state.json")
        self.runtimes: RuntimeLoader = runtimes if runtimes is not None else DEFAULT_LOADER
        self._state: dict[str, Any] = self._store.load() or {
            "schema": STATE_SCHEMA, "active_slot": None, "model_version": None,
            "update": {"id": None, "state": str(S.IDLE), "reason": None}, "refused": [],
        }

    # -- queries --------------------------------------------------------------------------
    @property
    def state(self) -> InstallState:
        return InstallState(self._state["update"]["state"])

    @property
    def model_version(self) -> str | None:
        version: str | None = self._state["model_version"]
        return version

    @property
    def update_id(self) -> str | None:
        uid: str | None = self._state["update"]["id"]
        return uid

    def already_handled(self, update_id: str) -> bool:
        """True if this update is installed or was refused (so it is not tried again)."""
        return update_id in self._state["refused"] or (
            self._state["update"]["id"] == update_id and self.state == S.COMMITTED)

    def active_package_bytes(self) -> bytes | None:
        slot = self._state["active_slot"]
        if slot is None:
            return None
        return (self.root / "slots" / slot / "package.elpkg").read_bytes()

    def active_package(self) -> Package | None:
        data = self.active_package_bytes()
        return None if data is None else read_package(data)

    def load_active(self) -> ModelRuntime | None:
        """The runtime of the active slot's package (start-up), or None without one."""
        data = self.active_package_bytes()
        return None if data is None else self.runtimes.load(read_package(data), sha256_hex(data))

    def factory_install(self, data: bytes) -> None:
        """The package a device leaves the factory with: written to slot ``a`` and made active,
        on a device that has never installed anything. Raises UpdateRefused for a package that is
        malformed or for another tier, ValueError on a device that already has a model."""
        if self._state["active_slot"] is not None or self.update_id is not None:
            raise ValueError("factory install on a device that already has a model")
        try:
            manifest = read_package(data).manifest
        except ContractError as e:
            raise UpdateRefused(ErrorCode.VERIFY_PACKAGE, str(e)) from e
        if manifest.tier != self.tier:
            raise UpdateRefused(ErrorCode.VERIFY_MISMATCH, f"a {manifest.tier} package on a {self.tier} device")
        atomic_write(self.root / "slots" / "a" / "package.elpkg", data)
        self._save({**self._state, "active_slot": "a", "model_version": manifest.model_version})

    # -- the machine ----------------------------------------------------------------------
    def recover(self) -> Announce | None:
        """After a restart: the update to resume, if any. The active slot is never changed here."""
        update = self._state["update"]
        if self.state not in _IN_FLIGHT:
            return None
        if self.state == S.TESTING:
            self._fire(Event.UNHEALTHY, update["id"], reason="interrupted while testing: rolled back")
            return None
        if update.get("resumes", 0) >= MAX_RESUMES or not update.get("announce"):
            self._fire(Event.REFUSED, update["id"], reason=f"interrupted {update.get('resumes', 0)} times: given up",
                       refused=True)
            return None
        self._save({**self._state, "update": {**update, "resumes": update.get("resumes", 0) + 1}})
        return Announce.from_obj(update["announce"])

    def install(self, announce: Announce, fetch: Fetch,
                prepared: Callable[[ModelRuntime], None] | None = None) -> tuple[InstallResult, ModelRuntime | None]:
        """Run one update to ``committed``, ``failed`` or ``rolled_back``, fetching with a
        blocking ``fetch``.

        ``prepared`` is called with the new, healthy runtime just before the switch is
        persisted. Raises TransientError (state back to ``idle``) when the package could not
        be fetched; the partial download is kept for the next attempt.
        """
        self.begin(announce)
        try:
            data = fetch(announce)
        except (TransientError, UpdateRefused) as e:
            result = self.fetch_failed(announce, e)
            if result is None:
                raise
            return result, None
        return self.complete(announce, data, prepared)

    def begin(self, announce: Announce) -> None:
        """Step 1: enter ``downloading`` (a resumed update re-enters the state it was cut off in)."""
        uid = announce.update_id
        if self.state == S.TESTING:   # the switch's write failed (a full disk): as after a restart
            self._fire(Event.UNHEALTHY, self._state["update"]["id"], reason="interrupted while testing: rolled back")
        resumed = self._state["update"]["id"] == uid and self.state in _IN_FLIGHT
        self._fire(Event.START, uid, announce=announce, keep_resumes=resumed)

    def fetch_failed(self, announce: Announce, error: TransientError | UpdateRefused,
                     give_up: bool = False) -> InstallResult | None:
        """Step 2, when the fetcher failed. A transient failure (network trouble, or a refusal
        whose code is transient: ``ErrorCode.retryable``) goes back to ``idle`` (None: retry
        later, the partial download is kept), or with ``give_up`` (the retries ran out) ends
        ``failed`` without being remembered, so the same update announced again is tried
        afresh. A definitive refusal ends ``failed`` and is remembered (never tried again)."""
        uid = announce.update_id
        code = error.code if isinstance(error, UpdateRefused) else ErrorCode.TRANSPORT_DOWNLOAD
        if code.retryable and not give_up:
            self._fire(Event.POSTPONED, uid, reason=str(error), code=code, announce=announce)
            return None
        if isinstance(error, TransientError):
            error = UpdateRefused(code, str(error))
        return self._refuse(uid, error, Event.REFUSED, remember=not code.retryable)

    def complete(self, announce: Announce, data: bytes,
                 prepared: Callable[[ModelRuntime], None] | None = None) -> tuple[InstallResult, ModelRuntime | None]:
        """Step 2, with the fetched bytes: verify, write the inactive slot, load and health-check
        beside the serving model, then switch (one atomic state write)."""
        uid = announce.update_id
        try:
            if self.state == S.DOWNLOADING:
                self._fire(Event.FETCHED, uid)
            bundle = self._verify(announce, data)
            if self.state == S.VERIFYING:
                self._fire(Event.VERIFIED, uid)
            slot = "b" if self._state["active_slot"] == "a" else "a"
            if self.state == S.INSTALLING:
                atomic_write(self.root / "slots" / slot / "package.elpkg", data)
                self._fire(Event.WRITTEN, uid)
        except UpdateRefused as e:
            return self._refuse(uid, e, Event.REFUSED), None
        try:
            runtime = self.runtimes.load(bundle, sha256_hex(data))
            health = self.runtimes.check(runtime, bundle)
        except UpdateRefused as e:
            return self._refuse(uid, e, Event.UNHEALTHY), None
        if prepared:
            prepared(runtime)
        self._fire(Event.PASSED, uid,   # this write is the switch
                   changes={"active_slot": slot, "model_version": bundle.manifest.model_version})
        return InstallResult(S.COMMITTED, uid, self.model_version, health=health), runtime

    def _refuse(self, update_id: str, error: UpdateRefused, event: Event, remember: bool = True) -> InstallResult:
        self._fire(event, update_id, reason=error.message, code=error.code, refused=remember)
        return InstallResult(self.state, update_id, self.model_version, error.message, error.code)

    def _verify(self, announce: Announce, data: bytes) -> Package:
        try:
            bundle = read_package(data)
        except ContractError as e:
            raise UpdateRefused(ErrorCode.VERIFY_PACKAGE, str(e)) from e
        m = bundle.manifest
        if m.model_version != announce.model_version or m.tier != announce.tier or m.tier != self.tier:
            raise UpdateRefused(ErrorCode.VERIFY_MISMATCH,
                                f"package is {m.model_version} for {m.tier}, announced "
                                f"{announce.model_version} for {announce.tier}, device tier {self.tier}")
        return bundle

    def _save(self, state: dict[str, Any]) -> None:
        """Persist, then adopt: memory never runs ahead of the disk. Raises StorageError."""
        self._store.save(state)
        self._state = state

    def _fire(self, event: Event, update_id: str, reason: str | None = None, code: ErrorCode | None = None,
              announce: Announce | None = None, keep_resumes: bool = False, refused: bool = False,
              changes: dict[str, Any] | None = None) -> None:
        """One transition, persisted before it takes effect (with ``changes`` to the state and,
        with ``refused``, the update remembered as never to be tried again)."""
        key = (self.state, event)
        if key not in TRANSITIONS:
            raise RuntimeError(f"install state machine: no transition for {key}")
        new = TRANSITIONS[key]
        old = self._state["update"]
        entry = {"id": update_id, "state": str(new), "reason": reason, "code": code, "at": time.time(),
                 "announce": as_dict(announce) if announce else old.get("announce") if old.get("id") == update_id else None,
                 "resumes": old.get("resumes", 0) if keep_resumes or event != Event.START else 0}
        state = {**self._state, **(changes or {}), "update": entry}
        if refused:
            state["refused"] = (self._state["refused"] + [update_id])[-32:]
        self._save(state)
        self._on_state(new, update_id)
        if self.observer is not None:
            self.observer(new, update_id, reason, code)
