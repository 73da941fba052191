"""Conversion and quantization: one float model -> the model files each tier's runtime runs.

=====================  ===========================================================================
function               produces
=====================  ===========================================================================
onnx_int8_qdq          ONNX int8, static post-training quantization in QDQ format, int8 weights
                       per channel and int8 activations per tensor (onnxruntime.quantization,
                       MinMax calibration)
onnx_fp16              the ONNX graph in float16, inputs and outputs included, or None
litert_fp32            a float32 .tflite (litert-torch: PyTorch -> LiteRT, no TensorFlow)
litert_dynamic_int8    int8 weights, float activations (ai-edge-quantizer ``dynamic_wi8_afp32``)
litert_full_int8       fully int8 (ai-edge-quantizer ``static_wi8_ai8``): int8 input and output,
                       int8 weights per channel, int32 bias, calibrated by true min/max
inline_buffers         the same .tflite with every weight buffer inside the flatbuffer (for TFLM)
tflite_operators       the operators a .tflite runs and the types they compute in
c_header               the model as a C byte array for firmware builds
=====================  ===========================================================================

Calibration data is always *model inputs*: raw training rows after the feature contract, in
the model's input shape, ``(n, *shape)`` (:meth:`edgeloop.contracts.features.FeatureSpec.model_input`),
so the input scale and zero point are measured on exactly what devices will feed the model. The
quantizers calibrate one example at a time, each fed as a batch of one, ``(1, *shape)``: the
shape the ``.tflite`` models are converted with and the ONNX graph's input with batch 1.

Layout: PyTorch convolutions are channels-first (NCHW, NCL), LiteRT's are channels-last. The
converter runs each convolution channels-last and inserts TRANSPOSE (or, where the channels or
the spatial axes have size 1, an equivalent RESHAPE) to move between the two;
:func:`tflite_operators` marks those operators (``Operator.inserted_for_layout``) so a tier
that cannot run them can say where they came from.

Why min/max: ai-edge-quantizer's own ``Quantizer.calibrate`` keeps an exponential moving
average (factor 0.95) of each sample's min and max; fed one row at a time, the range follows the
last few rows and clips every outlier after it. On the digits MLP that clipped the input range
to [-1.8, 2.3] while standardized pixels reach 12, and cost 0.8 points of top-1 agreement with
the float model. A running min/max (what onnxruntime's MinMax calibrator also does) recovers it.

Why inline buffers: ai-edge-quantizer 0.10 writes a model whose buffers of 1 KB or more add up
to 256 KB or more with *external* buffers (``Buffer.offset``/``size``, data after the
flatbuffer). LiteRT reads them; TFLite Micro ignores the offset and runs on garbage weights,
silently (measured: the MLPerf Tiny autoencoder's outputs 2.4x the fp32 norm away, every layer
off by up to 255 LSB). Every model for TFLM is therefore re-serialized with inline data
(4-byte aligned within the flatbuffer; the C array itself is 16-byte aligned).

Every function raises whatever its converter raises; :func:`edgeloop.cloud.package.tier_packagers.convert`
turns that into one :class:`~cloud.errors.UserError` line.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeloop.cloud.package.export import INPUT_NAME

__all__ = ["onnx_int8_qdq", "onnx_fp16", "litert_fp32", "litert_dynamic_int8", "litert_full_int8",
           "has_external_buffers", "inline_buffers", "Operator", "tflite_operators", "c_header"]


def onnx_int8_qdq(onnx_bytes: bytes, calib: np.ndarray) -> bytes:
    """Static int8 QDQ, weights per channel, calibrated on ``calib``: model inputs ``(n, *shape)``,
    fed one example at a time as ``(1, *shape)`` (the graph's input is ``(batch, *shape)``)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    rows = [{INPUT_NAME: example[None]} for example in np.asarray(calib, dtype=np.float32)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._rows = iter(rows)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._rows, None)

    with tempfile.TemporaryDirectory() as d:
        src, pre, dst = Path(d, "m.onnx"), Path(d, "pre.onnx"), Path(d, "q.onnx")
        src.write_bytes(onnx_bytes)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        return dst.read_bytes()


def onnx_fp16(onnx_bytes: bytes) -> bytes | None:
    """The graph in float16 (inputs and outputs too) where it converts, else None."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load_from_string(onnx_bytes), keep_io_types=False)
        return model.SerializeToString()
    except Exception:  # noqa: BLE001 - not every graph converts; fp32 is always shipped
        return None


def litert_fp32(model: nn.Module, input_shape: int | Sequence[int]) -> bytes:
    """PyTorch -> float32 .tflite with a ``(1, *input_shape)`` input (devices infer one sample at a
    time); ``input_shape`` is the model's input per example, an int for a flat vector."""
    import litert_torch

    shape = (input_shape,) if isinstance(input_shape, int) else tuple(int(d) for d in input_shape)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(d, "fp32.tflite")
        litert_torch.convert(model.eval(), (torch.zeros(1, *shape),)).export(str(path))
        return path.read_bytes()


def litert_dynamic_int8(fp32: bytes) -> bytes:
    """int8 weights, float activations: no calibration needed."""
    from ai_edge_quantizer import quantizer, recipe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qt = quantizer.Quantizer(fp32)
        qt.load_quantization_recipe(recipe.dynamic_wi8_afp32())
        return bytes(qt.quantize().quantized_model)


def litert_full_int8(fp32: bytes, calib: np.ndarray) -> bytes:
    """Fully int8 (int8 in and out, int32 bias), activation ranges by running min/max over ``calib``:
    model inputs ``(n, *shape)``, one calibration step per example, fed as ``(1, *shape)`` (the
    converted model's input)."""
    from ai_edge_quantizer import calibrator, quantizer, recipe, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils, tfl_interpreter_utils

    chosen = recipe.static_wi8_ai8()
    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(chosen)
    input_name = _signature_input(fp32)
    samples = [{input_name: example[None]} for example in np.asarray(calib, dtype=np.float32)]
    with warnings.catch_warnings():   # its interpreters keep every tensor on purpose, and say so
        warnings.simplefilter("ignore")
        calib_run = calibrator.Calibrator(fp32, num_threads=1, qsv_update_func=qsv_utils.min_max_update)
        calib_run.calibrate({tfl_interpreter_utils.DEFAULT_SIGNATURE_KEY: samples}, manager)
        qt = quantizer.Quantizer(fp32)
        qt.load_quantization_recipe(chosen)
        return bytes(qt.quantize(calib_run.get_model_qsvs()).quantized_model)


def has_external_buffers(model: bytes) -> bool:
    """Whether any buffer of the .tflite keeps its data outside the flatbuffer (offset/size)."""
    from ai_edge_litert import schema_py_generated as schema

    flat = schema.Model.GetRootAs(model, 0)
    return any(flat.Buffers(i).Offset() > 0 for i in range(flat.BuffersLength()))


def inline_buffers(model: bytes) -> bytes:
    """The same model with every buffer's data inside the flatbuffer, as TFLite Micro needs."""
    from ai_edge_litert.tools import flatbuffer_utils

    if not has_external_buffers(model):
        return model
    # read_model_from_bytearray resolves offset/size buffers into inline data
    flat = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    return bytes(flatbuffer_utils.convert_object_to_bytearray(flat))


def _signature_input(model: bytes) -> str:
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_content=model).get_signature_list()
    return next(iter(signatures.values()))["inputs"][0]


@dataclass(frozen=True)
class Operator:
    name: str                 # builtin operator name, e.g. FULLY_CONNECTED
    computes_in: str          # numpy dtype name of its first input: int8, float32, ...
    inserted_for_layout: bool = False   # a TRANSPOSE/RESHAPE the converter added between channels-first and -last
    layer: str = ""           # its output tensor's name: the converter names it after the model's layer
    index: int = -1           # its position in the graph


_CHANNELS_LAST_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "CONV_3D", "AVERAGE_POOL_2D", "MAX_POOL_2D",
                      "L2_POOL_2D"}
# operators a layout change passes through unchanged on its way to or from a convolution
_LAYOUT_NEUTRAL_OPS = {"PAD", "PADV2", "RELU", "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1", "LEAKY_RELU", "TANH", "LOGISTIC",
                       "HARD_SWISH", "GELU", "QUANTIZE", "DEQUANTIZE", "ADD", "SUB", "MUL", "RESHAPE", "TRANSPOSE"}
# channels-first <-> channels-last: NCHW <-> NHWC, NCL <-> NLC
_CHANNEL_SWAPS = {(0, 2, 3, 1), (0, 3, 1, 2), (0, 2, 1)}
_LAYOUT_HOPS = 4


def tflite_operators(model: bytes) -> list[Operator]:
    """The operators a .tflite runs, in order, read with LiteRT's reference op resolver (no
    delegate, so every builtin operator is listed as itself). A TRANSPOSE that swaps channels-first
    and channels-last, or a RESHAPE that only adds, drops or moves axes of size 1, next to a
    convolution or pooling operator (through at most a few element-wise, padding or layout
    operators) is marked ``inserted_for_layout``: the converter put it there because the PyTorch
    model's tensors are channels-first and LiteRT's convolutions run channels-last. (A model that
    permutes its own tensors that way next to a convolution is marked too; the .tflite cannot
    tell the two apart.)"""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_content=bytes(model), experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    ops = interpreter._get_ops_details()
    shapes = {t["index"]: tuple(int(d) for d in t["shape"]) for t in interpreter.get_tensor_details()}
    producer = {t: i for i, op in enumerate(ops) for t in op["outputs"]}
    consumers: dict[int, list[int]] = {}
    for i, op in enumerate(ops):
        for t in op["inputs"]:
            consumers.setdefault(int(t), []).append(i)

    def constant(tensor: int) -> tuple[int, ...] | None:
        try:
            return tuple(int(v) for v in np.asarray(interpreter.get_tensor(tensor)).reshape(-1))
        except (ValueError, RuntimeError):
            return None

    def changes_layout(op: dict) -> bool:
        if op["op_name"] == "TRANSPOSE" and len(op["inputs"]) == 2:
            return constant(int(op["inputs"][1])) in _CHANNEL_SWAPS
        if op["op_name"] == "RESHAPE" and len(op["inputs"]) and len(op["outputs"]):
            before, after = shapes.get(int(op["inputs"][0])), shapes.get(int(op["outputs"][0]))
            if before is None or after is None or before == after:
                return False
            return [d for d in before if d != 1] == [d for d in after if d != 1]
        return False

    def next_to_convolution(start: int) -> bool:
        seen, frontier = {start}, [start]
        for _ in range(_LAYOUT_HOPS):
            step = []
            for i in frontier:
                near = [producer[t] for t in ops[i]["inputs"][:1] if t in producer]
                near += [j for t in ops[i]["outputs"] for j in consumers.get(int(t), [])]
                for j in near:
                    if j in seen:
                        continue
                    if ops[j]["op_name"] in _CHANNELS_LAST_OPS:
                        return True
                    seen.add(j)
                    if ops[j]["op_name"] in _LAYOUT_NEUTRAL_OPS:
                        step.append(j)
            frontier = step
        return False

    interpreter.allocate_tensors()     # constant tensors (a TRANSPOSE's permutation) are readable after this
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    return [Operator(op["op_name"], np.dtype(op["operand_types"][0]).name if len(op["operand_types"]) else "none",
                     changes_layout(op) and next_to_convolution(i),
                     names.get(int(op["outputs"][0]), "") if len(op["outputs"]) else "", i)
            for i, op in enumerate(ops)]


def layer_label(tensor_name: str) -> str:
    """The PyTorch layer an operator came from, read from its output tensor's name as the
    converter writes it (``pkg.Net/torch.nn.modules.container.Sequential_features/
    torch.nn.modules.conv.Conv2d_0;3`` -> ``features.0 (Conv2d)``); the name itself otherwise."""
    parts = tensor_name.split(";")[0].split("/")
    if tensor_name.startswith("serving_default"):
        return "the model's output"
    if len(parts) < 2:     # computed in the top module's own forward (a functional call)
        return f"{parts[0].rsplit('.', 1)[-1]}.forward" if parts[0] else "?"
    attrs, cls = [], ""
    for part in parts[1:]:
        cls, _, attr = part.rsplit(".", 1)[-1].partition("_")
        attrs.append(attr or cls)
    return f"{'.'.join(attrs)} ({cls})"


def c_header(model: bytes, name: str, description: str) -> bytes:
    """The model as a C byte array, 16-byte aligned, for firmware builds."""
    symbol = re.sub(r"\W", "_", name)
    lines = [f"// {description}", "// Generated by edgeloop. Do not edit.", "#include <stdint.h>", "",
             f"__attribute__((aligned(16))) const unsigned char {symbol}[] = {{"]
    for i in range(0, len(model), 12):
        lines.append("  " + ", ".join(f"0x{b:02x}" for b in model[i:i + 12]) + ",")
    lines += ["};", f"const unsigned int {symbol}_len = {len(model)};", ""]
    return "\n".join(lines).encode()
