"""The control plane's steps, each one call: train, package, publish.

Each step reads its inputs from the registry and records what it made, so every artifact
can be traced back: update -> package -> model version -> run -> data set (sha256).
"""

from __future__ import annotations

import io
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from edgeloop.contracts.package import sha256_hex
from edgeloop.contracts.features import FeatureSpec
from edgeloop.contracts.messages import Announce
from edgeloop.cloud.train.datasets import Dataset, load_dataset
from edgeloop.cloud.errors import CloudError, IntegrityError, NotFound, UserError
from edgeloop.cloud.train.launcher import DistConfig, run_job
from edgeloop.cloud.train.runrecord import (code_record, environment_record, hardware_record, interrupt_marks,
                                            process_record)
from edgeloop.cloud.package.export import export_onnx
from edgeloop.cloud.package.packaging import PackageResult, baseline_stats, build_tier_package, store_blob
from edgeloop.cloud.release.releaser import Assignment, Releaser, register_package
from edgeloop.cloud.package.tiers import tier as tier_profile
from edgeloop.cloud.registry import Registry
from edgeloop.contracts.tasks import TaskKind, TaskSpec
from edgeloop.cloud.train.model_def import ModelDef, load_model_def, model_def_from_source
from edgeloop.cloud.train.training import (TrainParams, build_model, dataset_shape, n_outputs_for, outputs_of, wrap_for_task)
from edgeloop.cloud.workspace import Workspace

__all__ = ["train_model", "reproduce_run", "register_dataset", "resolve_dataset", "package_model",
           "publish_update", "GOLDEN_COUNT"]

GOLDEN_COUNT = 16


def register_dataset(registry: Registry, name: str | None, path: Path | None,
                     task: str | None = None) -> tuple[Dataset, str, bool]:
    """Load and register a data set file or folder. Returns (dataset, dataset_id, created)."""
    dataset = load_dataset(path, name, task=task)
    dataset_id, created = registry.add_dataset(name or dataset.name, dataset.sha256, str(dataset.path.resolve()),
                                               [list(f) for f in dataset.files], dataset.schema)
    return dataset, dataset_id, created


def load_registered(row: dict[str, Any]) -> Dataset:
    """A registered data set loaded again as it was registered (its task decides how labels read)."""
    return load_dataset(Path(row["path"]), row["name"], task=(row.get("schema") or {}).get("task"))


def resolve_dataset(registry: Registry, ref: str | None, task: str | None = None) -> tuple[Dataset, str]:
    """The data set a training run uses: a registered ``name[:version]``, a path (registered on
    the way), or the shipped digits set. Refuses a registered data set whose files changed."""
    if ref is None:
        dataset, dataset_id, _ = register_dataset(registry, "digits", None, task)
        return dataset, dataset_id
    if Path(ref).exists():
        dataset, dataset_id, _ = register_dataset(registry, None, Path(ref), task)
        return dataset, dataset_id
    if "/" in ref or ref.endswith((".csv", ".gz", ".npz")):
        raise NotFound(f"data set file not found: {ref}")
    row = registry.dataset(ref)
    dataset = load_registered(row)
    if dataset.sha256 != row["sha256"]:
        raise IntegrityError(f"data set {row['dataset_id']} changed on disk since it was registered "
                             f"(sha256 {dataset.sha256[:12]} != {row['sha256'][:12]}); register the new "
                             f"content with: edgeloop data add {row['name']} {row['path']}")
    return dataset, row["dataset_id"]


def train_model(ws: Workspace, registry: Registry, params: TrainParams, data: str | None = None,
                model: str = "digits-mlp", dist: DistConfig | None = None,
                on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                model_def: str | None = None, task: str | None = None) -> dict[str, Any]:
    """Train (in-process or distributed), export ONNX, register the run and a new model version.

    ``model_def`` names the user's own model (``FILE.py:FUNCTION``, cloud/train/model_def.py); without
    it the built-in MLP is trained. ``task`` (classification, regression, anomaly) defaults to
    what the data set declares. The run is recorded as ``running`` (with this process's pid and
    host) before training starts and ends ``succeeded``, ``failed`` with the reason, or
    ``interrupted`` on Ctrl-C or SIGTERM (the interrupt propagates); a run that did not succeed
    registers no model version.
    Bad input (a model definition that does not load, an output that does not fit the task, a
    data set that does not fit the model) is refused before anything is registered.
    """
    dist = dist or DistConfig()
    if task is not None and task not in {k.value for k in TaskKind}:
        raise UserError(f"unknown task {task!r}; tasks: {', '.join(k.value for k in TaskKind)}")
    definition = load_model_def(model_def) if model_def else None
    dataset, dataset_id = resolve_dataset(registry, data, task)
    kind = TaskKind(task or getattr(dataset, "task", "classification") or "classification")
    if kind is TaskKind.CLASSIFICATION and dataset.n_classes < 2:
        raise UserError(f"data set {dataset.name} has {dataset.n_classes} class(es); classification needs 2 or more")
    params = replace(params, task=kind.value, model_def=definition.ref if definition else None,
                     model_def_sha256=definition.sha256 if definition else None)
    if definition is not None:
        _preflight(definition, dataset, kind)
    run_id = f"run-{uuid.uuid4().hex[:12]}"
    code = code_record()
    if definition is not None:
        src_sha, src_path = store_blob(ws.artifacts_dir, definition.source)
        registry.add_artifact(src_sha, "model-def-source", len(definition.source), str(src_path))
        code["model_def"] = {**definition.record(), "source_artifact": src_sha}
    registry.start_run({"run_id": run_id, "model": model, "dataset_id": dataset_id,
                        "dataset_sha256": dataset.sha256, "params": params.to_obj(),
                        "dist": {**dist.to_obj(), "world_size": dist.world_size}, "code": code,
                        "environment": environment_record(), "hardware": hardware_record(),
                        "started_at": time.time(), **process_record()})
    with interrupt_marks(registry, run_id):   # Ctrl-C or SIGTERM: the run ends interrupted
        try:
            result = run_job(dataset, params, dist, ws.root / "runs" / run_id, on_epoch, definition)
            _, _, test = dataset.split(seed=params.split_seed)
            onnx_bytes = export_onnx(result.model, result.features.shape,
                                     check_inputs=result.features.model_input(test.x[:64]))
        except CloudError as e:
            registry.finish_run(run_id, status="failed", reason=str(e))
            raise
        except Exception as e:
            registry.finish_run(run_id, status="failed", reason=f"{type(e).__name__}: {e}")
            raise
        onnx_sha, onnx_path = store_blob(ws.artifacts_dir, onnx_bytes)
        registry.add_artifact(onnx_sha, "onnx", len(onnx_bytes), str(onnx_path))
        buf = io.BytesIO()
        torch.save(result.model.inner.state_dict(), buf)   # the tier converters start from PyTorch
        state_sha, state_path = store_blob(ws.artifacts_dir, buf.getvalue())
        registry.add_artifact(state_sha, "torch-state-dict", len(buf.getvalue()), str(state_path))
        version = registry.next_version(model)
        model_version = f"{model}:{version}"
        arch: dict[str, Any] = {"n_features": int(dataset.x.shape[1]), "n_classes": int(dataset.n_classes),
                                "hidden": params.hidden, "layers": params.layers,
                                "input_shape": list(dataset_shape(dataset)),
                                "target": [getattr(result.model, "mean", 0.0), getattr(result.model, "std", 1.0)]}
        if definition is not None:
            arch["model_def"] = code["model_def"]
        registry.add_model_version({"model_version": model_version, "model": model, "version": version,
                                    "run_id": run_id, "stage": "candidate", "onnx_sha256": onnx_sha,
                                    "state_sha256": state_sha, "arch": arch, "task": result.task.to_obj(),
                                    "features": result.features.to_obj(),
                                    "labels": _labels(dataset, result.task), "metrics": result.metrics})
        registry.finish_run(run_id, status="succeeded", metrics=result.metrics, history=result.history,
                            weights_sha256=result.weights_sha256)
        registry.add_edge(f"dataset:{dataset_id}", f"run:{run_id}", "trained")
        registry.add_edge(f"run:{run_id}", f"model_version:{model_version}", "produced")
    return {"run_id": run_id, "model_version": model_version, "metrics": result.metrics,
            "weights_sha256": result.weights_sha256, "onnx_sha256": onnx_sha, "dataset_id": dataset_id,
            "dataset_sha256": dataset.sha256, "world_size": result.world_size,
            "resumed_from_step": result.resumed_from_step, "task": result.task.to_obj()}


def _labels(dataset: Dataset, task: TaskSpec) -> list[str]:
    """What the outputs are called: class names, the target, or normal/anomaly."""
    if task.kind is TaskKind.REGRESSION:
        return ["value"]
    if task.kind is TaskKind.ANOMALY:
        return ["normal", "anomaly"]
    names = list(getattr(dataset, "label_names", ()) or ())
    return names if len(names) == dataset.n_classes else [str(i) for i in range(dataset.n_classes)]


def _preflight(definition: ModelDef, dataset: Dataset, kind: TaskKind) -> None:
    """Build the user's model once and run it on two rows of the data, before a run is recorded:
    a model that does not build, does not take the data's shape or outputs the wrong shape for
    the task is refused with one line and nothing is registered."""
    from edgeloop.cloud.train.training import _check_output, feature_spec_for

    shape = dataset_shape(dataset)
    n_out = n_outputs_for(kind, int(dataset.n_classes), int(dataset.x.shape[1]))
    model = build_model(shape, n_out, TrainParams(), definition)
    features = feature_spec_for(dataset.split()[0], input_shape=shape if len(shape) > 1 else ())
    _check_output(kind, model, torch.from_numpy(features.model_input(dataset.x[:2])), n_out, definition.ref)


def reproduce_run(ws: Workspace, registry: Registry, run_id: str, dist: DistConfig | None = None,
                  on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Re-run a recorded run and compare: bit-identical weights where that can hold, else metrics."""
    record = registry.run(run_id)
    if record["status"] != "succeeded":
        raise UserError(f"run {run_id} did not succeed ({record['status']}: {record['reason']}); nothing to reproduce")
    row = registry.dataset(record["dataset_id"])
    dataset = load_registered(row)
    if dataset.sha256 != record["dataset_sha256"]:
        raise IntegrityError(f"data set {record['dataset_id']} at {row['path']} changed since run {run_id}: "
                             f"sha256 {dataset.sha256[:12]} != recorded {record['dataset_sha256'][:12]}")
    recorded = record["dist"]
    dist = dist or DistConfig(nproc_per_node=int(recorded["world_size"]))
    params = TrainParams.from_obj(record["params"])
    definition, def_note = _recorded_model_def(registry, record)
    result = run_job(dataset, params, dist, ws.root / "runs" / f"{run_id}-repro-{uuid.uuid4().hex[:6]}", on_epoch,
                     definition)
    same_world = dist.world_size == int(recorded["world_size"])
    code, env = code_record(), environment_record()
    notes = [def_note] if def_note else []
    if not same_world:
        notes.append(f"world size {dist.world_size} differs from the recorded {recorded['world_size']}: "
                     "bit-identical weights cannot hold (gradient sums are ordered differently)")
    if code["training_code_sha256"] != record["code"]["training_code_sha256"]:
        notes.append("the training code differs from the recorded run's")
    if env["packages_sha256"] != record["environment"]["packages_sha256"]:
        notes.append("the installed packages differ from the recorded run's")
    metric_diff = {k: result.metrics[k] - record["metrics"].get(k, 0.0) for k in result.metrics}
    return {"run_id": run_id, "identical": result.weights_sha256 == record["weights_sha256"],
            "bit_identity_expected": same_world and not torch_cuda_used(record),
            "weights_sha256": result.weights_sha256, "original_weights_sha256": record["weights_sha256"],
            "metrics": result.metrics, "original_metrics": record["metrics"], "metric_difference": metric_diff,
            "world_size": dist.world_size, "notes": notes, "model_def_changed": bool(def_note)}


def _recorded_model_def(registry: Registry, record: dict[str, Any]) -> tuple[ModelDef | None, str | None]:
    """The model definition a run recorded, rebuilt from its stored copy, and a note if the
    user's file now differs from it (or is gone)."""
    rec = (record.get("code") or {}).get("model_def")
    if not rec:
        return None, None
    source = _read_artifact(registry, rec["source_artifact"], f"model definition source of {record['run_id']}")
    definition = model_def_from_source(rec["ref"], source)
    where = rec["ref"].rpartition(":")[0]
    note = None
    try:
        current = load_model_def(rec["ref"]).sha256
    except UserError as e:
        note = f"the model definition {rec['ref']} no longer loads ({e}); reproduced from the recorded copy"
    else:
        if current != rec["sha256"]:
            note = (f"the model definition {where} changed since the run (sha256 {current[:12]}, recorded "
                    f"{rec['sha256'][:12]}); reproduced from the recorded copy")
    return definition, note


def torch_cuda_used(record: dict[str, Any]) -> bool:
    return bool(record["hardware"].get("cuda_devices"))


def _training_data(registry: Registry, run_id: str) -> tuple[Dataset, int]:
    """The data set a run trained on (refused if its files changed since) and its split seed."""
    run = registry.run(run_id)
    row = registry.dataset(run["dataset_id"])
    dataset = load_registered(row)
    if dataset.sha256 != run["dataset_sha256"]:
        raise IntegrityError(f"data set {row['path']} changed since run {run_id} "
                             f"(sha256 {dataset.sha256[:12]} != {run['dataset_sha256'][:12]})")
    return dataset, int(run["params"].get("split_seed", 0))



def package_model(ws: Workspace, registry: Registry, model_version: str, tier: str) -> PackageResult:
    """Build a tier's package for a model version, proven on the tier's runtime and within its
    budgets, and store it (content-addressed). Raises UserError / BudgetExceeded, registering nothing."""
    mv = registry.model_version(model_version)
    profile = tier_profile(tier, ws.root)
    if (mv.get("arch") or {}).get("kind") == "imported" and mv["arch"].get("format") == "tflite":
        from edgeloop.cloud.package.importing import package_imported_tflite   # the file as it is: no ONNX, no PyTorch
        return package_imported_tflite(ws, registry, mv, profile)
    onnx_bytes = _read_artifact(registry, mv["onnx_sha256"], f"ONNX export of {model_version}")
    dataset, seed = _training_data(registry, mv["run_id"])
    train_split, _, test = dataset.split(seed=seed)
    features = FeatureSpec.from_obj(mv["features"])
    # no timestamps: the same model version always packages to the same bytes (rebuildable)
    lineage = {"run_id": mv["run_id"], "dataset_sha256": dataset.sha256, "onnx_sha256": mv["onnx_sha256"]}
    model = _torch_model(registry, mv)
    task = TaskSpec.from_obj(mv.get("task"))
    train_outputs = outputs_of(model, features, train_split.x)
    result = build_tier_package(profile, model, onnx_bytes, features, mv["labels"],
                                mv["model"], mv["version"], train_split.x,
                                test.x[:GOLDEN_COUNT], test.x, test.y, lineage,
                                baseline=baseline_stats(train_split.x, train_outputs, task, features), task=task)
    return register_package(ws, registry, model_version, result)


def _torch_model(registry: Registry, mv: dict[str, Any]) -> torch.nn.Module:
    """A model version's float PyTorch model as exported (the task's wrapper on top)."""
    if (mv.get("arch") or {}).get("kind") == "imported":
        from edgeloop.cloud.package.importing import torch_model as imported_torch_model   # its ONNX graph, via onnx2torch
        return imported_torch_model(registry, mv)
    if not mv.get("state_sha256") or not mv.get("arch"):
        raise UserError(f"{mv['model_version']} has no PyTorch weights recorded (trained before tier "
                        "packaging existed); retrain it")
    arch = mv["arch"]
    task = TaskSpec.from_obj(mv.get("task"))
    definition = None
    if arch.get("model_def"):
        rec = arch["model_def"]
        definition = model_def_from_source(rec["ref"], _read_artifact(
            registry, rec["source_artifact"], f"model definition source of {mv['model_version']}"))
    shape = tuple(arch.get("input_shape") or (arch["n_features"],))
    inner = build_model(shape, n_outputs_for(task.kind, arch["n_classes"], arch["n_features"]),
                        TrainParams(hidden=arch["hidden"], layers=arch["layers"]), definition)
    state = _read_artifact(registry, mv["state_sha256"], f"PyTorch weights of {mv['model_version']}")
    try:
        inner.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
    except Exception as e:  # noqa: BLE001 - unpickling and shape errors alike: the stored weights are unusable
        raise IntegrityError(f"the PyTorch weights of {mv['model_version']} do not load: "
                             f"{type(e).__name__}: {str(e)[:200]}") from None
    return wrap_for_task(inner, task, tuple(arch.get("target") or (0.0, 1.0)))


def _read_artifact(registry: Registry, sha256: str, what: str) -> bytes:
    """A stored artifact's bytes, checked against the sha256 it was registered under."""
    path = Path(registry.artifact_path(sha256))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IntegrityError(f"the stored {what} is unreadable ({path}): {e.strerror}") from None
    if sha256_hex(data) != sha256:
        raise IntegrityError(f"the stored {what} is corrupted ({path}: sha256 {sha256_hex(data)[:12]}, "
                             f"registered {sha256[:12]}); restore it or retrain")
    return data


def publish_update(ws: Workspace, registry: Registry, repository_url: str, model_version: str, tier: str,
                   announce: Callable[[Announce], None], director_url: str | None = None,
                   group: str | None = None) -> Announce:
    """Release the tier's package to a device group (default group: the tier) through the one
    release path (cloud/release/releaser.py: sign, assign in the director, delta, record), then announce
    it to the fleet. Raises IntegrityError, with nothing assigned, for a package the image
    repository and the director would disagree on."""
    group = group or tier
    now = time.time()
    sha = registry.package_for(model_version, tier)["sha256"]
    released = Releaser(ws, registry, repository_url, director_url).release(
        [Assignment(group, model_version, tier, f"publish/{group}/{sha}/{now!r}", named=False)], now=now)[0]
    announce(released.announce)
    return released.announce
