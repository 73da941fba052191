"""The drift report over a large fleet, on the SQLite and the PostgreSQL store.

A store is filled through its own operations (record_statuses, add_telemetry: what the ingest
calls, one batch of every record of 1,000 devices at a time) with ``--devices`` devices, two tiers, each sending ``--records`` telemetry records that
carry a 64-feature summary of 20 digits inputs (the digits baseline's bins and residual sums,
about 5.8 KB of JSON, as real devices send), for a model version whose package has the digits
drift baseline. Then ``drift_report`` runs per cohort in ``--by`` (``fleet``, ``tier``:
whole-fleet merges of every record; ``device``: one verdict per device), alerts not stored.

PostgreSQL: ``--postgres URL`` (an empty database), else a private server started for the run
(tests/pg_server.py: initdb and pg_ctl from Debian's postgresql package on a free port).

Prints one JSON object as its last line: devices, records, and per backend the fill time, the
store's size per device where known, and ``drift_report_s`` per cohort.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL_VERSION = "digits-mlp:1"
TIERS = ("edge-gateway", "mcu")


def _summaries(n: int) -> tuple[dict, list[dict]]:
    """The digits baseline and ``n`` different 20-input feature summaries of its training split."""
    import numpy as np

    from edgeloop.cloud.package.packaging import baseline_stats
    from edgeloop.cloud.train.datasets import load_dataset
    from edgeloop.device_sdk.telemetry import FeatureSummary
    train = load_dataset().split()[0]
    baseline = baseline_stats(train.x, np.eye(10)[train.y])
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        summary = FeatureSummary(baseline)
        summary.record_batch(train.x[rng.choice(len(train.x), 20, replace=False)])
        out.append(summary.to_obj())
    return baseline, out


def fill(location: Path | str, ws_root: Path, devices: int, records: int, baseline: dict,
         summaries: list[dict]) -> float:
    from edgeloop.cloud.drift.baselines import store_baseline
    from edgeloop.cloud.registry import Registry
    from edgeloop.cloud.workspace import Workspace
    ws = Workspace.init(ws_root, mqtt="127.0.0.1:1")
    registry = Registry(location)
    t0 = time.perf_counter()
    try:
        sha = store_baseline(ws, registry, baseline)
        for i, tier in enumerate(TIERS):
            registry.add_package({"sha256": f"pkg-{i}", "model_version": MODEL_VERSION, "tier": tier,
                                  "target": f"digits-{tier}", "length": 1, "baseline_sha256": sha})
        names = [f"dev-{i:06d}" for i in range(devices)]
        rng = random.Random(0)
        for start in range(0, devices, 1000):
            chunk = names[start:start + 1000]
            registry.record_statuses([{"device_id": d, "tier": TIERS[hash(d) % 2], "state": "committed",
                                       "model_version": MODEL_VERSION} for d in chunk])
            now = time.time()       # the store's bulk path: one batch (transaction) per 1000 devices
            registry.add_telemetry([{"device_id": d, "seq": seq, "model_version": MODEL_VERSION,
                                     "window_start": now, "window_end": now + seq, "count": 20,
                                     "labelled": 20, "correct": 19, "errors": 0, "latency_ms_p50": 0.2,
                                     "latency_ms_max": 0.5, "predictions": [2] * 10,
                                     "confidence_hist": [0] * 9 + [20],
                                     "features": summaries[rng.randrange(len(summaries))]}
                                    for seq in range(records) for d in chunk])
    finally:
        registry.close()
    return time.perf_counter() - t0


def report_times(location: Path | str, cohorts: list[str]) -> dict[str, float]:
    from edgeloop.cloud.drift.monitor import drift_report
    from edgeloop.cloud.registry import Registry
    registry = Registry(location)
    out = {}
    try:
        for by in cohorts:
            t0 = time.perf_counter()
            report = drift_report(registry, by=by, store_alerts=False)
            out[by] = round(time.perf_counter() - t0, 3)
            statuses = sorted({e["status"] for e in report})
            print(f"  by={by}: {len(report)} cohorts {statuses} in {out[by]} s", file=sys.stderr)
    finally:
        registry.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--records", type=int, default=2, help="telemetry records per device")
    ap.add_argument("--by", default="fleet,tier", help="cohorts, comma-separated (fleet, tier, device, ...)")
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--postgres", default=None, help="URL of an empty PostgreSQL database (default: a private one)")
    args = ap.parse_args()
    baseline, summaries = _summaries(64)
    cohorts = [c for c in args.by.split(",") if c]
    result: dict = {"devices": args.devices, "records": args.devices * args.records}
    with tempfile.TemporaryDirectory(prefix="edgeloop-drift-scale-") as tmp:
        for backend in [b for b in args.backends.split(",") if b]:
            server = None
            if backend == "sqlite":
                location: Path | str = Path(tmp) / "registry.db"
            elif args.postgres:
                location = args.postgres
            else:
                from tests.pg_server import PrivatePostgres
                server = PrivatePostgres()
                location = server.start()
            try:
                fill_s = fill(location, Path(tmp) / f"ws-{backend}", args.devices, args.records, baseline, summaries)
                entry = {"fill_s": round(fill_s, 2), "drift_report_s": report_times(location, cohorts)}
                if isinstance(location, Path):
                    entry["store_bytes_per_device"] = round(location.stat().st_size / args.devices)
                result[backend] = entry
            finally:
                if server is not None:
                    server.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
