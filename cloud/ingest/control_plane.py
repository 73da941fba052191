"""The control plane's MQTT side: announce updates, ingest status, telemetry and errors.

The connection is cloud/ingest/mqtt_session.py: one thread reads what the socket holds, cuts out the
messages, and stores them here as one batch (telemetry deduplicated on (device_id, seq)) before
acknowledging them; while it stores, new messages wait in the socket and the broker. A control plane
serves one fleet: it subscribes to, and publishes on, only that fleet's topics
(``edgeloop/v2/<fleet>/...``, contracts/topics.py), so several workspaces can share a broker.
Telemetry and errors are consumed through MQTT 5 shared subscriptions
(``$share/<share_group>-<fleet>/...``; the default group ``edgeloop-ingest``, a per-workspace
secret under ``edgeloop serve``), so several control-plane processes of one fleet split the
stream; status is a plain subscription because it is retained and shared subscriptions do not
receive retained messages.

Malformed payloads (not JSON, wrong schema, over the size bound, or naming a device other
than the topic's) are logged, counted in :attr:`IngestStats.malformed`, and dropped. Telemetry
that parses but is not good data (unknown or revoked device, sequence number or time from the
future, counted on other bin edges: cloud/ingest/checks.py) is refused and counted by reason in
:attr:`IngestStats.rejects`; every refusal, malformed ones included, gets a ``telemetry_rejects``
row. Messages are acknowledged to the broker only after their batch was stored (manual acks),
and then each device whose telemetry was in the batch gets an ``edgeloop.telemetry_ack/1`` naming
the records the store now has (or refused): only that lets the device delete them from its
outbox (device_sdk/delivery.py), so a record the broker took but delivered to nobody (a broker
restarted before the ingest subscribed again) is sent again, and stored exactly once.

With a ``time_server`` (cloud/ingest/time_server.py) it also answers devices' time requests with
signed time, straight from the connection's thread (nothing is stored).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path

from edgeloop.contracts import topics
from edgeloop.contracts.errors import ContractError
from edgeloop.contracts.messages import MAX_ACK_SEQS
from edgeloop.contracts.messages import (Announce, Command, DeviceState, ErrorReport, Status, Telemetry, TelemetryAck,
                                        TimeRequest, as_dict, encode, parse)
from edgeloop.cloud.release.block_server import BlockServer
from edgeloop.cloud.errors import ServiceUnavailable, UserError
from edgeloop.cloud.ingest.checks import RETIMED, Reject, TelemetryGate
from edgeloop.cloud.ingest.time_server import TimeServer
from edgeloop.cloud.ingest.mqtt_session import ConnectRefused, Incoming, MqttSession, Publication
from edgeloop.cloud.registry import Registry

try:
    from orjson import loads as _loads   # ~3x faster than json on telemetry records
except ImportError:  # pragma: no cover - orjson is in the cloud extra
    _loads = None

log = logging.getLogger("edgeloop.control_plane")

SHARE_GROUP = "edgeloop-ingest"
BATCH_MAX = 500

__all__ = ["ControlPlane", "IngestStats"]


@dataclass
class IngestStats:
    received: int = 0
    telemetry_stored: int = 0
    telemetry_duplicates: int = 0
    statuses: int = 0
    errors: int = 0
    malformed: int = 0
    store_failures: int = 0
    rejected: int = 0                   # telemetry refused as data (cloud/ingest/checks.py), by reason:
    rejects: dict[str, int] = field(default_factory=dict)
    confirmations: int = 0              # edgeloop.telemetry_ack/1 messages sent to devices
    clock_suspect: int = 0              # records stored at the receive time: the device's was impossible
    times_signed: int = 0               # edgeloop.time/1 answers sent


class ControlPlane:
    def __init__(self, registry: Registry, host: str, port: int, client_id: str | None = None,
                 repositories: dict[str, Path] | None = None,
                 session: str | None = None, tls_ca: Path | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None, share_group: str = SHARE_GROUP, shared: bool = True,
                 confirm: bool = True, fleet: str = topics.DEFAULT_FLEET,
                 time_server: TimeServer | None = None) -> None:
        """``fleet``: the fleet id whose topics this control plane serves (the workspace's
        ``Workspace.fleet``); it neither hears nor addresses another fleet's devices.
        ``share_group``: the MQTT 5 shared-subscription group ingest workers split the stream
        in; give every worker of a fleet the workspace's secret name (fleet.broker.share_group), so a
        device cannot join the group and make the broker drop part of the stream.
        ``shared=False``: one ingest worker takes the whole stream on plain subscriptions. Mosquitto
        2.0 restores a persistent session's plain subscriptions after a broker restart but not its
        shared ones, so with ``shared=False`` and ``session`` nothing is lost even when devices
        reconnect to a restarted broker before this worker does (docs/contracts/telemetry.md).
        ``session``: a stable name for a persistent MQTT session, so the broker keeps this
        ingest worker's QoS 1 messages while it is down (telemetry is not lost across restarts).
        ``tls_ca``: connect over TLS, trusting this CA; with ``tls_cert`` and ``tls_key``, mutual
        TLS as the identity they hold (an edgeloop broker's ACL gives ``edgeloop-control-plane``
        the control plane's rights). ``confirm``: tell each device which of its records are stored
        (``edgeloop.telemetry_ack/1``, QoS 0) after every batch. ``time_server``: answer devices'
        time requests with signed time. Raises UserError for TLS files that cannot be used or a
        malformed fleet id."""
        try:
            self.topics = topics.Fleet(fleet)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.registry = registry
        self.host, self.port = host, port
        self.stats = IngestStats()
        self._connected = threading.Event()
        self._busy = threading.Lock()              # held while a batch is being stored
        self.session = session
        self.share_group = share_group
        self.shared = shared
        self.confirm = confirm
        self.time_server = time_server
        tls = self._tls(tls_ca, tls_cert, tls_key) if tls_ca or tls_cert or tls_key else None
        self.client = MqttSession(session or client_id or f"edgeloop-cp-{uuid.uuid4().hex[:8]}", host, port,
                                  keepalive=30, clean_start=not session,
                                  session_expiry_s=24 * 3600 if session else 0, tls=tls, batch_max=BATCH_MAX)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._connected.clear
        self.client.on_subscribed = self._on_subscribe
        # a message is acknowledged to the broker only once its batch was stored: an ingest worker
        # that dies mid-batch gets it again from its persistent session
        self.client.on_messages = self._on_messages
        self.gate = TelemetryGate(registry)
        self._rejects: list[tuple[Reject, str]] = []
        self._subscribe_mid: int | None = None
        # with repositories, this control plane also serves their files over MQTT in blocks
        self.blocks = BlockServer(repositories, lambda t, p: self.client.publish(t, p, qos=1), self.topics) \
            if repositories else None

    @property
    def group(self) -> str:
        """The shared-subscription group of this fleet's ingest workers: the workspace's group
        and the fleet id, so two fleets' workers never share one group."""
        return f"{self.share_group}-{self.topics.name}"

    @staticmethod
    def _tls(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
        if ca is None or (cert is None) != (key is None):
            raise UserError("TLS needs the CA certificate, and a client certificate always with its key")
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)      # verifies the broker and its host name
            context.load_verify_locations(cafile=str(ca))
            if cert and key:
                context.load_cert_chain(str(cert), str(key))
            return context
        except (OSError, ValueError) as e:   # ssl.SSLError is an OSError
            raise UserError(f"cannot load the control plane's TLS files ({ca}, {cert}, {key}): {e}") from None

    @property
    def alive(self) -> bool:
        """The ingest thread is running (a bad message or a failed store never ends it)."""
        return self.client.alive

    # -- life cycle ---------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> ControlPlane:
        try:
            self.client.start()
        except (OSError, ConnectRefused) as e:
            self.stop()                                  # the block server's thread too
            raise ServiceUnavailable(f"cannot reach MQTT broker at {self.host}:{self.port}: {e}") from None
        if not self._connected.wait(timeout):
            self.stop()
            raise ServiceUnavailable(f"MQTT broker at {self.host}:{self.port} did not accept the subscriptions")
        return self

    def stop(self) -> None:
        if self.blocks is not None:
            self.blocks.stop()
        self.client.close()

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until the batch being stored (if any) is stored, and briefly for what the socket
        still holds."""
        deadline = time.time() + timeout
        time.sleep(0.05)
        if self._busy.acquire(timeout=max(0.0, deadline - time.time())):
            self._busy.release()

    # -- commands -----------------------------------------------------------------------
    def announce(self, announce: Announce, timeout: float = 10.0) -> None:
        info = self.client.publish(self.topics.announce(announce.tier), encode(announce), qos=1, retain=True)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise ServiceUnavailable("the broker did not acknowledge the announcement")

    def clear_announce(self, tier: str, timeout: float = 10.0) -> None:
        """Remove the retained announcement of a tier (an empty retained message)."""
        self.client.publish(self.topics.announce(tier), b"", qos=1, retain=True).wait_for_publish(timeout)

    def send_command(self, device_id: str, command: Command) -> Publication:
        """Publish a rollout command to one device (QoS 1, not retained); does not wait for the
        broker's acknowledgement (sent again after a reconnect until it comes)."""
        return self.client.publish(self.topics.command(device_id), encode(command), qos=1, retain=False)

    # -- ingest -------------------------------------------------------------------------
    def _on_connect(self) -> None:
        # one SUBSCRIBE; the control plane counts as started once the broker has acknowledged it
        prefix = f"$share/{self.group}/" if self.shared else ""
        subscriptions = [(self.topics.status_all(), 1),
                         (f"{prefix}{self.topics.telemetry_all()}", 1),
                         (f"{prefix}{self.topics.errors_all()}", 1)]
        if self.blocks is not None:
            subscriptions.append((f"$share/{self.group}-blocks/{self.topics.block_requests_all()}", 1))
        if self.time_server is not None:
            subscriptions.append((f"$share/{self.group}-time/{self.topics.time_requests_all()}", 0))
        self._subscribe_mid = self.client.subscribe(subscriptions)

    def _on_subscribe(self, mid: int, reason_codes: list[int]) -> None:
        if mid != self._subscribe_mid:
            return
        if any(rc >= 0x80 for rc in reason_codes):
            log.error("broker refused a control-plane subscription: %s", [hex(rc) for rc in reason_codes])
            return
        self._connected.set()

    def _on_messages(self, batch: list[Incoming]) -> None:
        """The connection's thread: store the batch, then acknowledge it to the broker."""
        with self._busy:
            rest, served = [], []
            for m in batch:
                if self.blocks is not None and m.topic.endswith("/blocks/req"):
                    self.blocks.submit(m.topic, m.payload)      # its own thread answers
                    served.append(m.packet_id)
                elif m.topic.endswith("/time/req"):
                    self._answer_time(m.topic, m.payload)
                    served.append(m.packet_id)
                else:
                    rest.append(m)
            self.client.ack([p for p in served if p])
            self._store_safely(rest)

    def _store_safely(self, batch: list[Incoming]) -> None:
        """A storage failure loses this batch's work but never the ingest thread. The batch's
        messages are acknowledged to the broker after the attempt (a device resends telemetry
        that was never confirmed)."""
        try:
            if batch:
                self._store([(m.topic, m.payload) for m in batch])
        except Exception:  # noqa: BLE001 - logged and counted; the next batch is tried
            self.stats.store_failures += 1
            log.exception("could not store a batch of %d messages", len(batch))
        self.client.ack([m.packet_id for m in batch if m.qos])

    def _store(self, batch: list[tuple[str, bytes]]) -> None:
        telemetry = []
        reports: list[ErrorReport] = []
        statuses: list[dict] = []
        installed: list[tuple[str, str]] = []
        for topic, payload in batch:
            self.stats.received += 1
            msg = self._parse(topic, payload)
            if isinstance(msg, Telemetry):
                telemetry.append(msg)
            elif isinstance(msg, Status):
                self.stats.statuses += 1
                statuses.append({"device_id": msg.device_id, "tier": msg.tier, "state": str(msg.state),
                                 "model_version": msg.model_version, "update_id": msg.update_id, "reason": msg.reason,
                                 "faults": msg.faults, "clock_offset_s": msg.clock_offset_s})
                if msg.state == DeviceState.COMMITTED and msg.update_id:
                    installed.append((msg.update_id, msg.device_id))
            elif isinstance(msg, ErrorReport):
                self.stats.errors += self.registry.add_device_error(as_dict(msg))
                reports.append(msg)
        self.registry.record_statuses(statuses, installed)   # one transaction for the batch's statuses
        good, refused = self.gate.check(telemetry)
        self._rejects += [(r, self.topics.telemetry(r.device_id)) for r in refused]
        self._flush_rejects()
        if good:
            # shallow: dataclasses.asdict would deep-copy every histogram (9 ms a record)
            rows = [{f.name: getattr(msg, f.name) for f in fields(msg)} for msg in good]
            for row in rows:
                extra = row.pop("extra", None) or {}
                if extra.get("clock_suspect"):       # stored at the receive time (cloud/ingest/checks.py)
                    row.update({k: extra[k] for k in RETIMED})
                    self.stats.clock_suspect += 1
            new = self.registry.add_telemetry(rows)
            self.stats.telemetry_stored += new
            self.stats.telemetry_duplicates += len(rows) - new
        if self.confirm:
            self._confirm(good, refused, reports)

    def _answer_time(self, topic: str, payload: bytes) -> None:
        """Sign the time for a device's nonce; a malformed request is counted and dropped."""
        device = self.topics.device_from_topic(topic)
        try:
            request = parse(payload, expect=TimeRequest)
        except ContractError as e:
            self.stats.malformed += 1
            log.warning("dropped malformed time request on %s: %s", topic, e)
            return
        if self.time_server is None or device is None or request.device_id != device:
            self.stats.malformed += 1
            return
        self.client.publish(self.topics.time(device), encode(self.time_server.answer(request)), qos=0)
        self.stats.times_signed += 1

    def _confirm(self, good: list[Telemetry], refused: list[Reject], reports: list[ErrorReport]) -> None:
        """After the commit: tell each device which of its records (and error reports, by
        report_id) the store is done with."""
        done: dict[str, tuple[list[int], list[int], list[str]]] = {}
        for msg in good:
            done.setdefault(msg.device_id, ([], [], []))[0].append(msg.seq)
        for r in refused:
            if r.seq is not None and r.device_id is not None and topics.valid_device_id(r.device_id):
                seqs, bad, _ = done.setdefault(r.device_id, ([], [], []))
                seqs.append(r.seq)
                bad.append(r.seq)
        for report in reports:
            if report.report_id is not None:
                done.setdefault(report.device_id, ([], [], []))[2].append(report.report_id)
        for device, (seqs, bad, errors) in done.items():
            refused = set(bad)
            for i in range(0, max(len(seqs), len(errors)), MAX_ACK_SEQS):
                chunk = seqs[i:i + MAX_ACK_SEQS]
                ack = TelemetryAck(device, chunk, [s for s in chunk if s in refused], errors[i:i + MAX_ACK_SEQS])
                self.client.publish(self.topics.telemetry_ack(device), encode(ack), qos=0)
                self.stats.confirmations += 1

    def _flush_rejects(self) -> None:
        """Count refusals by reason and keep one row each (telemetry_rejects)."""
        if not self._rejects:
            return
        pending, self._rejects = self._rejects, []
        for reject, _ in pending:
            self.stats.rejected += 1
            self.stats.rejects[reject.reason] = self.stats.rejects.get(reject.reason, 0) + 1
            log.warning("refused telemetry from %s (seq %s): %s: %s", reject.device_id, reject.seq,
                        reject.reason, reject.detail)
        self.registry.add_telemetry_rejects([{"device_id": r.device_id, "seq": r.seq, "reason": r.reason,
                                              "detail": r.detail[:500], "topic": topic} for r, topic in pending])

    def _parse(self, topic: str, payload: bytes) -> Status | Telemetry | ErrorReport | None:
        device = self.topics.device_from_topic(topic)
        if not payload:
            return None  # a cleared retained status
        try:
            msg = parse(payload, loads=_loads)
        except ContractError as e:
            self.stats.malformed += 1
            log.warning("dropped malformed message on %s: %s", topic, e)
            self._rejects.append((Reject(device, None, "schema", str(e)), topic))
            return None
        kind = topic.rsplit("/", 1)[-1]
        expected = {"status": Status, "telemetry": Telemetry, "errors": ErrorReport}.get(kind)
        if device is None or not isinstance(msg, expected or ()) or getattr(msg, "device_id", None) != device:
            self.stats.malformed += 1
            log.warning("dropped %s on %s: wrong topic or device id", msg.SCHEMA, topic)
            self._rejects.append((Reject(device, None, "wrong-topic", f"{msg.SCHEMA} naming another device "
                                         "or on another kind of topic"), topic))
            return None
        return msg  # type: ignore[return-value]
