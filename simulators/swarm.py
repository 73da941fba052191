"""A swarm: thousands of simulated devices in one process, on one asyncio event loop.

Each device is a real MQTT connection (paho, its own client id, a persistent session, a last
will saying ``offline``; mutual TLS with its own certificate when ``tls_dir`` holds one) driven
by :class:`~simulators._aio_mqtt.LoopDriver`, and speaks the device side of the protocol
(docs/contracts/mqtt.md) as the real agent does:

- it subscribes to ``devices/<id>/cmd`` and its tier's announce topic, publishes a retained
  ``online`` status once connected, re-publishes its last status every ``heartbeat_s``;
- on an ``install`` command (or a tier-wide announcement) it walks the install state machine
  below, publishing each state as a retained status: it really downloads the package over HTTP
  (one shared aiohttp session, at most ``download_concurrency`` transfers at a time) and checks
  length and sha256 against the announcement and against the verdict of the signed director
  and image metadata (python-tuf, once per distinct announcement for the whole swarm: the one
  shortcut, see simulators/_swarm_verify.py), then simulates install and health-check time;
- a command for the version it already runs is answered ``committed`` at once;
- it sends telemetry windows (valid ``edgeloop.telemetry/1``) every ``telemetry_s``.

Simulated, per device: tier (``tier_mix``), network (:class:`NetworkProfile`: latency, bandwidth,
dropped downloads, abrupt disconnects), failure injection (``fail_pct`` of devices fail the
health check of any model but the one they started with, so they report ``rolled_back`` and
keep it, while going back to it succeeds) and bad models (``bad_model_pct`` of devices install
fine but report high error rates and latency on any model but their first).

State machine (stable names: :class:`contracts.messages.DeviceState`)::

    online/committed/failed/rolled_back --start--> downloading --fetched--> verifying
    verifying --verified--> installing --written--> testing --passed--> committed
    downloading/verifying --refused--> failed          testing --unhealthy--> rolled_back
    online/committed/failed/rolled_back --already--> committed   (already on that version)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from contracts import topics
from contracts.errors import ContractError
from contracts.messages import Announce, Command, DeviceState, ErrorReport, Status, Telemetry, encode, parse
from device_sdk.mqtt import configure_tls
from simulators._aio_mqtt import LoopDriver
from simulators._swarm_verify import Verdict, VerdictCache

log = logging.getLogger("edgeloop.simulators.swarm")

__all__ = ["NetworkProfile", "SwarmConfig", "Swarm", "SwarmThread", "parse_tier_mix", "plan", "TRANSITIONS",
           "SimEvent"]

S = DeviceState


class SimEvent(StrEnum):
    START = "start"
    FETCHED = "fetched"
    VERIFIED = "verified"
    WRITTEN = "written"
    PASSED = "passed"
    REFUSED = "refused"
    UNHEALTHY = "unhealthy"
    ALREADY = "already"


_RESTING = (S.ONLINE, S.COMMITTED, S.FAILED, S.ROLLED_BACK)
TRANSITIONS: dict[tuple[DeviceState, SimEvent], DeviceState] = {
    **{(s, SimEvent.START): S.DOWNLOADING for s in _RESTING},
    **{(s, SimEvent.ALREADY): S.COMMITTED for s in _RESTING},
    (S.DOWNLOADING, SimEvent.FETCHED): S.VERIFYING,
    (S.DOWNLOADING, SimEvent.REFUSED): S.FAILED,
    (S.VERIFYING, SimEvent.VERIFIED): S.INSTALLING,
    (S.VERIFYING, SimEvent.REFUSED): S.FAILED,
    (S.INSTALLING, SimEvent.WRITTEN): S.TESTING,
    (S.TESTING, SimEvent.PASSED): S.COMMITTED,
    (S.TESTING, SimEvent.UNHEALTHY): S.ROLLED_BACK,
}


@dataclass(frozen=True)
class NetworkProfile:
    """What each simulated device's link does (the host's loopback is the real transport)."""

    latency_ms: float = 0.0            # one way; commands wait this long, downloads two
    bandwidth_kbps: float = 0.0        # per device download rate, kilobytes/s (0: unlimited)
    drop_pct: float = 0.0              # % of download attempts cut off mid-transfer (retried)
    disconnect_pct_per_min: float = 0.0   # % of connected devices that lose their connection each minute
    reconnect_s: float = 1.0           # how long a disconnected device stays away

    def __post_init__(self) -> None:
        for name in ("latency_ms", "bandwidth_kbps", "reconnect_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("drop_pct", "disconnect_pct_per_min"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"{name} must be between 0 and 100")


@dataclass(frozen=True)
class SwarmConfig:
    devices: int
    mqtt_host: str
    mqtt_port: int
    image_root: bytes                  # the trusted roots every simulated device is provisioned with
    director_root: bytes
    state_dir: Path                    # the swarm's shared TUF metadata (verdict cache)
    tier_mix: dict[str, float] = field(default_factory=lambda: {"edge-gateway": 1.0})
    prefix: str = "swarm"
    initial_version: str | None = None   # the model every device runs at start (None: none yet)
    fail_pct: float = 0.0
    bad_model_pct: float = 0.0
    network: NetworkProfile = NetworkProfile()
    install_s: float = 0.05            # simulated slot write
    health_s: float = 0.05             # simulated golden-vector check
    telemetry_s: float = 0.0           # seconds between telemetry windows per device (0: none)
    heartbeat_s: float = 60.0          # re-publish the last status after this long (0: never)
    download_concurrency: int = 64
    download_retries: int = 3
    max_package_bytes: int = 64 * 1024 * 1024
    connect_batch: int = 100
    keepalive: int = 60
    seed: int = 0
    fleet: str = topics.DEFAULT_FLEET  # the fleet id: the namespace of every topic (contracts/topics.py)
    tls_dir: Path | None = None        # <tls_dir>/<device id>/{ca.crt,device.crt,device.key}: mutual TLS

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError("devices must be at least 1")
        for name in ("fail_pct", "bad_model_pct"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"{name} must be between 0 and 100")
        if self.download_concurrency < 1:
            raise ValueError("download_concurrency must be at least 1")


def parse_tier_mix(text: str) -> dict[str, float]:
    """``"edge-gateway:0.7,mcu:0.3"`` -> shares that add up to 1. Raises ValueError."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        tier, _, share = part.partition(":")
        if not topics.valid_tier(tier):
            raise ValueError(f"invalid tier {tier!r} in tier mix {text!r}")
        try:
            value = float(share) if share else 1.0
        except ValueError:
            raise ValueError(f"share of {tier} must be a number, not {share!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"share of {tier} must be positive")
        mix[tier] = mix.get(tier, 0.0) + value
    if not mix:
        raise ValueError("the tier mix names no tier (example: edge-gateway:0.7,mcu:0.3)")
    total = sum(mix.values())
    return {tier: share / total for tier, share in mix.items()}


def _tiers(n: int, mix: dict[str, float]) -> list[str]:
    """Exactly n tiers in the mix's proportions (largest remainder), in stable order."""
    quotas = {t: n * s for t, s in mix.items()}
    counts = {t: int(q) for t, q in quotas.items()}
    for t in sorted(quotas, key=lambda t: quotas[t] - counts[t], reverse=True)[: n - sum(counts.values())]:
        counts[t] += 1
    return [t for t in mix for _ in range(counts[t])]


def plan(config: SwarmConfig) -> list[tuple[str, str]]:
    """(device id, tier) of every device the swarm will run: ``<prefix>-<tier>-<index>``."""
    return [(f"{config.prefix}-{tier}-{i:05d}", tier) for i, tier in enumerate(_tiers(config.devices, config.tier_mix))]


class DownloadFailed(Exception):
    """A package could not be downloaded after every retry."""


class _Dropped(Exception):
    """The simulated link dropped a download mid-transfer."""


class SimDevice:
    """One simulated device. Every method runs on the swarm's event loop."""

    def __init__(self, swarm: Swarm, device_id: str, tier: str, faulty: bool, bad_model: bool) -> None:
        self.swarm, self.device_id, self.tier = swarm, device_id, tier
        self.topics = topics.Fleet(swarm.config.fleet)
        self.group = tier
        self.faulty, self.bad_model = faulty, bad_model
        self.first_version = self.model_version = swarm.config.initial_version
        self.state = S.ONLINE
        self.update_id: str | None = None
        self.reason: str | None = None
        self.finished: dict[str, tuple[DeviceState, str | None]] = {}   # update id -> final state, reason
        self.task: asyncio.Task[None] | None = None
        self.queued: tuple[Announce, str] | None = None
        self.command_at: dict[str, float] = {}      # update id -> when its command arrived
        self.committed_at: dict[str, float] = {}
        self.ready = asyncio.Event()
        self.closing = False
        self.seq = 0
        self.status_at = 0.0
        self.next_telemetry = 0.0
        self.client = self._client()

    def _client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device_id, protocol=mqtt.MQTTv311,
                             clean_session=False)
        offline = Status(self.device_id, S.OFFLINE, self.tier)
        client.will_set(self.topics.status(self.device_id), encode(offline), qos=1, retain=True)
        client.max_queued_messages_set(0)
        tls = self.swarm.config.tls_dir
        if tls is not None and (tls / self.device_id / "device.crt").exists():
            folder = tls / self.device_id
            configure_tls(client, folder / "ca.crt", folder / "device.crt", folder / "device.key")
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        self.swarm.driver.attach(client)
        return client

    # -- connection ---------------------------------------------------------------------------
    def connect(self) -> None:
        cfg = self.swarm.config
        try:
            self.client.connect(cfg.mqtt_host, cfg.mqtt_port, keepalive=cfg.keepalive)
        except OSError as e:
            log.warning("%s: cannot connect: %s", self.device_id, e)
            self._reconnect_later()

    def disconnect_abruptly(self) -> None:
        """The link dies: the broker notices and publishes the last will (``offline``)."""
        sock = self.client.socket()
        if sock is not None:
            self.swarm.stats["disconnects"] += 1
            with contextlib.suppress(OSError):
                sock.shutdown(2)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, props: Any) -> None:
        if reason_code.is_failure:
            log.warning("%s: broker refused the connection: %s", self.device_id, reason_code)
            return
        client.subscribe([(self.topics.command(self.device_id), 1), (self.topics.announce(self.tier), 1)])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self._publish_status()        # online, or whatever it was doing when the link dropped
        if self.ready.is_set():
            self.swarm.stats["reconnects"] += 1
        self.ready.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, props: Any) -> None:
        if not self.closing:
            self._reconnect_later()

    def _reconnect_later(self) -> None:
        self.swarm.loop.call_later(max(0.05, self.swarm.config.network.reconnect_s), self._reconnect)

    def _reconnect(self) -> None:
        if self.closing:
            return
        try:
            self.client.reconnect()
        except OSError:
            self._reconnect_later()

    # -- messages -----------------------------------------------------------------------------
    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if not message.payload:
            return   # a cleared retained announcement
        try:
            msg = parse(message.payload)
        except ContractError as e:
            self.swarm.stats["malformed"] += 1
            log.warning("%s: dropped malformed message on %s: %s", self.device_id, message.topic, e)
            return
        if isinstance(msg, Command) and message.topic == self.topics.command(self.device_id):
            self._on_command(msg)
        elif isinstance(msg, Announce) and message.topic == self.topics.announce(self.tier):
            self._on_announce(dataclasses.replace(msg, group=None), command=False)
        else:
            self.swarm.stats["malformed"] += 1

    def _on_command(self, command: Command) -> None:
        announce = command.announce
        self.command_at.setdefault(announce.update_id, time.time())
        self.swarm.stats["commands"] += 1
        if announce.tier != self.tier:
            self._publish_error(announce.update_id, "verify.tier",
                                f"rollout {command.rollout_id} sent a {announce.tier} update to a {self.tier} device")
            return
        if self.task is None and announce.model_version == self.model_version:
            self._fire(SimEvent.ALREADY, announce.update_id)
            return
        self._on_announce(announce, command=True)

    def _on_announce(self, announce: Announce, command: bool) -> None:
        done = self.finished.get(announce.update_id)
        if done is not None:
            if command and self.task is None:    # asked again: say again how it ended
                self.state, self.update_id, self.reason = done[0], announce.update_id, done[1]
                self._publish_status()
            return
        if announce.tier != self.tier or (announce.model_version == self.model_version and not command):
            return
        group = announce.group or self.group
        if self.task is not None:
            self.queued = (announce, group)     # the newest wins; handled when this install ends
            return
        self.task = self.swarm.loop.create_task(self._install(announce, group))

    # -- the install --------------------------------------------------------------------------
    def _fire(self, event: SimEvent, update_id: str, reason: str | None = None) -> None:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise RuntimeError(f"{self.device_id}: no transition from {self.state} on {event}")
        self.state, self.update_id, self.reason = new, update_id, reason
        if new in (S.COMMITTED, S.FAILED, S.ROLLED_BACK):
            self.finished[update_id] = (new, reason)
            if new == S.COMMITTED:
                self.committed_at.setdefault(update_id, time.time())
        self._publish_status()

    async def _install(self, announce: Announce, group: str) -> None:
        try:
            await self._walk(announce, group)
        except Exception as e:  # noqa: BLE001 - a simulator bug must not stop the swarm; it is reported
            log.exception("%s: install of %s broke", self.device_id, announce.update_id)
            self.swarm.stats["internal_errors"] += 1
            self._give_up(announce.update_id, f"internal: {type(e).__name__}: {e}")
        finally:
            self.task = None
            if self.queued is not None:
                nxt, self.queued = self.queued, None
                self._on_announce(dataclasses.replace(nxt[0], group=nxt[1]), command=True)

    async def _walk(self, announce: Announce, group: str) -> None:
        cfg, uid = self.swarm.config, announce.update_id
        await asyncio.sleep(cfg.network.latency_ms / 1000)
        self._fire(SimEvent.START, uid)
        try:
            data = await self.swarm.download(announce)
        except DownloadFailed as e:
            return self._refuse(uid, "transport.download", f"download failed: {e}")
        self._fire(SimEvent.FETCHED, uid)
        try:
            verdict = await self.swarm.verdicts.verdict(announce, group)
        except Exception as e:  # noqa: BLE001 - the repository is unreachable: refused for now
            return self._refuse(uid, "transport.download", f"cannot refresh metadata: {type(e).__name__}: {e}")
        problem = _check(data, announce, verdict)
        if problem is not None:
            return self._refuse(uid, *problem)
        self._fire(SimEvent.VERIFIED, uid)
        await asyncio.sleep(cfg.install_s * random.uniform(0.5, 1.5))
        self._fire(SimEvent.WRITTEN, uid)
        await asyncio.sleep(cfg.health_s * random.uniform(0.5, 1.5))
        if self.faulty and announce.model_version != self.first_version:
            reason = "health.golden: golden vectors disagree with the package (injected fault); previous restored"
            self._publish_error(uid, "health.golden", reason)
            self._fire(SimEvent.UNHEALTHY, uid, reason)
            return
        self.model_version = announce.model_version
        self._fire(SimEvent.PASSED, uid)

    def _give_up(self, update_id: str, reason: str) -> None:
        """A simulator bug, not a protocol step: report ``failed`` (as the agent reports an
        internal error) from whatever state the install reached."""
        self.state, self.update_id, self.reason = S.FAILED, update_id, reason
        self.finished[update_id] = (S.FAILED, reason)
        self._publish_error(update_id, "agent.internal", reason)
        self._publish_status()

    def _refuse(self, update_id: str, code: str, reason: str) -> None:
        self._publish_error(update_id, code, reason)
        self._fire(SimEvent.REFUSED, update_id, reason)

    # -- reporting ----------------------------------------------------------------------------
    def _publish_status(self) -> None:
        status = Status(self.device_id, self.state, self.tier, self.model_version, self.update_id, self.reason,
                        time.time())
        self.status_at = status.ts
        self.client.publish(self.topics.status(self.device_id), encode(status), qos=1, retain=True)

    def _publish_error(self, update_id: str | None, code: str, message: str) -> None:
        report = ErrorReport(self.device_id, code, message[:1000], update_id, time.time())
        self.client.publish(self.topics.errors(self.device_id), encode(report), qos=1)

    def tick(self, now: float) -> None:
        """Heartbeat and telemetry, when due (called about once a second)."""
        cfg = self.swarm.config
        if not self.client.is_connected():
            return
        if cfg.heartbeat_s and now - self.status_at >= cfg.heartbeat_s:
            self._publish_status()
        if cfg.telemetry_s and self.model_version is not None and now >= self.next_telemetry:
            self.next_telemetry = now + cfg.telemetry_s
            self.client.publish(self.topics.telemetry(self.device_id), encode(self._window(now)), qos=1)
            self.swarm.stats["telemetry"] += 1

    def _window(self, now: float) -> Telemetry:
        """One synthetic window of 20 inferences; a bad model errs and slows down."""
        bad = self.bad_model and self.model_version != self.first_version
        rng, count = self.swarm.rng, 20
        errors = rng.randint(6, 10) if bad else 0
        served = count - errors
        correct = rng.randint(served // 3, served // 2) if bad else rng.randint(served - 2, served)
        predictions = [0] * 10
        for _ in range(served):
            predictions[rng.randrange(10)] += 1
        hist = [0] * 10
        for _ in range(served):
            hist[rng.randint(3, 6) if bad else rng.randint(7, 9)] += 1
        p50 = rng.uniform(40, 60) if bad else rng.uniform(1.5, 3.0)
        seq, self.seq = self.seq, self.seq + 1
        span = self.swarm.config.telemetry_s
        return Telemetry(self.device_id, seq, self.model_version, now - span, now, count, served, correct,
                         predictions, hist, round(p50, 3), round(p50 * 3, 3), errors=errors)

    def close(self) -> None:
        self.closing = True
        if self.task is not None:
            self.task.cancel()
        if self.client.is_connected():
            offline = Status(self.device_id, S.OFFLINE, self.tier, self.model_version, self.update_id, None,
                             time.time())
            self.client.publish(self.topics.status(self.device_id), encode(offline), qos=0, retain=True)
        self.client.disconnect()

    def report(self) -> dict[str, Any]:
        uid = self.update_id
        commit = None
        if uid in self.committed_at and uid in self.command_at:
            commit = round(self.committed_at[uid] - self.command_at[uid], 4)
        return {"device_id": self.device_id, "tier": self.tier, "state": str(self.state),
                "model_version": self.model_version, "update_id": uid, "reason": self.reason,
                "faulty": self.faulty, "bad_model": self.bad_model, "command_to_commit_s": commit,
                "committed_at": {u: round(t, 4) for u, t in self.committed_at.items()},
                "command_at": {u: round(t, 4) for u, t in self.command_at.items()}}


def _check(data: bytes, announce: Announce, verdict: Verdict) -> tuple[str, str] | None:
    """(code, reason) if the downloaded bytes must be refused."""
    if not verdict.ok:
        return verdict.code or "verify.metadata", verdict.reason or "refused"
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != announce.length or digest != announce.sha256:
        return "verify.hash", f"package ({len(data)} bytes, sha256 {digest[:12]}) does not match the announcement"
    if (verdict.length, verdict.sha256) != (len(data), digest):
        return "verify.hash", "package does not match its signed length or hash"
    return None


def target_url(announce: Announce) -> str:
    """Where the image repository stores a target (consistent snapshots: hash-prefixed name)."""
    parent, _, name = announce.target.rpartition("/")
    path = f"{parent}/{announce.sha256}.{name}" if parent else f"{announce.sha256}.{name}"
    return f"{announce.repository.rstrip('/')}/targets/{path}"


class Swarm:
    """Create with a config, ``await start()`` on an event loop, ``await stop()`` when done."""

    def __init__(self, config: SwarmConfig) -> None:
        self.config = config
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]   # set by start()
        self.driver: LoopDriver = None  # type: ignore[assignment]
        self.rng = random.Random(config.seed)
        self.stats: dict[str, int] = {k: 0 for k in ("commands", "downloads", "download_bytes", "download_retries",
                                                      "disconnects", "reconnects", "telemetry", "malformed",
                                                      "internal_errors")}
        self.devices: list[SimDevice] = []
        self.verdicts = VerdictCache(config.state_dir / "tuf", config.image_root, config.director_root,
                                     config.max_package_bytes)
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.started_at = 0.0

    def device_ids(self) -> list[str]:
        return [d.device_id for d in self.devices]

    async def start(self, timeout: float = 120.0) -> None:
        """Connect every device (in batches); returns once all are subscribed and online.
        Raises TimeoutError if the broker does not take them all within ``timeout``."""
        cfg = self.config
        self.loop = asyncio.get_running_loop()
        self.driver = LoopDriver(self.loop)
        self._slots = asyncio.Semaphore(cfg.download_concurrency)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=cfg.download_concurrency),
                                              timeout=aiohttp.ClientTimeout(total=60))
        picks = random.Random(cfg.seed)
        order = list(range(cfg.devices))
        picks.shuffle(order)
        n_fail = round(cfg.devices * cfg.fail_pct / 100)
        n_bad = round(cfg.devices * cfg.bad_model_pct / 100)
        faulty, bad = set(order[:n_fail]), set(order[n_fail:n_fail + n_bad])
        for i, (device_id, tier) in enumerate(plan(cfg)):
            device = SimDevice(self, device_id, tier, i in faulty, i in bad)
            device.next_telemetry = time.time() + self.rng.uniform(0, cfg.telemetry_s or 1)
            self.devices.append(device)
        deadline = time.time() + timeout
        for start in range(0, len(self.devices), cfg.connect_batch):
            batch = self.devices[start:start + cfg.connect_batch]
            for device in batch:
                device.connect()
            left = deadline - time.time()
            try:
                await asyncio.wait_for(asyncio.gather(*(d.ready.wait() for d in batch)), max(left, 0.1))
            except asyncio.TimeoutError:
                ready = sum(d.ready.is_set() for d in self.devices)
                raise TimeoutError(f"only {ready} of {cfg.devices} devices connected within {timeout:.0f} s") from None
        self._ticker = self.loop.create_task(self._tick_loop())
        self.started_at = time.time()

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        for device in self.devices:
            device.close()
        await asyncio.sleep(0.2 + len(self.devices) / 20_000)   # let the last statuses and DISCONNECTs leave
        for device in self.devices:
            self.driver.detach(device.client)
        await self.driver.close()
        if self._session is not None:
            await self._session.close()

    async def _tick_loop(self) -> None:
        net = self.config.network
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            for device in self.devices:
                device.tick(now)
            if net.disconnect_pct_per_min:
                share = net.disconnect_pct_per_min / 100 / 60
                for device in self.devices:
                    if device.client.is_connected() and self.rng.random() < share:
                        device.disconnect_abruptly()

    # -- downloads ----------------------------------------------------------------------------
    async def download(self, announce: Announce) -> bytes:
        """The package's bytes over HTTP through the device's simulated link. Raises DownloadFailed."""
        cfg, net = self.config, self.config.network
        url, last = target_url(announce), "no attempt"
        for attempt in range(cfg.download_retries + 1):
            if attempt:
                self.stats["download_retries"] += 1
                await asyncio.sleep(min(0.2 * 2 ** attempt, 5.0))
            await asyncio.sleep(2 * net.latency_ms / 1000)      # request out, first byte back
            began = time.monotonic()
            try:
                data = await self._get(url, announce)
            except (aiohttp.ClientError, asyncio.TimeoutError, _Dropped, OSError) as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if net.bandwidth_kbps:
                await asyncio.sleep(max(0.0, len(data) / (net.bandwidth_kbps * 1024) - (time.monotonic() - began)))
            self.stats["downloads"] += 1
            self.stats["download_bytes"] += len(data)
            return data
        raise DownloadFailed(f"{cfg.download_retries + 1} attempts, last: {last}")

    async def _get(self, url: str, announce: Announce) -> bytes:
        assert self._session is not None and self._slots is not None
        limit = min(announce.length, self.config.max_package_bytes)
        drop = self.rng.random() * 100 < self.config.network.drop_pct
        async with self._slots, self._session.get(url) as response:
            if response.status != 200:
                raise aiohttp.ClientResponseError(response.request_info, (), status=response.status,
                                                  message=f"HTTP {response.status} for {url}")
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if drop and len(body) >= limit // 2:
                    raise _Dropped("the simulated link dropped the transfer")
                if len(body) > limit:
                    break     # longer than announced: the hash check refuses it
            return bytes(body)

    # -- results ------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for device in self.devices:
            out[str(device.state)] = out.get(str(device.state), 0) + 1
        return out

    def report(self, per_device: bool = False) -> dict[str, Any]:
        times = sorted(t for d in self.devices if (t := d.report()["command_to_commit_s"]) is not None)
        result: dict[str, Any] = {
            "devices": len(self.devices), "connected": sum(d.client.is_connected() for d in self.devices),
            "states": self.counts(), "tiers": {t: sum(d.tier == t for d in self.devices) for t in self.config.tier_mix},
            "faulty": sum(d.faulty for d in self.devices), "bad_model": sum(d.bad_model for d in self.devices),
            "tuf_verifications": self.verdicts.verifications, **self.stats,
            "command_to_commit_p50_s": round(statistics.median(times), 4) if times else None,
            "command_to_commit_p99_s": round(_percentile(times, 0.99), 4) if times else None,
        }
        if per_device:
            result["per_device"] = [d.report() for d in self.devices]
        return result


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


class SwarmThread:
    """Run a :class:`Swarm` on its own event loop in a background thread (tests, benchmarks)."""

    def __init__(self, config: SwarmConfig) -> None:
        self.swarm = Swarm(config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="edgeloop-swarm", daemon=True)

    def start(self, timeout: float = 120.0) -> SwarmThread:
        self._thread.start()
        self.call(self.swarm.start(timeout), timeout + 10)
        return self

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def read(self, fn: Any, timeout: float = 30.0) -> Any:
        """Run ``fn(swarm)`` on the swarm's loop (its state is only touched there)."""
        async def run() -> Any:
            return fn(self.swarm)
        return self.call(run(), timeout)

    def stop(self) -> dict[str, Any]:
        report = self.read(lambda s: s.report(per_device=True))
        with contextlib.suppress(Exception):
            self.call(self.swarm.stop(), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        return report
