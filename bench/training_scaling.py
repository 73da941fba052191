"""Training throughput on 1 and 2 processes (DDP, gloo, CPU), for the demo MLP and a larger MLP.

samples/s is measured inside the job (median of 3 jobs): the training examples of an epoch divided by that
epoch's training time on rank 0 (median over epochs after the first), so process start-up and
rendezvous are not counted. Prints one JSON object as its last line.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeloop.cloud.train.datasets import load_dataset  # noqa: E402
from edgeloop.cloud.train.launcher import DistConfig, run_job  # noqa: E402
from edgeloop.cloud.train.training import TrainParams  # noqa: E402

MODELS = {
    "demo_mlp": TrainParams(epochs=6, hidden=32, layers=2, batch_size=64, checkpoint_every=0),
    "large_mlp": TrainParams(epochs=4, hidden=1024, layers=3, batch_size=64, checkpoint_every=0),
    # the same model with a larger global batch: fewer gradient all-reduces per sample
    "large_mlp_batch512": TrainParams(epochs=4, hidden=1024, layers=3, batch_size=512, checkpoint_every=0),
}


REPEATS = 3


def samples_per_s(params: TrainParams, nproc: int) -> tuple[float, float]:
    """Median over REPEATS jobs of each job's median epoch rate (2 cores are noisy)."""
    rates, acc = [], 0.0
    for _ in range(REPEATS):
        with tempfile.TemporaryDirectory() as d:
            result = run_job(load_dataset(), params, DistConfig(nproc_per_node=nproc, max_restarts=0), Path(d))
        rates.append(statistics.median(row["samples"] / row["train_seconds"] for row in result.history[1:]))
        acc = result.metrics["test_accuracy"]
    return statistics.median(rates), acc


def main() -> None:
    out: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                             "python": platform.python_version()}, "models": {}}
    for name, params in MODELS.items():
        one, acc1 = samples_per_s(params, 1)
        two, acc2 = samples_per_s(params, 2)
        out["models"][name] = {"samples_per_s_1": round(one), "samples_per_s_2": round(two),
                               "scaling": round(two / one, 3), "test_accuracy_1": round(acc1, 4),
                               "test_accuracy_2": round(acc2, 4)}
        print(f"{name}: {one:.0f} samples/s on 1 process, {two:.0f} on 2 ({two / one:.2f}x)", file=sys.stderr)
    demo = out["models"]["demo_mlp"]
    out.update({"samples_per_s_1": demo["samples_per_s_1"], "samples_per_s_2": demo["samples_per_s_2"],
                "scaling": demo["scaling"], "scaling_large": out["models"]["large_mlp"]["scaling"],
                "scaling_large_batch512": out["models"]["large_mlp_batch512"]["scaling"]})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
