"""Model stages, the promotion gate, and lineage queries.

Stages: ``candidate -> staging -> production -> archived``. Promotion to production passes
an evaluation gate: the candidate and the current production version are both evaluated on
the candidate's held-out test split (their ONNX artifacts, on onnxruntime, through their own
feature contracts) with the task's metric (contracts/tasks.py): the candidate must score at
least the production accuracy minus the tolerance (classification, anomaly detection), or an
MAE at most the production MAE times (1 + tolerance) (regression). Versions of different tasks
are not compared. The version it replaces moves to ``archived``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeloop.contracts.features import FeatureSpec
from edgeloop.contracts.tasks import TaskSpec
from edgeloop.cloud import audit
from edgeloop.cloud.errors import LineageBroken, NotFound, UserError
from edgeloop.cloud.registry import Registry

STAGES = ("candidate", "staging", "production", "archived")
ALLOWED = {("candidate", "staging"), ("candidate", "production"), ("staging", "production"),
           ("candidate", "archived"), ("staging", "archived"), ("production", "archived"),
           ("archived", "staging")}
DEFAULT_TOLERANCE = 0.01

__all__ = ["GateFailed", "GateResult", "Promotion", "promote", "lineage", "STAGES", "evaluate_version", "falls_short",
           "gate_result"]


class GateFailed(UserError):
    """The candidate scored below the gate; it was not promoted."""


@dataclass(frozen=True)
class Promotion:
    model_version: str
    from_stage: str
    to_stage: str
    candidate_accuracy: float | None = None
    production_accuracy: float | None = None
    replaced: str | None = None
    metric: str = "accuracy"           # what the two figures are (mae for regression)


@dataclass(frozen=True)
class GateResult:
    """The promotion gate's recorded verdict on a version (:func:`gate_result`): ``passed``,
    ``failed``, ``skipped`` (a pipeline trained it, its run ended before the gate) or ``none``
    (never put to the gate: trained and packaged by hand). ``reason`` says why it failed."""

    model_version: str
    verdict: str
    reason: str | None = None

    @property
    def blocks(self) -> bool:
        """Whether a rollout of it needs ``--force``."""
        return self.verdict in ("failed", "skipped")


def gate_result(registry: Registry, model_version: str) -> GateResult:
    """What the promotion gate said about ``model_version``, from what was recorded: a version
    in production passed it; otherwise the last recorded evaluation of it decides (a pipeline's
    ``evaluate`` step, or ``edgeloop models promote --to production``); a version a pipeline trained
    with no evaluation recorded skipped it. Raises NotFound for an unknown version."""
    mv = registry.model_version(model_version)
    if mv["stage"] == "production":
        return GateResult(model_version, "passed")
    verdicts = [o for step in ("evaluate", "gate") for o in registry.pipeline_step_outputs(step)
                if o.get("candidate") == model_version]
    if verdicts:
        # the newest: "models promote" records carry their time; pipeline steps are in the order run
        last = max(enumerate(verdicts), key=lambda iv: (float(iv[1].get("at", 0.0)), iv[0]))[1]
        return GateResult(model_version, "passed" if last.get("passed") else "failed", last.get("reason"))
    if any(o.get("model_version") == model_version for o in registry.pipeline_step_outputs("train")):
        return GateResult(model_version, "skipped", "its pipeline run ended before the gate")
    return GateResult(model_version, "none")


def _record_gate(registry: Registry, model_version: str, passed: bool, reason: str | None) -> None:
    """Remember a ``models promote`` gate verdict beside the pipelines' (read by gate_result)."""
    registry.remember_pipeline_step(f"gate:{model_version}:{uuid.uuid4().hex[:12]}", "gate",
                                    {"candidate": model_version, "passed": passed, "reason": reason,
                                     "at": time.time()})


def evaluate_version(registry: Registry, model_version: str, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    mv = registry.model_version(model_version)
    session = ort.InferenceSession(Path(registry.artifact_path(mv["onnx_sha256"])).read_bytes(),
                                   providers=["CPUExecutionProvider"])
    features = FeatureSpec.from_obj(mv["features"])
    outputs = session.run(None, {session.get_inputs()[0].name: features.model_input(x)})[0]
    return TaskSpec.from_obj(mv.get("task")).score(outputs.reshape(len(x), -1), y)


def falls_short(task: TaskSpec, candidate: float, production: float, tolerance: float) -> bool:
    """The gate against production, by the task's metric: accuracy more than ``tolerance``
    points below production's, or an MAE more than ``tolerance`` (a fraction) above it."""
    if task.higher_is_better:
        return candidate < production - tolerance
    return candidate > production * (1 + tolerance)


def promote(registry: Registry, model_version: str, to_stage: str, tolerance: float = DEFAULT_TOLERANCE,
            actor: str | None = None) -> Promotion:
    """Move ``model_version`` to ``to_stage`` (production through the gate), recorded in the audit
    log as ``actor``'s (None: the local user) as ``model.archive`` or ``model.promote``."""
    result = _promote(registry, model_version, to_stage, tolerance)
    audit.record(registry, actor, "model.archive" if to_stage == "archived" else "model.promote", model_version,
                 {"from": result.from_stage, "to": result.to_stage, "replaced": result.replaced})
    return result


def _promote(registry: Registry, model_version: str, to_stage: str, tolerance: float) -> Promotion:
    from edgeloop.cloud.loop.pipeline import _training_data   # the candidate's own held-out split

    if to_stage not in STAGES:
        raise UserError(f"unknown stage {to_stage!r}; stages: {', '.join(STAGES)}")
    mv = registry.model_version(model_version)
    current = mv["stage"]
    if (current, to_stage) not in ALLOWED:
        raise UserError(f"{model_version} is {current}; it cannot move to {to_stage}")
    if to_stage != "production":
        registry.set_stage(model_version, to_stage)
        return Promotion(model_version, current, to_stage)
    incumbents = [v for v in registry.in_stage(mv["model"], "production") if v != model_version]
    dataset, seed = _training_data(registry, mv["run_id"])
    _, _, test = dataset.split(seed=seed)
    task = TaskSpec.from_obj(mv.get("task"))
    cand = evaluate_version(registry, model_version, test.x, test.y)
    prod_acc = None
    if incumbents:
        other = TaskSpec.from_obj(registry.model_version(incumbents[-1]).get("task"))
        if other.kind is not task.kind:
            _record_gate(registry, model_version, False, f"a {task.kind.value} model against a {other.kind.value} one")
            raise GateFailed(f"{model_version} is a {task.kind.value} model and production {incumbents[-1]} a "
                             f"{other.kind.value} model: they cannot be compared; archive {incumbents[-1]} first")
        prod_acc = evaluate_version(registry, incumbents[-1], test.x, test.y)
        if falls_short(task, cand, prod_acc, tolerance):
            why = (f"{model_version} scores {task.score_metric} {cand:.4f} on held-out data, below production "
                   f"{incumbents[-1]} at {prod_acc:.4f} minus tolerance {tolerance}" if task.higher_is_better else
                   f"{model_version} has MAE {cand:.4f} on held-out data, above production "
                   f"{incumbents[-1]} at {prod_acc:.4f} plus {tolerance:.0%}")
            _record_gate(registry, model_version, False, why)
            raise GateFailed(f"{why}: not promoted")
    for old in incumbents:
        registry.set_stage(old, "archived")
    registry.set_stage(model_version, "production")
    return Promotion(model_version, current, "production", cand, prod_acc, incumbents[-1] if incumbents else None,
                     task.score_metric)


def lineage(registry: Registry, device_id: str) -> dict[str, Any]:
    """What a device runs and where it came from: update, package, model version, run, data set.

    Raises NotFound for a device this workspace does not know, and LineageBroken naming the
    first link it does not record (an update the device installed from elsewhere, or a registry
    restored from a backup older than the device's update). A device with no installed update
    recorded gets the device part and a ``note``."""
    rows = [d for d in registry.devices() if d["device_id"] == device_id]
    if not rows:
        raise NotFound(f"no device {device_id!r} (see: edgeloop devices)")
    device = rows[0]
    chain: dict[str, Any] = {"device": {k: device[k] for k in ("device_id", "tier", "state", "model_version",
                                                               "last_seen")}}
    node = f"device:{device_id}"
    updates = [p["src"] for p in registry.parents(node) if p["relation"] == "installed"]
    if not updates:
        chain["note"] = "no installed update is recorded for this device"
        return chain
    # the update that installed the version the device reports now
    current = next((u for u in updates if _update_version(registry, u) == device["model_version"]), updates[0])
    update_id = current.split(":", 1)[1]

    def broken(what: str) -> LineageBroken:
        return LineageBroken(f"lineage of {device_id} is broken: it installed update {update_id}, but {what} is not "
                             "recorded in this workspace (was registry.db restored from an older backup, or did the "
                             "device get its update from another workspace?)")

    update = registry.update(update_id)
    if update is None:
        raise broken(f"update {update_id}")
    chain["update"] = update
    published = [p["src"] for p in registry.parents(current) if p["relation"] == "published"]
    sha = published[0].split(":", 1)[1] if published else update["sha256"]
    chain["package"] = _link(lambda: registry.package(sha), broken, f"its package {str(sha)[:12]}")
    mv = _link(lambda: registry.model_version(update["model_version"]), broken,
               f"its model version {update['model_version']}")
    chain["model_version"] = {k: mv[k] for k in ("model_version", "stage", "onnx_sha256", "metrics", "run_id")}
    run = _link(lambda: registry.run(mv["run_id"]), broken, f"the run {mv['run_id']} of {mv['model_version']}")
    chain["run"] = {k: run[k] for k in ("run_id", "status", "params", "dist", "code", "environment", "hardware",
                                        "weights_sha256", "started_at", "ended_at")}
    ds = _link(lambda: registry.dataset(run["dataset_id"] or ""), broken,
               f"the data set {run['dataset_id']} of run {run['run_id']}")
    chain["dataset"] = {k: ds[k] for k in ("dataset_id", "sha256", "path", "files", "schema")}
    return chain


def _link(lookup: Callable[[], dict[str, Any]], broken: Callable[[str], LineageBroken], what: str) -> dict[str, Any]:
    """One step of the chain; a step the registry does not record raises ``broken(what)``."""
    try:
        return lookup()
    except NotFound:
        raise broken(what) from None


def _update_version(registry: Registry, node: str) -> str | None:
    uid = node.split(":", 1)[1]
    update = registry.update(uid)
    return update["model_version"] if update else None
