"""Training a classifier with PyTorch: one loop for one process or many (DistributedDataParallel).

The same :func:`train` runs in-process (world size 1) or inside a ``torch.distributed`` worker
launched with torchrun semantics (:mod:`cloud.train_worker`): the training split is sharded
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
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from contracts.features import FeatureSpec
from cloud.datasets import Dataset, Split
from cloud.errors import CloudError

__all__ = ["TrainParams", "TrainResult", "TrainingFailed", "train", "build_model", "weights_sha256",
           "feature_spec_for", "ProbabilityModel", "accuracy"]

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

    def to_obj(self) -> dict:
        return asdict(self)

    @classmethod
    def from_obj(cls, obj: dict) -> TrainParams:
        known = {k: obj[k] for k in cls.__dataclass_fields__ if k in obj}
        return cls(**known)


@dataclass
class TrainResult:
    model: nn.Module                  # outputs probabilities (softmax included)
    features: FeatureSpec
    params: TrainParams
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    weights_sha256: str = ""
    world_size: int = 1
    resumed_from_step: int | None = None


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


def build_model(n_features: int, n_classes: int, params: TrainParams) -> Classifier:
    return Classifier(n_features, params.hidden, n_classes, params.layers)


def feature_spec_for(train: Split, raw_max: float | None = None) -> FeatureSpec:
    """Scale to [0, 1] by the training maximum, then standardize per feature."""
    top = float(raw_max if raw_max is not None else max(1.0, float(train.x.max())))
    scaled = train.x.astype(np.float32) * np.float32(1.0 / top)
    std = np.maximum(scaled.std(axis=0), 0.05)
    return FeatureSpec(
        n_features=train.x.shape[1], names=[f"f{i}" for i in range(train.x.shape[1])],
        steps=[{"op": "scale", "factor": 1.0 / top},
               {"op": "standardize", "mean": [float(v) for v in scaled.mean(axis=0)],
                "std": [float(v) for v in std]}],
        raw_min=float(train.x.min()), raw_max=top,
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
        out = model(torch.from_numpy(features.apply(split.x)).to(device))
    return float((out.argmax(dim=1).cpu().numpy() == split.y).mean())


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
          checkpoint: Path | None = None) -> TrainResult:
    """Train on the data set's train split; report validation and test accuracy.

    Runs distributed if a process group is initialized. Raises TrainingFailed if the loss
    stops being finite.
    """
    ctx = _Dist.current()
    torch.manual_seed(params.seed)
    torch.use_deterministic_algorithms(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(dataset, params, ctx, on_epoch, checkpoint)
    finally:
        torch.set_num_threads(threads)


def _train(dataset: Dataset, params: TrainParams, ctx: _Dist,
           on_epoch: Callable[[int, dict[str, float]], None] | None, checkpoint: Path | None) -> TrainResult:
    train_split, val_split, test_split = dataset.split(seed=params.split_seed)
    features = feature_spec_for(train_split)
    model = build_model(dataset.x.shape[1], dataset.n_classes, params).to(ctx.device)
    x = torch.from_numpy(features.apply(train_split.x)).to(ctx.device)
    y = torch.from_numpy(train_split.y).to(ctx.device)
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
            loss = nn.functional.cross_entropy(wrapped(x[idx]), y[idx])
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
               "train_seconds": time.perf_counter() - epoch_start,
               "val_accuracy": accuracy(model, features, val_split)}
        history.append(row)
        if on_epoch and ctx.rank == 0:
            on_epoch(epoch + 1, row)
    metrics = {"val_accuracy": accuracy(model, features, val_split),
               "test_accuracy": accuracy(model, features, test_split), "train_examples": float(len(y))}
    prob = ProbabilityModel(model.cpu()).eval()
    return TrainResult(prob, features, params, metrics, history, weights_sha256(model), ctx.world, resumed)

