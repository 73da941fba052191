"""Every shipped example (cloud/examples) through training and per-tier packaging.

For each example and tier: packaged or refused (with the reason), the task's metric on the
tier's real runtime against the float model's on the same held-out rows, the artifact's size,
and its host latency (p50, one sample). Data ship inside installed packages: nothing is
downloaded. Last line: ``{"examples": {...}, "all_tiers_within_tolerance": true}``, where
"within tolerance" means every tier that packaged an example passed its fidelity check against
the float model (a tier that refuses a model, with its reason, is not a failure of tolerance).

    .venv/bin/python bench/examples.py [--only NAME ...] [--epochs-scale 1.0]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeloop.cloud.train.example_data import write_example  # noqa: E402
from edgeloop.cloud.examples import EXAMPLES  # noqa: E402
from edgeloop.cloud.loop.pipeline import package_model, train_model  # noqa: E402
from edgeloop.cloud.registry import Registry  # noqa: E402
from edgeloop.cloud.package.tier_packagers import DoesNotFit, OutOfTolerance  # noqa: E402
from edgeloop.cloud.package.tiers import load_tiers  # noqa: E402
from edgeloop.cloud.train.training import TrainParams  # noqa: E402
from edgeloop.cloud.workspace import Workspace  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(EXAMPLES), help="examples to run (default: all)")
    ap.add_argument("--epochs-scale", type=float, default=1.0, help="multiply each example's epochs")
    args = ap.parse_args()
    results: dict[str, dict] = {}
    within = True
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.init(Path(tmp) / "ws")
        registry = Registry(ws.store_location)
        for name in args.only or sorted(EXAMPLES):
            ex = EXAMPLES[name]
            t0 = time.perf_counter()
            data = write_example(ex.data, Path(tmp) / "data")
            epochs = max(1, round(ex.epochs * args.epochs_scale))
            trained = train_model(ws, registry, TrainParams(epochs=epochs, lr=ex.lr), data=str(data), model=name,
                                  model_def=ex.model_def, task=ex.task)
            row: dict = {"task": ex.task, "epochs": epochs, "train_s": round(time.perf_counter() - t0, 2),
                         "float_metrics": {k: round(v, 4) for k, v in trained["metrics"].items()}, "tiers": {}}
            for tier in sorted(load_tiers()):
                try:
                    pkg = package_model(ws, registry, trained["model_version"], tier)
                except DoesNotFit as e:
                    row["tiers"][tier] = {"packaged": False, "reason": str(e)[:300]}
                    within = within and not isinstance(e, OutOfTolerance)
                    continue
                m = {**pkg.manifest.measured, **pkg.timings}     # timings stay out of the package bytes
                row["tiers"][tier] = {
                    "packaged": True, "format": pkg.manifest.numeric_format, "metric": m["metric"],
                    "value": round(m["metric_value"], 4), "float_value": round(m["metric_value_float"], 4),
                    "agreement_with_float": round(m["top1_agreement_with_float"], 4),
                    "model_bytes": m["model_bytes"], "host_p50_ms": m["host_p50_ms"],
                    "device_latency_ms": m["device_latency_ms"], "ram_bytes": m.get("ram_bytes")}
            results[name] = row
            print(json.dumps({name: row}), file=sys.stderr)
    print(json.dumps({"examples": results, "all_tiers_within_tolerance": within,
                      "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                      "python": platform.python_version()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
