"""A simulated fleet: N real agents (real MQTT clients, real TUF client, real onnxruntime)
in one process, each with its own client id and state folder.

Each device is a :class:`edgeloop.device_sdk.agent.Agent` driven by a thread of this simulator's (the agent
has none of its own): it steps the agent, and once it has a model it serves ``samples`` requests
from its data stream, then flushes its last telemetry window. This thread-per-device driver
suits tens to hundreds of devices; fleet-scale runs drive the same agents on one event loop
(simulators/swarm.py).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
    agent_overrides: dict = field(default_factory=dict)   # extra AgentConfig fields (timeouts, ...)
    # extra AgentConfig fields for one device, by device id (its own TLS identity, for example)
    device_overrides: Callable[[str], dict[str, Any]] | None = None


@dataclass
class DeviceRun:
    agent: Agent
    served: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


class SimulatedFleet:
    def __init__(self, spec: FleetSpec, stream: DataStream) -> None:
        self.spec = spec
        self.stream = stream
        self.runs: list[DeviceRun] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def device_id(self, i: int) -> str:
        return f"{self.spec.prefix}-{self.spec.tier}-{i:05d}"

    def start(self) -> SimulatedFleet:
        for i in range(self.spec.devices):
            state = self.spec.state_root / self.device_id(i)
            provision(state / "tuf", self.spec.image_root, self.spec.director_root)
            own = self.spec.device_overrides(self.device_id(i)) if self.spec.device_overrides else {}
            agent = Agent(AgentConfig(device_id=self.device_id(i), tier=self.spec.tier, state_dir=state,
                                      mqtt_host=self.spec.mqtt_host, mqtt_port=self.spec.mqtt_port,
                                      fleet=self.spec.fleet,
                                      **{**self.spec.agent_overrides, **own}))
            agent.start()
            self.runs.append(DeviceRun(agent))
        for i, run in enumerate(self.runs):
            t = threading.Thread(target=self._drive, args=(i, run), name=f"sim-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _drive(self, index: int, run: DeviceRun) -> None:
        samples = self.stream.for_device(index, self.spec.samples, self.spec.label_rate)
        try:
            while not self._stop.is_set():
                run.agent.step(timeout=0.02)
                wanted = self.spec.serve_version
                if run.done.is_set() or run.agent.runtime is None or (wanted and run.agent.model_version != wanted):
                    continue
                for raw, label in samples:
                    run.agent.infer(raw, label)
                    run.served += 1
                    if run.served % 10 == 0:
                        run.agent.step()   # keep handling messages while serving
                run.agent.flush_telemetry()
                run.done.set()
        except Exception as e:  # noqa: BLE001 - recorded and reported by the fleet
            log.exception("simulated device %s stopped", run.agent.device_id)
            run.error = f"{type(e).__name__}: {e}"
            run.done.set()

    def stop_driving(self) -> None:
        """Stop the device threads but keep the agents connected (a test drives them itself)."""
        self._stop.set()
        for t in self._threads:
            t.join(5)

    def settled(self, run: DeviceRun) -> bool:
        """Served its requests, or refused the update it was waiting for."""
        result = run.agent.last_result
        refused = result is not None and result.model_version != self.spec.serve_version \
            and self.spec.serve_version is not None and result.reason is not None
        return run.done.is_set() or refused

    def settled_count(self) -> int:
        return sum(self.settled(run) for run in self.runs)

    def stop(self) -> None:
        self.stop_driving()
        for run in self.runs:
            try:
                run.agent.stop()
            except Exception:  # noqa: BLE001 - best effort on shutdown
                log.debug("stop failed for %s", run.agent.device_id, exc_info=True)
