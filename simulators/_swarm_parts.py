"""What the swarm plugs into each real agent (device_sdk.ports), and the faults it injects there.

- :class:`SwarmFetcher` (an :class:`~device_sdk.ports.UpdateFetcher`): the device's own HTTP
  download of the package on the swarm's aiohttp session, through the simulated network
  (latency, bandwidth, dropped transfers: a drop is the agent's TransientError, so the agent's
  own retry with back-off handles it), then the length and sha256 checks against the
  announcement and against the shared TUF verdict (simulators/_swarm_verify.py).
- :class:`SharedRuntimes` (a :class:`~device_sdk.ports.RuntimeLoader`): a loaded runtime and
  its health report per package sha256, shared by every device (immutable work: the same bytes
  load the same model and give the same golden outputs).
- :class:`DeviceRuntimes`: one device's view of it, with its injected faults: a faulty device's
  health check fails on any model but the one it started with; a device with a bad model
  serves it with a high error rate.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from edgeloop.contracts.package import Package
from edgeloop.contracts.codes import ErrorCode
from edgeloop.contracts.messages import Announce
from edgeloop.device_sdk.errors import TransientError, UpdateRefused
from edgeloop.device_sdk.runtime import DEFAULT_LOADER, HealthReport, ModelRuntime
from edgeloop.simulators._swarm_verify import Verdict, VerdictCache

__all__ = ["Downloads", "SwarmFetcher", "SharedRuntimes", "DeviceRuntimes", "target_url"]


def target_url(announce: Announce) -> str:
    """Where the image repository stores a target (consistent snapshots: hash-prefixed name)."""
    parent, _, name = announce.target.rpartition("/")
    path = f"{parent}/{announce.sha256}.{name}" if parent else f"{announce.sha256}.{name}"
    return f"{announce.repository.rstrip('/')}/targets/{path}"


class _Dropped(Exception):
    """The simulated link dropped a download mid-transfer."""


class Downloads:
    """The swarm's HTTP session (at most ``concurrency`` transfers at a time) and its counts."""

    def __init__(self, concurrency: int, max_bytes: int, drop_pct: float, rng: random.Random,
                 ca_file: Path | None = None) -> None:
        """``ca_file``: the fleet CA an https repository's certificate must chain to (as a real
        device's fetcher, device_sdk/fetcher.py); None: the system's trust store."""
        tls = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else True
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency, ssl=tls),
                                             timeout=aiohttp.ClientTimeout(total=60))
        self.slots = asyncio.Semaphore(concurrency)
        self.max_bytes, self.drop_pct, self.rng = max_bytes, drop_pct, rng
        self.downloads = self.download_bytes = self.dropped = 0

    async def get(self, announce: Announce) -> bytes:
        """The package's bytes (at most its announced length + 1). Raises TransientError."""
        url, limit = target_url(announce), min(announce.length, self.max_bytes)
        drop = self.rng.random() * 100 < self.drop_pct
        try:
            async with self.slots, self.session.get(url) as response:
                if response.status != 200:
                    raise TransientError(f"HTTP {response.status} for {url}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if drop and len(body) >= limit // 2:
                        self.dropped += 1
                        raise _Dropped("the simulated link dropped the transfer")
                    if len(body) > limit:
                        break     # longer than announced: the hash check refuses it
        except (aiohttp.ClientError, asyncio.TimeoutError, _Dropped, OSError) as e:
            raise TransientError(f"download failed ({type(e).__name__}): {e}") from e
        self.downloads += 1
        self.download_bytes += len(body)
        return bytes(body)

    async def close(self) -> None:
        await self.session.close()


class SwarmFetcher:
    """One device's fetches: started by its agent, finished on the loop, then ``on_done()``."""

    def __init__(self, downloads: Downloads, verdicts: VerdictCache, group: str, *, latency_s: float = 0.0,
                 bandwidth_kbps: float = 0.0, settle_s: float = 0.0, on_done: Any = None) -> None:
        self.downloads, self.verdicts, self.group = downloads, verdicts, group
        self.latency_s, self.bandwidth_kbps, self.settle_s = latency_s, bandwidth_kbps, settle_s
        self.on_done = on_done or (lambda: None)
        self._task: asyncio.Task[bytes] | None = None

    def start(self, announce: Announce, base: bytes | None) -> None:
        self._task = asyncio.get_running_loop().create_task(self._fetch(announce))
        self._task.add_done_callback(lambda _: self.on_done())

    def result(self) -> bytes | None:
        if self._task is None:
            raise RuntimeError("SwarmFetcher.result() without start()")
        if not self._task.done():
            return None
        task, self._task = self._task, None
        return task.result()

    def discard_partial(self) -> None:
        """Nothing is kept between attempts (each download starts over)."""

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _fetch(self, announce: Announce) -> bytes:
        await asyncio.sleep(2 * self.latency_s)      # request out, first byte back
        began = time.monotonic()
        data = await self.downloads.get(announce)
        if self.bandwidth_kbps:
            await asyncio.sleep(max(0.0, len(data) / (self.bandwidth_kbps * 1024) - (time.monotonic() - began)))
        try:
            verdict = await self.verdicts.verdict(announce, announce.group or self.group)
        except Exception as e:  # noqa: BLE001 - the repository is unreachable: try again later
            raise TransientError(f"cannot refresh metadata: {type(e).__name__}: {e}") from e
        refusal = _check(data, announce, verdict)
        if refusal is not None:
            raise refusal
        if self.settle_s:
            await asyncio.sleep(self.settle_s * random.uniform(0.5, 1.5))   # simulated flash write time
        return data


def _check(data: bytes, announce: Announce, verdict: Verdict) -> UpdateRefused | None:
    """Why the downloaded bytes must be refused, if they must."""
    if not verdict.ok:
        return UpdateRefused(verdict.code or ErrorCode.VERIFY_METADATA, verdict.reason or "refused")
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != announce.length or digest != announce.sha256:
        return UpdateRefused(ErrorCode.VERIFY_HASH, f"package ({len(data)} bytes, sha256 {digest[:12]}) does not "
                                                    "match the announcement")
    if (verdict.length, verdict.sha256) != (len(data), digest):
        return UpdateRefused(ErrorCode.VERIFY_HASH, "package does not match its signed length or hash")
    return None


class SharedRuntimes:
    """Loaded runtimes and health reports per package sha256, for the whole swarm."""

    def __init__(self) -> None:
        self._runtimes: dict[str, ModelRuntime] = {}
        self._health: dict[int, HealthReport | UpdateRefused] = {}
        self._inputs: dict[int, np.ndarray] = {}
        self.loads = 0

    def load(self, bundle: Package, package_sha256: str) -> ModelRuntime:
        runtime = self._runtimes.get(package_sha256)
        if runtime is None:
            runtime = DEFAULT_LOADER.load(bundle, package_sha256)
            self.loads += 1
            self._runtimes[package_sha256] = runtime
            golden = json.loads(bundle.files[bundle.manifest.golden])
            self._inputs[id(runtime)] = np.asarray(golden["inputs"], dtype=np.float32)
        return runtime

    def check(self, runtime: ModelRuntime, bundle: Package) -> HealthReport:
        verdict = self._health.get(id(runtime))
        if verdict is None:
            try:
                verdict = DEFAULT_LOADER.check(runtime, bundle)
            except UpdateRefused as e:
                verdict = e
            self._health[id(runtime)] = verdict
        if isinstance(verdict, UpdateRefused):
            raise UpdateRefused(verdict.code, verdict.message)
        return verdict

    def inputs(self, runtime: ModelRuntime) -> np.ndarray:
        """The package's golden inputs: the requests a simulated device serves."""
        return self._inputs[id(getattr(runtime, "inner", runtime))]


class _Erring:
    """A bad model: the same runtime, but about 4 requests in 10 fail."""

    def __init__(self, inner: ModelRuntime, rng: random.Random) -> None:
        self.inner, self.manifest, self._rng = inner, inner.manifest, rng

    def predict(self, raw: np.ndarray) -> np.ndarray:
        if self._rng.random() < 0.4:
            raise RuntimeError("injected fault: the bad model failed this request")
        return self.inner.predict(raw)


class DeviceRuntimes:
    """One device's runtime loader: the shared one, with this device's injected faults."""

    def __init__(self, shared: SharedRuntimes, first_version: str | None, *, faulty: bool = False,
                 bad_model: bool = False, rng: random.Random | None = None) -> None:
        self.shared, self.first_version = shared, first_version
        self.faulty, self.bad_model = faulty, bad_model
        self.rng = rng or random.Random(0)

    def load(self, bundle: Package, package_sha256: str) -> ModelRuntime:
        runtime = self.shared.load(bundle, package_sha256)
        if self.bad_model and bundle.manifest.model_version != self.first_version:
            return _Erring(runtime, self.rng)
        return runtime

    def check(self, runtime: ModelRuntime, bundle: Package) -> HealthReport:
        if self.faulty and bundle.manifest.model_version != self.first_version:
            raise UpdateRefused(ErrorCode.HEALTH_GOLDEN, "golden vectors disagree with the package (injected fault)")
        return self.shared.check(getattr(runtime, "inner", runtime), bundle)
