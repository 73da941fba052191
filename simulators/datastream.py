"""Local data streams for simulated devices: labelled raw inputs, in a per-device order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

__all__ = ["DataStream"]


@dataclass(frozen=True)
class DataStream:
    x: np.ndarray           # raw inputs (n, n_features)
    y: np.ndarray | None    # labels, or None where the device never learns ground truth

    def for_device(self, index: int, samples: int, label_rate: float = 1.0,
                   seed: int = 0) -> Iterator[tuple[np.ndarray, int | None]]:
        """``samples`` inputs starting at a device-specific offset; labels with ``label_rate``."""
        rng = np.random.default_rng(seed * 1_000_003 + index)
        start = (index * 37) % len(self.x)
        for i in range(samples):
            j = (start + i) % len(self.x)
            label = None
            if self.y is not None and rng.random() < label_rate:
                label = int(self.y[j])
            yield self.x[j:j + 1], label
