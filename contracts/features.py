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

Raw inputs are always flat rows of ``n_features`` numbers (row-major order of one example), on
the wire, in telemetry samples and in golden vectors. The steps run on those flat rows; the
model then takes them reshaped to ``(n, *input_shape)`` (:meth:`FeatureSpec.model_input`).
``input_shape`` defaults to ``[n_features]`` (a flat vector); an image is for example
``[1, 8, 8]`` with ``layout`` ``"NCHW"``, a multi-channel time series ``[3, 128]`` with ``"NCL"``.
Version 2 of the spec adds ``input_shape`` and ``layout``; a flat spec is still written as
version 1, so devices of earlier releases keep reading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeloop.contracts.errors import SchemaError

__all__ = ["FeatureSpec"]

SPEC_VERSION = 2
SPEC_VERSIONS = (1, 2)
LAYOUTS = ("flat", "NCHW", "NHWC", "NCL", "NLC")


@dataclass(frozen=True)
class FeatureSpec:
    n_features: int
    names: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    raw_min: float | None = None     # documented range of raw inputs, for validation and drift
    raw_max: float | None = None
    input_shape: tuple[int, ...] = ()    # the model's input per example; () means (n_features,)
    layout: str = "flat"                 # how input_shape's axes read (LAYOUTS)

    @property
    def shape(self) -> tuple[int, ...]:
        """The model's input shape per example (without the batch axis)."""
        return tuple(self.input_shape) or (self.n_features,)

    @property
    def channels(self) -> int:
        """Channels of a shaped input (1 for a flat vector): the axis drift summaries may group by."""
        if self.layout in ("NCHW", "NCL"):
            return self.shape[0]
        if self.layout in ("NHWC", "NLC"):
            return self.shape[-1]
        return 1

    def model_input(self, raw: np.ndarray) -> np.ndarray:
        """Raw flat rows (n, n_features) or one row -> float32 model inputs (n, *shape)."""
        x = self.apply(np.atleast_2d(np.asarray(raw, dtype=np.float32)))
        return x.reshape((len(x), *self.shape))

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
                x = ((x - np.asarray(step["mean"], np.float32)) / np.asarray(step["std"], np.float32)).astype(np.float32)
            else:  # validated in from_obj; kept for specs built in code
                raise SchemaError(f"unknown feature step {op!r}")
        return x.astype(np.float32, copy=False)

    def to_obj(self) -> dict[str, Any]:
        obj = {"version": 1, "n_features": self.n_features, "names": list(self.names),
               "steps": [dict(s) for s in self.steps], "raw_min": self.raw_min,
               "raw_max": self.raw_max}
        if self.shape != (self.n_features,) or self.layout != "flat":
            obj.update(version=SPEC_VERSION, input_shape=list(self.shape), layout=self.layout)
        return obj

    @classmethod
    def from_obj(cls, obj: Any) -> FeatureSpec:
        if not isinstance(obj, dict):
            raise SchemaError("feature spec must be an object")
        if obj.get("version") not in SPEC_VERSIONS:
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
        shape, layout = _check_shape(obj, n)
        return cls(n_features=n, names=[str(x) for x in names], steps=steps,
                   raw_min=obj.get("raw_min"), raw_max=obj.get("raw_max"), input_shape=shape, layout=layout)


def _check_shape(obj: dict[str, Any], n: int) -> tuple[tuple[int, ...], str]:
    if obj["version"] == 1:
        return (), "flat"
    shape, layout = obj.get("input_shape", [n]), obj.get("layout", "flat")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4 \
            or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape):
        raise SchemaError("feature spec 'input_shape' must list 1 to 4 positive integers")
    if math.prod(shape) != n:
        raise SchemaError(f"feature spec 'input_shape' {shape} holds {math.prod(shape)} values, not n_features {n}")
    if layout not in LAYOUTS:
        raise SchemaError(f"feature spec 'layout' must be one of {', '.join(LAYOUTS)}")
    want = {"flat": 1, "NCHW": 3, "NHWC": 3, "NCL": 2, "NLC": 2}[layout]
    if len(shape) != want:
        raise SchemaError(f"feature spec layout {layout} needs an input_shape of {want} axes, got {shape}")
    return tuple(shape), layout


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
