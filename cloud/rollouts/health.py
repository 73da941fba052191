"""Model health for rollouts: the new version's telemetry against the previous version's, on
the same devices (docs/rollouts.md, "Abort criteria").

:func:`judge` is pure: it takes each side's telemetry totals (the new version's and the
previous one's: counts, sums, the p95 of the records' latency and the prediction and
confidence histograms added up, as the store's ``health_totals`` computes them in SQL from the
per-device summaries) and thresholds, and returns the measures and the thresholds they break
(tests/health_reference.py adds telemetry rows up the same way in Python: the oracle the SQL is
tested against). Nothing is judged below ``min_inferences`` inferences on either side.

``quality_drop`` is the task's own metric (contracts/tasks.py) on the labelled inferences, new
against previous: the accuracy drop for classification and anomaly detection (absolute, 0..1),
the relative MAE increase for regression (0.1: the MAE rose by 10%). It is judged once each side
has ``min_inferences`` labelled inferences, and is None before.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

__all__ = ["MEASURES", "js_distance", "judge", "quality_drop"]

# measure -> how a breach reads
MEASURES = {"error_rate_increase": "error rate up", "latency_p95_increase_ms": "latency p95 up (ms)",
            "prediction_js": "prediction JS distance", "confidence_drop": "mean confidence down",
            "quality_drop": "task metric worse"}


def js_distance(p: Iterable[float], q: Iterable[float]) -> float:
    """Jensen-Shannon distance (base 2, 0..1) between two histograms (the shorter is zero-padded)."""
    a, b = [float(x) for x in p], [float(x) for x in q]
    n = max(len(a), len(b))
    a, b = a + [0.0] * (n - len(a)), b + [0.0] * (n - len(b))
    sa, sb = sum(a), sum(b)
    if sa <= 0 or sb <= 0:
        return 0.0
    a, b = [x / sa for x in a], [x / sb for x in b]
    m = [(x + y) / 2 for x, y in zip(a, b)]

    def kl(x: list[float]) -> float:
        return sum(xi * math.log2(xi / mi) for xi, mi in zip(x, m) if xi > 0)
    return math.sqrt(max(0.0, (kl(a) + kl(b)) / 2))


def _side(t: dict[str, Any]) -> dict[str, Any]:
    n, labelled, err_labelled, conf = t["inferences"], t["labelled"], t["err_labelled"], t["confidence"]
    total_conf = sum(conf)
    return {"inferences": n, "records": t["records"], "labelled": labelled,
            "accuracy": t["correct"] / labelled if labelled else None,
            "mae": t["abs_err_sum"] / err_labelled if err_labelled else None,
            "mae_labelled": err_labelled,
            "error_rate": t["errors"] / n if n else 0.0,
            "latency_p95_ms": t["latency_p95_ms"],
            "mean_confidence": sum((i + 0.5) / len(conf) * v for i, v in enumerate(conf)) / total_conf
            if total_conf else 0.0,
            "predictions": list(t["predictions"])}


def quality_drop(new: dict[str, Any], old: dict[str, Any], task: str, min_labelled: int) -> float | None:
    """How much worse the task's metric is on the new side (see the module text); None when
    either side has too few labelled inferences."""
    if task == "regression":
        if min(new["mae_labelled"], old["mae_labelled"]) < min_labelled or new["mae"] is None:
            return None
        if old["mae"] <= 0:
            return 0.0 if new["mae"] <= 0 else math.inf
        return new["mae"] / old["mae"] - 1.0
    if min(new["labelled"], old["labelled"]) < min_labelled:
        return None
    return old["accuracy"] - new["accuracy"]


def judge(sides: dict[bool, dict[str, Any]], limits: dict[str, float | None], min_inferences: int,
          task: str = "classification") -> dict[str, Any]:
    """``{"new", "previous", "evaluated", the MEASURES, "breaches"}`` of the two sides' totals
    (the store's ``health_totals``: SQL aggregates, no row loaded); a limit
    of None is not checked."""
    new, old = _side(sides[True]), _side(sides[False])
    out: dict[str, Any] = {"new": new, "previous": old, "breaches": [], "evaluated": False}
    if new["inferences"] < min_inferences or old["inferences"] < min_inferences:
        return out
    out["evaluated"] = True
    out["error_rate_increase"] = new["error_rate"] - old["error_rate"]
    out["latency_p95_increase_ms"] = new["latency_p95_ms"] - old["latency_p95_ms"]
    out["prediction_js"] = js_distance(new["predictions"], old["predictions"])
    out["confidence_drop"] = old["mean_confidence"] - new["mean_confidence"]
    out["quality_drop"] = quality_drop(new, old, task, min_inferences)
    out["metric"] = "mae" if task == "regression" else "accuracy"
    for key, label in MEASURES.items():
        limit = limits.get(key)
        if limit is not None and out[key] is not None and out[key] > limit:
            out["breaches"].append(f"{label} {out[key]:.4g} > {limit:g}")
    return out
