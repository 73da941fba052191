"""``edgeloop demo``: the whole loop once, end to end, on real components.

With ``--example NAME`` (cloud/examples) the demo runs a shipped example instead of the digits
MLP: the example's data set is written into the workspace, its model definition trained for its
task, packaged for every tier (each tier packages it or refuses it with its reason), and the
edge-gateway package goes to the fleet; the summary adds the per-tier results, the task's
fleet metric and the drift report.

train (PyTorch) -> export ONNX -> package for edge-gateway -> sign (TUF, Ed25519) -> announce
(MQTT) -> N simulated agents download over HTTP, verify with python-tuf, install, serve, and
report telemetry -> the control plane stores it in SQLite -> summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any, Callable

from edgeloop.cloud.train.datasets import load_dataset
from edgeloop.cloud.loop.pipeline import package_model, publish_update, train_model
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.services import ServiceStack, StackOptions
from edgeloop.cloud.train.training import TrainParams
from edgeloop.cloud.workspace import Workspace
from edgeloop.simulators.datastream import DataStream
from edgeloop.simulators.fleet import FleetSpec, SimulatedFleet

if TYPE_CHECKING:
    from edgeloop.fleet.broker import MqttLink

__all__ = ["DemoOptions", "run_demo"]

TIER = "edge-gateway"


@dataclass(frozen=True)
class DemoOptions:
    devices: int = 20
    samples: int = 60
    epochs: int = 30
    seed: int = 0
    timeout_s: float = 120.0
    prefix: str = "demo"          # device ids are <prefix>-edge-gateway-00000, ...
    example: str | None = None    # a shipped example (cloud/examples) instead of the digits MLP
    model_version: str | None = None   # deploy this registered version (packaged for edge-gateway): no training


Progress = Callable[[str, int, int], None]   # (stage, done, total)


def run_demo(ws: Workspace, opts: DemoOptions, progress: Progress | None = None, link: MqttLink | None = None,
             device_overrides: Callable[[str], dict[str, Any]] | None = None) -> dict:
    """``link``: how to reach the broker (default: plain TCP to the workspace's); with mutual TLS,
    ``device_overrides`` gives each simulated device its own identity (AgentConfig TLS fields).
    The services run as one stack (cloud/services.py), with the options serve uses
    (fleet.broker.stack_options) when ``link`` is given."""
    image, director = ws.image_repository(), ws.director_repository()
    image.init()
    director.init()
    if link is not None:
        from edgeloop.fleet.broker import stack_options
        options = stack_options(ws, f"{link.host}:{link.port}", "demo", rollouts=False)
    else:
        options = StackOptions(rollouts=False)
    with ServiceStack(ws, options) as stack:
        return _run(ws, stack, opts, progress, device_overrides)


def _run(ws: Workspace, stack: ServiceStack, opts: DemoOptions, progress: Progress | None,
         device_overrides: Callable[[str], dict[str, Any]] | None) -> dict:
    report = progress or (lambda stage, done, total: None)
    t0 = time.time()
    registry, cp, server = stack.registry, stack.control_plane, stack.repository
    image, director = ws.image_repository(), ws.director_repository()
    link = stack.options.broker
    host, port = (link.host, link.port) if link else (ws.mqtt_host, ws.mqtt_port)
    fleet: SimulatedFleet | None = None
    try:
        tiers: dict[str, Any] = {}
        if opts.model_version is not None:
            from edgeloop.cloud.loop.pipeline import _training_data

            mv = opts.model_version
            row = registry.model_version(mv)
            run = registry.run(row["run_id"])
            trained = {"model_version": mv, "run_id": row["run_id"], "dataset_sha256": run["dataset_sha256"],
                       "metrics": row["metrics"], "task": row.get("task") or {"kind": "classification"}}
            dataset, _ = _training_data(registry, row["run_id"])
        elif opts.example is None:
            trained = train_model(ws, registry, TrainParams(seed=opts.seed, epochs=opts.epochs),
                                  on_epoch=lambda e, row: report("train", e, opts.epochs))
            mv = trained["model_version"]
            package_model(ws, registry, mv, TIER)
            report("package", 1, 1)
            dataset = load_dataset()
        else:
            trained, dataset, tiers = _train_example(ws, registry, opts, report)
            mv = trained["model_version"]
        _, _, test = dataset.split(seed=0)
        spec = FleetSpec(devices=opts.devices, tier=TIER, state_root=ws.fleet_dir, mqtt_host=host,
                         mqtt_port=port, image_root=image.trusted_root(),
                         director_root=director.trusted_root(), samples=opts.samples, serve_version=mv,
                         prefix=opts.prefix, device_overrides=device_overrides, fleet=ws.fleet)
        fleet = SimulatedFleet(spec, DataStream(test.x, test.y)).start()
        announce = publish_update(ws, registry, server.url, mv, TIER, cp.announce)
        deadline = time.time() + opts.timeout_s
        while time.time() < deadline:
            settled = fleet.settled_count()
            report("fleet", settled, opts.devices)
            if settled == opts.devices:
                break
            time.sleep(0.1)
        cp.drain()
        _wait_for_statuses(registry, fleet, mv, deadline)
        cp.drain()
        summary = registry.telemetry_summary(mv)
        ids = {run.agent.device_id for run in fleet.runs}
        rows = [d for d in registry.devices(tier=TIER) if d["device_id"] in ids]
        updated = sum(1 for d in rows if d["model_version"] == mv)
        out = {
            "devices": opts.devices, "updated": updated, "failed": opts.devices - updated,
            "model_version": mv, "update_id": announce.update_id, "run_id": trained["run_id"],
            "dataset_sha256": trained["dataset_sha256"], "test_accuracy": trained["metrics"].get("test_accuracy"),
            "telemetry_records": summary["records"], "inferences": summary["inferences"],
            "accuracy": summary["accuracy"], "malformed_dropped": cp.stats.malformed,
            "workspace": str(ws.root), "seconds": round(time.time() - t0, 2),
        }
        if opts.example is not None:
            from edgeloop.cloud.drift.monitor import drift_report

            out.update(example=opts.example, task=trained["task"]["kind"], metrics=trained["metrics"],
                       tiers=tiers, fleet_mae=summary["mae"], fleet_anomaly_rate=summary["anomaly_rate"],
                       drift=[{k: c.get(k) for k in ("key", "model_version", "status", "records", "drifted_features")}
                              for c in drift_report(registry, by="fleet")])
            out["seconds"] = round(time.time() - t0, 2)
        return out
    finally:
        if fleet is not None:
            fleet.stop()
        cp.clear_announce(TIER)   # its repository stops with the demo: don't leave a dead link retained


def _train_example(ws: Workspace, registry: Registry, opts: DemoOptions,
                   report: Progress) -> tuple[dict, Any, dict[str, Any]]:
    """Write the example's data into the workspace, train its model, package it for every tier."""
    from edgeloop.cloud.train.example_data import write_example
    from edgeloop.cloud.examples import EXAMPLES
    from edgeloop.cloud.loop.pipeline import resolve_dataset
    from edgeloop.cloud.package.tier_packagers import DoesNotFit
    from edgeloop.cloud.package.tiers import load_tiers

    example = EXAMPLES[opts.example]
    path = write_example(example.data, ws.root / "data")
    trained = train_model(ws, registry, TrainParams(seed=opts.seed, epochs=example.epochs, lr=example.lr),
                          data=str(path), model=example.name, model_def=example.model_def, task=example.task,
                          on_epoch=lambda e, row: report("train", e, example.epochs))
    mv = trained["model_version"]
    tiers: dict[str, Any] = {}
    names = sorted(load_tiers())
    for i, tier in enumerate(names):
        try:
            result = package_model(ws, registry, mv, tier)
        except DoesNotFit as e:
            tiers[tier] = {"packaged": False, "reason": str(e)}
        else:
            m = result.manifest.measured
            tiers[tier] = {"packaged": True, "metric": m.get("metric"), "value": m.get("metric_value"),
                           "float_value": m.get("metric_value_float"), "bytes": m.get("model_bytes")}
        report("package", i + 1, len(names))
    if not tiers.get(TIER, {}).get("packaged"):
        raise DoesNotFit(f"example {example.name} does not fit the {TIER} tier the demo fleet runs: "
                         f"{tiers[TIER]['reason']}")
    dataset, _ = resolve_dataset(registry, str(path))
    return trained, dataset, tiers


def _wait_for_statuses(registry: Registry, fleet: SimulatedFleet, mv: str, deadline: float) -> None:
    """Until every device's latest status and every telemetry record it sent has been stored."""
    ids = {run.agent.device_id for run in fleet.runs}
    sent = sum(run.agent.seq.issued for run in fleet.runs)  # records ever numbered by these devices
    while time.time() < deadline:
        rows = {d["device_id"]: d for d in registry.devices() if d["device_id"] in ids}
        final = all(r["state"] in ("committed", "failed") and
                    (r["model_version"] == mv or r["state"] == "failed") for r in rows.values())
        stored = registry.telemetry_count(ids)
        if len(rows) == len(ids) and final and stored >= sent:
            return
        time.sleep(0.05)
