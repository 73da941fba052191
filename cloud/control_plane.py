"""The control plane's MQTT side: announce updates, ingest status, telemetry and errors.

Ingest never runs on paho's network thread: messages go into a bounded queue and one writer
thread stores them in batches (telemetry deduplicated on (device_id, seq)). Telemetry and
errors are consumed through MQTT 5 shared subscriptions (``$share/<share_group>/...``; the
default group ``edgeloop-ingest``, a per-workspace secret under ``edgeloop serve``), so
several control-plane processes split the stream; status is a plain subscription because
it is retained and shared subscriptions do not receive retained messages.

Malformed payloads (not JSON, wrong schema, over the size bound, or naming a device other
than the topic's) are logged, counted in :attr:`IngestStats.malformed`, and dropped. Telemetry
that parses but is not good data (unknown or revoked device, sequence number or time from the
future, counted on other bin edges: cloud/ingest_checks.py) is refused and counted by reason in
:attr:`IngestStats.rejects`; every refusal, malformed ones included, gets a ``telemetry_rejects``
row. Messages are acknowledged to the broker only after their batch was stored (manual acks),
and then each device whose telemetry was in the batch gets an ``edgeloop.telemetry_ack/1`` naming
the records the store now has (or refused): only that lets the device delete them from its
outbox (device_sdk/delivery.py), so a record the broker took but delivered to nobody (a broker
restarted before the ingest subscribed again) is sent again, and stored exactly once.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from contracts import topics
from contracts.errors import ContractError
from contracts.messages import MAX_ACK_SEQS
from contracts.messages import (Announce, Command, DeviceState, ErrorReport, Status, Telemetry, TelemetryAck, as_dict,
                                encode, parse)
from cloud.block_server import BlockServer
from cloud.errors import ServiceUnavailable, UserError
from cloud.ingest_checks import Reject, TelemetryGate
from cloud.registry import Registry

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
    dropped_queue_full: int = 0
    store_failures: int = 0
    rejected: int = 0                   # telemetry refused as data (cloud/ingest_checks.py), by reason:
    rejects: dict[str, int] = field(default_factory=dict)
    confirmations: int = 0              # edgeloop.telemetry_ack/1 messages sent to devices


class ControlPlane:
    def __init__(self, registry: Registry, host: str, port: int, client_id: str | None = None,
                 queue_max: int = 100_000, repositories: dict[str, Path] | None = None,
                 session: str | None = None, tls_ca: Path | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None, share_group: str = SHARE_GROUP, shared: bool = True,
                 confirm: bool = True) -> None:
        """``share_group``: the MQTT 5 shared-subscription group ingest workers split the stream
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
        (``edgeloop.telemetry_ack/1``, QoS 0) after every batch. Raises UserError for TLS files that
        cannot be used."""
        self.registry = registry
        self.host, self.port = host, port
        self.stats = IngestStats()
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=queue_max)
        self._connected = threading.Event()
        self._writer: threading.Thread | None = None
        self._idle = threading.Event()
        self.session = session
        self.share_group = share_group
        self.shared = shared
        self.confirm = confirm
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=session or client_id or f"edgeloop-cp-{uuid.uuid4().hex[:8]}")
        if tls_ca or tls_cert or tls_key:
            self._tls(tls_ca, tls_cert, tls_key)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self._connected.clear()
        self.client.on_message = self._on_message
        # a message is acknowledged to the broker only once its batch was stored: an ingest worker
        # that dies mid-batch gets it again from its persistent session
        self.client.manual_ack_set(True)
        self.gate = TelemetryGate(registry)
        self._rejects: list[tuple[Reject, str]] = []
        self.client.on_subscribe = self._on_subscribe
        self._subscribe_mid: int | None = None
        # with repositories, this control plane also serves their files over MQTT in blocks
        self.blocks = BlockServer(repositories, lambda t, p: self.client.publish(t, p, qos=1)) \
            if repositories else None

    def _tls(self, ca: Path | None, cert: Path | None, key: Path | None) -> None:
        if ca is None or (cert is None) != (key is None):
            raise UserError("TLS needs the CA certificate, and a client certificate always with its key")
        try:
            self.client.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None,
                                keyfile=str(key) if key else None, cert_reqs=ssl.CERT_REQUIRED,
                                tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (OSError, ValueError) as e:   # ssl.SSLError is an OSError
            raise UserError(f"cannot load the control plane's TLS files ({ca}, {cert}, {key}): {e}") from None

    # -- life cycle ---------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> ControlPlane:
        self._writer = threading.Thread(target=self._write_loop, name="edgeloop-ingest", daemon=True)
        self._writer.start()
        try:
            if self.session:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 24 * 3600
                self.client.connect(self.host, self.port, keepalive=30, clean_start=False, properties=props)
            else:
                self.client.connect(self.host, self.port, keepalive=30)
        except OSError as e:
            raise ServiceUnavailable(f"cannot reach MQTT broker at {self.host}:{self.port}: {e}") from None
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.client.loop_stop()
            raise ServiceUnavailable(f"MQTT broker at {self.host}:{self.port} did not accept the connection")
        return self

    def stop(self) -> None:
        if self.blocks is not None:
            self.blocks.stop()
        self.client.disconnect()
        self.client.loop_stop()
        self.drain()
        self._inbox.put(None)
        if self._writer:
            self._writer.join(10)

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until every message received so far is stored."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._inbox.empty() and self._idle.is_set():
                return
            time.sleep(0.01)

    # -- commands -----------------------------------------------------------------------
    def announce(self, announce: Announce, timeout: float = 10.0) -> None:
        info = self.client.publish(topics.announce(announce.tier), encode(announce), qos=1, retain=True)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise ServiceUnavailable("the broker did not acknowledge the announcement")

    def clear_announce(self, tier: str, timeout: float = 10.0) -> None:
        """Remove the retained announcement of a tier (an empty retained message)."""
        self.client.publish(topics.announce(tier), b"", qos=1, retain=True).wait_for_publish(timeout)

    def send_command(self, device_id: str, command: Command) -> mqtt.MQTTMessageInfo:
        """Publish a rollout command to one device (QoS 1, not retained); does not wait for the
        broker's acknowledgement (paho queues it while reconnecting)."""
        return self.client.publish(topics.command(device_id), encode(command), qos=1, retain=False)

    # -- ingest -------------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            log.error("broker refused the control plane: %s", reason_code)
            return
        # one SUBSCRIBE; the control plane counts as started once the broker has acknowledged it
        prefix = f"$share/{self.share_group}/" if self.shared else ""
        subscriptions = [(topics.status_all(), 1),
                         (f"{prefix}{topics.telemetry_all()}", 1),
                         (f"{prefix}{topics.errors_all()}", 1)]
        if self.blocks is not None:
            subscriptions.append((f"$share/{self.share_group}-blocks/{topics.block_requests_all()}", 1))
        _, self._subscribe_mid = client.subscribe(subscriptions)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        if mid != self._subscribe_mid:
            return
        if any(rc.is_failure for rc in reason_codes):
            log.error("broker refused a control-plane subscription: %s", reason_codes)
            return
        self._connected.set()

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        if self.blocks is not None and message.topic.endswith("/blocks/req"):
            self.blocks.submit(message.topic, bytes(message.payload))
            self._ack([(message.mid, message.qos)])
            return
        try:
            self._inbox.put_nowait((message.topic, bytes(message.payload), message.mid, message.qos))
        except queue.Full:
            self.stats.dropped_queue_full += 1      # not acknowledged: sent again after a reconnect

    def _ack(self, acks: list[tuple[int, int]]) -> None:
        for mid, qos in acks:
            if qos > 0:
                self.client.ack(mid, qos)

    def _write_loop(self) -> None:
        while True:
            self._idle.set()
            item = self._inbox.get()
            self._idle.clear()
            if item is None:
                return
            batch = [item]
            # group commit: take what is queued now (up to BATCH_MAX) and store it; a busy stream
            # makes big batches by itself, and a quiet one is not held back waiting for more
            while len(batch) < BATCH_MAX:
                try:
                    nxt = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._store_safely(batch)
                    return
                batch.append(nxt)
            self._store_safely(batch)

    def _store_safely(self, batch: list[tuple[str, bytes, int, int]]) -> None:
        """A storage failure loses this batch's work but never the ingest thread. The batch's
        messages are acknowledged to the broker after the attempt."""
        try:
            self._store([(topic, payload) for topic, payload, _, _ in batch])
        except Exception:  # noqa: BLE001 - logged and counted; the next batch is tried
            self.stats.store_failures += 1
            log.exception("could not store a batch of %d messages", len(batch))
        self._ack([(mid, qos) for _, _, mid, qos in batch])

    def _store(self, batch: list[tuple[str, bytes]]) -> None:
        telemetry = []
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
                                 "model_version": msg.model_version, "update_id": msg.update_id, "reason": msg.reason})
                if msg.state == DeviceState.COMMITTED and msg.update_id:
                    installed.append((msg.update_id, msg.device_id))
            elif isinstance(msg, ErrorReport):
                self.stats.errors += 1
                self.registry.add_device_error(as_dict(msg))
        self.registry.record_statuses(statuses, installed)   # one transaction for the batch's statuses
        good, refused = self.gate.check(telemetry)
        self._rejects += [(r, topics.telemetry(r.device_id)) for r in refused]
        self._flush_rejects()
        if good:
            # shallow: dataclasses.asdict would deep-copy every histogram (9 ms a record)
            rows = [{f.name: getattr(msg, f.name) for f in fields(msg)} for msg in good]
            for row in rows:
                row.pop("extra", None)
            new = self.registry.add_telemetry(rows)
            self.stats.telemetry_stored += new
            self.stats.telemetry_duplicates += len(rows) - new
        if self.confirm:
            self._confirm(good, refused)

    def _confirm(self, good: list[Telemetry], refused: list[Reject]) -> None:
        """After the commit: tell each device which of its records the store is done with."""
        done: dict[str, tuple[list[int], list[int]]] = {}
        for msg in good:
            done.setdefault(msg.device_id, ([], []))[0].append(msg.seq)
        for r in refused:
            if r.seq is not None and r.device_id is not None and topics.valid_device_id(r.device_id):
                seqs, bad = done.setdefault(r.device_id, ([], []))
                seqs.append(r.seq)
                bad.append(r.seq)
        for device, (seqs, bad) in done.items():
            for i in range(0, len(seqs), MAX_ACK_SEQS):
                chunk = seqs[i:i + MAX_ACK_SEQS]
                ack = TelemetryAck(device, chunk, [s for s in bad if s in set(chunk)] if bad else [])
                self.client.publish(topics.telemetry_ack(device), encode(ack), qos=0)
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
        device = topics.device_from_topic(topic)
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
