"""The rollout controller's own cost, without a fleet: how much control-plane time a rollout of
N devices takes (cloud/rollouts/controller.py), separate from the broker and the devices.

A real registry (SQLite, WAL) and real TUF signing; N devices registered as running v1; a
canary (1%) then doubling waves of v2. The sender records each command, and before every step
every device sent a command "answers" committed, written straight into the registry as the
control plane's ingest would. So a wave finishes as soon as it is sent, and the figures are the
controller's work alone: create (select, check, sign, persist), and the sum of its steps.

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeloop.cloud.package.packaging import store_blob  # noqa: E402
from edgeloop.cloud.registry import Registry  # noqa: E402
from edgeloop.cloud.rollouts.controller import RolloutController, RolloutSpec  # noqa: E402
from edgeloop.cloud.workspace import Workspace  # noqa: E402

TIER = "edge-gateway"


def run(devices: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="edgeloop-rollout-bench-"))
    try:
        ws = Workspace.init(root / "ws", mqtt="127.0.0.1:1")
        registry = Registry(ws.store_location)
        ws.image_repository().init()
        ws.director_repository().init()
        for v in (1, 2):
            mv = f"m:{v}"
            registry.add_model_version({"model_version": mv, "model": "m", "version": v, "run_id": "r",
                                        "stage": "candidate"})
            data = f"package {mv}".encode()
            sha, path = store_blob(ws.artifacts_dir, data)
            registry.add_artifact(sha, f"package:{TIER}", len(data), str(path))
            registry.add_package({"sha256": sha, "model_version": mv, "tier": TIER, "target": f"m/{v}/{TIER}.elpkg",
                                  "length": len(data)})
        registry.record_statuses([{"device_id": f"dev-{i:06d}", "tier": TIER, "state": "online",
                                   "model_version": "m:1"} for i in range(devices)])
        sent: list[tuple[str, str]] = []
        ctl = RolloutController(ws, registry, lambda d, c: sent.append((d, c.announce.update_id)),
                                repository_url="http://127.0.0.1:9/repository")
        t0 = time.perf_counter()
        rid = ctl.create(RolloutSpec("m:2", f"tier={TIER}", strategy="canary", canary="1%", growth=2.0))
        create_s = time.perf_counter() - t0
        steps, step_s = 0, 0.0
        while ctl.status(rid)["state"] not in ("completed", "aborted") and steps < 1000:
            registry.record_statuses([{"device_id": d, "tier": TIER, "state": "committed", "model_version": "m:2",
                                       "update_id": u} for d, u in sent])
            sent.clear()
            t0 = time.perf_counter()
            ctl.step()
            step_s += time.perf_counter() - t0
            steps += 1
        status = ctl.status(rid)
        registry.close()
        return {"devices": devices, "state": status["state"], "committed": status["counts"]["committed"],
                "commands_sent": status["commands_sent"], "steps": steps, "create_s": round(create_s, 3),
                "steps_s": round(step_s, 3),
                "controller_ms_per_device": round(1000 * (create_s + step_s) / devices, 3),
                "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                            "python": platform.python_version()}}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    args = parser.parse_args()
    if args.devices < 1:
        parser.error("--devices must be at least 1")
    print(json.dumps(run(args.devices)))


if __name__ == "__main__":
    main()
