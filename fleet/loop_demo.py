"""``edgeloop demo --loop``: the closed loop, end to end, on real components.

deploy v1 to a simulated fleet -> serve (fleet accuracy before drift) -> a sensor drift hits part
of the fleet -> serve (accuracy after drift) -> the drift report flags the drifted devices ->
the retraining pipeline (cloud/loop/closed_loop.py, the shipped ``digits-retrain.toml``) collects the labelled
inputs the devices sampled, trains v2, gates it against v1, packages it, canaries it through
the rollout controller, and promotes it -> serve (accuracy after v2).

Accuracy is the fleet's own: summed from the telemetry records the devices sent in each phase
(``correct / labelled``), not computed on the side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeloop.cloud.train.datasets import load_dataset
from edgeloop.cloud.drift.monitor import drift_report
from edgeloop.cloud.loop.closed_loop import controller_driver, load_pipeline, run_pipeline
from edgeloop.cloud.models import promote
from edgeloop.cloud.loop.pipeline import package_model, publish_update, train_model
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.services import ServiceStack, StackOptions
from edgeloop.cloud.train.training import TrainParams
from edgeloop.cloud.workspace import Workspace
from edgeloop.simulators.datastream import Drift
from edgeloop.simulators.fed import FedFleet
from edgeloop.simulators.fleet import FleetSpec

__all__ = ["LoopOptions", "run_loop_demo", "default_pipeline_path"]

TIER = "edge-gateway"
# a sensor gain/offset drift: the sensor reads half the signal on top of a raised floor
DEMO_DRIFT = Drift(kind="gain", amount=0.5, offset=4.0, lo=0.0, hi=16.0)


def default_pipeline_path() -> Path:
    return Path(str(resources.files("edgeloop.cloud.loop") / "pipelines" / "digits-retrain.toml"))


@dataclass(frozen=True)
class LoopOptions:
    devices: int = 10
    drifted_share: float = 0.5       # share of devices whose sensor drifts
    samples: int = 200               # requests per device per phase
    epochs: int = 30
    seed: int = 0
    timeout_s: float = 240.0
    prefix: str = "loop"
    pipeline: Path | None = None


Say = Callable[[str, str], None]


def _phase_accuracy(registry: Registry, marks: dict[str, tuple[int, int]], ids: list[str]) -> float | None:
    labelled = correct = 0
    for device_id in ids:
        lo, hi = marks[device_id]
        row = registry.device_telemetry_totals(device_id, lo, hi)
        labelled += row["labelled"] or 0
        correct += row["correct"] or 0
    return round(correct / labelled, 4) if labelled else None


def run_loop_demo(ws: Workspace, opts: LoopOptions, say: Say | None = None, options: StackOptions | None = None,
                  device_overrides: Callable[[str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """``options``: the service stack's (cloud/services.py; default: plain TCP to the workspace's
    broker); ``edgeloop demo --loop`` passes serve's (fleet.broker.stack_options), and with mutual
    TLS ``device_overrides`` gives each simulated device its own identity."""
    image, director = ws.image_repository(), ws.director_repository()
    image.init()
    director.init()
    with ServiceStack(ws, options or StackOptions()) as stack:
        return _run(ws, stack, opts, say, device_overrides)


def _run(ws: Workspace, stack: ServiceStack, opts: LoopOptions, say: Say | None,
         device_overrides: Callable[[str], dict[str, Any]] | None) -> dict[str, Any]:
    note = say or (lambda stage, msg: None)
    t0 = time.time()
    registry, cp, server, ctl = stack.registry, stack.control_plane, stack.repository, stack.rollouts
    image, director = ws.image_repository(), ws.director_repository()
    link = stack.options.broker
    host, port = (link.host, link.port) if link else (ws.mqtt_host, ws.mqtt_port)
    fleet: FedFleet | None = None
    try:
        # -- the data: a "lab" set to train on, and "field" rows only devices see ------------------------
        # field rows never enter training data except as what devices sample in the first two
        # phases; the last phase serves field rows no model has seen, so "after v2" is honest
        lab_id, field_seen, field_unseen = _split_lab_and_field(ws, registry, opts.seed)
        # -- v1: train, gate (first production version), package, deploy to the whole fleet ---------
        trained = train_model(ws, registry, TrainParams(seed=opts.seed, epochs=opts.epochs), data=lab_id)
        v1 = trained["model_version"]
        for earlier in registry.in_stage(_model_name(registry, v1), "production"):
            # a re-run in the same folder starts the story over: v1 becomes production again
            # (an earlier run's retrained version would otherwise gate it out); said, not hidden
            promote(registry, earlier, "archived")
            note("deploy", f"archived {earlier}, production from an earlier demo --loop in this workspace")
        promote(registry, v1, "production")
        package_model(ws, registry, v1, TIER)
        note("deploy", f"{v1} trained (test accuracy {trained['metrics']['test_accuracy']:.3f}), "
                       f"packaged for {TIER}, production")
        dataset = load_dataset()
        spec = FleetSpec(devices=opts.devices, tier=TIER, state_root=ws.fleet_dir, mqtt_host=host,
                         mqtt_port=port, image_root=image.trusted_root(), device_overrides=device_overrides,
                         director_root=director.trusted_root(), prefix=opts.prefix, fleet=ws.fleet,
                         agent_overrides={"sample_rate": 1.0, "sample_max": 20, "telemetry_window": 20,
                                          "heartbeat_s": 5.0})
        fleet = FedFleet(spec).start()
        ids = [run.agent.device_id for run in fleet.runs]
        publish_update(ws, registry, server.url, v1, TIER, cp.announce)
        _wait(lambda: all(r.agent.model_version == v1 for r in fleet.runs), opts.timeout_s, "v1 install")
        cp.clear_announce(TIER)   # later versions travel by rollout only
        note("deploy", f"{v1} installed on {opts.devices}/{opts.devices} devices")

        drifted = set(ids[: int(round(opts.devices * opts.drifted_share))])
        mean, sd = dataset.x.mean(axis=0), dataset.x.std(axis=0)
        rng = np.random.default_rng(opts.seed)

        def phase(name: str, drift_on: bool, rows: tuple[np.ndarray, np.ndarray]) -> dict[str, tuple[int, int]]:
            before = {r.agent.device_id: r.agent.seq.issued for r in fleet.runs}
            fx, fy = rows
            for i, run in enumerate(fleet.runs):
                idx = rng.choice(len(fy), size=opts.samples, replace=True)
                x = fx[idx]
                if drift_on and run.agent.device_id in drifted:
                    x = DEMO_DRIFT.apply(x, mean, sd).astype(np.float32)
                fleet.feed(i, x, fy[idx])
            if not fleet.wait_idle(opts.timeout_s):
                raise TimeoutError(f"the fleet did not serve the {name} phase in {opts.timeout_s} s")
            marks = {r.agent.device_id: (before[r.agent.device_id], r.agent.seq.issued) for r in fleet.runs}
            _wait(lambda: _stored(registry, marks), opts.timeout_s, f"{name} telemetry")
            return marks

        def accuracies(marks: dict[str, tuple[int, int]]) -> dict[str, float | None]:
            clean = [d for d in ids if d not in drifted]
            return {"fleet": _phase_accuracy(registry, marks, ids),
                    "drifted_devices": _phase_accuracy(registry, marks, sorted(drifted)),
                    "other_devices": _phase_accuracy(registry, marks, clean)}

        acc_before = accuracies(phase("before-drift", False, field_seen))
        note("serve", f"before drift: fleet accuracy {acc_before['fleet']}")
        acc_drift = accuracies(phase("after-drift", True, field_seen))
        note("drift", f"sensor drift on {len(drifted)}/{opts.devices} devices: fleet accuracy {acc_drift['fleet']} "
                      f"(drifted devices {acc_drift['drifted_devices']})")

        # -- detection: which devices does the drift report flag? ------------------------------------
        report = drift_report(registry, by="device")
        flagged = sorted({r["key"] for r in report if r["status"] in ("drift", "skew") and r["model_version"] == v1})
        note("detect", f"drift report flags {len(flagged)} devices: "
                       f"{len(set(flagged) & drifted)} of the {len(drifted)} drifted, "
                       f"{len(set(flagged) - drifted)} of the {opts.devices - len(drifted)} others")

        # -- the retraining pipeline: collect -> train -> evaluate -> package -> canary -> promote -------
        pipe = load_pipeline(opts.pipeline or default_pipeline_path())
        deploy, watch = controller_driver(ctl, drive=True)
        run = run_pipeline(ws, registry, pipe, deploy, watch, progress=lambda s, m: note(f"pipeline:{s}", m),
                           trigger="drift" if flagged else "manual")
        v2 = run.output("train").get("model_version")
        if run.status != "succeeded":
            raise RuntimeError(f"the retraining pipeline ended {run.status}: {run.reason}")
        _wait(lambda: all(r.agent.model_version == v2 for r in fleet.runs), opts.timeout_s, "v2 install")
        acc_after = accuracies(phase("after-v2", True, field_unseen))
        note("serve", f"after {v2}: fleet accuracy {acc_after['fleet']} (drifted devices {acc_after['drifted_devices']})")
        rollout = run.output("watch")
        return {
            "devices": opts.devices, "drifted_devices": len(drifted), "v1": v1, "v2": v2,
            "accuracy_before_drift": acc_before, "accuracy_after_drift": acc_drift, "accuracy_after_v2": acc_after,
            "flagged": flagged, "flagged_drifted": len(set(flagged) & drifted),
            "flagged_clean": len(set(flagged) - drifted),
            "pipeline_run": run.run_id, "pipeline_status": run.status,
            "collected_device_rows": run.output("collect").get("device_rows"),
            "gate": {k: run.output("evaluate").get(k) for k in ("candidate_accuracy", "production_accuracy",
                                                                 "candidate_device_accuracy",
                                                                 "production_device_accuracy")},
            "rollout_id": rollout.get("rollout_id"), "rollout_counts": rollout.get("counts"),
            "production": registry.in_stage(pipe.model, "production"),
            "workspace": str(ws.root), "seconds": round(time.time() - t0, 1),
        }
    finally:
        if fleet is not None:
            fleet.stop()
        cp.clear_announce(TIER)


def _split_lab_and_field(ws: Workspace, registry: Registry, seed: int
                         ) -> tuple[str, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Register 80% of the shipped digits as the lab data set; return its id and the other 20%
    as two halves of field data (served before retraining / only after it)."""
    from edgeloop.cloud.loop.closed_loop import _write_csv_gz
    from edgeloop.cloud.loop.pipeline import register_dataset

    digits = load_dataset()
    order = np.random.default_rng(seed + 7).permutation(len(digits.y))
    n_field = len(order) // 5
    field, lab = order[:n_field], order[n_field:]
    folder = ws.root / "data" / "digits-lab"
    folder.mkdir(parents=True, exist_ok=True)
    _write_csv_gz(folder / "digits-lab.csv.gz", digits.x[lab], digits.y[lab])
    _, lab_id, _ = register_dataset(registry, "digits-lab", folder / "digits-lab.csv.gz")
    half = n_field // 2
    return (lab_id, (digits.x[field[:half]], digits.y[field[:half]]),
            (digits.x[field[half:]], digits.y[field[half:]]))


def _model_name(registry: Registry, model_version: str) -> str:
    return registry.model_version(model_version)["model"]


def _stored(registry: Registry, marks: dict[str, tuple[int, int]]) -> bool:
    for device_id, (lo, hi) in marks.items():
        n = registry.device_telemetry_totals(device_id, lo, hi)["records"]
        if n < hi - lo:
            return False
    return True


def _wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
