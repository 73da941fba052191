"""Drift and skew, from the mergeable feature summaries devices send (docs/drift.md).

Telemetry records carry, per raw input feature, a histogram on the package baseline's fixed
bin edges. Summaries from any set of records (a device, a cohort, the fleet) merge by
addition, and are compared with the training baseline per feature with:

- **PSI** (population stability index), with a 1e-4 floor on empty bins;
- **KS** (Kolmogorov-Smirnov) on the binned CDFs, with its p-value from the asymptotic
  distribution and the effective sample size n*m/(n+m);
- **JS** (Jensen-Shannon distance, base 2, in [0, 1]).

A feature drifts when its KS p-value is below alpha divided by the number of features tested
(Bonferroni: testing 64 features together does not turn noise into alarms) **and** its PSI is
at least a minimum effect size, so very large cohorts do not alarm on differences too small
to matter. The same test runs on the prediction distribution. A device that is off the
baseline from its very first window is reported as **skew** (features computed differently
in serving than in training), not drift.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DriftConfig", "FeatureDrift", "DriftVerdict", "merge", "compare", "psi", "ks", "js"]


@dataclass(frozen=True)
class DriftConfig:
    alpha: float = 0.01          # family-wise false alarm rate per comparison
    min_psi: float = 0.1         # smallest effect that counts as drift
    min_rows: int = 50           # fewer inputs than this: not enough evidence, no verdict


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    e = np.maximum(expected / max(expected.sum(), 1), 1e-4)
    a = np.maximum(actual / max(actual.sum(), 1), 1e-4)
    return float(np.sum((a - e) * np.log(a / e)))


def ks(expected: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """(D, p-value) of the two-sample KS test on binned data."""
    n, m = expected.sum(), actual.sum()
    if n == 0 or m == 0:
        return 0.0, 1.0
    d = float(np.max(np.abs(np.cumsum(expected) / n - np.cumsum(actual) / m)))
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * d
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101)) if lam > 0 else 1.0
    return d, float(min(1.0, max(0.0, p)))


def js(expected: np.ndarray, actual: np.ndarray) -> float:
    p = expected / max(expected.sum(), 1)
    q = actual / max(actual.sum(), 1)
    mid = (p + q) / 2
    def kl(x: np.ndarray, y: np.ndarray) -> float:
        mask = x > 0
        return float(np.sum(x[mask] * np.log2(x[mask] / y[mask])))
    return math.sqrt(max(0.0, (kl(p, mid) + kl(q, mid)) / 2))


def merge(summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Add feature summaries up (exact: counts and sums add, min/max combine)."""
    summaries = [s for s in summaries if s]
    if not summaries:
        return None
    out = {"hist": [np.array(h, dtype=np.int64) for h in summaries[0]["hist"]],
           **{k: np.array(summaries[0][k], dtype=np.float64) for k in ("n", "missing", "sum", "sumsq", "min", "max")}}
    for s in summaries[1:]:
        out["hist"] = [a + np.array(b) for a, b in zip(out["hist"], s["hist"])]
        for k in ("n", "missing", "sum", "sumsq"):
            out[k] = out[k] + np.array(s[k])
        out["min"] = np.minimum(out["min"], s["min"])
        out["max"] = np.maximum(out["max"], s["max"])
    return out


@dataclass(frozen=True)
class FeatureDrift:
    feature: int
    psi: float
    ks_d: float
    ks_p: float
    js: float
    mean: float
    baseline_mean: float
    drifted: bool


@dataclass
class DriftVerdict:
    rows: int
    drifted: bool
    features: list[FeatureDrift] = field(default_factory=list)
    predictions: FeatureDrift | None = None
    note: str = ""

    @property
    def drifted_features(self) -> list[int]:
        return [f.feature for f in self.features if f.drifted]


def _judge(index: int, expected: np.ndarray, actual: np.ndarray, tests: int, cfg: DriftConfig,
           mean: float, base_mean: float) -> FeatureDrift:
    d, p = ks(expected, actual)
    value = psi(expected, actual)
    return FeatureDrift(index, round(value, 5), round(d, 5), p, round(js(expected, actual), 5), round(mean, 5),
                        round(base_mean, 5), bool(p < cfg.alpha / tests and value >= cfg.min_psi))


def compare(baseline: dict[str, Any], summary: dict[str, Any] | None, predictions: list[int] | None,
            cfg: DriftConfig = DriftConfig()) -> DriftVerdict:
    """Compare merged telemetry with the package baseline."""
    if summary is None or int(np.max(summary["n"])) < cfg.min_rows:
        rows = 0 if summary is None else int(np.max(summary["n"]))
        return DriftVerdict(rows, False, note=f"only {rows} inputs: not enough evidence")
    rows = int(np.max(summary["n"]))
    feats = baseline["features"]
    tests = len(feats) + 1
    results = [_judge(i, np.array(f["counts"], dtype=np.float64), np.asarray(h, dtype=np.float64), tests, cfg,
                      float(summary["sum"][i] / max(summary["n"][i], 1)), float(f["mean"]))
               for i, (f, h) in enumerate(zip(feats, summary["hist"]))]
    pred = None
    if predictions is not None and sum(predictions) > 0:
        pred = _judge(-1, np.array(baseline["predictions"], dtype=np.float64),
                      np.array(predictions, dtype=np.float64), tests, cfg, 0.0, 0.0)
    drifted = any(f.drifted for f in results) or bool(pred and pred.drifted)
    return DriftVerdict(rows, drifted, results, pred)


def records_summary(rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[int] | None]:
    """Merge stored telemetry rows (as the registry returns them)."""
    summaries = [json.loads(r["features"]) for r in rows if r.get("features")]
    preds = None
    for r in rows:
        p = json.loads(r["predictions"]) if isinstance(r["predictions"], str) else r["predictions"]
        preds = p if preds is None else [a + b for a, b in zip(preds, p)]
    return merge(summaries), preds


# -- reports over the registry ---------------------------------------------------------------------
COHORTS = ("device", "tier", "model_version", "fleet")


def drift_report(registry, by: str = "device", cfg: DriftConfig = DriftConfig(),  # noqa: ANN001
                 store_alerts: bool = True) -> list[dict[str, Any]]:
    """Per cohort and model version: drift or skew against that version's training baseline,
    and live accuracy from labelled telemetry. Drift and skew are stored as alerts."""
    from contracts.bundle import read_bundle
    from pathlib import Path

    if by not in COHORTS:
        from cloud.errors import UserError
        raise UserError(f"unknown cohort {by!r}; use one of {', '.join(COHORTS)}")
    rows = list(registry.db.query(
        "select t.*, coalesce(d.tier, '?') as tier from telemetry t left join devices d using (device_id) "
        "where t.model_version is not null order by t.device_id, t.seq"))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        key = {"device": r["device_id"], "tier": r["tier"], "model_version": r["model_version"], "fleet": "fleet"}[by]
        groups.setdefault((key, r["model_version"]), []).append(r)
    baselines: dict[tuple[str, str], dict | None] = {}
    report = []
    for (key, mv), members in sorted(groups.items()):
        tier = members[0]["tier"]
        if (mv, tier) not in baselines:
            try:
                pkg = registry.package_for(mv, tier)
                baselines[(mv, tier)] = read_bundle(Path(registry.artifact_path(pkg["sha256"])).read_bytes()).manifest.baseline
            except Exception:  # noqa: BLE001 - no package or baseline: reported as such
                baselines[(mv, tier)] = None
        baseline = baselines[(mv, tier)]
        labelled = sum(r["labelled"] for r in members)
        entry: dict[str, Any] = {"cohort": by, "key": key, "model_version": mv, "records": len(members),
                                 "inferences": sum(r["count"] for r in members),
                                 "accuracy": sum(r["correct"] for r in members) / labelled if labelled else None}
        if not baseline:
            report.append({**entry, "status": "no-baseline", "drifted_features": []})
            continue
        verdict = compare(baseline, *records_summary(members), cfg=cfg)
        status = "insufficient" if verdict.note else ("drift" if verdict.drifted else "ok")
        if by == "device" and verdict.drifted and _first_windows_drifted(baseline, members, cfg):
            status = "skew"
        worst = max(verdict.features, key=lambda f: f.psi, default=None)
        entry.update({"status": status, "rows": verdict.rows, "drifted_features": verdict.drifted_features,
                      "max_psi": worst.psi if worst else None, "max_psi_feature": worst.feature if worst else None,
                      "prediction_psi": verdict.predictions.psi if verdict.predictions else None,
                      "prediction_drift": bool(verdict.predictions and verdict.predictions.drifted)})
        report.append(entry)
        if store_alerts and status in ("drift", "skew"):
            registry.add_alert({"kind": status, "cohort": by, "key": key, "model_version": mv,
                                "detail": json.dumps({k: entry[k] for k in ("drifted_features", "max_psi",
                                                                            "prediction_psi", "rows")})})
    return report


def _first_windows_drifted(baseline: dict, members: list[dict[str, Any]], cfg: DriftConfig) -> bool:
    """Skew: already off the baseline in the device's first windows (enough of them for a verdict)."""
    first, rows = [], 0
    for r in members:
        first.append(r)
        rows += r["count"]
        if rows >= cfg.min_rows:
            break
    verdict = compare(baseline, *records_summary(first), cfg=cfg)
    return verdict.drifted
