"""The closed loop: a pipeline defined in a file, run step by step, each step cached by content.

A pipeline file (TOML, docs/pipeline.md) names the steps' settings::

    [pipeline]  name, model
    [collect]   base data set, minimum device samples
    [train]     epochs, hidden, layers, lr, seed, batch_size, nproc_per_node, model_def, task
    [gate]      tolerance against production, min_accuracy, min_device_accuracy
    [package]   tiers
    [rollout]   target selector, strategy, canary, bake_s, rate_per_min, abort criteria
    [watch]     timeout_s

Steps, in order: ``collect -> train -> evaluate -> package -> rollout -> watch -> promote``.
Every step has a *key*: the sha256 of its settings and of its inputs' identities (data set
sha256, model version, package sha256). A step whose key was completed before is skipped and
its recorded output reused, so re-running an unchanged pipeline trains nothing, packages
nothing and rolls nothing out again; new device data changes the collected data set's hash,
and with it every key downstream. Every run is recorded (``pipeline_runs``) with each step's
key, output, and whether it was cached.

``collect`` builds a new data set version: the base data set's rows plus the labelled raw
inputs that devices sampled into their telemetry (opt-in on the device, ``sample_rate``),
in (device, seq) order, written as a folder data set so its sha256 is defined by content
(flat classification data as CSV; shaped inputs and other tasks as one deterministic ``.npz``
that keeps the shape, layout, task and numeric labels). ``model_def`` in ``[train]`` is your
model definition (``FILE.py:FUNCTION``, relative to the pipeline file, or
``MODULE:FUNCTION``); its source hash is part of the train step's key, so editing it retrains.
``evaluate`` runs the candidate and the production version (their ONNX artifacts, through
their own feature contracts) on the candidate's held-out test split and on the held-out
device rows alone, with the task's metric (accuracy; MAE for regression); the gate needs the
candidate not worse than production by more than the tolerance (accuracy points; for MAE a
fraction), and ``min_accuracy``/``min_device_accuracy`` (``max_mae``/``max_device_mae``).
``rollout`` and ``watch`` use the rollout controller (canary, waves, abort criteria, rollback);
``promote`` moves a completed rollout's version to production, or archives a rolled-back one.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeloop.cloud.errors import UserError
from edgeloop.cloud.field_types import check_field_types
from edgeloop.cloud.train.launcher import DistConfig
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.train.training import TrainParams
from edgeloop.cloud.workspace import Workspace

__all__ = ["PipelineFile", "PipelineRun", "StepResult", "load_pipeline", "run_pipeline", "pipeline_runs",
           "STEPS"]

STEPS = ("collect", "train", "evaluate", "package", "rollout", "watch", "promote")
_SECTIONS = {"pipeline", "collect", "train", "gate", "package", "rollout", "watch"}
_TRAIN_KEYS = {"epochs", "hidden", "layers", "lr", "seed", "split_seed", "batch_size", "weight_decay",
               "nproc_per_node", "model_def", "task"}
_NOT_PARAMS = {"nproc_per_node", "model_def", "task"}     # settings of the run, not TrainParams


@dataclass(frozen=True)
class PipelineFile:
    name: str
    model: str
    collect: dict[str, Any]
    train: dict[str, Any]
    gate: dict[str, Any]
    package: dict[str, Any]
    rollout: dict[str, Any] | None
    watch: dict[str, Any]
    sha256: str
    root: Path = Path(".")             # the pipeline file's folder: relative paths in it start here

    @property
    def model_def(self) -> str | None:
        """``[train] model_def`` with a relative file path resolved against the pipeline file."""
        ref = self.train.get("model_def")
        if not ref:
            return None
        from edgeloop.cloud.train.model_def import names_a_file

        where, sep, function = str(ref).rpartition(":")
        if sep and names_a_file(where) and not Path(where).is_absolute():
            return f"{(self.root / where).resolve()}:{function}"
        return str(ref)

    @property
    def tiers(self) -> list[str]:
        return list(self.package.get("tiers", ["edge-gateway"]))


def load_pipeline(path: Path) -> PipelineFile:
    """Read and check a pipeline file; raises UserError naming the first problem."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read pipeline file {path}: {e.strerror or e}") from None
    return parse_pipeline(raw, Path(path))


def parse_pipeline(raw: bytes, path: Path) -> PipelineFile:
    """Check a pipeline file's bytes (``path``: where it is, for messages and relative paths).
    Raises UserError naming the first problem, whatever the bytes."""
    from edgeloop.cloud.rollouts.controller import RolloutSpec

    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    unknown = set(doc) - _SECTIONS
    if unknown:
        raise UserError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(sorted(_SECTIONS))}")
    bad_tables = sorted(name for name, value in doc.items() if not isinstance(value, dict))
    if bad_tables:
        raise UserError(f"{path}: {', '.join(bad_tables)} must be a [section] (a table), not a value")
    head = doc.get("pipeline", {})
    if not isinstance(head.get("name"), str) or not head["name"]:
        raise UserError(f"{path}: [pipeline] needs a name")
    if not isinstance(head.get("model", ""), str):
        raise UserError(f"{path}: [pipeline] model must be a model name (a string)")
    train = dict(doc.get("train", {}))
    bad = set(train) - _TRAIN_KEYS
    if bad:
        raise UserError(f"{path}: unknown [train] setting(s) {', '.join(sorted(bad))}; "
                        f"known: {', '.join(sorted(_TRAIN_KEYS))}")
    check_field_types(TrainParams, {k: v for k, v in train.items() if k != "nproc_per_node"}, f"{path}: [train]")
    if "nproc_per_node" in train and (isinstance(train["nproc_per_node"], bool)
                                      or not isinstance(train["nproc_per_node"], int)):
        raise UserError(f"{path}: [train] nproc_per_node must be a whole number")
    tiers = doc.get("package", {}).get("tiers", ["edge-gateway"])
    if not isinstance(tiers, list) or not tiers or not all(isinstance(t, str) for t in tiers):
        raise UserError(f"{path}: [package] tiers must be a non-empty list of tier names")
    rollout = doc.get("rollout")
    if rollout is not None and not isinstance(rollout.get("target"), str):
        raise UserError(f"{path}: [rollout] needs a target selector, e.g. target = \"tier=edge-gateway\"")
    if rollout is not None:
        if "model_version" in rollout:
            raise UserError(f"{path}: [rollout] takes no model_version (the pipeline rolls out what it trained)")
        check_field_types(RolloutSpec, rollout, f"{path}: [rollout]")
    return PipelineFile(name=head["name"], model=str(head.get("model", "digits-mlp")),
                        collect=dict(doc.get("collect", {})), train=train, gate=dict(doc.get("gate", {})),
                        package=dict(doc.get("package", {})), rollout=dict(rollout) if rollout else None,
                        watch=dict(doc.get("watch", {})), sha256=hashlib.sha256(raw).hexdigest(),
                        root=path.resolve().parent)


@dataclass
class StepResult:
    step: str
    key: str
    cached: bool
    output: dict[str, Any]
    seconds: float


@dataclass
class PipelineRun:
    run_id: str
    name: str
    status: str = "running"          # running -> succeeded | failed | rolled_back
    reason: str | None = None
    steps: list[StepResult] = field(default_factory=list)

    def output(self, step: str) -> dict[str, Any]:
        for s in self.steps:
            if s.step == step:
                return s.output
        return {}

    def to_obj(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "name": self.name, "status": self.status, "reason": self.reason,
                "steps": [{"step": s.step, "key": s.key, "cached": s.cached, "seconds": round(s.seconds, 2),
                           "output": s.output} for s in self.steps]}


# a rollout driver: (pipeline file, model version) -> rollout id, and (rollout id, timeout) -> final status
Deploy = Callable[[dict[str, Any], str], str]
Watch = Callable[[str, float], dict[str, Any]]
Progress = Callable[[str, str], None]   # (step, message)


def _key(step: str, *parts: Any) -> str:
    return hashlib.sha256(json.dumps([step, *parts], sort_keys=True, default=str).encode()).hexdigest()


def _cached(registry: Registry, key: str) -> dict[str, Any] | None:
    return registry.pipeline_step_output(key)


def _remember(registry: Registry, key: str, step: str, output: dict[str, Any]) -> None:
    registry.remember_pipeline_step(key, step, output)


def pipeline_runs(registry: Registry) -> list[dict[str, Any]]:
    return registry.pipeline_runs()


def run_pipeline(ws: Workspace, registry: Registry, pipe: PipelineFile, deploy: Deploy | None = None,
                 watch: Watch | None = None, progress: Progress | None = None,
                 trigger: str = "manual") -> PipelineRun:
    """Run every step; returns the run (its status says how it ended). Without ``deploy``
    (no control plane to roll out through), the run stops after ``package``.
    Raises UserError for a pipeline that cannot start (unknown base data set, no device data)."""
    say = progress or (lambda step, msg: None)
    run = PipelineRun(run_id=f"pipe-{uuid.uuid4().hex[:10]}", name=pipe.name)
    started = time.time()
    _record(registry, run, pipe, trigger, started)

    def step(name: str, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        t0 = time.time()
        hit = _cached(registry, key)
        if hit is not None:
            say(name, "unchanged: reusing the recorded result")
            run.steps.append(StepResult(name, key, True, hit, time.time() - t0))
        else:
            out = fn()
            if out.get("_final", True):
                _remember(registry, key, name, {k: v for k, v in out.items() if k != "_final"})
            out.pop("_final", None)
            run.steps.append(StepResult(name, key, False, out, time.time() - t0))
        _record(registry, run, pipe, trigger, started)
        return run.steps[-1].output

    try:
        collected = _collect_inputs(registry, pipe)
        data = step("collect", _key("collect", pipe.collect, collected["base_sha256"], collected["samples_sha256"]),
                    lambda: _collect(ws, registry, pipe, collected, say))
        params = _train_params(pipe)
        definition = _model_def_sha256(pipe)
        trained = step("train", _key("train", data["dataset_sha256"], params.to_obj(), pipe.model,
                                     pipe.train.get("nproc_per_node", 1),
                                     # only pipelines that name a definition or task key on them:
                                     # the keys of earlier pipeline files stay what they were
                                     *([definition, pipe.train.get("task")] if definition or pipe.train.get("task")
                                       else [])),
                       lambda: _train(ws, registry, pipe, data, params, say))
        mv = trained["model_version"]
        production = registry.in_stage(pipe.model, "production")
        incumbent = production[-1] if production else None
        verdict = step("evaluate", _key("evaluate", mv, incumbent, pipe.gate, data["dataset_sha256"]),
                       lambda: _evaluate(registry, pipe, data, mv, incumbent, say))
        if not verdict["passed"]:
            run.status, run.reason = "failed", verdict["reason"]
            return run
        packages = step("package", _key("package", mv, pipe.tiers), lambda: _package(ws, registry, pipe, mv, say))
        if deploy is None or watch is None or pipe.rollout is None:
            run.status = "succeeded"
            run.reason = "packaged; no rollout configured" if pipe.rollout is None else "packaged; no control plane"
            return run
        # a rollout acts on the fleet as it is now: reused only while the production version it
        # was meant to replace is still production (a re-run after another version shipped rolls out again)
        rolled = step("rollout", _key("rollout", packages, pipe.rollout, incumbent),
                      lambda: {"rollout_id": deploy(pipe.rollout or {}, mv), "model_version": mv})
        final = step("watch", _key("watch", rolled["rollout_id"]),
                     lambda: _watch(watch, rolled["rollout_id"], float(pipe.watch.get("timeout_s", 600)), say))
        outcome = step("promote", _key("promote", rolled["rollout_id"], final["state"]),
                       lambda: _promote(registry, mv, final, pipe, say))
        run.status = "succeeded" if outcome["promoted"] else "rolled_back"
        run.reason = outcome["reason"]
        return run
    except UserError as e:
        run.status, run.reason = "failed", str(e)
        raise
    except Exception as e:
        run.status, run.reason = "failed", f"{type(e).__name__}: {e}"
        raise
    finally:
        _record(registry, run, pipe, trigger, started, ended=time.time())


def _record(registry: Registry, run: PipelineRun, pipe: PipelineFile, trigger: str, started: float,
            ended: float | None = None) -> None:
    registry.record_pipeline_run({"run_id": run.run_id, "name": pipe.name, "file_sha256": pipe.sha256,
                                  "status": run.status, "reason": run.reason, "trigger": trigger,
                                  "steps": run.to_obj()["steps"], "started_at": started, "ended_at": ended})


# -- collect ----------------------------------------------------------------------------------------
def _base_dataset(registry: Registry, pipe: PipelineFile) -> dict[str, Any]:
    """The data set device rows are added to: [collect] base, else the production version's
    (else the model's first version's), followed back through earlier collections, so device
    rows are never added on top of an earlier collection of themselves."""
    ref = pipe.collect.get("base")
    if ref:
        return registry.dataset(str(ref))
    production = registry.in_stage(pipe.model, "production")
    versions = [m for m in registry.model_versions() if m["model"] == pipe.model]
    source = production[-1] if production else (min(versions, key=lambda m: m["version"])["model_version"]
                                                if versions else None)
    if source is None:
        raise UserError(f"no base data set: name one in [collect] base, or train {pipe.model} first")
    dataset = registry.dataset(registry.run(registry.model_version(source)["run_id"])["dataset_id"])
    bases = {o["dataset_id"]: o["base_dataset_id"] for o in registry.pipeline_step_outputs("collect")
             if "base_dataset_id" in o}
    for _ in range(100):
        if dataset["dataset_id"] not in bases:
            return dataset
        dataset = registry.dataset(bases[dataset["dataset_id"]])
    raise UserError("the collected data sets' bases form a cycle; name [collect] base explicitly")


def _collect_inputs(registry: Registry, pipe: PipelineFile) -> dict[str, Any]:
    base = _base_dataset(registry, pipe)
    xs, ys, ids = registry.device_samples()
    blob = json.dumps([xs, ys, ids]).encode()
    return {"base": base, "base_sha256": base["sha256"], "x": xs, "y": ys, "devices": ids,
            "samples_sha256": hashlib.sha256(blob).hexdigest()}


def _collect(ws: Workspace, registry: Registry, pipe: PipelineFile, c: dict[str, Any],
             say: Progress) -> dict[str, Any]:
    from edgeloop.cloud.loop.pipeline import load_registered, register_dataset

    minimum = int(pipe.collect.get("min_samples", 1))
    if len(c["y"]) < minimum:
        raise UserError(f"devices sent {len(c['y'])} labelled samples; the pipeline needs at least {minimum}: run "
                        "a fleet that sends them (edgeloop simulate --devices 20 --sample-rate 0.5) or turn sampling on in "
                        "your devices' agents (AgentConfig.sample_rate), and run the pipeline again")
    base = load_registered(c["base"])
    if base.sha256 != c["base_sha256"]:
        raise UserError(f"base data set {c['base']['dataset_id']} changed on disk since it was registered")
    width = base.x.shape[1]
    seen: set[tuple] = set()
    rows = []
    for x, y in zip(c["x"], c["y"]):
        if len(x) != width or not _label_fits(base, y) or (tuple(x), y) in seen:
            continue      # another model's input, or an exact duplicate (it would leak across the split)
        seen.add((tuple(x), y))
        rows.append((x, y))
    if len(rows) < minimum:
        what = f"{base.n_classes} classes" if base.task != "regression" else "numeric targets"
        raise UserError(f"{len(rows)} distinct device samples match the base data set's {width} features and "
                        f"{what}; the pipeline needs {minimum} (more devices, or a higher sample rate: edgeloop "
                        "simulate --devices 20 --sample-rate 0.5)")
    folder = ws.root / "data" / f"{pipe.name}-{c['samples_sha256'][:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    dev_x = np.array([x for x, _ in rows], dtype=np.float32)
    if base.task == "classification" and base.layout == "flat" and not base.input_shape:
        _write_csv_gz(folder / "0-base.csv.gz", base.x, base.y)
        _write_csv_gz(folder / "1-devices.csv.gz", dev_x, np.array([y for _, y in rows], dtype=np.int64))
        dataset, dataset_id, created = register_dataset(registry, f"{pipe.name}-collected", folder)
    else:
        # shaped inputs or another task: one .npz that keeps the shape, layout, task and numeric labels
        from edgeloop.cloud.train.example_data import write_npz

        label_dtype = np.float32 if base.task == "regression" else np.int64
        arrays = {"x": np.concatenate([base.x, dev_x]).reshape(-1, *base.shape),
                  "y": np.concatenate([base.y, np.array([y for _, y in rows])]).astype(label_dtype),
                  "layout": np.array(base.layout), "task": np.array(base.task)}
        if base.label_names:
            arrays["label_names"] = np.array(list(base.label_names))
        path = write_npz(arrays, folder / "collected.npz", overwrite=True)   # the pipeline's own folder
        dataset, dataset_id, created = register_dataset(registry, f"{pipe.name}-collected", path)
    say("collect", f"{len(rows)} labelled device samples from {len(set(c['devices']))} devices + "
                   f"{len(base.y)} base rows -> {dataset_id}")
    return {"dataset_id": dataset_id, "dataset_sha256": dataset.sha256, "base_dataset_id": c["base"]["dataset_id"],
            "base_rows": int(len(base.y)),
            "device_rows": len(rows), "devices": len(set(c["devices"]))}


def _label_fits(base: Any, y: Any) -> bool:
    """A device sample's label fits the base data set's task (a class it has; any number)."""
    if not isinstance(y, (int, float)) or isinstance(y, bool) or not np.isfinite(y):
        return False
    if base.task == "regression":
        return True
    return float(y).is_integer() and 0 <= y < base.n_classes


def _write_csv_gz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Deterministic bytes (no gzip timestamp), so the same rows always hash the same."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    for row, label in zip(x.tolist(), y.tolist()):
        writer.writerow([repr(float(v)) for v in row] + [int(label)])
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(text.getvalue().encode())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


# -- train, evaluate, package -------------------------------------------------------------------------
def _model_def_sha256(pipe: PipelineFile) -> str | None:
    """The source hash of ``[train] model_def``: part of the train key, so an edit retrains."""
    if pipe.model_def is None:
        return None
    from edgeloop.cloud.train.model_def import load_model_def
    return load_model_def(pipe.model_def).sha256


def _train_params(pipe: PipelineFile) -> TrainParams:
    values = {k: v for k, v in pipe.train.items() if k not in _NOT_PARAMS}
    try:
        return TrainParams(**values)
    except TypeError as e:
        raise UserError(f"[train]: {e}") from None


def _train(ws: Workspace, registry: Registry, pipe: PipelineFile, data: dict[str, Any], params: TrainParams,
           say: Progress) -> dict[str, Any]:
    from edgeloop.cloud.loop.pipeline import train_model

    nproc = int(pipe.train.get("nproc_per_node", 1))
    trained = train_model(ws, registry, params, data=data["dataset_id"], model=pipe.model,
                          dist=DistConfig(nproc_per_node=nproc), model_def=pipe.model_def,
                          task=pipe.train.get("task"))
    metrics = trained["metrics"]
    metric = "mae" if "test_mae" in metrics else "accuracy"
    say("train", f"{trained['model_version']} test {metric} {metrics['test_' + metric]:.4f}")
    return {"model_version": trained["model_version"], "run_id": trained["run_id"],
            f"test_{metric}": metrics[f"test_{metric}"]}


def _evaluate(registry: Registry, pipe: PipelineFile, data: dict[str, Any], mv: str, incumbent: str | None,
              say: Progress) -> dict[str, Any]:
    """The gate, with the task's metric: ``<who>_<metric>`` and ``<who>_device_<metric>`` for
    candidate and production (metric ``accuracy``, or ``mae`` for regression)."""
    from edgeloop.cloud.models import evaluate_version, falls_short
    from edgeloop.cloud.loop.pipeline import _training_data
    from edgeloop.contracts.tasks import TaskSpec

    task = TaskSpec.from_obj(registry.model_version(mv).get("task"))
    metric = task.score_metric
    dataset, seed = _training_data(registry, registry.model_version(mv)["run_id"])
    test_idx = dataset.split_indices(seed)[2]
    device_idx = test_idx[test_idx >= data["base_rows"]]
    out: dict[str, Any] = {"candidate": mv, "production": incumbent, "metric": metric}
    for who, version in (("candidate", mv), ("production", incumbent)):
        if version is None:
            continue
        out[f"{who}_{metric}"] = evaluate_version(registry, version, dataset.x[test_idx], dataset.y[test_idx])
        out[f"{who}_device_{metric}"] = (evaluate_version(registry, version, dataset.x[device_idx],
                                                          dataset.y[device_idx]) if len(device_idx) else None)
    out["device_test_rows"] = int(len(device_idx))
    tolerance = float(pipe.gate.get("tolerance", 0.01))
    cand, prod = out[f"candidate_{metric}"], out.get(f"production_{metric}")
    reasons = []
    if prod is not None and falls_short(task, cand, prod, tolerance):
        reasons.append(f"{mv} scores {cand:.4f}, below production {incumbent} at {prod:.4f} minus tolerance "
                       f"{tolerance}" if task.higher_is_better else
                       f"{mv} has MAE {cand:.4f}, above production {incumbent} at {prod:.4f} plus {tolerance:.0%}")
    if task.higher_is_better:
        limits = (("min_accuracy", cand, "scores", "below"),
                  ("min_device_accuracy", out["candidate_device_accuracy"], "scores", "below"))
    else:
        limits = (("max_mae", cand, "has MAE", "above"),
                  ("max_device_mae", out["candidate_device_mae"], "has MAE", "above"))
    for setting, value, verb, side in limits:
        limit = pipe.gate.get(setting)
        if limit is None or value is None:
            continue
        if (value < float(limit)) if side == "below" else (value > float(limit)):
            where = " on held-out device data" if "device" in setting else ""
            reasons.append(f"{mv} {verb} {value:.4f}{where}, {side} {setting} {limit}")
    out["passed"] = not reasons
    out["reason"] = "; ".join(reasons) or None
    say("evaluate", ("passed: " if out["passed"] else "FAILED: ") + (out["reason"] or _scores(out)))
    return out


def _scores(out: dict[str, Any]) -> str:
    m = out["metric"]
    parts = [f"candidate {m} {out[f'candidate_{m}']:.4f}"]
    if out.get(f"production_{m}") is not None:
        parts.append(f"production {out[f'production_{m}']:.4f}")
    if out.get(f"candidate_device_{m}") is not None:
        parts.append(f"on device data: candidate {out[f'candidate_device_{m}']:.4f}"
                     + (f", production {out[f'production_device_{m}']:.4f}"
                        if out.get(f"production_device_{m}") is not None else ""))
    return ", ".join(parts)


def _package(ws: Workspace, registry: Registry, pipe: PipelineFile, mv: str, say: Progress) -> dict[str, Any]:
    from edgeloop.cloud.errors import NotFound
    from edgeloop.cloud.loop.pipeline import package_model

    shas = {}
    for tier in pipe.tiers:
        try:
            shas[tier] = registry.package_for(mv, tier)["sha256"]
        except (NotFound, UserError):
            package_model(ws, registry, mv, tier)
            shas[tier] = registry.package_for(mv, tier)["sha256"]
        say("package", f"{mv} for {tier}: {shas[tier][:12]}")
    return {"model_version": mv, "packages": shas}


# -- rollout, watch, promote ----------------------------------------------------------------------------
def _watch(watch: Watch, rollout_id: str, timeout_s: float, say: Progress) -> dict[str, Any]:
    status = watch(rollout_id, timeout_s)
    say("watch", f"rollout {rollout_id} {status['state']}" + (f": {status.get('reason')}" if status.get("reason") else ""))
    final = status["state"] in ("completed", "aborted")
    return {"rollout_id": rollout_id, "state": status["state"], "reason": status.get("reason"),
            "counts": status.get("counts", {}), "_final": final}


def _promote(registry: Registry, mv: str, final: dict[str, Any], pipe: PipelineFile, say: Progress) -> dict[str, Any]:
    from edgeloop.cloud.models import promote

    if final["state"] != "completed":
        if registry.model_version(mv)["stage"] in ("candidate", "staging"):
            registry.set_stage(mv, "archived")
        reason = f"rollout {final['rollout_id']} {final['state']}" + (f": {final['reason']}" if final.get("reason") else "")
        say("promote", f"not promoted ({reason}); {mv} archived")
        return {"promoted": False, "model_version": mv, "reason": reason}
    if registry.model_version(mv)["stage"] == "archived":
        # the same data trained the same model once before (the train step was reused), and it has
        # since been replaced: it comes back through staging, the one way an archived version returns
        promote(registry, mv, "staging")
        say("promote", f"{mv} was archived: back to staging before the gate")
    result = promote(registry, mv, "production", float(pipe.gate.get("tolerance", 0.01)))
    say("promote", f"{mv} is production" + (f", replacing {result.replaced}" if result.replaced else ""))
    return {"promoted": True, "model_version": mv, "replaced": result.replaced, "reason": None}


def controller_driver(ctl: Any, drive: bool, interval_s: float = 0.2) -> tuple[Deploy, Watch]:
    """``deploy``/``watch`` over a :class:`edgeloop.cloud.rollouts.controller.RolloutController`. ``drive``: this
    process steps the controller itself (no ``edgeloop serve`` running); otherwise it only
    watches the rollout's persisted state while the serving process drives it."""
    from dataclasses import fields as dc_fields

    from edgeloop.cloud.rollouts.controller import RolloutSpec

    known = {f.name for f in dc_fields(RolloutSpec)} - {"model_version"}

    def deploy(cfg: dict[str, Any], model_version: str) -> str:
        bad = set(cfg) - known
        if bad:
            raise UserError(f"unknown [rollout] setting(s) {', '.join(sorted(bad))}; known: {', '.join(sorted(known))}")
        return ctl.create(RolloutSpec(model_version=model_version, **cfg))

    def watch(rollout_id: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.time() + timeout_s
        while True:
            if drive:
                ctl.step()
            status = ctl.status(rollout_id)
            if status["state"] in ("completed", "aborted") or time.time() >= deadline:
                return status
            time.sleep(interval_s)

    return deploy, watch
