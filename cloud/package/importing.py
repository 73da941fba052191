"""Bring your own trained model: a model file made elsewhere becomes a model version.

``edgeloop models import FILE --name NAME --data DATA`` (:func:`import_model`). The format is
read from the file's content, not its name:

=============  ==================================  ==========================================
format         recognised by                        the model version's ONNX / PyTorch model
=============  ==================================  ==========================================
onnx           an ONNX protobuf onnxruntime loads  the file itself; PyTorch via onnx2torch
torchscript    a zip ``torch.jit.load`` loads       exported to ONNX; PyTorch via onnx2torch
torch-export   a zip ``torch.export.load`` loads    exported to ONNX; PyTorch via onnx2torch
               (``.pt2``)
tflite         a ``TFL3`` flatbuffer LiteRT loads   none: packaged as it is, for .tflite tiers
=============  ==================================  ==========================================

The feature contract takes the input shape from the model (batch axis dropped), which must be
the data set's per-example shape, and the layout from the data set; ``--preprocess standardize``
gives the spec training would compute on the training split, ``none`` a spec without steps
(the model takes raw values). The model's outputs on the data must fit the task:
classification, one probability per class (rows summing to 1: the model must end in softmax);
regression, one value; anomaly, one score, the threshold ``--threshold`` or the one training
would choose on the validation split's normal rows. Metrics are the training metrics on the
same test split. Anything that does not fit is refused with one line before anything is
registered.

Tier packaging of imported versions (:func:`torch_model`, :func:`package_imported_tflite`):
versions with an ONNX graph get their float PyTorch module from onnx2torch (LiteRT tiers trace
it; where onnx2torch cannot convert the graph an onnxruntime-backed module stands in, which
serves the ONNX tiers and makes LiteRT tiers refuse with one line). An imported ``.tflite``
is packaged as the file itself, for the tiers that run ``.tflite``: LiteRT tiers (mobile) and,
if it is fully int8 (int8 input and output), TFLite Micro (mcu); ONNX tiers refuse it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import time
import types
import uuid
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from edgeloop.contracts.package import Package, Manifest, read_package, sha256_hex, write_package
from edgeloop.contracts.features import FeatureSpec
from edgeloop.contracts.tasks import TaskKind, TaskSpec
from edgeloop.cloud.errors import IntegrityError, UserError

if TYPE_CHECKING:
    from edgeloop.cloud.train.datasets import Dataset
    from edgeloop.cloud.package.packaging import PackageResult
    from edgeloop.cloud.registry import Registry
    from edgeloop.cloud.package.tiers import TierProfile
    from edgeloop.cloud.workspace import Workspace

__all__ = ["FORMATS", "ImportedModel", "detect_and_load", "import_model", "torch_model", "is_imported_tflite",
           "package_imported_tflite", "PREPROCESS"]

FORMATS = ("onnx", "torchscript", "torch-export", "tflite")
PREPROCESS = ("standardize", "none")
PROBABILITY_ATOL = {"float": 1e-3, "int8": 0.05}   # |row sum - 1| a softmax output keeps (int8: 1/256 steps)
TFLITE_RUNTIMES = ("litert", "tflite-micro")


@dataclass
class ImportedModel:
    format: str
    input_shape: tuple[int, ...] | None       # per example; None where the file does not say (TorchScript)
    predict: Callable[[np.ndarray], np.ndarray]   # model inputs (n, *shape) float32 -> outputs (n, k) float32
    module: nn.Module | None = None           # the loaded PyTorch model (TorchScript, torch.export)
    int8: bool = False                        # .tflite with int8 input and output


# -- loading, by content ---------------------------------------------------------------------
def detect_and_load(data: bytes, name: str = "the model file") -> ImportedModel:
    """Recognise and load a model file. Raises UserError (one line) for anything else."""
    if len(data) >= 8 and data[4:8] == b"TFL3":
        return _load_tflite(data, name)
    if data[:4] == b"PK\x03\x04":
        return _load_torch_zip(data, name)
    if Path(name).suffix.lower() == ".tflite":
        raise UserError(f"{name} is not a .tflite model (no TFL3 flatbuffer identifier)")
    return _load_onnx(data, name)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _load_onnx(data: bytes, name: str) -> ImportedModel:
    import onnx
    import onnxruntime as ort

    try:
        graph = onnx.load_from_string(data).graph
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - protobuf and onnxruntime errors alike: not a usable model
        raise UserError(f"{name} is not a model edgeloop can import (not ONNX onnxruntime loads, TorchScript, "
                        f"torch.export or .tflite): {_first_line(e)}") from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise UserError(f"{name}: the ONNX model takes {len(inputs)} inputs; an importable model takes one")
    shape = _static_per_example(inputs[0].shape, f"{name}: the ONNX model's input {inputs[0].name!r}")
    in_name = inputs[0].name
    del graph

    def predict(x: np.ndarray) -> np.ndarray:
        out = session.run(None, {in_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32).reshape(len(x), -1)

    return ImportedModel("onnx", shape, predict)


def _static_per_example(dims: Any, what: str) -> tuple[int, ...]:
    rest = list(dims)[1:]
    if not list(dims) or any(not isinstance(d, int) or d <= 0 for d in rest):
        raise UserError(f"{what} has shape {list(dims)}; it needs a batch axis and static dimensions after it")
    return tuple(int(d) for d in rest)


def _load_torch_zip(data: bytes, name: str) -> ImportedModel:
    try:
        members = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile as e:
        raise UserError(f"{name} is a damaged zip archive, not a model: {_first_line(e)}") from None
    if any(m.endswith("/models/model.json") or m.endswith("serialized_exported_program.json")
           or "/models/" in m for m in members):
        return _load_torch_export(data, name)
    if any(m.endswith("/code/__torch__.py") or "/code/" in m for m in members):
        return _load_torchscript(data, name)
    raise UserError(f"{name} is a zip archive but neither TorchScript nor a torch.export program "
                    "(a plain torch.save checkpoint holds weights, not a model: export it with torch.jit.save "
                    "or torch.export.save)")


def _load_torchscript(data: bytes, name: str) -> ImportedModel:
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{name} does not load as TorchScript: {_first_line(e)}") from None
    return ImportedModel("torchscript", None, _torch_predict(module), module=module)


class _ExportedModule(nn.Module):
    """A torch.export program's module: it refuses ``.train()``/``.eval()``, which the
    exporters call, so those only set this wrapper's flag."""

    def __init__(self, gm: nn.Module) -> None:
        super().__init__()
        self.gm = gm

    def train(self, mode: bool = True) -> _ExportedModule:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gm(x)


def _load_torch_export(data: bytes, name: str) -> ImportedModel:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{name} does not load as a torch.export program: {_first_line(e)}") from None
    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise UserError(f"{name}: the exported program takes {len(user_inputs)} inputs; an importable model "
                        "takes one")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0])
    val = node.meta.get("val")
    shape = None
    if val is not None and len(val.shape) >= 1:
        rest = val.shape[1:]
        if all(isinstance(d, int) or str(d).isdigit() for d in rest):
            shape = tuple(int(d) for d in rest)
    module = _ExportedModule(program.module())
    return ImportedModel("torch-export", shape, _torch_predict(module), module=module)


def _torch_predict(module: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        if not isinstance(out, torch.Tensor):
            raise UserError(f"the model returns {type(out).__name__}, not one tensor")
        return out.detach().float().reshape(len(x), -1).numpy()
    return predict


def _load_tflite(data: bytes, name: str) -> ImportedModel:
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_content=bytes(data))
        interpreter.allocate_tensors()
        ins, outs = interpreter.get_input_details(), interpreter.get_output_details()
    except Exception as e:  # noqa: BLE001 - a damaged flatbuffer raises anything
        raise UserError(f"{name} claims to be a .tflite model but LiteRT cannot load it: {_first_line(e)}") from None
    if len(ins) != 1 or len(outs) != 1:
        raise UserError(f"{name}: the .tflite model has {len(ins)} inputs and {len(outs)} outputs; an importable "
                        "model has one of each")
    shape = _static_per_example([int(d) for d in ins[0]["shape"]], f"{name}: the .tflite model's input")
    if int(ins[0]["shape"][0]) != 1:
        raise UserError(f"{name}: the .tflite model's input has batch {int(ins[0]['shape'][0])}; devices run "
                        "one example at a time (batch 1)")
    in_dt, out_dt = np.dtype(ins[0]["dtype"]), np.dtype(outs[0]["dtype"])
    if in_dt not in (np.float32, np.int8) or out_dt not in (np.float32, np.int8):
        raise UserError(f"{name}: the .tflite model's input is {in_dt.name} and output {out_dt.name}; importable: "
                        "float32 or int8")
    in_q, out_q = ins[0].get("quantization", (0.0, 0)), outs[0].get("quantization", (0.0, 0))
    for dt, q, what in ((in_dt, in_q, "input"), (out_dt, out_q, "output")):
        if dt == np.int8 and not q[0] > 0:
            raise UserError(f"{name}: the .tflite model's int8 {what} has no quantization scale")

    def predict(x: np.ndarray) -> np.ndarray:
        rows = []
        for example in np.asarray(x, dtype=np.float32):
            v = example[None]
            if in_dt == np.int8:
                v = np.clip(np.round(v / in_q[0] + in_q[1]), -128, 127).astype(np.int8)
            interpreter.set_tensor(ins[0]["index"], v)
            interpreter.invoke()
            out = interpreter.get_tensor(outs[0]["index"])
            if out_dt == np.int8:
                out = (out.astype(np.float32) - out_q[1]) * out_q[0]
            rows.append(np.asarray(out, dtype=np.float32).reshape(-1))
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    return ImportedModel("tflite", shape, predict, int8=in_dt == np.int8 and out_dt == np.int8)


# -- import ---------------------------------------------------------------------------------
class _Probe(nn.Module):
    """A prediction function as a module, so training's metric code reads its outputs."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray]) -> None:
        super().__init__()
        self._predict = predict
        self._device = nn.Parameter(torch.zeros(1), requires_grad=False)   # outputs_of asks for a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._predict(x.detach().cpu().numpy()))


def import_model(ws: Workspace, registry: Registry, file: Path, name: str, data: str | None,
                 task: str | None = None, preprocess: str = "standardize",
                 threshold: float | None = None) -> dict[str, Any]:
    """Check and register an externally trained model as a new version of ``name``. Every check
    runs before the first registry write; a refused import registers nothing."""
    from edgeloop.cloud.package.export import export_onnx
    from edgeloop.cloud.package.packaging import store_blob
    from edgeloop.cloud.loop.pipeline import _labels, resolve_dataset
    from edgeloop.cloud.train.runrecord import code_record, environment_record, hardware_record
    from edgeloop.cloud.train.training import _metrics, _task_spec, dataset_shape, feature_spec_for

    if task is not None and task not in {k.value for k in TaskKind}:
        raise UserError(f"unknown task {task!r}; tasks: {', '.join(k.value for k in TaskKind)}")
    if preprocess not in PREPROCESS:
        raise UserError(f"unknown preprocessing {preprocess!r}; choose: {', '.join(PREPROCESS)}")
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise UserError(f"--threshold must be a positive number, got {threshold}")
    if not name or any(c in name for c in ":/ "):
        raise UserError(f"model name {name!r} must be non-empty, without ':', '/' or spaces")
    file = Path(file)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise UserError(f"model file not found: {file}") from None
    except OSError as e:
        raise UserError(f"cannot read model file {file}: {e.strerror}") from None
    if not raw:
        raise UserError(f"{file} is empty, not a model")
    imported = detect_and_load(raw, str(file))

    dataset, dataset_id = resolve_dataset(registry, data, task)
    kind = TaskKind(task or getattr(dataset, "task", "classification") or "classification")
    if threshold is not None and kind is not TaskKind.ANOMALY:
        raise UserError("--threshold is for --task anomaly only")
    if kind is TaskKind.CLASSIFICATION and dataset.n_classes < 2:
        raise UserError(f"data set {dataset.name} has {dataset.n_classes} class(es); classification needs 2 or more")
    data_shape = dataset_shape(dataset)
    if imported.input_shape is not None and tuple(imported.input_shape) != tuple(data_shape):
        raise UserError(f"{file} takes inputs of shape {_shape(imported.input_shape)} per example, the data set "
                        f"{dataset.name} gives {_shape(data_shape)}")
    layout = getattr(dataset, "layout", "flat") or "flat"
    train, val, test = dataset.split(seed=0)
    spec_shape = data_shape if len(data_shape) > 1 else ()
    if preprocess == "standardize":
        features = feature_spec_for(train, input_shape=spec_shape, layout=layout)
    else:
        n = int(dataset.x.shape[1])
        features = FeatureSpec(n_features=n, names=[f"f{i}" for i in range(n)], steps=[],
                               raw_min=float(train.x.min()), raw_max=float(train.x.max()),
                               input_shape=tuple(spec_shape), layout=layout)
    fmt = imported.format
    val_out = _run(imported, features.model_input(val.x), file, data_shape)
    _check_outputs(kind, val_out, int(dataset.n_classes), fmt, imported.int8, file)
    if kind is TaskKind.ANOMALY and threshold is not None:
        spec = TaskSpec(kind, threshold=float(threshold))
    else:
        spec = _task_spec(kind, val_out[:, 0], val, train)
    probe = _Probe(imported.predict)
    metrics = _metrics(spec, probe, features, val, test, len(train.y))

    onnx_bytes: bytes | None = None
    if fmt == "onnx":
        onnx_bytes = raw
    elif fmt in ("torchscript", "torch-export"):
        try:
            onnx_bytes = export_onnx(imported.module, features.shape, check_inputs=features.model_input(test.x[:64]),
                                     atol=1e-4)
        except IntegrityError as e:
            raise UserError(f"{file}: its ONNX export does not match the model ({e})") from None
        except Exception as e:  # noqa: BLE001 - the exporter raises anything on graphs it cannot trace
            raise UserError(f"{file}: the {fmt} model does not export to ONNX: {_first_line(e)}") from None

    # -- everything checked: the same import again is the version it made, not a new one
    same = _same_import(registry, name, hashlib.sha256(raw).hexdigest(), dataset_id, preprocess, spec.to_obj())
    if same is not None:
        return same
    # -- register
    src_sha, src_path = store_blob(ws.artifacts_dir, raw)
    registry.add_artifact(src_sha, f"import:{fmt}", len(raw), str(src_path))
    onnx_sha = None
    if onnx_bytes is not None:
        onnx_sha, onnx_path = store_blob(ws.artifacts_dir, onnx_bytes)
        if onnx_sha != src_sha:
            registry.add_artifact(onnx_sha, "onnx", len(onnx_bytes), str(onnx_path))
    run_id = f"run-{uuid.uuid4().hex[:12]}"
    origin = {"format": fmt, "sha256": src_sha, "file": str(file.resolve())}
    registry.start_run({"run_id": run_id, "model": name, "dataset_id": dataset_id, "dataset_sha256": dataset.sha256,
                        "params": {"imported": True, "task": kind.value, "preprocess": preprocess, "split_seed": 0},
                        "dist": {"world_size": 0}, "code": {**code_record(), "imported": origin},
                        "environment": environment_record(), "hardware": hardware_record(),
                        "started_at": time.time()})
    registry.finish_run(run_id, status="succeeded", metrics=metrics, history=[], weights_sha256=src_sha)
    version = registry.next_version(name)
    model_version = f"{name}:{version}"
    arch = {"kind": "imported", "format": fmt, "source_sha256": src_sha, "n_features": int(dataset.x.shape[1]),
            "n_classes": int(dataset.n_classes), "input_shape": list(data_shape), "int8": imported.int8}
    labels = _labels(dataset, spec)
    registry.add_model_version({"model_version": model_version, "model": name, "version": version, "run_id": run_id,
                                "stage": "candidate", "onnx_sha256": onnx_sha, "state_sha256": None, "arch": arch,
                                "task": spec.to_obj(), "features": features.to_obj(), "labels": labels,
                                "metrics": metrics})
    registry.add_edge(f"import:{src_sha}", f"run:{run_id}", "imported")
    registry.add_edge(f"dataset:{dataset_id}", f"run:{run_id}", "evaluated")
    registry.add_edge(f"run:{run_id}", f"model_version:{model_version}", "produced")
    return {"model_version": model_version, "run_id": run_id, "format": fmt, "source_sha256": src_sha,
            "onnx_sha256": onnx_sha, "dataset_id": dataset_id, "dataset_sha256": dataset.sha256,
            "input_shape": list(data_shape), "task": spec.to_obj(), "metrics": metrics, "preprocess": preprocess,
            "int8": imported.int8, "created": True}


def _same_import(registry: Registry, name: str, src_sha: str, dataset_id: str, preprocess: str,
                 task: dict[str, Any]) -> dict[str, Any] | None:
    """The version of ``name`` an earlier import of the same file, data set, preprocessing and
    task made (``created: False``), or None."""
    for mv in registry.model_versions():
        if mv["model"] != name:
            continue
        full = registry.model_version(mv["model_version"])
        arch = full.get("arch") or {}
        if arch.get("kind") != "imported" or arch.get("source_sha256") != src_sha:
            continue
        run = registry.run(full["run_id"])
        if run["dataset_id"] != dataset_id or run["params"].get("preprocess") != preprocess or full["task"] != task:
            continue
        dataset = registry.dataset(dataset_id)
        return {"model_version": full["model_version"], "run_id": full["run_id"], "format": arch["format"],
                "source_sha256": src_sha, "onnx_sha256": full["onnx_sha256"], "dataset_id": dataset_id,
                "dataset_sha256": dataset["sha256"], "input_shape": arch["input_shape"], "task": full["task"],
                "metrics": full["metrics"], "preprocess": preprocess, "int8": arch["int8"], "created": False}
    return None


def _shape(shape: tuple[int, ...] | list[int]) -> str:
    return f"({', '.join(str(int(d)) for d in shape)}{',' if len(shape) == 1 else ''})"


def _run(imported: ImportedModel, x: np.ndarray, file: Path, shape: tuple[int, ...]) -> np.ndarray:
    try:
        out = imported.predict(x)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own code raises anything
        raise UserError(f"{file} does not run on the data set's inputs of shape {_shape(shape)} per example: "
                        f"{_first_line(e)}") from None
    if out.shape[0] != len(x):
        raise UserError(f"{file} returns {out.shape[0]} rows for {len(x)} examples")
    if not np.all(np.isfinite(out)):
        raise UserError(f"{file} outputs non-finite values on the data set")
    return out


def _check_outputs(kind: TaskKind, out: np.ndarray, n_classes: int, fmt: str, int8: bool, file: Path) -> None:
    k = out.shape[1]
    if kind is TaskKind.CLASSIFICATION:
        if k != n_classes:
            raise UserError(f"{file} outputs {k} values per example; the data set has {n_classes} classes, and a "
                            f"classifier must output one probability per class")
        sums = out.sum(axis=1)
        tol = PROBABILITY_ATOL["int8" if int8 else "float"]
        if np.any(out < -tol) or np.any(np.abs(sums - 1.0) > tol):
            raise UserError(f"{file} outputs rows summing to {float(sums.min()):.3g}..{float(sums.max()):.3g}, not "
                            "probabilities; a classifier must end in softmax")
    elif k != 1:
        what = "the value" if kind is TaskKind.REGRESSION else "the anomaly score"
        raise UserError(f"{file} outputs {k} values per example; a {kind.value} model must output one ({what})")


# -- packaging imported versions -------------------------------------------------------------
def _torchvision_loads() -> bool:
    try:
        import torchvision  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - a build for another torch raises RuntimeError, OSError, ...
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]
        return False


def _import_onnx2torch():  # noqa: ANN202
    """onnx2torch, importable without a working torchvision (which it needs only for NMS and
    RoiAlign nodes): a stand-in is put in place for the import only, if torchvision is not
    installed or does not load. pip resolves onnx2torch's torchvision to the CUDA build, whose
    ``_C`` extension does not load beside the CPU torch wheel, so importing it raises."""
    if "onnx2torch" in sys.modules or _torchvision_loads():
        import onnx2torch
        return onnx2torch
    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")

    def missing(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("this ONNX operator needs torchvision, which is not installed or does not load")

    ops.nms = ops.roi_align = ops.box_convert = missing
    tv.ops = ops
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
    try:
        import onnx2torch
    finally:
        del sys.modules["torchvision"], sys.modules["torchvision.ops"]
    return onnx2torch


class _OnnxRuntimeModule(_Probe):
    """An ONNX graph's outputs through onnxruntime, for when onnx2torch cannot convert it: the
    ONNX tiers need only the float outputs; LiteRT tiers cannot trace it and refuse."""


def is_imported(mv: dict[str, Any]) -> bool:
    return (mv.get("arch") or {}).get("kind") == "imported"


def is_imported_tflite(mv: dict[str, Any]) -> bool:
    return is_imported(mv) and mv["arch"].get("format") == "tflite"


def torch_model(registry: Registry, mv: dict[str, Any]) -> nn.Module:
    """An imported version's float PyTorch module (from its ONNX graph, via onnx2torch)."""
    from edgeloop.cloud.loop.pipeline import _read_artifact

    if is_imported_tflite(mv) or not mv.get("onnx_sha256"):
        raise UserError(f"{mv['model_version']} is an imported .tflite: it has no PyTorch model; it runs only on "
                        f".tflite tiers ({', '.join(TFLITE_TIER_NAMES)})")
    onnx_bytes = _read_artifact(registry, mv["onnx_sha256"], f"ONNX graph of {mv['model_version']}")
    try:
        import onnx

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _import_onnx2torch().convert(onnx.load_from_string(onnx_bytes)).eval()
    except Exception:  # noqa: BLE001 - unsupported operators: fall back on onnxruntime for the float outputs
        loaded = _load_onnx(onnx_bytes, f"the ONNX graph of {mv['model_version']}")
        return _OnnxRuntimeModule(loaded.predict).eval()


TFLITE_TIER_NAMES = ("mobile", "mcu")


def package_imported_tflite(ws: Workspace, registry: Registry, mv: dict[str, Any],
                            profile: TierProfile) -> PackageResult:
    """An imported .tflite packaged as it is for a .tflite tier, measured and checked like any
    tier package (operators, arena, budgets, golden vectors), and stored."""
    from edgeloop.cloud.package.packaging import GOLDEN_ATOL, baseline_stats, check_fidelity, golden_atol, split_timings, task_fidelity
    from edgeloop.cloud.package.packaging import _load, _tensor, aot_library
    from edgeloop.cloud.loop.pipeline import GOLDEN_COUNT, _read_artifact, _training_data
    from edgeloop.cloud.package.tier_packagers import (TierArtifact, arena_for_tier, captured_output, check_budgets, check_operators,
                                      measure)
    from edgeloop.cloud.package import quantize
    from edgeloop.cloud.package.export import INPUT_NAME, OUTPUT_NAME

    name = mv["model_version"]
    arch = mv["arch"]
    if profile.runtime not in TFLITE_RUNTIMES:
        raise UserError(f"{name} is an imported .tflite: an imported .tflite runs only on .tflite tiers "
                        f"({', '.join(TFLITE_TIER_NAMES)}); {profile.name} runs {profile.runtime}")
    if profile.runtime == "tflite-micro" and not arch.get("int8"):
        raise UserError(f"{name} is a float .tflite; {profile.name} (TFLite Micro) runs fully int8 .tflite only "
                        "(int8 input and output)")
    model_bytes = _read_artifact(registry, arch["source_sha256"], f"imported .tflite of {name}")
    if profile.runtime == "tflite-micro":
        model_bytes = quantize.inline_buffers(model_bytes)
    fmt = "int8" if arch.get("int8") else "fp32"
    dataset, seed = _training_data(registry, mv["run_id"])
    train_split, _, test = dataset.split(seed=seed)
    features = FeatureSpec.from_obj(mv["features"])
    task = TaskSpec.from_obj(mv.get("task"))
    labels = mv["labels"]
    n_outputs = len(labels) if task.kind is TaskKind.CLASSIFICATION else 1
    reference = _load_tflite(model_bytes, f"imported .tflite of {name}").predict
    artifact = TierArtifact("model.tflite", {"model.tflite": model_bytes}, fmt,
                            operators=quantize.tflite_operators(model_bytes))
    if profile.runtime == "tflite-micro":
        artifact.files["model_data.h"] = quantize.c_header(model_bytes, f"g_{mv['model']}_model",
                                                           f"{name} for {profile.name}")
        artifact.layout["c_header"] = "model_data.h"
    check_operators(profile, artifact)
    arena = arena_for_tier(profile, model_bytes)
    draft = Manifest(model=mv["model"], version=mv["version"], tier=profile.name, runtime=profile.runtime,
                     numeric_format=fmt, entrypoint="model.tflite", inputs=[], outputs=[], features=features,
                     labels=labels, golden="golden.json", golden_atol=GOLDEN_ATOL[fmt],
                     max_latency_ms=profile.latency_budget_ms,
                     measured=dict(arena), task=task)
    bundle = Package(draft, artifact.files)
    float_out = reference(features.model_input(test.x))
    golden_raw = test.x[:GOLDEN_COUNT]
    with captured_output():
        runtime = _load(bundle)
        measured = {**measure(profile, bundle, runtime, float_out, test.x, test.y), **arena}
        measured.update(task_fidelity(task, runtime.predict(test.x), float_out, test.y))
    check_fidelity(profile, task, measured, fmt)
    measured["operators"] = sorted({op.name for op in artifact.operators or []})
    check_budgets(profile, measured)
    golden = {"inputs": golden_raw.astype(np.float32).tolist(),
              "outputs": [[float(f"{v:.8g}") for v in row] for row in runtime.predict(golden_raw).tolist()]}
    in_q, out_q = getattr(runtime, "in_q", None), getattr(runtime, "out_q", None)
    aot_files, aot_layout, aot_measured = aot_library(profile, model_bytes, features, golden_raw, test.x, in_q)
    artifact.files.update(aot_files)
    artifact.layout.update(aot_layout)
    measured.update(aot_measured)
    io_specs = {"inputs": [_tensor(INPUT_NAME, list(features.shape), runtime, in_q, "in_dtype")],
                "outputs": [_tensor(OUTPUT_NAME, [n_outputs], runtime, out_q, "out_dtype")]}
    atol = golden_atol(task, fmt, np.asarray(golden["outputs"], dtype=np.float64), out_q)
    train_out = reference(features.model_input(train_split.x))
    lineage = {"run_id": mv["run_id"], "dataset_sha256": dataset.sha256, "onnx_sha256": None,
               "imported_sha256": arch["source_sha256"]}
    recorded, timings = split_timings(measured)
    manifest = Manifest(**{**draft.__dict__, **io_specs, "lineage": lineage, "layout": artifact.layout,
                           "golden_atol": atol, "baseline": baseline_stats(train_split.x, train_out, task, features),
                           "measured": {**recorded, "input_quantization": in_q, "output_quantization": out_q}})
    data = write_package(manifest, {**artifact.files, "golden.json": json.dumps(golden, separators=(",", ":")).encode()})
    from edgeloop.cloud.package.packaging import PackageResult
    from edgeloop.cloud.release.releaser import register_package

    result = PackageResult(data, sha256_hex(data), read_package(data).manifest, timings)
    return register_package(ws, registry, name, result)
