"""A simulated fleet: N real agents (real MQTT clients, real TUF client, real onnxruntime)
in one process, each with its own client id and state folder.

Each device is a :class:`edgeloop.device_sdk.agent.Agent` driven by a thread of this simulator's (the agent
has none of its own): it steps the agent, and once it has a model it serves ``samples`` requests
from its data stream (again for every new model version it installs, with ``per_version``),
then flushes its last telemetry window and stays connected, answering updates and sending
heartbeats, until :meth:`SimulatedFleet.stop`. Stopping is prompt: a device stops between two
requests, and every agent is stopped (telemetry flushed, ``offline`` published, link closed) at
the same time, so no device thread is still inside onnxruntime when the process exits. This
thread-per-device driver suits tens to hundreds of devices; fleet-scale runs drive the same
agents on one event loop (simulators/swarm.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from edgeloop.device_sdk.agent import Agent, AgentConfig
from edgeloop.contracts.topics import DEFAULT_FLEET
from edgeloop.device_sdk.tuf_fetch import provision
from edgeloop.simulators.datastream import DataStream

log = logging.getLogger("edgeloop.simulators.fleet")

__all__ = ["SimulatedFleet", "FleetSpec"]


@dataclass(frozen=True)
class FleetSpec:
    devices: int
    tier: str
    state_root: Path
    mqtt_host: str
    mqtt_port: int
    image_root: bytes                  # trusted roots each device is provisioned with
    director_root: bytes
    samples: int = 60                  # requests each device serves once it has a model
    label_rate: float = 1.0
    prefix: str = "sim"
    fleet: str = DEFAULT_FLEET         # the fleet id every device's topics are under (contracts/topics.py)
    serve_version: str | None = None   # serve only once this version is installed (None: any)
    per_version: bool = False          # serve ``samples`` requests again on every newly installed version
    agent_overrides: dict = field(default_factory=dict)   # extra AgentConfig fields (timeouts, ...)
    # extra AgentConfig fields for one device, by device id (its own TLS identity, for example)
    device_overrides: Callable[[str], dict[str, Any]] | None = None


@dataclass
class DeviceRun:
    agent: Agent
    served: int = 0
    done: threading.Event = field(default_factory=threading.Event)   # served its first ``samples``
    error: str | None = None
    first_version: str | None = None    # the model it ran when the fleet started
    served_version: str | None = None   # the model it last served its requests on

    @property
    def updated(self) -> bool:
        """Installed another model version since the fleet started."""
        return self.agent.model_version is not None and self.agent.model_version != self.first_version


class SimulatedFleet:
    def __init__(self, spec: FleetSpec, stream: DataStream) -> None:
        self.spec = spec
        self.stream = stream
        self.runs: list[DeviceRun] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def device_id(self, i: int) -> str:
        return f"{self.spec.prefix}-{self.spec.tier}-{i:05d}"

    def start(self, should_stop: Callable[[], bool] | None = None) -> SimulatedFleet:
        """Start every device (or, once ``should_stop()`` says so, no more of them) and its thread."""
        for i in range(self.spec.devices):
            if should_stop is not None and should_stop():
                break
            state = self.spec.state_root / self.device_id(i)
            provision(state / "tuf", self.spec.image_root, self.spec.director_root)
            own = self.spec.device_overrides(self.device_id(i)) if self.spec.device_overrides else {}
            agent = Agent(AgentConfig(device_id=self.device_id(i), tier=self.spec.tier, state_dir=state,
                                      mqtt_host=self.spec.mqtt_host, mqtt_port=self.spec.mqtt_port,
                                      fleet=self.spec.fleet,
                                      **{**self.spec.agent_overrides, **own}))
            agent.start()
            self.runs.append(DeviceRun(agent, first_version=agent.model_version))
        for i, run in enumerate(self.runs):
            t = threading.Thread(target=self._drive, args=(i, run), name=f"sim-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _drive(self, index: int, run: DeviceRun) -> None:
        try:
            while not self._stop.is_set():
                run.agent.step(timeout=0.02 if not run.done.is_set() else 0.1)
                if self._due(run):
                    self._serve(run, self.stream.for_device(index, self.spec.samples, self.spec.label_rate))
        except Exception as e:  # noqa: BLE001 - recorded and reported by the fleet
            log.exception("simulated device %s stopped", run.agent.device_id)
            run.error = f"{type(e).__name__}: {e}"
            run.done.set()

    def _due(self, run: DeviceRun) -> bool:
        """Whether the device should serve its requests now: it has the model it waits for, and
        has not served them yet (on this version, with ``per_version``)."""
        version, wanted = run.agent.model_version, self.spec.serve_version
        if run.agent.runtime is None or (wanted and version != wanted):
            return False
        if not run.done.is_set():
            return True
        return self.spec.per_version and version != run.served_version

    def _serve(self, run: DeviceRun, samples: Iterable[tuple[Any, Any]]) -> None:
        run.served_version = run.agent.model_version
        for raw, label in samples:
            if self._stop.is_set():
                break
            run.agent.infer(raw, label)
            run.served += 1
            if run.served % 10 == 0:
                run.agent.step()   # keep handling messages while serving
        run.agent.flush_telemetry()
        run.done.set()

    def stop_driving(self, timeout: float = 5.0) -> None:
        """Stop the device threads but keep the agents connected (a test drives them itself).
        Each thread ends between two requests; waits up to ``timeout`` for all of them."""
        self._stop.set()
        deadline = time.time() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.time()))

    def settled(self, run: DeviceRun) -> bool:
        """Served its requests, or refused the update it was waiting for."""
        result = run.agent.last_result
        refused = result is not None and result.model_version != self.spec.serve_version \
            and self.spec.serve_version is not None and result.reason is not None
        return run.done.is_set() or refused

    def settled_count(self) -> int:
        return sum(self.settled(run) for run in self.runs)

    def online_count(self) -> int:
        """Devices whose link to the broker is up now."""
        return sum(run.agent.link.connected for run in self.runs)

    def updated_count(self) -> int:
        return sum(run.updated for run in self.runs)

    def served_count(self) -> int:
        return sum(run.served for run in self.runs)

    def model_versions(self) -> dict[str, int]:
        """How many devices run each model version now ("-": none yet)."""
        counts: dict[str, int] = {}
        for run in self.runs:
            key = run.agent.model_version or "-"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    def stop(self, drain_s: float = 5.0) -> None:
        """Stop every device: its thread first, then all agents at once (each flushes its
        telemetry, gives its outbox up to ``drain_s``, publishes ``offline``, closes its link).
        Returns once every agent has stopped, or about ``2 * drain_s + 5`` seconds at most."""
        self.stop_driving()
        stoppers = [threading.Thread(target=self._stop_agent, args=(run, drain_s), name=f"sim-stop-{i}", daemon=True)
                    for i, run in enumerate(self.runs)]
        for t in stoppers:
            t.start()
        deadline = time.time() + 2 * drain_s + 5
        for t in stoppers:
            t.join(max(0.0, deadline - time.time()))

    @staticmethod
    def _stop_agent(run: DeviceRun, drain_s: float) -> None:
        try:
            run.agent.stop(drain_s)
        except Exception:  # noqa: BLE001 - best effort on shutdown
            log.debug("stop failed for %s", run.agent.device_id, exc_info=True)
