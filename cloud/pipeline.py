"""The control plane's steps, each one call: train, package, publish.

Each step reads its inputs from the registry and records what it made, so every artifact
can be traced back: update -> package -> model version -> run -> data set (sha256).
"""

from __future__ import annotations

import io
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from tuf.api.metadata import TargetFile

from contracts.bundle import sha256_hex
from contracts.features import FeatureSpec
from contracts.messages import Announce
from contracts.topics import assignment_path
from cloud.datasets import Dataset, load_dataset
from cloud.errors import CloudError, IntegrityError, NotFound, UserError
from cloud.launcher import DistConfig, run_job
from cloud.runrecord import code_record, environment_record, hardware_record
from cloud.delta import make_delta
from cloud.export import export_onnx
from cloud.packaging import PackageResult, baseline_stats, build_tier_package, store_blob
from cloud.tiers import tier as tier_profile
from cloud.registry import Registry
from cloud.training import ProbabilityModel, TrainParams, build_model
from cloud.workspace import Workspace

__all__ = ["train_model", "reproduce_run", "register_dataset", "resolve_dataset", "package_model",
           "publish_update", "GOLDEN_COUNT"]

GOLDEN_COUNT = 16


def register_dataset(registry: Registry, name: str | None, path: Path | None) -> tuple[Dataset, str, bool]:
    """Load and register a data set file or folder. Returns (dataset, dataset_id, created)."""
    dataset = load_dataset(path, name)
    dataset_id, created = registry.add_dataset(name or dataset.name, dataset.sha256, str(dataset.path.resolve()),
                                               [list(f) for f in dataset.files], dataset.schema)
    return dataset, dataset_id, created


def resolve_dataset(registry: Registry, ref: str | None) -> tuple[Dataset, str]:
    """The data set a training run uses: a registered ``name[:version]``, a path (registered on
    the way), or the shipped digits set. Refuses a registered data set whose files changed."""
    if ref is None:
        dataset, dataset_id, _ = register_dataset(registry, "digits", None)
        return dataset, dataset_id
    if Path(ref).exists():
        dataset, dataset_id, _ = register_dataset(registry, None, Path(ref))
        return dataset, dataset_id
    if "/" in ref or ref.endswith((".csv", ".gz")):
        raise NotFound(f"data set file not found: {ref}")
    row = registry.dataset(ref)
    dataset = load_dataset(Path(row["path"]), row["name"])
    if dataset.sha256 != row["sha256"]:
        raise IntegrityError(f"data set {row['dataset_id']} changed on disk since it was registered "
                             f"(sha256 {dataset.sha256[:12]} != {row['sha256'][:12]}); register the new "
                             f"content with: edgeloop data add {row['name']} {row['path']}")
    return dataset, row["dataset_id"]


def train_model(ws: Workspace, registry: Registry, params: TrainParams, data: str | None = None,
                model: str = "digits-mlp", dist: DistConfig | None = None,
                on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train (in-process or distributed), export ONNX, register the run and a new model version.

    The run is recorded as ``running`` before training starts and ends ``succeeded`` or
    ``failed`` with the reason; a failed run registers no model version.
    """
    dist = dist or DistConfig()
    dataset, dataset_id = resolve_dataset(registry, data)
    run_id = f"run-{uuid.uuid4().hex[:12]}"
    registry.start_run({"run_id": run_id, "model": model, "dataset_id": dataset_id,
                        "dataset_sha256": dataset.sha256, "params": params.to_obj(),
                        "dist": {**dist.to_obj(), "world_size": dist.world_size}, "code": code_record(),
                        "environment": environment_record(), "hardware": hardware_record(),
                        "started_at": time.time()})
    try:
        result = run_job(dataset, params, dist, ws.root / "runs" / run_id, on_epoch)
        _, _, test = dataset.split(seed=params.split_seed)
        onnx_bytes = export_onnx(result.model, dataset.x.shape[1], check_inputs=result.features.apply(test.x[:64]))
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
    registry.add_model_version({"model_version": model_version, "model": model, "version": version,
                                "run_id": run_id, "stage": "candidate", "onnx_sha256": onnx_sha,
                                "state_sha256": state_sha,
                                "arch": {"n_features": int(dataset.x.shape[1]), "n_classes": dataset.n_classes,
                                         "hidden": params.hidden, "layers": params.layers},
                                "features": result.features.to_obj(),
                                "labels": [str(i) for i in range(dataset.n_classes)], "metrics": result.metrics})
    registry.finish_run(run_id, status="succeeded", metrics=result.metrics, history=result.history,
                        weights_sha256=result.weights_sha256)
    registry.add_edge(f"dataset:{dataset_id}", f"run:{run_id}", "trained")
    registry.add_edge(f"run:{run_id}", f"model_version:{model_version}", "produced")
    return {"run_id": run_id, "model_version": model_version, "metrics": result.metrics,
            "weights_sha256": result.weights_sha256, "onnx_sha256": onnx_sha, "dataset_id": dataset_id,
            "dataset_sha256": dataset.sha256, "world_size": result.world_size,
            "resumed_from_step": result.resumed_from_step}


def reproduce_run(ws: Workspace, registry: Registry, run_id: str, dist: DistConfig | None = None,
                  on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Re-run a recorded run and compare: bit-identical weights where that can hold, else metrics."""
    record = registry.run(run_id)
    if record["status"] != "succeeded":
        raise UserError(f"run {run_id} did not succeed ({record['status']}: {record['reason']}); nothing to reproduce")
    row = registry.dataset(record["dataset_id"])
    dataset = load_dataset(Path(row["path"]), row["name"])
    if dataset.sha256 != record["dataset_sha256"]:
        raise IntegrityError(f"data set {record['dataset_id']} at {row['path']} changed since run {run_id}: "
                             f"sha256 {dataset.sha256[:12]} != recorded {record['dataset_sha256'][:12]}")
    recorded = record["dist"]
    dist = dist or DistConfig(nproc_per_node=int(recorded["world_size"]))
    params = TrainParams.from_obj(record["params"])
    result = run_job(dataset, params, dist, ws.root / "runs" / f"{run_id}-repro-{uuid.uuid4().hex[:6]}", on_epoch)
    same_world = dist.world_size == int(recorded["world_size"])
    code, env = code_record(), environment_record()
    notes = []
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
            "world_size": dist.world_size, "notes": notes}


def torch_cuda_used(record: dict[str, Any]) -> bool:
    return bool(record["hardware"].get("cuda_devices"))


def _training_data(registry: Registry, run_id: str) -> tuple[Dataset, int]:
    """The data set a run trained on (refused if its files changed since) and its split seed."""
    run = registry.run(run_id)
    row = registry.dataset(run["dataset_id"])
    dataset = load_dataset(Path(row["path"]), row["name"])
    if dataset.sha256 != run["dataset_sha256"]:
        raise IntegrityError(f"data set {row['path']} changed since run {run_id} "
                             f"(sha256 {dataset.sha256[:12]} != {run['dataset_sha256'][:12]})")
    return dataset, int(run["params"].get("split_seed", 0))


CALIBRATION_ROWS = 256


def package_model(ws: Workspace, registry: Registry, model_version: str, tier: str) -> PackageResult:
    """Build a tier's package for a model version, proven on the tier's runtime and within its
    budgets, and store it (content-addressed). Raises UserError / BudgetExceeded, registering nothing."""
    mv = registry.model_version(model_version)
    profile = tier_profile(tier, ws.root)
    onnx_bytes = _read_artifact(registry, mv["onnx_sha256"], f"ONNX export of {model_version}")
    dataset, seed = _training_data(registry, mv["run_id"])
    train_split, _, test = dataset.split(seed=seed)
    features = FeatureSpec.from_obj(mv["features"])
    # no timestamps: the same model version always packages to the same bytes (rebuildable)
    lineage = {"run_id": mv["run_id"], "dataset_sha256": dataset.sha256, "onnx_sha256": mv["onnx_sha256"]}
    model = _torch_model(registry, mv)
    with torch.no_grad():
        train_probs = model(torch.from_numpy(features.apply(train_split.x))).numpy()
    result = build_tier_package(profile, model, onnx_bytes, features, mv["labels"],
                                mv["model"], mv["version"], train_split.x[:CALIBRATION_ROWS],
                                test.x[:GOLDEN_COUNT], test.x, test.y, lineage,
                                baseline=baseline_stats(train_split.x, train_probs))
    sha, path = store_blob(ws.artifacts_dir, result.data)
    registry.add_artifact(sha, f"package:{tier}", len(result.data), str(path))
    registry.add_package({"sha256": sha, "model_version": model_version, "tier": tier,
                          "target": result.target_path, "length": len(result.data)})
    registry.add_edge(f"model_version:{model_version}", f"package:{sha}", "packaged")
    return result


def _torch_model(registry: Registry, mv: dict[str, Any]) -> torch.nn.Module:
    if not mv.get("state_sha256") or not mv.get("arch"):
        raise UserError(f"{mv['model_version']} has no PyTorch weights recorded (trained before tier "
                        "packaging existed); retrain it")
    arch = mv["arch"]
    inner = build_model(arch["n_features"], arch["n_classes"],
                        TrainParams(hidden=arch["hidden"], layers=arch["layers"]))
    state = _read_artifact(registry, mv["state_sha256"], f"PyTorch weights of {mv['model_version']}")
    try:
        inner.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
    except Exception as e:  # noqa: BLE001 - unpickling and shape errors alike: the stored weights are unusable
        raise IntegrityError(f"the PyTorch weights of {mv['model_version']} do not load: "
                             f"{type(e).__name__}: {str(e)[:200]}") from None
    return ProbabilityModel(inner).eval()


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
    """Sign the tier's package into the image repository, assign it to a device group in the
    director (default group: the tier), and announce it to the fleet."""
    pkg = registry.package_for(model_version, tier)
    data = Path(registry.artifact_path(pkg["sha256"])).read_bytes()
    image = ws.image_repository()
    image.add_target(pkg["target"], data)
    delta = delta_from_current(ws, registry, image, group or tier, pkg["target"], data)
    mv = registry.model_version(model_version)
    msg = Announce(update_id=f"upd-{uuid.uuid4().hex[:12]}", model=mv["model"], model_version=model_version,
                   tier=tier, target=pkg["target"], length=pkg["length"], sha256=pkg["sha256"],
                   repository=repository_url, director=director_url or _director_url(repository_url),
                   issued_at=time.time(), delta=delta)
    assign(ws, group or tier, msg, data)
    announce(msg)
    registry.add_update({"update_id": msg.update_id, "model_version": model_version, "tier": tier,
                         "target": msg.target, "sha256": msg.sha256, "length": msg.length,
                         "issued_at": msg.issued_at})
    registry.add_edge(f"package:{pkg['sha256']}", f"update:{msg.update_id}", "published")
    return msg


def assign(ws: Workspace, group: str, msg: Announce, data: bytes) -> None:
    """The director's word: ``group`` installs this package (replacing its previous assignment)."""
    director = ws.director_repository()
    prefix = f"assignments/{group}/"
    current = {path: None for path in director.targets() if path.startswith(prefix)}
    target = TargetFile.from_data(assignment_path(group, msg.target), data, ["sha256"])
    target.unrecognized_fields["custom"] = {"update_id": msg.update_id, "model_version": msg.model_version}
    director.set_targets({**current, target.path: target})


def delta_from_current(ws: Workspace, registry: Registry, image, group: str, target: str,
                        data: bytes) -> dict | None:
    """Sign a delta from the package the group runs now, if one helps (docs/ota.md)."""
    prefix = f"assignments/{group}/"
    current = [t for p, t in ws.director_repository().targets().items() if p.startswith(prefix)]
    if not current or current[0].path == f"{prefix}{target}":
        return None
    base_sha = current[0].hashes["sha256"]
    try:
        base = Path(registry.artifact_path(base_sha)).read_bytes()
    except (NotFound, OSError):
        return None
    made = make_delta(base, data)
    if made is None:
        return None
    patch, _ = made
    delta_target = f"{target.rsplit('.', 1)[0]}.from-{base_sha[:16]}.delta"
    image.add_target(delta_target, patch)
    return {"target": delta_target, "base_sha256": base_sha, "length": len(patch)}


def _director_url(repository_url: str) -> str:
    return repository_url.rstrip("/").rsplit("/", 1)[0] + "/director"
