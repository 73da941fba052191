"""The Python reference of the store's rollout health totals (``Store.health_totals``, SQL):
telemetry rows added up per side, what tests/test_fleet_aggregates.py checks the SQL against,
and :func:`compare`, :func:`~edgeloop.cloud.rollouts.health.judge` of such rows, for tests that
state health cases as rows (``new`` 1 for the new version, 0 for the previous one; ``count``,
``errors``, ``latency_ms_p50``, the ``predictions`` and ``confidence_hist`` histograms as JSON
text or lists, and where known ``labelled``, ``correct`` and ``abs_err_sum``)."""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

from edgeloop.cloud.rollouts.health import judge


def percentile(values: list[float], pct: float) -> float:
    """Linear-interpolated percentile; 0.0 for no values."""
    values = sorted(values)
    if not values:
        return 0.0
    k = (len(values) - 1) * pct / 100
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _hist(value: Any) -> list[float]:
    return json.loads(value) if isinstance(value, str) else list(value)


def _added(acc: list[float], hist: Iterable[float]) -> list[float]:
    hist = list(hist)
    acc = acc + [0.0] * (len(hist) - len(acc))
    return [a + (hist[i] if i < len(hist) else 0.0) for i, a in enumerate(acc)]


def totals(rows: list[dict[str, Any]]) -> dict[bool, dict[str, Any]]:
    """Telemetry rows added up per side (True: the new version), as the store's
    ``health_totals`` gives them: ``records``, ``inferences``, ``labelled``, ``correct``,
    ``errors``, ``abs_err_sum`` and ``err_labelled`` (over the rows with an error sum),
    ``latency_p95_ms`` (of the rows' p50s, rows with inferences only), ``predictions`` and
    ``confidence`` (the histograms added, the shorter zero-padded)."""
    out = {}
    for new in (True, False):
        side = [row for row in rows if bool(row["new"]) == new]
        preds: list[float] = []
        conf: list[float] = []
        for row in side:
            preds, conf = _added(preds, _hist(row["predictions"])), _added(conf, _hist(row["confidence_hist"]))
        errs = [row for row in side if row.get("abs_err_sum") is not None]
        out[new] = {"records": len(side), "inferences": sum(row["count"] or 0 for row in side),
                    "labelled": sum(row.get("labelled") or 0 for row in side),
                    "correct": sum(row.get("correct") or 0 for row in side),
                    "errors": sum(row.get("errors") or 0 for row in side),
                    "abs_err_sum": sum(row["abs_err_sum"] for row in errs),
                    "err_labelled": sum(row.get("labelled") or 0 for row in errs),
                    "latency_p95_ms": percentile([row["latency_ms_p50"] for row in side if row["count"]], 95),
                    "predictions": preds, "confidence": conf}
    return out


def compare(rows: list[dict[str, Any]], limits: dict[str, float | None], min_inferences: int,
            task: str = "classification") -> dict[str, Any]:
    """``judge`` of telemetry rows (:func:`totals`)."""
    return judge(totals(rows), limits, min_inferences, task)
