"""A swarm: thousands of real device agents in one process, on one asyncio event loop.

Every simulated device is a :class:`edgeloop.device_sdk.agent.Agent`, the class a real device runs: its
own install state machine (device_sdk/ota.py), ``state.json``, two slots, outbox, sequence
numbers, statuses, retries and error reports. The swarm only drives it (``agent.step()`` when
a message arrives, a download finishes or a retry is due) and builds it from parts that fit one
event loop (device_sdk/ports.py):

- its link is :class:`edgeloop.simulators._aio_link.AioLink`: paho on this loop through
  :class:`~simulators._aio_mqtt.LoopDriver` (its own client id, a persistent session, a last
  will; mutual TLS with its own certificate when ``tls_dir`` holds one);
- its fetcher is :class:`edgeloop.simulators._swarm_parts.SwarmFetcher`: its own HTTP download of the
  package (one shared aiohttp session, at most ``download_concurrency`` transfers at a time),
  checked against the announcement and the signed metadata;
- its runtime loader and its outbox are the shipped ones, with the shared work below.

Shared between devices, because it is immutable (and reported as ``shared_work``):

- the TUF verdict: python-tuf verifies the signed director and image metadata once per distinct
  announcement (simulators/_swarm_verify.py), and each device checks its own download against it;
- the loaded runtime and its health report, per package sha256.

Per-device state folders go under ``device_dir`` (tmpfs for large swarms); outboxes are the
shipped SQLite outbox, in memory (a simulated device never restarts). The report says both.

Simulated, per device: tier (``tier_mix``), network (:class:`NetworkProfile`: latency, bandwidth,
dropped downloads, abrupt disconnects, injected in the link and the fetcher), failure injection
(``fail_pct`` of devices fail the health check of any model but the one they started with, so
they report ``rolled_back`` and keep it, while going back to it succeeds) and bad models
(``bad_model_pct`` of devices install fine but fail about 4 requests in 10 on any model but their
first: their telemetry shows it), both injected in the runtime loader. With ``telemetry_s``
every device serves a telemetry window of its package's golden inputs that often, or, with a
``stream`` of labelled rows, a window of those rows (its own order, as :class:`DataStream`
deals them), of which it sends the share ``sample_rate``, labelled, in its telemetry.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from edgeloop.contracts import topics
from edgeloop.contracts.errors import ContractError
from edgeloop.contracts.messages import Command, DeviceState, Status, encode, parse
from edgeloop.device_sdk.agent import Agent, AgentConfig
from edgeloop.device_sdk.outbox import Outbox
from edgeloop.device_sdk.tuf_fetch import provision
from edgeloop.simulators._aio_link import AioLink, LinkStats
from edgeloop.simulators._aio_mqtt import LoopDriver
from edgeloop.simulators._swarm_parts import DeviceRuntimes, Downloads, SharedRuntimes, SwarmFetcher, target_url
from edgeloop.simulators._swarm_verify import VerdictCache
from edgeloop.simulators.datastream import DataStream

__all__ = ["NetworkProfile", "SwarmConfig", "Swarm", "SwarmDevice", "SwarmThread", "parse_tier_mix", "plan",
           "target_url", "DEVICE_CODE", "SHARED_WORK"]

DEVICE_CODE = f"{Agent.__module__}.{Agent.__qualname__}"
SHARED_WORK = ["tuf_verdict: python-tuf runs once per distinct (director, image, group, target, update id); "
               "every device checks its own download against the verdict",
               "runtime: one loaded runtime and its health report per package sha256"]


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
    initial_packages: dict[str, bytes] = field(default_factory=dict)   # tier -> that version's package,
                                       # factory-installed on each device of the tier
    fail_pct: float = 0.0
    bad_model_pct: float = 0.0
    network: NetworkProfile = NetworkProfile()
    install_s: float = 0.05            # simulated flash time added to each download (the agent's own
    health_s: float = 0.05             # slot write and health check run for real, after it)
    telemetry_s: float = 0.0           # seconds between telemetry windows per device (0: none)
    heartbeat_s: float = 60.0          # re-publish the last status after this long (0: never)
    download_concurrency: int = 64
    download_retries: int = 3          # the agent's retries of a failed download (its back-off)
    max_package_bytes: int = 64 * 1024 * 1024
    connect_batch: int = 100
    keepalive: int = 60
    seed: int = 0
    fleet: str = topics.DEFAULT_FLEET  # the fleet id: the namespace of every topic (contracts/topics.py)
    tls_dir: Path | None = None        # <tls_dir>/<device id>/{ca.crt,device.crt,device.key}: mutual TLS
    device_dir: Path | None = None     # where each device's own state folder goes (None: state_dir;
                                       # /dev/shm for large swarms), removed when the swarm stops
    stream: DataStream | None = None   # labelled rows devices serve each telemetry_s (None: golden inputs)
    sample_rate: float = 0.0           # share of served requests sent, labelled, in telemetry (AgentConfig)

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError("devices must be at least 1")
        for name in ("fail_pct", "bad_model_pct"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"{name} must be between 0 and 100")
        if self.download_concurrency < 1:
            raise ValueError("download_concurrency must be at least 1")
        if not 0 <= self.sample_rate <= 1:
            raise ValueError("sample_rate must be between 0 and 1")
        if self.initial_version is not None and not self.initial_packages:
            raise ValueError("initial_version needs its packages (initial_packages: tier -> package bytes)")


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



class SwarmDevice:
    """Drives one real agent on the swarm's loop: steps it when something happened for it.
    Holds no device state of its own beyond timings for the report."""

    def __init__(self, swarm: Swarm, device_id: str, tier: str, faulty: bool, bad_model: bool,
                 index: int = 0) -> None:
        cfg = swarm.config
        self.swarm, self.device_id, self.tier = swarm, device_id, tier
        self.faulty, self.bad_model = faulty, bad_model
        self.command_at: dict[str, float] = {}      # update id -> when its command arrived
        self.committed_at: dict[str, float] = {}
        self._scheduled = False
        self._closed = False            # stopped: never stepped again (its download was cancelled)
        self._retry_handle: asyncio.TimerHandle | None = None
        self.next_telemetry = 0.0
        self.rows = _endless(cfg.stream, index) if cfg.stream is not None else None
        root = swarm.device_root / device_id
        self.topics = topics.Fleet(cfg.fleet)
        provision(root / "tuf", cfg.image_root, cfg.director_root)
        offline = Status(device_id, DeviceState.OFFLINE, tier)
        self.link = AioLink(swarm.driver, device_id, cfg.mqtt_host, cfg.mqtt_port,
                            will=(self.topics.status(device_id), encode(offline)), keepalive=cfg.keepalive,
                            tls_dir=cfg.tls_dir / device_id if cfg.tls_dir is not None else None,
                            latency_s=cfg.network.latency_ms / 1000, reconnect_s=cfg.network.reconnect_s,
                            stats=swarm.link_stats, on_ready=self.kick)
        self.fetcher = SwarmFetcher(swarm.downloads, swarm.verdicts, tier, latency_s=cfg.network.latency_ms / 1000,
                                    bandwidth_kbps=cfg.network.bandwidth_kbps, settle_s=cfg.install_s + cfg.health_s,
                                    on_done=self.kick)
        self.runtimes = DeviceRuntimes(swarm.runtimes, cfg.initial_version, faulty=faulty, bad_model=bad_model,
                                       rng=random.Random(f"{cfg.seed}-{device_id}"))
        config = AgentConfig(device_id=device_id, tier=tier, state_dir=root, fleet=cfg.fleet,
                             max_package_bytes=cfg.max_package_bytes,
                             heartbeat_s=cfg.heartbeat_s, sample_rate=cfg.sample_rate,
                             retry_delays_s=tuple(min(0.2 * 2 ** a, 5.0) for a in range(1, cfg.download_retries + 1)))
        self.agent = Agent(config, link=self.link, fetcher=self.fetcher, runtimes=self.runtimes,
                           outbox=Outbox(Path(":memory:")))
        package = cfg.initial_packages.get(tier)
        if package is not None and self.agent.model_version is None:
            self.agent.installer.factory_install(package)

    def start(self) -> None:
        self.agent.start()

    def kick(self) -> None:
        """Something happened for this device: step its agent soon (once per loop iteration)."""
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self.swarm.loop.call_soon(self._step)

    def _step(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        for _ in range(64):
            self._note_command()
            if not self.agent.step():
                break
        else:
            self.kick()                 # more to do: after the other devices had their turn
        self._note_status()
        due = self.agent.next_due
        if due is not None and self._retry_handle is None:
            self._retry_handle = self.swarm.loop.call_later(max(0.0, due - time.time()), self._retry)

    def _retry(self) -> None:
        self._retry_handle = None
        self.kick()

    def _note_command(self) -> None:
        """When the command for an update arrived (the report's command-to-commit time)."""
        if self.link.inbox and self.link.inbox[0][0] == self.topics.command(self.device_id):
            self.swarm.stats["commands"] += 1
            with contextlib.suppress(ContractError):   # a malformed one: the agent drops it
                command = parse(self.link.inbox[0][1], expect=Command)
                self.command_at.setdefault(command.announce.update_id, time.time())

    def _note_status(self) -> None:
        status = self.agent.last_status
        if status is not None and status[0] == DeviceState.COMMITTED and status[1] is not None:
            self.committed_at.setdefault(status[1], time.time())

    def tick(self, now: float) -> None:
        """Heartbeat and telemetry, when due (called about once a second)."""
        cfg = self.swarm.config
        if cfg.telemetry_s and self.agent.runtime is not None and now >= self.next_telemetry:
            self.next_telemetry = now + cfg.telemetry_s
            if self.rows is not None:
                for _ in range(self.agent.config.telemetry_window):
                    self.agent.infer(*next(self.rows))
            else:
                inputs = self.swarm.runtimes.inputs(self.agent.runtime)
                for i in range(self.agent.config.telemetry_window):
                    self.agent.infer(inputs[i % len(inputs)][None, :])
            self.swarm.stats["telemetry"] += 1
        self.kick()

    @property
    def state(self) -> DeviceState:
        status = self.agent.last_status
        return status[0] if status is not None else DeviceState.OFFLINE

    def close(self) -> None:
        self._closed = True
        self.fetcher.cancel()
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        self.agent.stop(drain_s=0)

    def report(self) -> dict[str, Any]:
        state, uid, reason = self.agent.last_status or (DeviceState.OFFLINE, None, None)
        result = self.agent.last_result
        if result is not None and result.update_id == uid and result.code and reason:
            reason = f"{result.code}: {reason}"
        commit = None
        if uid in self.committed_at and uid in self.command_at:
            commit = round(self.committed_at[uid] - self.command_at[uid], 4)
        return {"device_id": self.device_id, "tier": self.tier, "state": str(state),
                "model_version": self.agent.model_version, "update_id": uid, "reason": reason,
                "faulty": self.faulty, "bad_model": self.bad_model, "command_to_commit_s": commit,
                "outbox": len(self.agent.outbox), "retries": self.agent.retries,
                "committed_at": {u: round(t, 4) for u, t in self.committed_at.items()},
                "command_at": {u: round(t, 4) for u, t in self.command_at.items()}}


class Swarm:
    """Create with a config, ``await start()`` on an event loop, ``await stop()`` when done."""

    def __init__(self, config: SwarmConfig) -> None:
        self.config = config
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]   # set by start()
        self.driver: LoopDriver = None  # type: ignore[assignment]
        self.downloads: Downloads = None  # type: ignore[assignment]
        self.rng = random.Random(config.seed)
        self.stats: dict[str, int] = {"commands": 0, "telemetry": 0}
        self.link_stats = LinkStats()
        self.devices: list[SwarmDevice] = []
        self.verdicts = VerdictCache(config.state_dir / "tuf", config.image_root, config.director_root,
                                     config.max_package_bytes)
        self.runtimes = SharedRuntimes()
        self.device_root: Path = Path()
        self._ticker: asyncio.Task[None] | None = None
        self.started_at = 0.0

    def device_ids(self) -> list[str]:
        return [d.device_id for d in self.devices]

    async def start(self, timeout: float = 120.0) -> None:
        """Build and start every device (connecting in batches); returns once all are subscribed
        and online. Raises TimeoutError if the broker does not take them all within ``timeout``."""
        cfg = self.config
        self.loop = asyncio.get_running_loop()
        self.driver = LoopDriver(self.loop)
        fleet_ca = min(cfg.tls_dir.glob("*/ca.crt"), default=None) if cfg.tls_dir is not None else None
        self.downloads = Downloads(cfg.download_concurrency, cfg.max_package_bytes, cfg.network.drop_pct, self.rng,
                                   ca_file=fleet_ca)      # every device of a fleet trusts the same CA
        parent = cfg.device_dir or cfg.state_dir
        parent.mkdir(parents=True, exist_ok=True)
        self.device_root = Path(tempfile.mkdtemp(prefix=f"{cfg.prefix}-devices-", dir=parent))
        picks = random.Random(cfg.seed)
        order = list(range(cfg.devices))
        picks.shuffle(order)
        n_fail = round(cfg.devices * cfg.fail_pct / 100)
        n_bad = round(cfg.devices * cfg.bad_model_pct / 100)
        faulty, bad = set(order[:n_fail]), set(order[n_fail:n_fail + n_bad])
        for i, (device_id, tier) in enumerate(plan(cfg)):
            device = SwarmDevice(self, device_id, tier, i in faulty, i in bad, index=i)
            device.next_telemetry = time.time() + self.rng.uniform(0, cfg.telemetry_s or 1)
            self.devices.append(device)
        deadline = time.time() + timeout
        for start in range(0, len(self.devices), cfg.connect_batch):
            batch = self.devices[start:start + cfg.connect_batch]
            for device in batch:
                device.start()
            left = deadline - time.time()
            try:
                await asyncio.wait_for(asyncio.gather(*(d.link.ready.wait() for d in batch)), max(left, 0.1))
            except asyncio.TimeoutError:
                ready = sum(d.link.ready.is_set() for d in self.devices)
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
            self.driver.detach(device.link.client)
            device.agent.outbox.close()
        await self.driver.close()
        if self.downloads is not None:
            await self.downloads.close()
        shutil.rmtree(self.device_root, ignore_errors=True)

    async def _tick_loop(self) -> None:
        net, cfg = self.config.network, self.config
        period = 1.0 if cfg.telemetry_s or net.disconnect_pct_per_min else max(1.0, cfg.heartbeat_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.time()
            if cfg.telemetry_s or cfg.heartbeat_s:
                for device in self.devices:
                    device.tick(now)
            if net.disconnect_pct_per_min:
                share = net.disconnect_pct_per_min / 100 / 60 * period
                for device in self.devices:
                    if device.link.connected and self.rng.random() < share:
                        device.link.disconnect_abruptly()

    # -- results ------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for device in self.devices:
            out[str(device.state)] = out.get(str(device.state), 0) + 1
        return out

    def report(self, per_device: bool = False) -> dict[str, Any]:
        reports = [d.report() for d in self.devices]
        times = sorted(t for r in reports if (t := r["command_to_commit_s"]) is not None)
        cfg = self.config
        result: dict[str, Any] = {
            "device_code": DEVICE_CODE, "device_classes": sorted({type(d.agent).__module__ + "." +
                                                                  type(d.agent).__qualname__ for d in self.devices}),
            "shared_work": SHARED_WORK,
            "device_state": f"{self.device_root} ({'tmpfs' if str(self.device_root).startswith('/dev/shm') else 'disk'}"
                            "); outbox: the shipped SQLite outbox, in memory",
            "devices": len(self.devices), "connected": sum(d.link.connected for d in self.devices),
            "states": self.counts(), "tiers": {t: sum(d.tier == t for d in self.devices) for t in cfg.tier_mix},
            "faulty": sum(d.faulty for d in self.devices), "bad_model": sum(d.bad_model for d in self.devices),
            "tuf_verifications": self.verdicts.verifications, "runtime_loads": self.runtimes.loads,
            **self.stats, "downloads": self.downloads.downloads if self.downloads else 0,
            "download_bytes": self.downloads.download_bytes if self.downloads else 0,
            "download_retries": sum(d.agent.retries for d in self.devices),
            "dropped_downloads": self.downloads.dropped if self.downloads else 0,
            "disconnects": self.link_stats.disconnects, "reconnects": self.link_stats.reconnects,
            "malformed": sum(d.agent.malformed for d in self.devices),
            "internal_errors": sum(1 for r in reports if (r["reason"] or "").startswith(("internal:", "storage.write"))),
            "command_to_commit_p50_s": round(statistics.median(times), 4) if times else None,
            "command_to_commit_p99_s": round(_percentile(times, 0.99), 4) if times else None,
        }
        if per_device:
            result["per_device"] = reports
        return result


def _endless(stream: DataStream, index: int) -> Iterator[tuple[Any, Any]]:
    """Device ``index``'s rows of ``stream``, round and round."""
    while True:
        yield from stream.for_device(index, len(stream.x))


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
