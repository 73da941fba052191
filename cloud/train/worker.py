"""The torchrun entry point of a training job: ``python -m torch.distributed.run ... -m
cloud.train.worker JOB.json``.

Every rank loads the data set and checks its sha256 against the job; global rank 0 writes
progress (``progress.jsonl``), the checkpoint, and the result (``result.pt``) or the reason
for failure (``failure.json``). Nothing else is written by any rank.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from edgeloop.cloud.train.datasets import load_dataset
from edgeloop.cloud.errors import CloudError
from edgeloop.cloud.train.model_def import model_def_from_source
from edgeloop.cloud.train.training import TrainParams, TrainingFailed, train, RegressionModel

STARTUP_FAULT_ENV = "EDGELOOP_FAULT_BEFORE_INIT"   # set: every rank exits before joining, first launch only


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    run_dir = Path(job["run_dir"])
    if os.environ.get(STARTUP_FAULT_ENV) and os.environ.get("EDGELOOP_LAUNCH_ATTEMPT", "0") == "0":
        print("edgeloop train worker: injected start-up failure", file=sys.stderr)
        return 1   # a test's stand-in for a rendezvous or gloo mesh that did not form
    dist.init_process_group("nccl" if torch.cuda.is_available() and job.get("cuda", True) else "gloo")
    rank = dist.get_rank()
    started = run_dir / "started"
    started.mkdir(exist_ok=True)
    local_rank = os.environ.get("LOCAL_RANK", str(rank))
    (started / f"{os.environ.get('EDGELOOP_LAUNCH_ATTEMPT', '0')}-{local_rank}").touch()
    try:
        params = TrainParams.from_obj(job["params"])
        dataset = load_dataset(Path(job["dataset_path"]), task=params.task)
        if dataset.sha256 != job["dataset_sha256"]:
            raise TrainingFailed(f"data set {job['dataset_path']} changed: sha256 {dataset.sha256[:12]} "
                                 f"!= {job['dataset_sha256'][:12]} recorded for this job")
        progress = run_dir / "progress.jsonl"

        def on_epoch(epoch: int, row: dict) -> None:
            with open(progress, "a") as f:
                f.write(json.dumps(row) + "\n")

        model_def = None
        if job.get("model_def"):
            source = Path(job["model_def"]["source_path"]).read_bytes()
            model_def = model_def_from_source(job["model_def"]["ref"], source)
            if model_def.sha256 != params.model_def_sha256:
                raise TrainingFailed(f"model definition {model_def.ref} changed: sha256 {model_def.sha256[:12]} "
                                     f"!= {str(params.model_def_sha256)[:12]} recorded for this job")
        result = train(dataset, params, on_epoch, checkpoint=run_dir / "checkpoint.pt", model_def=model_def)
        if rank == 0:
            torch.save({"state_dict": result.model.inner.state_dict(), "features": result.features.to_obj(),
                        "metrics": result.metrics, "history": result.history,
                        "weights_sha256": result.weights_sha256, "world_size": result.world_size,
                        "resumed_from_step": result.resumed_from_step, "task": result.task.to_obj(),
                        "target": _target(result.model)}, run_dir / "result.pt")
        return 0
    except CloudError as e:
        if rank == 0:
            _write_json(run_dir / "failure.json", {"reason": str(e)})
        print(f"edgeloop train worker rank {rank}: {e}", file=sys.stderr)
        return 3
    finally:
        dist.destroy_process_group()


def _target(model: torch.nn.Module) -> list[float]:
    """A regression model's target (mean, std), to rebuild the same wrapper from the state dict."""
    return [model.mean, model.std] if isinstance(model, RegressionModel) else [0.0, 1.0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
