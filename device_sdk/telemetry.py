"""Telemetry windows: what the agent measures while serving, summarised per window.

A window accumulates counts (inferences, labelled, correct), a prediction histogram, a
confidence histogram (10 bins over [0, 1]) and latencies, then becomes one
:class:`edgeloop.contracts.messages.Telemetry` record with the next per-device sequence number. The
sequence counter is persisted before the record is handed to the transport, so a restart
never reuses a number (the cloud deduplicates on (device_id, seq)), and it advances only once
that write succeeded, so a failed write (a full disk) skips no number either.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgeloop.contracts.baseline_digest import edges_digest
from edgeloop.contracts.package import Manifest
from edgeloop.contracts.messages import Telemetry
from edgeloop.contracts.tasks import CLASSIFICATION, TaskKind, TaskSpec
from edgeloop.device_sdk.storage import read_json, write_json

CONFIDENCE_BINS = 10

__all__ = ["TelemetryWindow", "SequenceCounter"]


class SequenceCounter:
    """A persisted, strictly increasing per-device record number."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._next = int((read_json(path) or {}).get("next_seq", 0))

    @property
    def issued(self) -> int:
        """How many sequence numbers this device has ever handed out."""
        return self._next

    def take(self) -> int:
        """The next number, persisted first. Raises StorageError, and hands out nothing, when
        the write fails (the same number comes next time)."""
        seq = self._next
        write_json(self.path, {"next_seq": seq + 1})
        self._next = seq + 1
        return seq


class FeatureSummary:
    """Raw inputs summarised per feature on the package baseline's fixed bin edges, plus count,
    sum, sum of squares, min, max and missing (NaN) count: all merge exactly by addition
    (min/max by min/max) across windows and devices."""

    def __init__(self, baseline: dict) -> None:
        feats = baseline["features"]
        # a shaped input with more values than a summary holds is summarised per channel: each
        # example contributes its mean over the channel's values (docs/drift.md)
        reduce = baseline.get("reduce") or {}
        self.channels = int(reduce.get("channels", 0)) if reduce.get("op") == "channel_mean" else 0
        self.channels_first = bool(reduce.get("channels_first", True))
        self.edges = edges_digest(feats)
        self.inner_edges = [np.asarray(f["edges"][1:-1], dtype=np.float64) for f in feats]
        self.bins = [len(f["edges"]) - 1 for f in feats]
        f = len(feats)
        self.hist = [np.zeros(b, dtype=np.int64) for b in self.bins]
        self.n, self.missing = np.zeros(f, np.int64), np.zeros(f, np.int64)
        self.sum, self.sumsq = np.zeros(f), np.zeros(f)
        self.min, self.max = np.full(f, np.inf), np.full(f, -np.inf)
        # residuals (each feature minus its linear prediction from the others), when the package
        # baseline carries their model: rn complete rows, their residuals' sums and sums of squares
        res = baseline.get("residuals")
        self.res_center = np.asarray(res["center"], dtype=np.float64) if res else None
        self.res_weights = np.asarray(res["weights"], dtype=np.float64) if res else None
        self.rn, self.rsum, self.rsumsq = 0, np.zeros(f), np.zeros(f)

    def _reduce(self, x: np.ndarray) -> np.ndarray:
        """Rows (n, n_features) -> what the baseline summarises: the rows, or channel means."""
        if not self.channels:
            return x
        if self.channels_first:
            return x.reshape(len(x), self.channels, -1).mean(axis=2)
        return x.reshape(len(x), -1, self.channels).mean(axis=1)

    def record(self, raw: np.ndarray) -> None:
        x = self._reduce(np.asarray(raw, dtype=np.float64).reshape(1, -1)).reshape(-1)
        ok = np.isfinite(x)
        self.missing += ~ok
        self.n += ok
        xs = np.where(ok, x, 0.0)
        self.sum += xs
        self.sumsq += xs * xs
        self.min = np.where(ok, np.minimum(self.min, x), self.min)
        self.max = np.where(ok, np.maximum(self.max, x), self.max)
        for i, (v, edges) in enumerate(zip(x, self.inner_edges)):
            if ok[i]:
                self.hist[i][int(np.searchsorted(edges, v, side="right"))] += 1
        if self.res_weights is not None and ok.all():
            self._residuals(x[None, :])

    def record_batch(self, raw: np.ndarray) -> None:
        """Record ``n`` inputs at once (rows of ``raw``): the same counts as ``n`` calls of
        :meth:`record`, for simulators and batch inference."""
        x = self._reduce(np.asarray(raw, dtype=np.float64).reshape(len(raw), -1))
        ok = np.isfinite(x)
        self.missing += (~ok).sum(axis=0)
        self.n += ok.sum(axis=0)
        xs = np.where(ok, x, 0.0)
        self.sum += xs.sum(axis=0)
        self.sumsq += (xs * xs).sum(axis=0)
        self.min = np.minimum(self.min, np.where(ok, x, np.inf).min(axis=0, initial=np.inf))
        self.max = np.maximum(self.max, np.where(ok, x, -np.inf).max(axis=0, initial=-np.inf))
        for i, edges in enumerate(self.inner_edges):
            col = x[ok[:, i], i]
            self.hist[i] += np.bincount(np.searchsorted(edges, col, side="right"), minlength=self.bins[i])
        if self.res_weights is not None:
            self._residuals(x[ok.all(axis=1)])

    def _residuals(self, rows: np.ndarray) -> None:
        if len(rows) and self.res_weights is not None:
            e = (rows - self.res_center) @ self.res_weights
            self.rn += len(rows)
            self.rsum += e.sum(axis=0)
            self.rsumsq += (e * e).sum(axis=0)

    def to_obj(self) -> dict:
        finite = lambda a: [float(v) if np.isfinite(v) else 0.0 for v in a]  # noqa: E731
        out = {"hist": [h.tolist() for h in self.hist], "n": self.n.tolist(), "missing": self.missing.tolist(),
               "sum": [float(v) for v in self.sum], "sumsq": [float(v) for v in self.sumsq],
               "min": finite(self.min), "max": finite(self.max), "edges": self.edges}
        if self.res_weights is not None:
            out.update(rn=self.rn, rsum=[float(v) for v in self.rsum], rsumsq=[float(v) for v in self.rsumsq])
        return out


class TelemetryWindow:
    """One window's counts. ``task`` (contracts/tasks.py) says how predictions are binned and
    labels scored: classes (``n_bins`` of them), regression bins with the absolute error summed
    (``abs_err_sum``), or the normal/anomaly flags."""

    def __init__(self, n_bins: int, baseline: dict | None = None, task: TaskSpec = CLASSIFICATION,
                 clock: Callable[[], float] = time.time) -> None:
        """``clock``: the time windows are stamped with (the agent's trusted clock, device_sdk/clock.py)."""
        self.task = task
        self.clock = clock
        self.n_classes = task.n_bins(n_bins)
        self.baseline = baseline if baseline and baseline.get("features") else None
        self.reset()

    @classmethod
    def for_manifest(cls, manifest: Manifest, clock: Callable[[], float] = time.time) -> TelemetryWindow:
        return cls(len(manifest.labels), manifest.baseline, manifest.task, clock)

    def reset(self) -> None:
        self.summary = FeatureSummary(self.baseline) if self.baseline else None
        self.start = self.clock()
        self.count = self.labelled = self.correct = self.errors = 0
        self.abs_err_sum = 0.0
        self.predictions = [0] * self.n_classes
        self.confidence = [0] * CONFIDENCE_BINS
        self.latencies: list[float] = []

    def record(self, prediction: float, confidence: float, latency_ms: float, label: float | None,
               raw: np.ndarray | None = None, bin: int | None = None) -> None:
        """One inference. ``bin`` is the prediction's telemetry bin (the class index when omitted)."""
        self.count += 1
        if self.summary is not None and raw is not None:
            self.summary.record(raw)
        k = int(prediction) if bin is None else bin
        if 0 <= k < self.n_classes:
            self.predictions[k] += 1
        if self.task.kind is not TaskKind.REGRESSION:
            self.confidence[min(CONFIDENCE_BINS - 1, max(0, int(confidence * CONFIDENCE_BINS)))] += 1
        self.latencies.append(latency_ms)
        if label is not None:
            self.labelled += 1
            self.correct += int(self.task.correct(prediction, label))
            if self.task.kind is TaskKind.REGRESSION:
                self.abs_err_sum += abs(float(prediction) - float(label))

    def record_error(self) -> None:
        self.errors += 1

    def close(self, device_id: str, seq: int, model_version: str | None) -> Telemetry:
        lat = np.asarray(self.latencies or [0.0])
        record = Telemetry(
            device_id=device_id, seq=seq, model_version=model_version, window_start=self.start,
            window_end=max(self.start, self.clock()), count=self.count, labelled=self.labelled,
            correct=self.correct, predictions=list(self.predictions), confidence_hist=list(self.confidence),
            latency_ms_p50=float(np.percentile(lat, 50)), latency_ms_max=float(lat.max()), errors=self.errors,
            features=self.summary.to_obj() if self.summary is not None and self.count else None,
            abs_err_sum=round(self.abs_err_sum, 6) if self.task.kind is TaskKind.REGRESSION else None,
        )
        self.reset()
        return record
