"""The device agent: listens for updates, installs them safely, serves inference, reports.

The agent owns no thread and no I/O: whoever runs it (a real device's main loop, the gateway,
the threaded fleet simulator, or the swarm's asyncio loop) calls :meth:`Agent.step` to take the
next step of an install, run a due retry or handle one queued message, and :meth:`Agent.infer`
to serve requests, from the same thread or from two (a serving thread and a control thread):
the model switch and the telemetry window are guarded by one lock, held only for bookkeeping,
never during inference or a download. Its parts are :mod:`edgeloop.device_sdk.ports` Protocols (the MQTT
link, the update fetcher, the runtime loader, the state, outbox and sequence stores), built by
:mod:`edgeloop.device_sdk.factory` unless given. An install is the installer's steps
(device_sdk/ota.py): ``begin``, the fetcher's download (a blocking fetcher does it inside one
``step`` on the control thread; an asynchronous one in the background of the caller's loop),
then ``complete``; the new model is loaded and health-checked beside the serving one and the
switch happens between requests, so no request fails or waits on an install.

Bad input never stops it: a malformed message is logged and dropped; a bad update is refused,
reported on the status topic and through the outbox on the errors topic (codes:
:class:`edgeloop.contracts.codes.ErrorCode`), and the current model keeps serving.

Nor does the disk: telemetry and error reports reach the outbox through a
:class:`~device_sdk.spool.Spool`, which holds them in memory (bounded, drops counted) while the
state folder is full or read-only and stores them, numbered in order, once it takes writes again;
the fault (``storage.full``, ``storage.readonly``) is on the device's status (``faults``) meanwhile.

Time comes from the control plane: on every connect and every ``time_sync_s`` the agent asks for
signed time (device_sdk/clock.py); TUF expiry, telemetry windows and statuses use that trusted
clock, and a clock off by more than ``clock_tolerance_s`` is a ``clock.skewed`` fault on the status,
with the offset in ``clock_offset_s``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from edgeloop.contracts import topics
from edgeloop.contracts.codes import ErrorCode
from edgeloop.contracts.errors import ContractError
from edgeloop.contracts.messages import (MAX_FEATURES, M, Announce, Command, DeviceState, ErrorReport, SignedTime, Status,
                                        TelemetryAck, encode, parse)
from edgeloop.contracts.tasks import TaskKind
from edgeloop.device_sdk import factory
from edgeloop.device_sdk.clock import TrustedClock
from edgeloop.device_sdk.delivery import Delivery
from edgeloop.device_sdk.errors import StorageError, TransientError, UpdateRefused
from edgeloop.device_sdk.ota import InstallResult, Installer, InstallState
from edgeloop.device_sdk.ports import Link, OutboxStore, RuntimeLoader, Sent, SequenceStore, StateStore, UpdateFetcher
from edgeloop.device_sdk.runtime import ModelRuntime
from edgeloop.device_sdk.spool import Spool, SpoolLimits
from edgeloop.device_sdk.storage import fault_code
from edgeloop.device_sdk.telemetry import TelemetryWindow

log = logging.getLogger("edgeloop.agent")

__all__ = ["Agent", "AgentConfig", "UpdateEvent"]

_OTA_STATUS = {
    InstallState.DOWNLOADING: DeviceState.DOWNLOADING, InstallState.VERIFYING: DeviceState.VERIFYING,
    InstallState.INSTALLING: DeviceState.INSTALLING, InstallState.TESTING: DeviceState.TESTING,
}
_FINAL_STATUS = {InstallState.COMMITTED: DeviceState.COMMITTED, InstallState.FAILED: DeviceState.FAILED,
                 InstallState.ROLLED_BACK: DeviceState.ROLLED_BACK}


@dataclass(frozen=True)
class AgentConfig:
    """Everything an agent needs, with every bound in one place."""

    device_id: str
    tier: str
    state_dir: Path
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    fleet: str = topics.DEFAULT_FLEET   # the fleet id: the namespace of every topic (contracts/topics.py)
    group: str | None = None            # director assignment group (default: the tier)
    max_package_bytes: int = 64 * 1024 * 1024
    download_timeout_s: float = 30.0    # a stalled download gives up after this, and resumes later
    telemetry_window: int = 20          # inferences per telemetry record
    inbox_max: int = 256                # queued MQTT messages before new ones are dropped
    retry_delays_s: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)   # after transient download failures
    transport: str = "http"             # how packages travel: "http" (Range resume) or "mqtt" (blocks)
    outbox_max_bytes: int = 16 * 1024 * 1024     # store-and-forward bound while offline
    outbox_max_age_s: float = 7 * 24 * 3600.0
    held_max: int = 1024                # telemetry held in memory while the disk refuses writes
    held_max_bytes: int = 4 * 1024 * 1024   # (device_sdk/spool.py; beyond it drops are counted)
    max_in_flight: int = 64             # outbox messages published but not yet acknowledged
    confirm_timeout_s: float | None = 60.0   # telemetry the ingest has not confirmed is sent again after
                                             # this (None: delete on the broker's PUBACK; device_sdk/delivery.py)
    heartbeat_s: float = 60.0           # re-publish the last status after this long without one (0: never)
    tls_ca: Path | None = None          # CA of the broker's certificate: TLS on (off without it)
    tls_cert: Path | None = None        # this device's certificate and key: mutual TLS
    tls_key: Path | None = None
    sample_rate: float = 0.0            # share of requests whose raw input rides along in telemetry (off;
                                        # inputs of over MAX_FEATURES values are never sampled)
    sample_max: int = 8                 # at most this many sampled inputs per telemetry window
    network_thread: bool = True         # the default link's paho network thread (False: its I/O
                                        # runs inside step(), and the device is one thread)
    time_sync_s: float = 3600.0         # ask for the control plane's signed time this often, and on
                                        # every connect (0: never; the wall clock is trusted)
    clock_tolerance_s: float = 300.0    # a clock further off than this is a clock.skewed fault
    clock_skew_s: float = 0.0           # a simulated device's wall clock runs this far off (fault
                                        # tests, simulators); 0 on a real device


@dataclass(frozen=True)
class UpdateEvent:
    """One step of an update on this device, for :meth:`Agent.observe`: ``announced``, then each
    state the install enters (``downloading``, ``verifying``, ``installing``, ``testing``,
    ``committed``, ``failed``, ``rolled_back``, or ``idle`` when a download is postponed), or
    ``failed`` for an update refused before or outside the install (``code``: ErrorCode)."""

    step: str
    update_id: str
    model_version: str | None          # the announced version
    reason: str | None = None
    code: str | None = None


class Agent:
    def __init__(self, config: AgentConfig, *, link: Link | None = None, fetcher: UpdateFetcher | None = None,
                 runtimes: RuntimeLoader | None = None, state: StateStore | None = None,
                 outbox: OutboxStore | None = None, sequence: SequenceStore | None = None) -> None:
        """Every part not given is the real one (:mod:`edgeloop.device_sdk.factory`). Raises ValueError
        for an invalid device id or transport."""
        if not topics.valid_device_id(config.device_id):
            raise ValueError(f"invalid device id {config.device_id!r}")
        if config.transport not in ("http", "mqtt"):
            raise ValueError(f"unknown transport {config.transport!r}: use http or mqtt")
        self.config = config
        self.device_id = config.device_id
        self.topics = topics.Fleet(config.fleet)      # raises ValueError for a malformed fleet id
        self.link: Link = link if link is not None else factory.link(config)
        self.link.on_acked = self._on_acked
        self.link.on_connection_change = self._on_link
        root = Path(config.state_dir)
        self.clock = TrustedClock(config.device_id, root / "tuf" / "director" / "metadata" / "root.json",
                                  root / "clock.json", wall=self._wall, tolerance_s=config.clock_tolerance_s)
        self._time_asked = -float("inf")                           # monotonic time of the last request
        self._time_every = min(30.0, config.time_sync_s)           # until answered: 30 s, doubling
        self.client: UpdateFetcher = fetcher if fetcher is not None else factory.fetcher(config, self.link,
                                                                                         self.clock.now)
        self.installer = Installer(Path(config.state_dir), config.tier, config.max_package_bytes,
                                   on_state=self._report_ota, store=state, runtimes=runtimes)
        self.seq: SequenceStore = sequence if sequence is not None else factory.sequence(config)
        self._outbox_fault: tuple[ErrorCode, str] | None = None
        self.outbox: OutboxStore = outbox if outbox is not None else self._open_outbox()   # (an empty one is falsy)
        self.spool = Spool(self.outbox, self.seq, SpoolLimits(config.held_max, config.held_max_bytes))
        self._faults_published: dict[str, str] = {}
        self.delivery = Delivery(self.outbox, lambda topic, payload: self.link.publish(topic, payload, qos=1),
                                 lambda: self.link.connected, max_in_flight=config.max_in_flight,
                                 confirm_timeout_s=config.confirm_timeout_s)
        self.runtime: ModelRuntime | None = None
        self.window: TelemetryWindow | None = None
        self.malformed = 0
        self.last_result: InstallResult | None = None
        self.retries = 0                                          # transient failures retried so far
        self._retry: tuple[Announce, int, float] | None = None   # (update, attempts so far, due at)
        self._job: tuple[Announce, int] | None = None            # the install under way, attempts before it
        self._next: Announce | None = None                        # arrived while installing
        self._lock = threading.RLock()                            # runtime switch + telemetry window
        self._last_status: tuple[DeviceState, str | None, str | None] | None = None   # for heartbeats
        self._status_at = 0.0
        self._samples: list[tuple[list[float], float | None]] = []   # sampled raw inputs of this window
        self._sample_rng = np.random.default_rng(zlib.crc32(config.device_id.encode()))
        self._status_lock = threading.RLock()   # a heartbeat never re-sends a status older than the last one
        self._observers: list[Callable[[UpdateEvent], None]] = []
        self.installer.observer = lambda state, uid, reason, code: self._emit(str(state), uid, reason, code)

    def _open_outbox(self) -> OutboxStore:
        """The outbox on disk, or, when the disk will not open it, one in memory for this run
        (a fault on the status until the agent is restarted with a working disk)."""
        try:
            return factory.outbox(self.config)
        except StorageError as e:
            log.error("%s: %s; keeping the outbox in memory (lost on restart)", self.device_id, e)
            self._outbox_fault = (e.code, f"outbox kept in memory until a restart: {e}"[:500])
            return factory.memory_outbox(self.config)

    def _wall(self) -> float:
        """The device's own clock (off by ``clock_skew_s`` on a simulated device)."""
        return time.time() + self.config.clock_skew_s

    @property
    def model_version(self) -> str | None:
        return self.installer.model_version

    @property
    def installing(self) -> bool:
        return self._job is not None

    @property
    def last_status(self) -> tuple[DeviceState, str | None, str | None] | None:
        """(state, update id, reason) of the status this device published last."""
        return self._last_status

    @property
    def next_due(self) -> float | None:
        """When a postponed update is due to be tried again (time.time()), if one waits."""
        return self._retry[2] if self._retry else None

    def observe(self, callback: Callable[[UpdateEvent], None]) -> None:
        """Call ``callback`` with every :class:`UpdateEvent`, on the thread taking the step (keep
        it quick; an exception it raises is logged and ignored). None by default: the agent is quiet."""
        self._observers.append(callback)

    def _emit(self, step: str, update_id: str, reason: str | None = None, code: str | None = None) -> None:
        if not self._observers:
            return
        version = self._job[0].model_version if self._job is not None and self._job[0].update_id == update_id \
            else None
        event = UpdateEvent(step, update_id, version, reason, None if code is None else str(code))
        for callback in self._observers:
            try:
                callback(event)
            except Exception:  # noqa: BLE001 - an observer never breaks an install
                log.exception("%s: update observer failed", self.device_id)

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Recover local state, load the active model, connect; the ``online`` status goes out
        as soon as the link is up (and again, with the latest state, after every reconnect).
        Raises TransientError if a blocking link cannot reach the broker."""
        resume = self.installer.recover()
        runtime = self.installer.load_active()
        if runtime is not None:
            self._serve(runtime)
        self.link.subscribe(self.topics.announce(self.config.tier))
        self.link.subscribe(self.topics.command(self.device_id))
        if self.config.confirm_timeout_s is not None:
            self.link.route(self.topics.telemetry_ack(self.device_id), self._on_telemetry_ack)
            self.link.subscribe(self.topics.telemetry_ack(self.device_id), qos=0)
        if self.config.time_sync_s:
            self.link.route(self.topics.time(self.device_id), self._on_time)
            self.link.subscribe(self.topics.time(self.device_id), qos=0)
        with self._status_lock:
            self._last_status = (DeviceState.ONLINE, None, None)
        self.link.connect()
        if resume is not None:
            log.info("%s: resuming update %s", self.device_id, resume.update_id)
            self._begin(resume, 0)

    def stop(self, drain_s: float = 5.0) -> None:
        """Flush telemetry, give the outbox up to ``drain_s`` to reach the broker (what is left
        goes on the next start), publish ``offline`` and close the link. ``drain_s=0`` never
        waits (a driver on an event loop)."""
        self.flush_telemetry()
        deadline = time.time() + drain_s
        while self.outbox.unsent() and self.link.connected and time.time() < deadline:   # the broker has it;
            # what the ingest has not confirmed yet is sent again on the next start
            self.pump()
            self.link.poll(0.01)
        self._publish_status(DeviceState.OFFLINE)
        self.link.close(flush_s=drain_s)

    def _on_acked(self, mid: int) -> None:
        self.delivery.puback(mid)

    def _on_link(self, up: bool) -> None:
        """The link came up (subscribed) or went down: resend the outbox from the start, and say
        again where this device is (the broker published its last will while it was away)."""
        self.delivery.reset()
        if up:
            self._ask_time()
            with self._status_lock:
                if self._last_status is not None:
                    self._publish_status(*self._last_status)

    # -- work ---------------------------------------------------------------------------
    def step(self, timeout: float = 0.0) -> bool:
        """Take the install's next step, run a due retry, or handle one queued message (waiting
        up to ``timeout`` for one). True if work was done."""
        self._heartbeat()
        self._flush_spool()
        self.pump()
        if self._job is not None and self._advance():
            return True
        if self._retry is not None and time.time() >= self._retry[2] and not self.installing:
            announce, attempts, _ = self._retry
            self._retry = None
            self._begin(announce, attempts)
            return True
        message = self.link.receive(timeout)
        if message is None:
            return False
        self.handle(*message)
        return True

    def handle(self, topic: str, payload: bytes) -> None:
        """One incoming message. Never raises for bad input."""
        if not payload:
            return  # a cleared retained message
        try:
            msg = parse(payload)
        except ContractError as e:
            self.malformed += 1
            log.warning("%s: dropped malformed message on %s: %s", self.device_id, topic, e)
            return
        if isinstance(msg, Announce) and topic == self.topics.announce(self.config.tier):
            # a tier-wide announcement is checked against this device's own director group
            self._on_announce(dataclasses.replace(msg, group=None) if msg.group else msg)
        elif isinstance(msg, Command) and topic == self.topics.command(self.device_id) and msg.command == "install":
            self._on_command(msg)
        else:
            self.malformed += 1
            log.warning("%s: dropped unexpected %s on %s", self.device_id, msg.SCHEMA, topic)

    def infer(self, raw: np.ndarray, label: float | None = None) -> tuple[int | float, float] | None:
        """Serve one request. Returns (prediction, confidence), or None with no model installed:
        the class and its probability, the anomaly flag (0/1) and its score relative to twice the
        threshold, or the regression value and 0.0 (the package's task contract decides)."""
        with self._lock:                      # a finished install switches in between requests
            runtime = self.runtime
        if runtime is None:
            return None
        start = time.perf_counter()
        try:
            probs = runtime.predict(raw)[0]
        except Exception:  # noqa: BLE001 - a failed request is counted, never fatal
            log.exception("%s: inference failed", self.device_id)
            with self._lock:
                if self.window is not None:
                    self.window.record_error()
            return None
        task = runtime.manifest.task
        decision = task.decide(probs)
        pred: int | float = decision.prediction if task.kind is TaskKind.REGRESSION else int(decision.prediction)
        conf = decision.confidence
        latency_ms = (time.perf_counter() - start) * 1000
        with self._lock:
            if self.runtime is not runtime:
                # the model switched during this request: its record goes out under the old version
                late = TelemetryWindow.for_manifest(runtime.manifest, self.clock.now)
                late.record(pred, conf, latency_ms, label, raw, decision.bin)
                self._publish_window(late, runtime)
            elif self.window is not None:
                self.window.record(pred, conf, latency_ms, label, raw, decision.bin)
                if self.config.sample_rate > 0 and len(self._samples) < self.config.sample_max \
                        and np.size(raw) <= MAX_FEATURES and self._sample_rng.random() < self.config.sample_rate:
                    self._samples.append(([round(float(v), 6) for v in np.asarray(raw).reshape(-1)], label))
                if self.window.count >= self.config.telemetry_window:
                    self._flush_locked(runtime)
        return pred, conf

    def flush_telemetry(self) -> None:
        """Close the open window, and store what the spool holds in memory if the disk takes it."""
        with self._lock:
            self._flush_locked(self.runtime)
        self._flush_spool(force=True)

    def _flush_spool(self, force: bool = False) -> None:
        """Store what is held in memory, if the disk takes it now; say so if the fault changed."""
        if self.spool.held:
            with self._lock:
                self.spool.flush(force)
        self._report_faults()

    def _flush_locked(self, serving_runtime: ModelRuntime | None) -> None:
        if self.window is not None:
            self._publish_window(self.window, serving_runtime)

    def _publish_window(self, window: TelemetryWindow, serving_runtime: ModelRuntime | None) -> None:
        if window.count == 0 and window.errors == 0:
            return
        serving = serving_runtime.manifest.model_version if serving_runtime else None   # the model that answered
        record = window.close(self.device_id, 0, serving)   # numbered by the spool as it is persisted
        if self._samples and window is self.window:
            record = replace(record, samples={"x": [x for x, _ in self._samples], "y": [y for _, y in self._samples]})
            self._samples = []
        self.spool.telemetry(self.topics.telemetry(self.device_id), record)
        self._report_faults()
        self.pump()

    def pump(self) -> int:
        """Publish what the outbox holds, in order, up to the in-flight bound. Returns how many."""
        with self._lock:
            return self.delivery.pump()

    def _parsed(self, payload: bytes, kind: type[M], what: str) -> M | None:
        """``payload`` as a ``kind`` message, or None (counted as malformed and logged)."""
        try:
            return parse(payload, expect=kind)
        except ContractError as e:
            self.malformed += 1
            log.warning("%s: dropped malformed %s: %s", self.device_id, what, e)
            return None

    def _on_telemetry_ack(self, payload: bytes) -> None:
        """The link's thread or loop: the ingest stored (or refused) these records."""
        ack = self._parsed(payload, TelemetryAck, "telemetry acknowledgement")
        if ack is None:
            return
        if ack.device_id != self.device_id:
            self.malformed += 1
            return
        if ack.refused:
            log.warning("%s: the cloud refused telemetry records %s as data (its telemetry_rejects says why)",
                        self.device_id, ack.refused[:10])
        self.delivery.confirm(ack.seqs, ack.errors)

    # -- updates ------------------------------------------------------------------------
    def _on_announce(self, announce: Announce) -> None:
        if announce.tier != self.config.tier or self.installer.already_handled(announce.update_id) \
                or announce.model_version == self.model_version:
            return
        if self._retry is not None and self._retry[0].issued_at > announce.issued_at:
            return   # older than the update waiting for a retry
        if self._retry is not None and self._retry[0].update_id == announce.update_id:
            return   # already waiting for its retry (a re-sent command keeps the back-off)
        if self._job is not None and self._job[0].update_id == announce.update_id:
            return   # being installed now
        self._retry = None
        # the package's size is checked against its SIGNED length by the fetcher, before any
        # byte of it is downloaded (package.too_large); the announcement's length is not signed
        if self.installing:
            self._next = announce             # handled when the running install finishes
            return
        self._begin(announce, 0)

    def _on_command(self, command: Command) -> None:
        """A rollout reached this device. Its announcement may name the rollout's director group;
        only the control plane can publish on this device's command topic (broker ACL)."""
        announce = command.announce
        if announce.tier != self.config.tier:
            self._publish_error(announce.update_id, ErrorCode.VERIFY_TIER,
                                f"rollout {command.rollout_id} sent a {announce.tier} update to a {self.config.tier} device")
            return
        if announce.model_version == self.model_version and not self.installing:
            self._publish_status(DeviceState.COMMITTED, announce.update_id)   # nothing to do: already there
            return
        self._on_announce(announce)

    def _begin(self, announce: Announce, attempts: int) -> None:
        """Install step 1: enter ``downloading`` and start the fetcher."""
        self._job = (announce, attempts)
        if attempts == 0:
            self._emit("announced", announce.update_id)
        try:
            base = self.installer.active_package_bytes()
            self.installer.begin(announce)
            self.client.start(announce, base)
        except Exception as e:  # noqa: BLE001 - reported, the device keeps serving
            self._finish(announce, attempts, None, None, e)

    def _advance(self) -> bool:
        """Install step 2, once the fetcher has an answer: verify, write, check, switch."""
        assert self._job is not None
        announce, attempts = self._job
        try:
            data = self.client.result()
            if data is None:
                return False                  # still downloading (an asynchronous fetcher)
        except (TransientError, UpdateRefused) as e:
            return self._fetch_failed(announce, attempts, e)
        except Exception as e:  # noqa: BLE001 - reported, the device keeps serving
            self._finish(announce, attempts, None, None, e)
            return True
        try:
            result, runtime = self.installer.complete(announce, data)
        except Exception as e:  # noqa: BLE001 - reported, the device keeps serving
            self._finish(announce, attempts, None, None, e)
            return True
        self._finish(announce, attempts, result, runtime, None)
        return True

    def _fetch_failed(self, announce: Announce, attempts: int, error: TransientError | UpdateRefused) -> bool:
        """A transient failure is retried after ``retry_delays_s[attempts]``; once those run out,
        or for a definitive refusal, the install ends (contracts/codes.py: refusal classes)."""
        try:
            result = self.installer.fetch_failed(announce, error,
                                                 give_up=attempts >= len(self.config.retry_delays_s))
        except Exception as e:  # noqa: BLE001 - reported, the device keeps serving
            self._finish(announce, attempts, None, None, e)
            return True
        if result is not None and result.code is not None and result.code.retryable:   # retries ran out
            result = dataclasses.replace(result, reason=f"download failed {attempts + 1} times: {result.reason}")
        self._finish(announce, attempts, result, None, error if result is None else None)
        return True

    def _finish(self, announce: Announce, attempts: int, result: InstallResult | None, runtime: ModelRuntime | None,
                error: Exception | None) -> None:
        """The install ended (or was postponed): report it and switch models between requests."""
        with self._lock:
            self._job = None
            if isinstance(error, TransientError) or isinstance(error, UpdateRefused) and error.code.retryable:
                self._postpone(announce, attempts, error)
            elif error is not None:
                storage = isinstance(error, (StorageError, OSError))
                code = fault_code(error) if storage else ErrorCode.AGENT_INTERNAL
                log.error("%s: update %s failed: %s", self.device_id, announce.update_id, error)
                self._publish_error(announce.update_id, code, f"{type(error).__name__}: {error}")
                reason = f"{code}: {error}" if storage else f"internal: {error}"
                self._emit("failed", announce.update_id, reason, code)
                self._publish_status(DeviceState.FAILED, announce.update_id, reason=reason)
            elif result is not None:
                self.last_result = result
                if runtime is not None:
                    self._flush_locked(self.runtime)   # the old model's window closes under the old version
                    self._serve(runtime)
                else:
                    self._publish_error(announce.update_id, result.code or ErrorCode.INSTALL_UNKNOWN,
                                        result.reason or "")
                self._publish_status(_FINAL_STATUS[result.state], announce.update_id, reason=result.reason)
            if self._next is not None:
                nxt, self._next = self._next, None
                self._on_announce(nxt)

    def _postpone(self, announce: Announce, attempts: int, error: Exception) -> None:
        delays = self.config.retry_delays_s
        if attempts < len(delays):
            log.info("%s: update %s postponed (%s); retry in %ss", self.device_id, announce.update_id, error,
                     delays[attempts])
            self.retries += 1
            self._retry = (announce, attempts + 1, time.time() + delays[attempts])
            self._publish_status(DeviceState.ONLINE, announce.update_id, reason=f"retrying: {error}")
            return
        code = error.code if isinstance(error, UpdateRefused) else ErrorCode.TRANSPORT_DOWNLOAD
        self._publish_error(announce.update_id, code, str(error))
        self._emit("failed", announce.update_id, f"download failed {attempts + 1} times: {error}", code)
        self._publish_status(DeviceState.FAILED, announce.update_id,
                             reason=f"download failed {attempts + 1} times: {error}")

    @property
    def pending_retry(self) -> Announce | None:
        return self._retry[0] if self._retry else None

    def _serve(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime
        self.window = TelemetryWindow.for_manifest(runtime.manifest, self.clock.now)

    def _report_ota(self, state: InstallState, update_id: str) -> None:
        if state in _OTA_STATUS:   # final states are published by _finish, with the model now serving
            self._publish_status(_OTA_STATUS[state], update_id)

    def _heartbeat(self) -> None:
        """Re-publish the last status once ``heartbeat_s`` passed without one, so the control
        plane's last-seen time stays fresh (a device whose last will was lost still turns offline).
        Ask for the signed time again when it is due (until the first answer: after 30 s, then
        twice as long each time, up to ``time_sync_s``: a control plane without a time server is
        not asked thousands of times)."""
        every = self.config.time_sync_s if self.clock.synced else self._time_every
        if self.config.time_sync_s and self.link.connected and time.monotonic() - self._time_asked >= every:
            self._ask_time()
            if not self.clock.synced:
                self._time_every = min(2 * self._time_every, self.config.time_sync_s)
        with self._status_lock:
            if self.config.heartbeat_s and self._last_status is not None and self.link.connected \
                    and time.time() - self._status_at >= self.config.heartbeat_s:
                self._publish_status(*self._last_status)

    def _ask_time(self) -> None:
        if self.config.time_sync_s:
            self._time_asked = time.monotonic()
            self.link.publish(self.topics.time_request(self.device_id), encode(self.clock.request()), qos=0)

    def _on_time(self, payload: bytes) -> None:
        """The link's thread or loop: the control plane's signed time (device_sdk/clock.py)."""
        answer = self._parsed(payload, SignedTime, "signed time")
        if answer is None:
            return
        if self.clock.accept(answer):
            if self.clock.skewed:
                log.warning("%s: this device's clock is %+.0f s off the control plane's signed time",
                            self.device_id, -(self.clock.offset_s or 0.0))
            with self._status_lock:
                if self._last_status is not None:
                    self._publish_status(*self._last_status)    # with the offset now known

    def _faults(self) -> dict[str, str]:
        """The faults this device has now, by code (its status's ``faults``)."""
        faults: dict[str, str] = {}
        for storage in (self._outbox_fault, self.spool.fault):
            if storage is not None:
                faults[str(storage[0])] = storage[1]
        if self.clock.skewed:
            faults[str(ErrorCode.CLOCK_SKEWED)] = (f"the device clock is {-(self.clock.offset_s or 0.0):+.0f} s off "
                                                   "the control plane's signed time (in use instead)")
        return faults

    def _report_faults(self) -> None:
        """A fault appeared or cleared: say so on the status topic now, not at the next heartbeat."""
        faults = self._faults()
        if faults.keys() != self._faults_published.keys():
            with self._status_lock:
                if self._last_status is not None:
                    self._publish_status(*self._last_status)

    def _publish_status(self, state: DeviceState, update_id: str | None = None, reason: str | None = None) -> Sent:
        faults = self._faults()
        status = Status(self.device_id, state, self.config.tier, self.model_version, update_id, reason,
                        self.clock.now(), faults, self.clock.offset_s)
        with self._status_lock:
            self._faults_published = faults
            self._last_status, self._status_at = (state, update_id, reason), time.time()
            return self.link.publish(self.topics.status(self.device_id), encode(status), qos=1, retain=True)

    def _publish_error(self, update_id: str | None, code: ErrorCode, message: str) -> None:
        report = ErrorReport(self.device_id, code, message[:1000], update_id, self.clock.now(), uuid.uuid4().hex[:16])
        self.spool.report(self.topics.errors(self.device_id), encode(report), report.report_id)
        self.pump()
