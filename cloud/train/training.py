"""Training with PyTorch: one loop for one process or many (DistributedDataParallel).

What is trained is the built-in MLP (``--hidden``, ``--layers``) or the user's own model
(:mod:`edgeloop.cloud.train.model_def`), for one of three tasks (:mod:`edgeloop.contracts.tasks`): classification
(cross-entropy on logits), regression (mean squared error on the standardized target) or anomaly
detection (an autoencoder trained on the normal rows by mean squared reconstruction error, its
threshold chosen on the validation split's normal rows). A model definition may bring its own
``training_step``. The trained model is wrapped so that its exported graph outputs what the task
contract says: probabilities, the target in real units, or the anomaly score.

The same :func:`train` runs in-process (world size 1) or inside a ``torch.distributed`` worker
launched with torchrun semantics (:mod:`edgeloop.cloud.train.worker`): the training split is sharded
with :class:`DistributedSampler`, gradients are averaged by DDP (gloo on CPU, NCCL on CUDA),
the training loss is reduced across ranks, and only global rank 0 writes checkpoints.

Reproducibility: with the same data, hyperparameters, seed and world size, CPU training is
bit-identical (deterministic algorithms, one intra-op thread per rank, a seeded sampler).
The global batch is ``batch_size``, split evenly over ranks; a different world size changes
the order of floating-point sums and so the weights.

Checkpoints (every ``checkpoint_every`` steps, atomic) hold the model, optimizer, epoch, step
and history; a restarted job resumes from the last one and reaches the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from edgeloop.contracts.features import FeatureSpec
from edgeloop.contracts.tasks import REGRESSION_BINS, TaskKind, TaskSpec
from edgeloop.cloud.train.datasets import Dataset, Split
from edgeloop.cloud.errors import CloudError, UserError

if TYPE_CHECKING:
    from edgeloop.cloud.train.model_def import ModelDef

__all__ = ["TrainParams", "TrainResult", "TrainingFailed", "train", "build_model", "weights_sha256",
           "feature_spec_for", "ProbabilityModel", "RegressionModel", "AnomalyScoreModel", "wrap_for_task",
           "accuracy", "n_outputs_for", "ANOMALY_QUANTILE"]

ANOMALY_QUANTILE = 0.95          # the threshold: this quantile of the validation split's normal scores (5% false alarms)
REGRESSION_TOLERANCE_SD = 0.5    # a regression prediction within this many target sd counts as correct

FAULT_ENV = "EDGELOOP_FAULT_EXIT_AT_STEP"   # "<rank>:<step>": that rank exits at that step, first attempt only


class TrainingFailed(CloudError):
    """Training could not produce a model (diverged, a worker died beyond its restarts)."""

    exit_code = 5


@dataclass(frozen=True)
class TrainParams:
    seed: int = 0                 # initialisation and batch order
    split_seed: int = 0           # which rows are train / validation / test (fixed per data set)
    epochs: int = 30
    batch_size: int = 64          # global batch, split over ranks
    lr: float = 0.01
    hidden: int = 32
    layers: int = 2               # hidden layers
    weight_decay: float = 1e-4
    checkpoint_every: int = 50    # steps; 0: no checkpoints
    task: str = "classification"  # contracts.tasks.TaskKind
    model_def: str | None = None  # the user's model by reference (cloud.train.model_def); None: the MLP
    model_def_sha256: str | None = None

    def to_obj(self) -> dict:
        return asdict(self)

    @classmethod
    def from_obj(cls, obj: dict) -> TrainParams:
        known = {k: obj[k] for k in cls.__dataclass_fields__ if k in obj}
        return cls(**known)


@dataclass
class TrainResult:
    model: nn.Module                  # outputs what the task contract says (wrap_for_task)
    features: FeatureSpec
    params: TrainParams
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    weights_sha256: str = ""
    world_size: int = 1
    resumed_from_step: int | None = None
    task: TaskSpec = field(default_factory=TaskSpec)


class Classifier(nn.Module):
    """An MLP producing logits."""

    def __init__(self, n_features: int, hidden: int, n_classes: int, layers: int = 2) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        width = n_features
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        mods.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ProbabilityModel(nn.Module):
    """Softmax on top, so the exported graph outputs class probabilities."""

    def __init__(self, logits_model: nn.Module) -> None:
        super().__init__()
        self.inner = logits_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.inner(x), dim=-1)


class RegressionModel(nn.Module):
    """The target back in real units: ``inner(x) * std + mean``."""

    def __init__(self, inner: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.inner = inner
        self.mean, self.std = float(mean), float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).reshape(x.shape[0], -1) * self.std + self.mean


class AnomalyScoreModel(nn.Module):
    """The anomaly score of each row: mean squared error of the inner model's reconstruction."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.inner = autoencoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        err = self.inner(x).reshape(x.shape) - x
        return (err * err).reshape(x.shape[0], -1).mean(dim=1, keepdim=True)


class _Flat(nn.Module):
    """The built-in MLP on a shaped input: flatten first."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.net = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1))


def n_outputs_for(task: TaskKind | str, n_classes: int, n_features: int) -> int:
    """What a model of the task outputs per row before edgeloop's wrapper."""
    kind = TaskKind(task)
    return {TaskKind.CLASSIFICATION: n_classes, TaskKind.REGRESSION: 1, TaskKind.ANOMALY: n_features}[kind]


def build_model(input_shape: int | tuple[int, ...], n_outputs: int, params: TrainParams,
                model_def: ModelDef | None = None) -> nn.Module:
    """The user's model (``model_def``) or the built-in MLP, producing the task's raw outputs."""
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
    if model_def is not None:
        return model_def.build(shape, n_outputs)
    mlp = Classifier(math.prod(shape), params.hidden, n_outputs, params.layers)
    return mlp if len(shape) == 1 else _Flat(mlp)


def wrap_for_task(model: nn.Module, task: TaskSpec, target: tuple[float, float] = (0.0, 1.0)) -> nn.Module:
    """The model as exported: probabilities, real-unit values or anomaly scores."""
    if task.kind is TaskKind.CLASSIFICATION:
        return ProbabilityModel(model).eval()
    if task.kind is TaskKind.REGRESSION:
        return RegressionModel(model, *target).eval()
    return AnomalyScoreModel(model).eval()


def feature_spec_for(train: Split, raw_max: float | None = None, input_shape: tuple[int, ...] = (),
                     layout: str = "flat") -> FeatureSpec:
    """Scale to [0, 1] by the training maximum, then standardize per feature."""
    top = float(raw_max if raw_max is not None else max(1.0, float(train.x.max())))
    scaled = train.x.astype(np.float32) * np.float32(1.0 / top)
    std = np.maximum(scaled.std(axis=0), 0.05)
    return FeatureSpec(
        n_features=train.x.shape[1], names=[f"f{i}" for i in range(train.x.shape[1])],
        steps=[{"op": "scale", "factor": 1.0 / top},
               {"op": "standardize", "mean": [float(v) for v in scaled.mean(axis=0)],
                "std": [float(v) for v in std]}],
        raw_min=float(train.x.min()), raw_max=top, input_shape=tuple(input_shape), layout=layout,
    )


def weights_sha256(model: nn.Module) -> str:
    """A hash of every parameter and buffer, in state-dict order, by name, dtype and bytes."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(name.removeprefix("inner.").encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def accuracy(model: nn.Module, features: FeatureSpec, split: Split) -> float:
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(torch.from_numpy(features.model_input(split.x)).to(device))
    return float((out.argmax(dim=1).cpu().numpy() == split.y).mean())


def outputs_of(model: nn.Module, features: FeatureSpec, x_raw: np.ndarray) -> np.ndarray:
    """The (wrapped) model's outputs on raw rows, as numpy (n, k)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(torch.from_numpy(features.model_input(x_raw)).to(device))
    return out.reshape(len(x_raw), -1).cpu().numpy()


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @classmethod
    def current(cls) -> _Dist:
        if dist.is_available() and dist.is_initialized():
            device = "cpu"
            if dist.get_backend() == "nccl":
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
                torch.cuda.set_device(device)
            return cls(dist.get_rank(), dist.get_world_size(), device)
        return cls()

    def all_reduce(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.cpu().tolist()


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _maybe_fault(rank: int, step: int) -> None:
    """Fault injection for tests: kill this worker once, as a crash would."""
    spec = os.environ.get(FAULT_ENV)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" \
        and os.environ.get("EDGELOOP_LAUNCH_ATTEMPT", "0") == "0"
    if spec and first_attempt:
        fault_rank, fault_step = (int(v) for v in spec.split(":"))
        if (rank, step) == (fault_rank, fault_step):
            os._exit(17)


def train(dataset: Dataset, params: TrainParams,
          on_epoch: Callable[[int, dict[str, float]], None] | None = None,
          checkpoint: Path | None = None, model_def: ModelDef | None = None) -> TrainResult:
    """Train on the data set's train split; report the task's metric on validation and test.

    Runs distributed if a process group is initialized. Raises TrainingFailed if the loss
    stops being finite, UserError if the model's output does not fit the task.
    """
    ctx = _Dist.current()
    torch.manual_seed(params.seed)
    torch.use_deterministic_algorithms(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(dataset, params, ctx, on_epoch, checkpoint, model_def)
    finally:
        torch.set_num_threads(threads)


def dataset_shape(dataset: Dataset) -> tuple[int, ...]:
    return tuple(getattr(dataset, "input_shape", ()) or ()) or (int(dataset.x.shape[1]),)


def _fit_rows(task: TaskKind, split: Split) -> np.ndarray:
    """Rows the model learns from: all of them, or for anomaly detection the normal ones."""
    if task is TaskKind.ANOMALY:
        normal = np.flatnonzero(split.y == 0)
        return normal if len(normal) else np.arange(len(split.y))
    return np.arange(len(split.y))


def _task_loss(task: TaskKind, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task is TaskKind.CLASSIFICATION:
        return nn.functional.cross_entropy(out, y)
    if task is TaskKind.REGRESSION:
        return nn.functional.mse_loss(out.reshape(-1), y)
    return nn.functional.mse_loss(out.reshape(x.shape), x)


def _check_output(task: TaskKind, model: nn.Module, x: torch.Tensor, n_outputs: int, ref: str) -> None:
    """Refuse a model whose output cannot mean what the task needs, before any step is taken."""
    with torch.no_grad():
        try:
            out = model(x[:2])
        except Exception as e:  # noqa: BLE001 - user models raise anything
            raise UserError(f"{ref} cannot run on inputs of shape {tuple(x.shape[1:])}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    if not isinstance(out, torch.Tensor):
        raise UserError(f"{ref} returns {type(out).__name__}, not one tensor")
    got = tuple(out.shape[1:])
    if task is TaskKind.ANOMALY:
        ok, want = out.numel() == x[:2].numel(), f"a reconstruction of its input {tuple(x.shape[1:])}"
    elif task is TaskKind.REGRESSION:
        ok, want = out.reshape(out.shape[0], -1).shape[1] == 1, "one value per row"
    else:
        ok, want = got == (n_outputs,), f"{n_outputs} class logits per row"
    if not ok or out.shape[0] != 2:
        raise UserError(f"{ref} outputs shape {got} per row; a {task.value} model must output {want}")


def _task_spec(task: TaskKind, scores_val: np.ndarray, val: Split, train: Split) -> TaskSpec:
    if task is TaskKind.CLASSIFICATION:
        return TaskSpec()
    if task is TaskKind.REGRESSION:
        y = train.y.astype(np.float64)
        lo, hi = float(y.min()), float(y.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, REGRESSION_BINS + 1)
        return TaskSpec(task, tolerance=round(max(float(y.std()), 1e-6) * REGRESSION_TOLERANCE_SD, 6),
                        bins=[round(float(v), 6) for v in edges])
    normal = scores_val[val.y == 0] if np.any(val.y == 0) else scores_val
    threshold = float(np.quantile(normal, ANOMALY_QUANTILE)) if len(normal) else 1.0
    return TaskSpec(task, threshold=float(f"{max(threshold, 1e-9):.6g}"))


def _metrics(task: TaskSpec, wrapped: nn.Module, features: FeatureSpec, val: Split, test: Split,
             n_train: int) -> dict[str, float]:
    out: dict[str, float] = {"train_examples": float(n_train)}
    for name, split in (("val", val), ("test", test)):
        got = outputs_of(wrapped, features, split.x)
        if task.kind is TaskKind.REGRESSION:
            out[f"{name}_mae"] = task.score(got, split.y)
            out[f"{name}_within_tolerance"] = float(np.mean(np.abs(task.decide_all(got) - split.y) <= task.tolerance))
        elif task.kind is TaskKind.ANOMALY:
            out[f"{name}_accuracy"] = task.score(got, split.y)
            out[f"{name}_anomaly_rate"] = float(task.decide_all(got).mean())
        else:
            out[f"{name}_accuracy"] = task.score(got, split.y)
    return out


def _train(dataset: Dataset, params: TrainParams, ctx: _Dist, on_epoch: Callable[[int, dict[str, float]], None] | None,
           checkpoint: Path | None, model_def: ModelDef | None) -> TrainResult:
    kind = TaskKind(params.task)
    train_split, val_split, test_split = dataset.split(seed=params.split_seed)
    shape = dataset_shape(dataset)
    features = feature_spec_for(train_split, input_shape=shape if len(shape) > 1 else (),
                                layout=getattr(dataset, "layout", "flat") or "flat")
    n_out = n_outputs_for(kind, int(dataset.n_classes), int(dataset.x.shape[1]))
    model = build_model(shape, n_out, params, model_def).to(ctx.device)
    rows = _fit_rows(kind, train_split)
    x = torch.from_numpy(features.model_input(train_split.x[rows])).to(ctx.device)
    target = (0.0, 1.0)
    if kind is TaskKind.REGRESSION:
        yr = train_split.y[rows].astype(np.float64)
        target = (float(yr.mean()), max(float(yr.std()), 1e-6))
        y = torch.from_numpy(((yr - target[0]) / target[1]).astype(np.float32)).to(ctx.device)
    else:
        y = torch.from_numpy(train_split.y[rows].astype(np.int64)).to(ctx.device)
    ref = model_def.ref if model_def is not None else "the built-in MLP"
    _check_output(kind, model, x, n_out, ref)
    step_fn = model_def.training_step if model_def is not None else None
    opt = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    sampler = DistributedSampler(range(len(y)), num_replicas=ctx.world, rank=ctx.rank, shuffle=True,
                                 seed=params.seed)
    per_rank_batch = max(1, params.batch_size // ctx.world)
    history: list[dict[str, float]] = []
    start_epoch, skip_steps, step, resumed, carried = 0, 0, 0, None, (0.0, 0.0)
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False, map_location=ctx.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, skip_steps, step, history = state["epoch"], state["step_in_epoch"], state["step"], state["history"]
        carried = tuple(state["epoch_loss"])   # the running loss of the interrupted epoch
        resumed = step
    wrapped: nn.Module = model
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model, device_ids=None if ctx.device == "cpu" else [ctx.device])
    for epoch in range(start_epoch, params.epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)), device=ctx.device)
        batches = [order[i:i + per_rank_batch] for i in range(0, len(order), per_rank_batch)]
        loss_sum, seen = carried if epoch == start_epoch else (0.0, 0.0)
        epoch_start = time.perf_counter()
        wrapped.train()
        for i, idx in enumerate(batches):
            if epoch == start_epoch and i < skip_steps:
                continue
            _maybe_fault(ctx.rank, step)
            if step_fn is not None:
                loss = step_fn(wrapped, x[idx], y[idx])
            else:
                loss = _task_loss(kind, wrapped(x[idx]), x[idx], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            batch_loss, n, bad = ctx.all_reduce([float(loss.detach()) * len(idx), float(len(idx)),
                                                 float(not math.isfinite(float(loss.detach())))])
            if bad:
                raise TrainingFailed(f"loss became non-finite at epoch {epoch + 1}, step {step}")
            loss_sum, seen = loss_sum + batch_loss, seen + n
            if checkpoint is not None and params.checkpoint_every and step % params.checkpoint_every == 0 \
                    and ctx.rank == 0:
                _save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                              "epoch": epoch, "step_in_epoch": i + 1, "step": step,
                                              "history": history, "epoch_loss": [loss_sum, seen]})
        wrapped.eval()
        row = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1.0), "samples": seen,
               "train_seconds": time.perf_counter() - epoch_start}
        row.update(_epoch_quality(kind, model, features, val_split, target))
        history.append(row)
        if on_epoch and ctx.rank == 0:
            on_epoch(epoch + 1, row)
    model.eval()
    scores_val = outputs_of(wrap_for_task(model, TaskSpec(kind, threshold=1.0, tolerance=1.0, bins=[0.0, 1.0]),
                                          target), features, val_split.x)[:, 0]
    task = _task_spec(kind, scores_val, val_split, train_split)
    final = wrap_for_task(model, task, target)
    metrics = _metrics(task, final, features, val_split, test_split, len(y))
    result_model = wrap_for_task(model.cpu(), task, target)
    return TrainResult(result_model, features, params, metrics, history, weights_sha256(model), ctx.world, resumed,
                       task)


def _epoch_quality(kind: TaskKind, model: nn.Module, features: FeatureSpec, val: Split,
                   target: tuple[float, float]) -> dict[str, float]:
    """Per-epoch validation quality: accuracy, MAE, or the mean reconstruction error of normal rows."""
    if kind is TaskKind.CLASSIFICATION:
        return {"val_accuracy": accuracy(model, features, val)}
    probe = TaskSpec(kind, threshold=1.0, tolerance=1.0, bins=[0.0, 1.0])
    got = outputs_of(wrap_for_task(model, probe, target), features, val.x)
    if kind is TaskKind.REGRESSION:
        return {"val_mae": float(np.mean(np.abs(got[:, 0] - val.y)))}
    normal = val.y == 0
    return {"val_reconstruction_error": float(got[normal, 0].mean() if normal.any() else got[:, 0].mean())}
