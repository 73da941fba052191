"""Read the int8 FULLY_CONNECTED layers of a .tflite model into :class:`FCLayer` objects, and
compare two interpreters with the reference rules of :mod:`edgeloop.kernels.int8_reference` layer by
layer: each interpreter's output of each layer against the reference applied to *that
interpreter's own* input of the layer, so a difference is attributed to the layer that made it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgeloop.kernels.int8_reference import FCLayer, Rule, fully_connected

__all__ = ["FCOp", "TensorReader", "LiteRTReader", "TFLMReader", "fc_ops", "LayerCheck", "check_fc_layers"]


class TensorReader(Protocol):
    """An interpreter that kept every tensor of its last invoke."""

    def tensor(self, index: int) -> np.ndarray: ...


class LiteRTReader:
    """A LiteRT interpreter made with ``experimental_preserve_all_tensors=True``."""

    def __init__(self, interpreter) -> None:  # noqa: ANN001 - ai_edge_litert.interpreter.Interpreter
        self._interpreter = interpreter

    def tensor(self, index: int) -> np.ndarray:
        return np.asarray(self._interpreter.get_tensor(index))


class TFLMReader:
    """A TFLite Micro interpreter made with ``InterpreterConfig.kPreserveAllTensors``."""

    def __init__(self, interpreter) -> None:  # noqa: ANN001 - tflite_micro's runtime.Interpreter
        self._interpreter = interpreter

    def tensor(self, index: int) -> np.ndarray:
        return np.asarray(self._interpreter.GetTensor(index, 0)["tensor_data"])


@dataclass(frozen=True)
class FCOp:
    input_index: int     # tensor indices in subgraph 0 (the same in every interpreter)
    output_index: int
    layer: FCLayer


def _activation_range(kind: int, scale: float, zero_point: int) -> tuple[int, int]:
    """CalculateActivationRangeQuantized for int8 outputs."""
    from ai_edge_litert.schema_py_generated import ActivationFunctionType as Act

    def q(v: float) -> int:
        return zero_point + int(round(v / scale))

    lo, hi = -128, 127
    if kind == Act.RELU:
        lo = max(lo, q(0.0))
    elif kind == Act.RELU6:
        lo, hi = max(lo, q(0.0)), min(hi, q(6.0))
    elif kind == Act.RELU_N1_TO_1:
        lo, hi = max(lo, q(-1.0)), min(hi, q(1.0))
    elif kind != Act.NONE:
        raise ValueError(f"fused activation {kind} has no reference here")
    return lo, hi


def fc_ops(model: bytes) -> list[FCOp]:
    """The int8 FULLY_CONNECTED operators of subgraph 0, in execution order."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    flat = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    interpreter = Interpreter(model_content=bytes(model),
                              experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    details = {t["index"]: t for t in interpreter.get_tensor_details()}
    out = []
    for op in flat.subgraphs[0].operators:
        if flat.operatorCodes[op.opcodeIndex].builtinCode != schema.BuiltinOperator.FULLY_CONNECTED:
            continue
        x, w, b = (int(i) for i in op.inputs[:3])
        y = int(op.outputs[0])
        if details[x]["dtype"] != np.int8 or details[w]["dtype"] != np.int8:
            continue
        xq, wq, yq = (details[i]["quantization_parameters"] for i in (x, w, y))
        lo, hi = _activation_range(op.builtinOptions.fusedActivationFunction, float(yq["scales"][0]),
                                   int(yq["zero_points"][0]))
        layer = FCLayer(weights=interpreter.get_tensor(w), bias=interpreter.get_tensor(b) if b >= 0 else None,
                        input_scale=float(xq["scales"][0]), input_zero_point=int(xq["zero_points"][0]),
                        weight_scales=np.asarray(wq["scales"], dtype=np.float32),
                        output_scale=float(yq["scales"][0]), output_zero_point=int(yq["zero_points"][0]),
                        activation_min=lo, activation_max=hi)
        out.append(FCOp(x, y, layer))
    return out


@dataclass(frozen=True)
class LayerCheck:
    """One interpreter against one rule, over every FC layer and every input tried."""

    rule: Rule
    layers: int
    outputs_checked: int
    mismatches: int          # outputs where the interpreter differs from the rule given its own input

    @property
    def bit_exact(self) -> bool:
        return self.mismatches == 0


def check_fc_layers(ops: list[FCOp], reader: TensorReader, rule: Rule) -> LayerCheck:
    """After an invoke: does every FC layer's output equal ``rule`` applied to its input?"""
    checked = mismatches = 0
    for op in ops:
        x = reader.tensor(op.input_index).reshape(-1, op.layer.weights.shape[1])
        got = reader.tensor(op.output_index).reshape(x.shape[0], -1)
        want = fully_connected(op.layer, x, rule)
        checked += got.size
        mismatches += int(np.count_nonzero(got != want))
    return LayerCheck(rule, len(ops), checked, mismatches)
