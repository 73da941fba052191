"""The feature contract: preprocessing defined once, applied the same way everywhere.

A :class:`FeatureSpec` travels inside every package's manifest. Training calls
:func:`FeatureSpec.apply` on raw inputs to make the model's inputs, and so does every device
runtime before inference, so serving can never compute features differently from training.
The spec is declarative JSON (a list of steps), so a runtime in another language can apply it
with the same arithmetic (float32, in step order).

Steps (version 1):

- ``{"op": "scale", "factor": f}``                 x * f
- ``{"op": "clip", "min": a, "max": b}``           min(max(x, a), b)
- ``{"op": "standardize", "mean": [...], "std": [...]}``   (x - mean) / std, per feature
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contracts.errors import SchemaError

__all__ = ["FeatureSpec"]

SPEC_VERSION = 1


@dataclass(frozen=True)
class FeatureSpec:
    n_features: int
    names: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    raw_min: float | None = None     # documented range of raw inputs, for validation and drift
    raw_max: float | None = None

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Raw inputs of shape (n, n_features) or (n_features,) -> float32 model inputs."""
        x = np.asarray(raw, dtype=np.float32)
        if x.shape[-1] != self.n_features:
            raise SchemaError(f"expected {self.n_features} features, got {x.shape[-1]}")
        for step in self.steps:
            op = step["op"]
            if op == "scale":
                x = x * np.float32(step["factor"])
            elif op == "clip":
                x = np.clip(x, np.float32(step["min"]), np.float32(step["max"]))
            elif op == "standardize":
                x = (x - np.asarray(step["mean"], np.float32)) / np.asarray(step["std"], np.float32)
            else:  # validated in from_obj; kept for specs built in code
                raise SchemaError(f"unknown feature step {op!r}")
        return x.astype(np.float32, copy=False)

    def to_obj(self) -> dict[str, Any]:
        return {"version": SPEC_VERSION, "n_features": self.n_features, "names": list(self.names),
                "steps": [dict(s) for s in self.steps], "raw_min": self.raw_min,
                "raw_max": self.raw_max}

    @classmethod
    def from_obj(cls, obj: Any) -> FeatureSpec:
        if not isinstance(obj, dict):
            raise SchemaError("feature spec must be an object")
        if obj.get("version") != SPEC_VERSION:
            raise SchemaError(f"unsupported feature spec version {obj.get('version')!r}")
        n = obj.get("n_features")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= 1_000_000:
            raise SchemaError("feature spec 'n_features' must be a positive integer")
        steps = obj.get("steps", [])
        if not isinstance(steps, list):
            raise SchemaError("feature spec 'steps' must be a list")
        for step in steps:
            _check_step(step, n)
        names = obj.get("names", [])
        if not isinstance(names, list) or (names and len(names) != n):
            raise SchemaError("feature spec 'names' must list one name per feature")
        return cls(n_features=n, names=[str(x) for x in names], steps=steps,
                   raw_min=obj.get("raw_min"), raw_max=obj.get("raw_max"))


def _check_step(step: Any, n: int) -> None:
    if not isinstance(step, dict) or not isinstance(step.get("op"), str):
        raise SchemaError("each feature step must be an object with an 'op'")
    op = step["op"]
    if op == "scale":
        _number(step, "factor")
    elif op == "clip":
        _number(step, "min")
        _number(step, "max")
    elif op == "standardize":
        for key in ("mean", "std"):
            vec = step.get(key)
            if not isinstance(vec, list) or len(vec) != n:
                raise SchemaError(f"standardize '{key}' must list {n} numbers")
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in vec):
                raise SchemaError(f"standardize '{key}' must list finite numbers")
        if any(v <= 0 for v in step["std"]):
            raise SchemaError("standardize 'std' must be positive")
    else:
        raise SchemaError(f"unknown feature step {op!r}")


def _number(step: dict[str, Any], key: str) -> None:
    v = step.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SchemaError(f"feature step {step['op']!r} needs a finite number '{key}'")
