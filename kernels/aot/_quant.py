"""Offline quantization arithmetic: what TFLite Micro computes in each kernel's Prepare, done
once at compile time with the same float32/float64 steps, so that the generated C carries
the exact integers TFLM would hold at run time (``quantization_util.cc``, ``kernel_util.cc``).
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32


def tflite_round(x: float) -> float:
    """``TfLiteRound`` (std::round): half away from zero."""
    return math.copysign(math.floor(abs(x) + 0.5), x)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """``QuantizeMultiplier`` (double rounding build): ``real ~= m * 2**(shift - 31)``."""
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    q_fixed = int(tflite_round(q * (1 << 31)))
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return q_fixed, shift


def frexp_multiplier(real: float) -> tuple[int, int]:
    """The inline ``frexp`` + ``TfLiteRound`` of TFLM's int8 LOGISTIC and TANH Prepare (no
    renormalisation when the fraction rounds up to 1)."""
    q, shift = math.frexp(real)
    return int(tflite_round(q * (1 << 31))), shift


def input_radius(integer_bits: int, left_shift: int, total_signed_bits: int = 31) -> int:
    """``CalculateInputRadius``."""
    rescaled = (1.0 * ((1 << integer_bits) - 1) * (1 << (total_signed_bits - integer_bits))
                / (1 << left_shift))
    return int(math.floor(rescaled))


def quantize_float(scale: float, zero_point: int, value: float) -> int:
    """kernel_util.h ``Quantize``: ``zero_point + round(f / scale)`` in float32."""
    return zero_point + int(tflite_round(float(F32(value) / F32(scale))))


def activation_range(activation: str, scale: float, zero_point: int) -> tuple[int, int] | None:
    """``CalculateActivationRangeQuantized`` for int8; None for an activation it refuses."""
    lo, hi = -128, 127
    if activation == "NONE":
        return lo, hi
    if activation == "RELU":
        return max(lo, quantize_float(scale, zero_point, 0.0)), hi
    if activation == "RELU6":
        return (max(lo, quantize_float(scale, zero_point, 0.0)),
                min(hi, quantize_float(scale, zero_point, 6.0)))
    if activation == "RELU_N1_TO_1":
        return (max(lo, quantize_float(scale, zero_point, -1.0)),
                min(hi, quantize_float(scale, zero_point, 1.0)))
    return None


def downscale_to_int16(multiplier: int) -> int:
    """``DownScaleInt32ToInt16Multiplier``."""
    if multiplier >= (1 << 31) - 1 - (1 << 15):
        return (1 << 15) - 1
    return (multiplier + (1 << 15)) >> 16
