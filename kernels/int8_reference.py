"""Reference int8 arithmetic of the TFLite family, in plain numpy, to attribute differences
between runtimes to a rule rather than to chance.

An int8 FULLY_CONNECTED or CONV_2D layer sums ``(w - 0) * (x - input_zp)`` into an int32
accumulator, adds the int32 bias, and *requantizes*: multiplies by the effective scale
``input_scale * weight_scale[c] / output_scale`` (below 1), rounds, adds the output zero point
and clamps to the fused activation's range. Two requantization rules are in use:

``fixed_point``
    tflite-micro ``tensorflow/lite/kernels/internal/quantization_util.cc`` and ``common.h``:
    the scale becomes a Q31 multiplier and a shift (``QuantizeMultiplier``), applied by
    ``MultiplyByQuantizedMultiplier`` = gemmlowp's ``SaturatingRoundingDoublingHighMul``
    followed by ``RoundingDivideByPOT``: two roundings. TFLite Micro uses it in every int8
    kernel; LiteRT uses it in its CONV_2D and DEPTHWISE_CONV_2D reference kernels.
``float``
    LiteRT's reference FULLY_CONNECTED kernels (``reference_integer_ops::FullyConnected`` and
    ``FullyConnectedPerChannel`` overloads that take the float scales) compute
    ``round(double(acc) * (double(input_scale) * double(weight_scale) / double(output_scale)))``,
    rounding half away from zero: one rounding, in double precision.

The two agree except where the accumulator lands within rounding error of a half step; there
they differ by exactly one LSB. ``tests/test_tiers_kernels.py`` holds both runtimes to these
references bit for bit, layer by layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["Rule", "FCLayer", "quantize_multiplier", "requantize_fixed_point", "requantize_float",
           "fully_connected"]

Rule = Literal["fixed_point", "float"]
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1


@dataclass(frozen=True)
class FCLayer:
    """One int8 fully connected layer as a .tflite file stores it."""

    weights: np.ndarray          # int8 (out, in), symmetric (zero point 0)
    bias: np.ndarray | None      # int32 (out,)
    input_scale: float
    input_zero_point: int
    weight_scales: np.ndarray    # float32, one per output channel (or one for the tensor)
    output_scale: float
    output_zero_point: int
    activation_min: int = -128   # the fused activation's range, already in output units
    activation_max: int = 127


def quantize_multiplier(real: float) -> tuple[int, int]:
    """``QuantizeMultiplier``: ``real == multiplier * 2**(shift - 31)``, multiplier in [2**30, 2**31)."""
    if real == 0.0:
        return 0, 0
    fraction, shift = math.frexp(real)
    multiplier = round(fraction * (1 << 31))
    if multiplier == 1 << 31:
        multiplier //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return int(multiplier), int(shift)


def _saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    product = a.astype(np.int64) * b.astype(np.int64)
    nudged = product + np.where(product >= 0, 1 << 30, 1 - (1 << 30))
    high = np.where(nudged >= 0, nudged >> 31, -((-nudged) >> 31))    # C++ division truncates toward 0
    return np.where((a == _INT32_MIN) & (b == _INT32_MIN), _INT32_MAX, high)


def _rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def requantize_fixed_point(acc: np.ndarray, real_scale: np.ndarray) -> np.ndarray:
    """TFLite Micro's rule: Q31 multiplier and shift per channel, two roundings. Broadcasts
    ``real_scale`` (one per output channel) over the last axis of ``acc``."""
    pairs = [quantize_multiplier(float(s)) for s in np.atleast_1d(real_scale)]
    multiplier = np.array([m for m, _ in pairs], dtype=np.int64)
    shift = np.array([s for _, s in pairs], dtype=np.int64)
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    scaled = acc.astype(np.int64) * (np.int64(1) << left)
    return _rounding_divide_by_pot(_saturating_rounding_doubling_high_mul(scaled, multiplier), right)


def requantize_float(acc: np.ndarray, real_scale: np.ndarray) -> np.ndarray:
    """LiteRT's reference FULLY_CONNECTED rule: one rounding in double, half away from zero."""
    v = acc.astype(np.float64) * np.asarray(real_scale, dtype=np.float64)
    return (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int64)


def fully_connected(layer: FCLayer, x: np.ndarray, rule: Rule) -> np.ndarray:
    """int8 inputs (batch, in) -> int8 outputs (batch, out), computed with ``rule``."""
    acc = (x.astype(np.int64) - layer.input_zero_point) @ layer.weights.astype(np.int64).T
    if layer.bias is not None:
        acc = acc + layer.bias.astype(np.int64)
    real = (np.float64(layer.input_scale) * layer.weight_scales.astype(np.float64)
            / np.float64(layer.output_scale))
    scaled = requantize_fixed_point(acc, real) if rule == "fixed_point" else requantize_float(acc, real)
    return np.clip(scaled + layer.output_zero_point, layer.activation_min, layer.activation_max).astype(np.int8)
