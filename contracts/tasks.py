"""What a model's output means: the task contract, shared by training, packaging and devices.

Every package's manifest carries a :class:`TaskSpec` (``"task"``; absent means classification,
as packages of earlier releases are). It says how one output row becomes a *prediction*, which
telemetry counts it goes into, and how a label is scored, so that the device, the ingest, the
promotion gate and the rollout health gate all read quality the same way:

==============  ======================  ==========================  ==========================
kind            model output per row    prediction (telemetry bin)  a labelled row is correct
==============  ======================  ==========================  ==========================
classification  class probabilities     argmax (one bin per class)  label == prediction
regression      the target value(s)     value (bins over the        abs(value - label) <=
                                        training target's range)    ``tolerance``
anomaly         an anomaly score        score > ``threshold``       label (1 anomalous, 0
                (reconstruction error)  (bins: normal, anomaly)     normal) == prediction
==============  ======================  ==========================  ==========================

The *confidence* telemetry histogram holds the top class probability (classification), the
score relative to twice the threshold (anomaly, clipped to [0, 1]) and is empty for regression.
The quality metric each task reports (:attr:`TaskSpec.metric`): ``accuracy`` (classification),
``mae`` (regression: telemetry carries ``abs_err_sum`` beside ``labelled``), ``anomaly_rate``
(the share of predictions over the threshold) with ``accuracy`` where labels come back.
What :meth:`TaskSpec.score` measures against labels (:attr:`TaskSpec.score_metric`) is
``accuracy`` for classification and anomaly detection and ``mae`` for regression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from edgeloop.contracts.errors import SchemaError

__all__ = ["TaskKind", "TaskSpec", "CLASSIFICATION", "Decision"]

CONFIDENCE_BINS = 10
REGRESSION_BINS = 10


class TaskKind(StrEnum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    ANOMALY = "anomaly"


@dataclass(frozen=True)
class Decision:
    """One output row read by its task."""

    prediction: float           # class index, anomaly flag (0/1) or regression value
    confidence: float           # in [0, 1]: what the confidence histogram counts
    bin: int                    # index into the telemetry's ``predictions`` counts


@dataclass(frozen=True)
class TaskSpec:
    kind: TaskKind = TaskKind.CLASSIFICATION
    threshold: float | None = None          # anomaly: a score above it is anomalous
    tolerance: float | None = None          # regression: |error| at most this counts as correct
    bins: list[float] = field(default_factory=list)   # regression: edges of the prediction bins

    @property
    def metric(self) -> str:
        return {TaskKind.CLASSIFICATION: "accuracy", TaskKind.REGRESSION: "mae",
                TaskKind.ANOMALY: "anomaly_rate"}[self.kind]

    @property
    def score_metric(self) -> str:
        """The name of what :meth:`score` returns: ``mae`` for regression, else ``accuracy``."""
        return "mae" if self.kind is TaskKind.REGRESSION else "accuracy"

    @property
    def higher_is_better(self) -> bool:
        """Of :meth:`score`: accuracy (classification and anomaly with labels) up, MAE down."""
        return self.kind is not TaskKind.REGRESSION

    def n_bins(self, n_outputs: int) -> int:
        """How many ``predictions`` counts a telemetry record holds."""
        if self.kind is TaskKind.CLASSIFICATION:
            return n_outputs
        if self.kind is TaskKind.ANOMALY:
            return 2
        return max(1, len(self.bins) - 1)

    def decide(self, row: np.ndarray) -> Decision:
        """One model output row -> prediction, confidence and telemetry bin."""
        row = np.asarray(row, dtype=np.float32).reshape(-1)
        if self.kind is TaskKind.CLASSIFICATION:
            k = int(np.argmax(row))
            return Decision(float(k), float(row[k]), k)
        value = float(row[0])
        if self.kind is TaskKind.ANOMALY:
            threshold = float(self.threshold or 0.0)
            flag = int(value > threshold)
            conf = min(1.0, max(0.0, value / (2 * threshold))) if threshold > 0 else float(flag)
            return Decision(float(flag), conf if math.isfinite(conf) else 1.0, flag)
        return Decision(value, 0.0, self._bin(value))

    def decide_all(self, outputs: np.ndarray) -> np.ndarray:
        """Predictions for many output rows (n,) as float64."""
        out = np.asarray(outputs, dtype=np.float32).reshape(len(outputs), -1)
        if self.kind is TaskKind.CLASSIFICATION:
            return out.argmax(1).astype(np.float64)
        if self.kind is TaskKind.ANOMALY:
            return (out[:, 0] > float(self.threshold or 0.0)).astype(np.float64)
        return out[:, 0].astype(np.float64)

    def correct(self, prediction: float, label: float) -> bool:
        if self.kind is TaskKind.REGRESSION:
            return abs(prediction - label) <= float(self.tolerance or 0.0)
        return int(round(label)) == int(prediction)

    def score(self, outputs: np.ndarray, labels: np.ndarray) -> float:
        """The quality of many output rows against labels: accuracy, or MAE for regression."""
        pred = self.decide_all(outputs)
        y = np.asarray(labels, dtype=np.float64).reshape(len(pred), -1)[:, 0]
        if self.kind is TaskKind.REGRESSION:
            return float(np.mean(np.abs(pred - y)))
        return float(np.mean(pred == np.round(y)))

    def _bin(self, value: float) -> int:
        edges = self.bins
        if len(edges) < 2 or not math.isfinite(value):
            return 0
        k = int(np.searchsorted(np.asarray(edges[1:-1], dtype=np.float64), value, side="right"))
        return min(max(k, 0), len(edges) - 2)

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"kind": self.kind.value}
        if self.threshold is not None:
            obj["threshold"] = self.threshold
        if self.tolerance is not None:
            obj["tolerance"] = self.tolerance
        if self.bins:
            obj["bins"] = list(self.bins)
        return obj

    @classmethod
    def from_obj(cls, obj: Any) -> TaskSpec:
        if obj is None:
            return CLASSIFICATION
        if not isinstance(obj, dict):
            raise SchemaError("task must be an object")
        try:
            kind = TaskKind(str(obj.get("kind")))
        except ValueError:
            raise SchemaError(f"unknown task kind {obj.get('kind')!r}; kinds: "
                              f"{', '.join(k.value for k in TaskKind)}") from None
        threshold, tolerance = _finite(obj, "threshold"), _finite(obj, "tolerance")
        bins = obj.get("bins", [])
        if not isinstance(bins, list) or len(bins) > 65 \
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in bins) \
                or any(b <= a for a, b in zip(bins, bins[1:])):
            raise SchemaError("task 'bins' must list at most 65 increasing finite numbers")
        if kind is TaskKind.ANOMALY and (threshold is None or threshold <= 0):
            raise SchemaError("an anomaly task needs a positive 'threshold'")
        if kind is TaskKind.REGRESSION and (tolerance is None or tolerance <= 0 or len(bins) < 2):
            raise SchemaError("a regression task needs a positive 'tolerance' and at least two 'bins' edges")
        return cls(kind, threshold, tolerance, [float(v) for v in bins])


def _finite(obj: dict[str, Any], key: str) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SchemaError(f"task '{key}' must be a finite number")
    return float(v)


CLASSIFICATION = TaskSpec()
