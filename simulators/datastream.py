"""Local data streams for simulated devices: labelled raw inputs, in a per-device order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

__all__ = ["DataStream", "Drift", "drifted_windows"]


@dataclass(frozen=True)
class DataStream:
    x: np.ndarray           # raw inputs (n, n_features)
    y: np.ndarray | None    # labels, or None where the device never learns ground truth

    def for_device(self, index: int, samples: int, label_rate: float = 1.0,
                   seed: int = 0) -> Iterator[tuple[np.ndarray, int | float | None]]:
        """``samples`` inputs starting at a device-specific offset; labels with ``label_rate``."""
        rng = np.random.default_rng(seed * 1_000_003 + index)
        start = (index * 37) % len(self.x)
        for i in range(samples):
            j = (start + i) % len(self.x)
            label = None
            if self.y is not None and rng.random() < label_rate:
                # class labels stay whole numbers; a regression target keeps its value
                label = int(self.y[j]) if np.issubdtype(self.y.dtype, np.integer) else float(self.y[j])
            yield self.x[j:j + 1], label


# -- drift injectors: what the field does to a model's inputs (issue 7) ----------------------------
@dataclass(frozen=True)
class Drift:
    """A change applied to a batch of raw inputs (and, for label shift, to which rows are drawn).

    ``kind``: ``none``; ``mean_shift`` (add ``amount`` baseline standard deviations to
    ``feature``); ``scale`` (multiply ``feature``'s spread around its mean by ``amount``);
    ``gain`` (a sensor gain/offset drift on every feature: ``x * amount + offset``);
    ``stuck`` (``feature`` always reads ``amount``); ``label_shift`` (classes in ``classes``
    are drawn ``amount`` times as often). Values are clipped to ``[lo, hi]``, the sensor's range,
    where given.
    """

    kind: str = "none"
    feature: int = 0
    amount: float = 0.0
    offset: float = 0.0
    classes: tuple[int, ...] = ()
    lo: float | None = None
    hi: float | None = None

    def apply(self, x: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
        x = np.array(x, dtype=np.float64, copy=True)
        f = self.feature
        if self.kind == "mean_shift":
            x[:, f] += self.amount * sd[f]
        elif self.kind == "scale":
            x[:, f] = mean[f] + (x[:, f] - mean[f]) * self.amount
        elif self.kind == "gain":
            x = x * self.amount + self.offset
        elif self.kind == "stuck":
            x[:, f] = self.amount
        elif self.kind not in ("none", "label_shift"):
            raise ValueError(f"unknown drift kind {self.kind!r}")
        if self.lo is not None or self.hi is not None:
            x = np.clip(x, self.lo, self.hi)
        return x

    def weights(self, y: np.ndarray) -> np.ndarray | None:
        """Per-row draw probabilities (label shift), or None for uniform."""
        if self.kind != "label_shift":
            return None
        w = np.where(np.isin(y, self.classes), self.amount, 1.0)
        return w / w.sum()


def drifted_windows(x: np.ndarray, y: np.ndarray, drift: Drift, windows: int, size: int,
                    rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``windows`` batches of ``size`` rows drawn with replacement from (x, y), drift applied."""
    mean, sd = x.mean(axis=0), x.std(axis=0)
    p = drift.weights(y)
    for _ in range(windows):
        idx = rng.choice(len(x), size=size, replace=True, p=p)
        yield drift.apply(x[idx], mean, sd), y[idx]
