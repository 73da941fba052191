"""Drift and skew, from the mergeable feature summaries devices send (docs/drift.md).

Telemetry records carry, per raw input feature, a histogram on the package baseline's fixed
bin edges plus count, sum and sum of squares. Summaries from any set of records (a device, a
cohort, the fleet) merge by addition, and are compared with the training baseline:

- **mean test** per feature: a two-sample z-test of the merged mean against the baseline's
  mean, with variance ``sd^2 (1/n + 1/N)`` (``N`` the baseline's rows, so the baseline's own
  sampling error is counted). Only on features whose baseline is not concentrated in one
  value (most common value under ``mean_max_mode_share`` of the rows): on a feature that is
  almost always 0 the window mean is far from normal, and the histogram test covers it.
- **residual mean test** per feature, the same z-test on the feature's residual given all the
  others (the package baseline's ``residuals`` model; devices send residual sums ``rn``,
  ``rsum``, ``rsumsq``): a shift of one feature moves its residual by the whole shift while
  the residual spreads only by what the other features cannot explain, so on correlated inputs
  (neighbouring pixels, redundant sensors) it sees in one window what the feature's own mean
  needs several for. A whole-input change (gain on every feature) hardly moves residuals; the
  plain mean test and KS cover it;
- **KS** (Kolmogorov-Smirnov) on the binned CDFs, with its asymptotic p-value and the
  effective sample size n*m/(n+m), with **PSI** as its effect size (1e-4 floor on empty bins);
- **chi-square** on the prediction distribution (classes are categories, not an order);
- **JS** (Jensen-Shannon distance, base 2, in [0, 1]): reported.

Every p-value of one comparison (all features' mean and KS tests, and the predictions) goes
through Holm's step-down correction at the family-wise rate ``alpha``: testing 64 features
together does not turn noise into alarms. The correction can be weighted (``mean_weight``: each
mean test counts that many KS or chi-square tests, and gets that much more of ``alpha``; the
bound holds for any weights). A test that rejects also needs a minimum effect (``min_psi``,
``min_shift_sd``), so very large cohorts do not alarm on differences too small to matter.
:class:`DriftMonitor` watches one stream (a device or a cohort) window by window and compares
the newest 1, 2, 4 and 8 windows merged (``alpha`` split over the looks by ``look_weights``): a
small shift that one window cannot show is caught when two windows together can.

A device that is off the baseline from its very first window is reported as **skew**
(features computed differently in serving than in training), not drift.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from scipy import stats

__all__ = ["DriftConfig", "FeatureDrift", "DriftVerdict", "DriftMonitor", "merge", "compare", "psi", "ks", "js",
           "mean_test", "holm", "MONITOR_CONFIG", "records_summary", "drift_report", "COHORTS"]


@dataclass(frozen=True)
class DriftConfig:
    alpha: float = 0.01          # family-wise false-alarm rate of one verdict (Holm over all tests)
    min_psi: float = 0.1         # smallest histogram effect that counts as drift
    min_shift_sd: float = 0.1    # smallest mean shift, in baseline standard deviations, that counts
    min_rows: int = 50           # fewer inputs than this: not enough evidence, no verdict
    mean_max_mode_share: float = 0.9   # mean test only where no single value holds more of the baseline
    looks: tuple[int, ...] = (1, 2, 4, 8)   # DriftMonitor: newest windows merged per look
    look_weights: tuple[float, ...] = ()     # DriftMonitor: share of alpha per look (empty: equal)
    mean_weight: float = 1.0     # Holm weight of one mean test; a KS or chi-square test weighs 1
    resid_weight: float = 1.0    # Holm weight of one residual-mean test (when summaries carry residuals)

    def look_alphas(self) -> tuple[float, ...]:
        """``alpha`` split over :attr:`looks` in proportion to :attr:`look_weights` (Bonferroni)."""
        weights = self.look_weights or (1.0,) * len(self.looks)
        if len(weights) != len(self.looks) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("look_weights: one non-negative weight per look")
        return tuple(self.alpha * w / math.fsum(weights) for w in weights)


# The streaming monitor's default: nominally at most 0.7% of calm windows alarm (Bonferroni over
# the looks, weighted Holm within one). Close to a real rate when the live data are a new sample of
# the training population: the mean tests, calibrated against the baseline's own sampling error,
# then spend nearly all of it (measured 0.4-1.0% on drawn digits baselines; the normal tail of a
# skewed pixel's window mean is a little light; bench/drift_detection.py, docs/drift.md). Most of
# alpha goes to the 2-window look and, within a look, to the mean and residual tests (weight 8 each
# against 1 for a KS or chi-square test: the 48 + 48 hold 92% of it on the digits baseline), which
# are what sees a small shift of one feature; KS and chi-square keep the rest for shape changes.
MONITOR_CONFIG = DriftConfig(alpha=0.007, look_weights=(0.15, 0.75, 0.05, 0.05), mean_weight=8.0, resid_weight=8.0)


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


def mean_test(base_mean: float, base_sd: float, base_rows: int, n: float, total: float) -> tuple[float, float, float]:
    """(z, two-sided p, shift in baseline sd) of ``n`` values summing to ``total`` against the
    baseline's mean; (0, 1, 0) when there is nothing to test."""
    if n <= 0 or base_sd <= 0:
        return 0.0, 1.0, 0.0
    shift = (total / n - base_mean) / base_sd
    z = shift / math.sqrt(1.0 / n + 1.0 / max(base_rows, 1))
    return float(z), float(2 * stats.norm.sf(abs(z))), float(shift)


def chi_square(expected: np.ndarray, actual: np.ndarray) -> float:
    """p-value of a two-sample chi-square test (contingency table) on category counts."""
    keep = (expected + actual) > 0
    if keep.sum() < 2 or expected.sum() == 0 or actual.sum() == 0:
        return 1.0
    table = np.vstack([expected[keep], actual[keep]])
    fitted = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    statistic = float(((table - fitted) ** 2 / fitted).sum())
    return float(stats.chi2.sf(statistic, table.shape[1] - 1))


def holm(pvalues: list[float], alpha: float, weights: list[float] | None = None) -> list[bool]:
    """Holm's step-down: which hypotheses are rejected at family-wise rate ``alpha``.

    With ``weights`` (non-negative, not all zero) it is the weighted Holm procedure (Holm 1979):
    hypotheses are taken in order of ``p / w``, and one is rejected while ``p <= alpha * w / W``,
    ``W`` the total weight of those not yet rejected. The family-wise rate stays ``alpha`` under
    any dependence; a hypothesis with more weight gets more of it. Equal weights: plain Holm."""
    if weights is None:
        weights = [1.0] * len(pvalues)
    if len(weights) != len(pvalues) or min(weights, default=0.0) < 0:
        raise ValueError("holm: one non-negative weight per p-value")
    ratio = [p / w if w > 0 else math.inf for p, w in zip(pvalues, weights)]
    order = sorted(range(len(pvalues)), key=lambda i: ratio[i])
    rejected = [False] * len(pvalues)
    remaining = math.fsum(weights)
    for i in order:
        if weights[i] <= 0 or pvalues[i] > alpha * weights[i] / remaining:
            break
        rejected[i] = True
        remaining -= weights[i]
    return rejected


def merge(summaries: Iterable[dict[str, Any] | None]) -> dict[str, Any] | None:
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
    if all("rsum" in s for s in summaries):      # residual sums, only if every part has them
        out["rn"] = sum(int(s["rn"]) for s in summaries)
        for k in ("rsum", "rsumsq"):
            out[k] = np.sum([np.asarray(s[k], dtype=np.float64) for s in summaries], axis=0)
    return out


def _add_predictions(a: list[int] | None, b: list[int] | None) -> list[int] | None:
    if a is None or b is None:
        return b if a is None else a
    return [x + y for x, y in zip(a, b)]


@dataclass(frozen=True)
class FeatureDrift:
    feature: int            # -1: the prediction distribution
    psi: float
    ks_d: float
    ks_p: float
    js: float
    mean: float
    baseline_mean: float
    drifted: bool
    mean_z: float = 0.0
    mean_p: float = 1.0
    shift_sd: float = 0.0
    tests: tuple[str, ...] = ()     # which tests found it: "mean", "resid", "ks", "chi2"
    resid_z: float = 0.0            # z of the feature's residual mean (given the other features)
    resid_shift_sd: float = 0.0     # that shift, in residual standard deviations


@dataclass
class DriftVerdict:
    rows: int
    drifted: bool
    features: list[FeatureDrift] = field(default_factory=list)
    predictions: FeatureDrift | None = None
    note: str = ""
    windows: int = 0        # DriftMonitor: how many newest windows the deciding look merged

    @property
    def drifted_features(self) -> list[int]:
        return [f.feature for f in self.features if f.drifted]


def _mode_share(counts: list[int], rows: int) -> float:
    return max(counts) / max(rows, 1)


def _ks_p(d: np.ndarray, n: float, m: np.ndarray) -> np.ndarray:
    """Asymptotic two-sample KS p-values for statistics ``d`` (vectorised :func:`ks`)."""
    en = np.sqrt(n * m / np.maximum(n + m, 1))
    lam = (en + 0.12 + 0.11 / np.maximum(en, 1e-12)) * d
    k = np.arange(1, 101)
    terms = (-1.0) ** (k - 1) * np.exp(-2.0 * np.outer(lam * lam, k * k))
    p = np.clip(2 * terms.sum(axis=1), 0.0, 1.0)
    return np.where((lam > 0) & (m > 0), p, 1.0)


def _feature_tests(baseline: dict[str, Any], summary: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every feature's PSI, KS (D, p), JS and mean test at once (same numbers as the scalar
    functions above)."""
    feats = baseline["features"]
    base_rows = int(baseline.get("rows") or sum(feats[0]["counts"]))
    out: dict[str, list[float]] = {k: [] for k in ("psi", "ks_d", "ks_p", "js")}
    widths = {len(f["counts"]) for f in feats}
    if len(widths) == 1:
        e = np.array([f["counts"] for f in feats], dtype=np.float64)
        a = np.array(summary["hist"], dtype=np.float64)
        ne, na = e.sum(1, keepdims=True), a.sum(1, keepdims=True)
        pe, pa = e / np.maximum(ne, 1), a / np.maximum(na, 1)
        fe, fa = np.maximum(pe, 1e-4), np.maximum(pa, 1e-4)
        out["psi"] = ((fa - fe) * np.log(fa / fe)).sum(1)
        d = np.abs(np.cumsum(e, 1) / np.maximum(ne, 1) - np.cumsum(a, 1) / np.maximum(na, 1)).max(1)
        out["ks_d"] = np.where(na[:, 0] > 0, d, 0.0)
        out["ks_p"] = _ks_p(out["ks_d"], float(ne[0, 0]), na[:, 0])
        mid = (pe + pa) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = lambda x: np.where(x > 0, x * np.log2(x / np.where(mid > 0, mid, 1)), 0.0).sum(1)  # noqa: E731
            out["js"] = np.sqrt(np.maximum(0.0, (kl(pe) + kl(pa)) / 2))
    else:
        for f, h in zip(feats, summary["hist"]):
            e, a = np.array(f["counts"], dtype=np.float64), np.asarray(h, dtype=np.float64)
            d, p = ks(e, a)
            for key, value in (("psi", psi(e, a)), ("ks_d", d), ("ks_p", p), ("js", js(e, a))):
                out[key].append(value)
    n = np.asarray(summary["n"], dtype=np.float64)
    mu = np.array([f["mean"] for f in feats], dtype=np.float64)
    sd = np.array([f.get("std", 0.0) for f in feats], dtype=np.float64)
    mean = np.asarray(summary["sum"], dtype=np.float64) / np.maximum(n, 1)
    usable = (n > 0) & (sd > 0)
    shift = np.where(usable, (mean - mu) / np.where(sd > 0, sd, 1), 0.0)
    z = shift / np.sqrt(1.0 / np.maximum(n, 1) + 1.0 / max(base_rows, 1))
    res = baseline.get("residuals")
    if res and "rsum" in summary and int(summary["rn"]) > 0 and len(summary["rsum"]) == len(feats):
        rn = float(summary["rn"])
        rmu, rsd = np.asarray(res["mean"], dtype=np.float64), np.asarray(res["std"], dtype=np.float64)
        rshift = np.where(rsd > 0, (np.asarray(summary["rsum"], dtype=np.float64) / rn - rmu) / np.where(rsd > 0, rsd, 1), 0.0)
        rz = rshift / np.sqrt(1.0 / rn + 1.0 / max(base_rows, 1))
        rp = np.where(rsd > 0, 2 * stats.norm.sf(np.abs(rz)), 1.0)
    else:
        rshift = rz = np.zeros(len(feats))
        rp = None
    return {**{k: np.asarray(v, dtype=np.float64) for k, v in out.items()}, "mean": mean, "base_mean": mu,
            "shift": shift, "z": z, "mean_p": np.where(usable, 2 * stats.norm.sf(np.abs(z)), 1.0),
            "rshift": rshift, "rz": rz, "resid_p": rp}


def _mean_testable(baseline: dict[str, Any], cfg: DriftConfig) -> list[int]:
    feats = baseline["features"]
    rows = int(baseline.get("rows") or sum(feats[0]["counts"]))
    return [i for i, f in enumerate(feats)
            if f.get("std", 0) > 0 and _mode_share(f["counts"], rows) < cfg.mean_max_mode_share]


def compare(baseline: dict[str, Any], summary: dict[str, Any] | None, predictions: list[int] | None,
            cfg: DriftConfig = DriftConfig()) -> DriftVerdict:
    """Compare merged telemetry with the package baseline (all features tested together)."""
    if summary is None or int(np.max(summary["n"])) < cfg.min_rows:
        rows = 0 if summary is None else int(np.max(summary["n"]))
        return DriftVerdict(rows, False, note=f"only {rows} inputs: not enough evidence")
    rows = int(np.max(summary["n"]))
    t = _feature_tests(baseline, summary)
    count = len(baseline["features"])
    testable = _mean_testable(baseline, cfg)
    slots = [(i, "ks") for i in range(count)] + [(i, "mean") for i in testable]
    if t["resid_p"] is not None:       # one feature against the others: sees a shift its spread hides
        slots += [(i, "resid") for i in testable]
    column = {"ks": "ks_p", "mean": "mean_p", "resid": "resid_p"}
    pvals = [float(t[column[test]][i]) for i, test in slots]
    weights = [{"mean": cfg.mean_weight, "resid": cfg.resid_weight}.get(test, 1.0) for _, test in slots]
    pred_measured = None
    if predictions is not None and sum(predictions) > 0 and baseline.get("predictions"):
        expected = np.array(baseline["predictions"], dtype=np.float64)
        actual = np.array(predictions, dtype=np.float64)
        pred_measured = (psi(expected, actual), *ks(expected, actual), js(expected, actual), chi_square(expected, actual))
        pvals.append(pred_measured[4])
        slots.append((-1, "chi2"))
        weights.append(1.0)
    found: dict[int, list[str]] = {}
    for (i, test), rejected in zip(slots, holm(pvals, cfg.alpha, weights)):
        if rejected and (test == "mean" and abs(t["shift"][i]) >= cfg.min_shift_sd or
                         test == "resid" and abs(t["rshift"][i]) >= cfg.min_shift_sd or
                         test == "ks" and t["psi"][i] >= cfg.min_psi or
                         test == "chi2" and pred_measured is not None and pred_measured[0] >= cfg.min_psi):
            found.setdefault(i, []).append(test)
    results = [FeatureDrift(i, round(float(t["psi"][i]), 5), round(float(t["ks_d"][i]), 5), float(t["ks_p"][i]),
                            round(float(t["js"][i]), 5), round(float(t["mean"][i]), 5),
                            round(float(t["base_mean"][i]), 5), i in found, round(float(t["z"][i]), 3),
                            float(t["mean_p"][i]), round(float(t["shift"][i]), 4), tuple(found.get(i, ())),
                            round(float(t["rz"][i]), 3), round(float(t["rshift"][i]), 4))
               for i in range(count)]
    pred = None
    if pred_measured is not None:
        pred = FeatureDrift(-1, round(pred_measured[0], 5), round(pred_measured[1], 5), pred_measured[4],
                            round(pred_measured[3], 5), 0.0, 0.0, -1 in found, tests=tuple(found.get(-1, ())))
    return DriftVerdict(rows, bool(found), results, pred)


class DriftMonitor:
    """One stream of windows (a device, a cohort) against one baseline. After each window,
    the newest 1, 2, 4, ... windows merged are compared, each look at its share of ``alpha``
    (:meth:`DriftConfig.look_alphas`, Bonferroni over the looks), so the whole check keeps its
    false-alarm rate per window."""

    def __init__(self, baseline: dict[str, Any], cfg: DriftConfig | None = None) -> None:
        cfg = cfg or MONITOR_CONFIG
        self.baseline = baseline
        self.cfg = cfg
        self._look_cfgs = {k: DriftConfig(**{**cfg.__dict__, "alpha": a})
                           for k, a in zip(cfg.looks, cfg.look_alphas())}
        self._windows: deque[tuple[dict[str, Any] | None, list[int] | None]] = deque(maxlen=max(cfg.looks))

    def add(self, features: dict[str, Any] | None, predictions: list[int] | None) -> DriftVerdict:
        """Take one window's summary and prediction counts; return the verdict of the first look
        that drifted, or of the widest look when none did."""
        self._windows.appendleft((features, predictions))
        verdict = DriftVerdict(0, False, note="no windows")
        for k in self.cfg.looks:
            if k > len(self._windows):
                break
            newest = list(self._windows)[:k]
            preds = None
            for _, p in newest:
                preds = _add_predictions(preds, p)
            verdict = compare(self.baseline, merge(f for f, _ in newest), preds, self._look_cfgs[k])
            verdict.windows = k
            if verdict.drifted:
                return verdict
        return verdict

    def reset(self) -> None:
        """Forget the windows seen (after an alarm was handled, or a model change)."""
        self._windows.clear()


def records_summary(rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[int] | None]:
    """Merge stored telemetry rows (as the registry returns them)."""
    summaries = [json.loads(r["features"]) for r in rows if r.get("features")]
    preds = None
    for r in rows:
        p = json.loads(r["predictions"]) if isinstance(r["predictions"], str) else r["predictions"]
        preds = _add_predictions(preds, p)
    return merge(summaries), preds


# -- reports over the registry ---------------------------------------------------------------------
COHORTS = ("device", "tier", "tag", "site", "model_version", "fleet")


def _cohort_summary(features: dict[str, Any] | None, totals: dict[str, Any]) -> dict[str, Any] | None:
    """The store's merged feature summary of a cohort as :func:`merge` returns one (arrays;
    the residual sums only where every record with a summary has them)."""
    if not features or not totals["featured"]:
        return None
    out: dict[str, Any] = {"hist": [np.array(h, dtype=np.int64) for h in features["hist"]],
                           **{k: np.array(features.get(k, []), dtype=np.float64)
                              for k in ("n", "missing", "sum", "sumsq", "min", "max")}}
    if totals["residual"] == totals["featured"] and "rsum" in features:
        out["rn"] = int(totals["rn"])
        out.update({k: np.array(features.get(k, []), dtype=np.float64) for k in ("rsum", "rsumsq")})
    return out


def drift_report(registry, by: str = "device", cfg: DriftConfig = DriftConfig(),  # noqa: ANN001
                 store_alerts: bool = True) -> list[dict[str, Any]]:
    """Per cohort and model version: drift or skew against that version's training baseline, and
    live accuracy from labelled telemetry and operator label feedback. The whole history and
    the newest 1, 2, 4, 8 records are each compared (alpha split over them), so a recent change
    is not diluted by a long calm history. Drift and skew are stored as alerts.

    The whole history's counts, sums and merged feature summary are aggregated by the store
    (cloud/store/drift.py: SQL over the records' mergeable summaries, no record's JSON loaded
    here); only each cohort's first record and newest few come back as rows.
    Raises UserError for an unknown cohort."""
    if by not in COHORTS:
        from edgeloop.cloud.errors import UserError
        raise UserError(f"unknown cohort {by!r}; use one of {', '.join(COHORTS)}")
    features = registry.drift_cohort_features(by)
    edges: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in registry.drift_cohort_rows(by, max(cfg.looks)):
        edges.setdefault((r["key"], r["model_version"]), []).append(r)
    baselines: dict[tuple[str, str], dict | None] = {}
    report = []
    for totals in registry.drift_cohort_totals(by):
        key, mv = totals["key"], totals["model_version"]
        rows = edges[(key, mv)]
        tier = next(r["tier"] for r in rows if r["first"])
        if (mv, tier) not in baselines:
            baselines[(mv, tier)] = _baseline(registry, mv, tier)
        whole = (_cohort_summary(features.get((key, mv)), totals), totals["predictions"])
        entry = _judge_cohort(registry, by, key, mv, totals, whole, [r for r in rows if r["recent"]],
                              baselines[(mv, tier)], cfg)
        report.append(entry)
        if store_alerts and entry["status"] in ("drift", "skew"):
            registry.add_alert({"kind": entry["status"], "cohort": by, "key": key, "model_version": mv,
                                "detail": json.dumps({k: entry[k] for k in ("drifted_features", "max_psi",
                                                                            "prediction_psi", "rows", "tests")})})
    return report


def _baseline(registry, model_version: str, tier: str) -> dict | None:  # noqa: ANN001
    """The stored baseline (cloud/drift/baselines.py): None only when the version has no package here
    or its record says it has none; a missing or corrupt one raises IntegrityError."""
    from edgeloop.cloud.drift.baselines import model_baseline
    return model_baseline(registry, model_version, tier)


def _judge_cohort(registry, by: str, key: str, mv: str, totals: dict[str, Any],  # noqa: ANN001
                  whole: tuple[dict[str, Any] | None, list[int] | None], recent: list[dict[str, Any]],
                  baseline: dict | None, cfg: DriftConfig) -> dict[str, Any]:
    """``totals`` and ``whole`` (merged summary, prediction counts): the cohort's whole history;
    ``recent``: its newest records (all but the first, at most the widest look)."""
    labelled = totals["labelled"]
    entry: dict[str, Any] = {"cohort": by, "key": key, "model_version": mv, "records": totals["records"],
                             "inferences": totals["inferences"], "labelled": labelled,
                             "accuracy": totals["correct"] / labelled if labelled else None}
    if totals["err_records"]:
        # regression: "accuracy" is the share within the task's tolerance; the MAE says how far off
        n = totals["err_labelled"]
        entry["mae"] = totals["abs_err_sum"] / n if n else None
    if not baseline:
        return {**entry, "status": "no-baseline", "drifted_features": [], "tests": []}
    looks = [k for k in cfg.looks if k < totals["records"]]
    split = DriftConfig(**{**cfg.__dict__, "alpha": cfg.alpha / (1 + len(looks))})
    verdict = compare(baseline, *whole, cfg=split)
    for k in looks:
        if verdict.drifted:
            break
        latest = compare(baseline, *records_summary(recent[-k:]), cfg=split)
        if latest.drifted:
            verdict = latest
    status = "insufficient" if verdict.note else ("drift" if verdict.drifted else "ok")
    if by == "device" and verdict.drifted and _first_windows_drifted(
            baseline, registry.telemetry_records(device_id=key, model_version=mv), split):
        status = "skew"
    worst = max(verdict.features, key=lambda f: f.psi, default=None)
    entry.update({"status": status, "rows": verdict.rows, "drifted_features": verdict.drifted_features,
                  "tests": sorted({t for f in verdict.features for t in f.tests}),
                  "max_psi": worst.psi if worst else None, "max_psi_feature": worst.feature if worst else None,
                  "max_shift_sd": max((abs(f.shift_sd) for f in verdict.features if f.drifted), default=None),
                  "prediction_psi": verdict.predictions.psi if verdict.predictions else None,
                  "prediction_drift": bool(verdict.predictions and verdict.predictions.drifted)})
    return entry


def _first_windows_drifted(baseline: dict, members: list[dict[str, Any]], cfg: DriftConfig) -> bool:
    """Skew: already off the baseline in the device's first windows (enough of them for a verdict)."""
    first, rows = [], 0
    for r in sorted(members, key=lambda r: r["seq"]):
        first.append(r)
        rows += r["count"]
        if rows >= cfg.min_rows:
            break
    return compare(baseline, *records_summary(first), cfg=cfg).drifted
