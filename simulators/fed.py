"""A simulated fleet whose devices serve what the caller feeds them, phase by phase.

:class:`FedFleet` is a :class:`~simulators.fleet.SimulatedFleet` (real agents, real MQTT, real
TUF, real onnxruntime; one thread per device) where each device serves the rows put on its
queue with :meth:`FedFleet.feed`, handling MQTT messages between requests so updates install
while it serves. The closed-loop demo uses it to run "before drift", "after drift" and "after
the retrained model" phases on the same devices, and to change what individual devices see
(drift injection) between phases.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import replace

import numpy as np

from edgeloop.simulators.datastream import DataStream
from edgeloop.simulators.fleet import DeviceRun, FleetSpec, SimulatedFleet

__all__ = ["FedFleet"]


class FedFleet(SimulatedFleet):
    def __init__(self, spec: FleetSpec) -> None:
        super().__init__(replace(spec, samples=0, serve_version=None), DataStream(np.zeros((1, 1)), None))
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(spec.devices)]
        self._busy = [threading.Event() for _ in range(spec.devices)]

    def feed(self, index: int, x: np.ndarray, y: np.ndarray | None) -> None:
        """Queue rows for device ``index`` to serve; its telemetry window is flushed after them."""
        self._busy[index].set()
        for i in range(len(x)):
            self._queues[index].put((x[i:i + 1], None if y is None else int(y[i])))
        self._queues[index].put(None)   # end of this batch: flush

    def wait_idle(self, timeout: float) -> bool:
        """Until every device has served what it was fed (and flushed); False on timeout."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not any(b.is_set() for b in self._busy):
                return True
            time.sleep(0.05)
        return False

    def _drive(self, index: int, run: DeviceRun) -> None:
        q = self._queues[index]
        try:
            while not self._stop.is_set():
                run.agent.step(timeout=0.02)
                for _ in range(20):
                    try:
                        item = q.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        run.agent.flush_telemetry()
                        if q.empty():
                            self._busy[index].clear()
                        continue
                    raw, label = item
                    run.agent.infer(raw, label)
                    run.served += 1
        except Exception as e:  # noqa: BLE001 - recorded and reported by the fleet
            run.error = f"{type(e).__name__}: {e}"
            self._busy[index].clear()
