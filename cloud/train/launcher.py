"""Running a training job: in-process for one process, through torchrun for more.

:class:`DistConfig` carries torchrun's own options (``--nproc-per-node``, ``--nnodes``,
``--node-rank``, ``--rdzv-endpoint``, ``--max-restarts``); :func:`run_job` launches
``python -m torch.distributed.run`` with them and the worker :mod:`edgeloop.cloud.train.worker`,
follows its progress file, and returns the result that global rank 0 wrote, or raises
:class:`TrainingFailed` with the reason. On one machine, restarts are relaunches of the whole
job with a fresh rendezvous (each resuming from the last checkpoint); across machines they are
torchrun's own elastic restarts.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from edgeloop.contracts.features import FeatureSpec
from edgeloop.cloud.train.datasets import Dataset
from edgeloop.contracts.tasks import TaskSpec
from edgeloop.cloud.train.training import (TrainParams, TrainResult, TrainingFailed, build_model, dataset_shape, n_outputs_for,
                            train, wrap_for_task)

if TYPE_CHECKING:
    from edgeloop.cloud.train.model_def import ModelDef

__all__ = ["DistConfig", "run_job"]

log = logging.getLogger("edgeloop.launcher")
STARTUP_RETRIES = 2   # relaunches when the workers never formed a process group (not counted as restarts)


@dataclass(frozen=True)
class DistConfig:
    nproc_per_node: int = 1
    nnodes: str = "1"                   # "N" or "MIN:MAX" (elastic)
    node_rank: int = 0
    rdzv_endpoint: str | None = None    # HOST:PORT of the rendezvous; None: standalone on this machine
    max_restarts: int = 0

    @property
    def in_process(self) -> bool:
        return self.nproc_per_node == 1 and self.nnodes == "1" and self.max_restarts == 0

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * int(self.nnodes.split(":")[-1])

    def to_obj(self) -> dict:
        return asdict(self)


def _torchrun_args(cfg: DistConfig) -> list[str]:
    args = ["--nproc-per-node", str(cfg.nproc_per_node), "--monitor-interval", "0.5"]
    if cfg.rdzv_endpoint:
        args += ["--nnodes", cfg.nnodes, "--node-rank", str(cfg.node_rank), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", cfg.rdzv_endpoint, "--max-restarts", str(cfg.max_restarts)]
    else:
        # One machine: a c10d rendezvous on a fresh local port per launch, and restarts done by
        # relaunching (see run_job). torch 2.13's in-place restart of gloo workers was seen to hang
        # (--standalone) or fail to reconnect ("connectFullMesh failed") here.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        args += ["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                 "--max-restarts", "0"]
    return args


def run_job(dataset: Dataset, params: TrainParams, cfg: DistConfig, run_dir: Path,
            on_epoch: Callable[[int, dict[str, float]], None] | None = None,
            model_def: ModelDef | None = None) -> TrainResult:
    """Train; returns rank 0's result. Raises TrainingFailed with the reason on failure.

    On one machine a failed job is relaunched up to ``max_restarts`` times; every launch
    resumes from the last checkpoint. Across machines torchrun's own elastic agent restarts.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.in_process:
        return train(dataset, params, on_epoch, model_def=model_def)
    job = {"dataset_path": str(dataset.path.resolve()), "dataset_sha256": dataset.sha256,
           "params": params.to_obj(), "run_dir": str(run_dir.resolve())}
    if model_def is not None:
        # every rank builds the model from this exact source, checked against the recorded sha256
        source_path = run_dir / "model_def.py"
        source_path.write_bytes(model_def.source)
        job["model_def"] = {"ref": model_def.ref, "source_path": str(source_path.resolve())}
    (run_dir / "job.json").write_text(json.dumps(job))
    launches = 1 if cfg.rdzv_endpoint else 1 + cfg.max_restarts
    seen, attempt, startup_retries = 0, 0, 0
    while True:
        code, seen = _launch(cfg, run_dir, attempt, seen, on_epoch)
        if code == 0 or (run_dir / "failure.json").exists() or (run_dir / "result.pt").exists():
            break    # done, or a failure that a restart cannot fix (diverged, data changed)
        if not cfg.rdzv_endpoint and not _all_ranks_started(run_dir, attempt, cfg) \
                and startup_retries < STARTUP_RETRIES:
            # the workers never formed a process group (a rendezvous port taken, a gloo mesh that
            # did not connect): nothing ran, so relaunching costs no restart from the budget
            startup_retries += 1
            log.warning("training workers did not start (exit code %s); relaunching (%d/%d)",
                        code, startup_retries, STARTUP_RETRIES)
            attempt += 1
            continue
        launches -= 1
        attempt += 1
        if launches <= 0:
            break
    if cfg.node_rank != 0 and code == 0:
        raise TrainingFailed("this node's workers finished; node 0 holds the result")
    result_path = run_dir / "result.pt"
    if code != 0 and result_path.exists():
        # rank 0 wrote the result after the last collective; a failure in tear-down loses nothing
        log.warning("training workers exited with code %s after rank 0 wrote the result; keeping it", code)
    elif code != 0 or not result_path.exists():
        raise TrainingFailed(_failure_reason(run_dir, code, cfg))
    return _load_result(result_path, dataset, params, model_def)


def _launch(cfg: DistConfig, run_dir: Path, attempt: int, seen: int,
            on_epoch: Callable[[int, dict[str, float]], None] | None) -> tuple[int, int]:
    cmd = [sys.executable, "-m", "torch.distributed.run", *_torchrun_args(cfg), "-m", "edgeloop.cloud.train.worker",
           str((run_dir / "job.json").resolve())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGELOOP_LAUNCH_ATTEMPT": str(attempt),
           "PYTHONPATH": _source_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(run_dir / "torchrun.log", "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None:
                seen = _follow(run_dir / "progress.jsonl", seen, on_epoch)
                time.sleep(0.2)
        except BaseException:        # Ctrl-C or SIGTERM here: stop the workers too, not leave them training
            proc.terminate()         # torchrun passes it on to every worker
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    return proc.returncode, _follow(run_dir / "progress.jsonl", seen, on_epoch)


def _all_ranks_started(run_dir: Path, attempt: int, cfg: DistConfig) -> bool:
    """Whether every local rank of this launch joined the process group (train_worker marks it)."""
    started = run_dir / "started"
    return all((started / f"{attempt}-{rank}").exists() for rank in range(cfg.nproc_per_node))


def _source_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def _follow(progress: Path, seen: int, on_epoch: Callable[[int, dict[str, float]], None] | None) -> int:
    """Report epochs appended to the progress file since line ``seen``."""
    if not progress.exists():
        return seen
    lines = progress.read_text().splitlines()
    for line in lines[seen:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return seen   # a line still being written
        if on_epoch:
            on_epoch(int(row["epoch"]), row)
        seen += 1
    return seen


def _failure_reason(run_dir: Path, code: int | None, cfg: DistConfig) -> str:
    failure = run_dir / "failure.json"
    if failure.exists():
        return json.loads(failure.read_text())["reason"]
    tail = ""
    log = run_dir / "torchrun.log"
    if log.exists():
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ("Error" in ln or "error" in ln or "Exception" in ln)
                  and not ln.startswith("error_file")]
        tail = " | ".join(dict.fromkeys((errors or lines or [""])[-3:]))[:600]
    return (f"training workers failed (exit code {code}) after up to {cfg.max_restarts} restarts"
            + (f": {tail}" if tail else "") + f" (log: {log})")


def _load_result(path: Path, dataset: Dataset, params: TrainParams, model_def: ModelDef | None) -> TrainResult:
    saved = torch.load(path, weights_only=False)
    task = TaskSpec.from_obj(saved.get("task"))
    model = build_model(dataset_shape(dataset), n_outputs_for(task.kind, dataset.n_classes, dataset.x.shape[1]),
                        params, model_def)
    model.load_state_dict(saved["state_dict"])
    target = tuple(saved.get("target", (0.0, 1.0)))
    return TrainResult(wrap_for_task(model, task, target), FeatureSpec.from_obj(saved["features"]), params,
                       saved["metrics"], saved["history"], saved["weights_sha256"], saved["world_size"],
                       saved["resumed_from_step"], task)
