"""Lowering: one .tflite operator -> one kernel call, with every parameter TFLite Micro would
compute in Prepare computed here (``_quant``), and every check TFLM's Prepare makes (or a
narrower one this compiler needs) made here, so the C runs blindly.

=====================  =====================================  ==============================
operator               kernel                                 in place (planner may)
=====================  =====================================  ==============================
FULLY_CONNECTED        el_fully_connected                     no
CONV_2D                el_conv2d                              1x1 stride 1 unpadded: pixel by pixel
DEPTHWISE_CONV_2D      el_depthwise_conv2d                    channel by channel, multiplier 1
AVERAGE/MAX_POOL_2D    el_average_pool2d / el_max_pool2d      no
ADD, SUB, MUL          el_add / el_sub / el_mul (broadcast)   over a same-shape dying input
RESHAPE, SQUEEZE,      none (output aliases the input), or    alias
EXPAND_DIMS            el_copy without in-place
SOFTMAX                el_softmax (last axis)                 no
MEAN                   el_mean                                no
PAD, PADV2             el_pad, or folded into the next        no
                       convolution's padding (``_fold``)
CONCATENATION          el_concatenation                       no
TRANSPOSE              el_transpose                           no
SLICE, STRIDED_SLICE   el_transpose (a strided gather)        no
RELU                   el_relu                                over the dying input
MAXIMUM                el_maximum (broadcast)                 over a same-shape dying input
QUANTIZE (int8->int8)  el_requantize                          over the dying input
LOGISTIC, TANH,        el_logistic / el_tanh / el_hard_swish  over the dying input
HARD_SWISH
=====================  =====================================  ==============================

Templates name tensors ``{T<index>}``, the op's parameter struct ``{P}``, its own constant
arrays ``{A:<name>}`` and its scratch buffer ``{S}``; the code generator substitutes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from . import _quant as q
from ._graph import Graph, Operator, Tensor
from .errors import UnsupportedByCompiler

MAX_DIMS = 6
InPlace = Literal["none", "alias", "elementwise", "depthwise", "pointwise"]


@dataclass
class Step:
    """One operator, lowered."""

    op: Operator
    call: str                                   # C statement(s), templated
    struct_type: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)
    inplace: InPlace = "none"
    eligible: tuple[int, ...] = ()              # tensor indices the output may overwrite
    call_inplace: str | None = None             # the call when the planner runs it in place
    scratch_bytes: int = 0                      # scratch the in-place call needs
    folded: bool = False                        # removed by a rewrite (kernels/aot/_fold.py)
    folded_into: str = "folded into the next convolution"
    windowed: tuple[int, ...] = ()              # tensors read around each output element, not at it:
                                                # the output may not overwrite their buffer

    @property
    def reads(self) -> tuple[int, ...]:
        return tuple(i for i in self.op.inputs if i >= 0)


class _Refuse(Exception):
    pass


def _need(cond: bool, why: str) -> None:
    if not cond:
        raise _Refuse(why)


def _act_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as tfl

    return {v: k for k, v in vars(tfl.ActivationFunctionType).items() if not k.startswith("_")}


def _activation(opts: Any, out: Tensor) -> tuple[int, int]:
    name = _act_names().get(int(getattr(opts, "fusedActivationFunction", 0) or 0), "?")
    rng = q.activation_range(name, out.qscale, out.qzero)
    _need(rng is not None, f"fused activation {name} is not supported")
    return rng  # type: ignore[return-value]


def _act_tensors(g: Graph, op: Operator) -> list[Tensor]:
    return [g.tensors[i] for i in op.inputs if i >= 0]


def _const(g: Graph, op: Operator, pos: int, what: str, dtype: str | None = None) -> Tensor | None:
    if pos >= len(op.inputs) or op.inputs[pos] < 0:
        return None
    t = g.tensors[op.inputs[pos]]
    _need(t.is_const, f"its {what} '{t.name}' is not a constant")
    _need(dtype is None or t.dtype == dtype, f"its {what} is {t.dtype}, not {dtype}")
    return t


def _int8_input(g: Graph, op: Operator, pos: int = 0) -> Tensor:
    t = g.tensors[op.inputs[pos]]
    _need(t.dtype == "int8", f"input {pos} '{t.name}' is {t.dtype}, not int8")
    return t


def _nhwc(shape: tuple[int, ...], what: str) -> tuple[int, int, int, int]:
    _need(len(shape) == 4, f"its {what} has rank {len(shape)}, not 4 (NHWC)")
    return shape  # type: ignore[return-value]


def _padding(kind: int, size: int, filt: int, stride: int, dilation: int) -> tuple[int, int]:
    """``ComputeOutSize`` and ``ComputePaddingWithOffset`` (padding.h): (output size, pad before)."""
    effective = (filt - 1) * dilation + 1
    out = (size + stride - 1) // stride if kind == 0 else (size + stride - effective) // stride
    total = max((out - 1) * stride + effective - size, 0)
    return out, total // 2


def _per_channel(in_t: Tensor, w: Tensor, out_t: Tensor, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``PopulateConvolutionQuantizationParams``: double(input) * double(filter) / double(output)."""
    scales = w.scale if w.scale is not None and len(w.scale) > 1 else np.repeat(w.scale[:1], channels)
    _need(len(scales) == channels, f"filter has {len(scales)} scales for {channels} channels")
    pairs = [q.quantize_multiplier(float(in_t.scale[0]) * float(s) / float(out_t.scale[0])) for s in scales]
    return np.array([m for m, _ in pairs], np.int32), np.array([s for _, s in pairs], np.int32)


def _symmetric(w: Tensor) -> None:
    _need(w.zero_point is None or not np.any(w.zero_point), "filter zero point is not 0")


# ---- operators ----------------------------------------------------------------------------
def _fully_connected(g: Graph, op: Operator) -> Step:
    x, out = _int8_input(g, op), g.tensors[op.outputs[0]]
    w = _const(g, op, 1, "weights", "int8")
    b = _const(g, op, 2, "bias", "int32")
    _need(w is not None and len(w.shape) == 2, "weights must be a constant 2-D int8 tensor")
    _need(int(getattr(op.options, "weightsFormat", 0) or 0) == 0, "shuffled weights format is not supported")
    depth, accum = w.shape
    _need(x.size % accum == 0 and out.size == x.size // accum * depth,
          f"input {x.shape} and output {out.shape} do not match weights {w.shape}")
    per_channel = w.scale is not None and len(w.scale) > 1
    if per_channel:
        _symmetric(w)
        mult, shift = _per_channel(x, w, out, depth)
        filter_offset = 0
    else:   # GetQuantizedConvolutionMultipler: the product in float32, then double
        real = float(np.float32(x.scale[0]) * np.float32(w.scale[0])) / float(out.scale[0])
        m, s = q.quantize_multiplier(real)
        mult, shift = np.full(depth, m, np.int32), np.full(depth, s, np.int32)
        filter_offset = -w.qzero
    lo, hi = _activation(op.options, out)
    fields = dict(batches=x.size // accum, accum_depth=accum, output_depth=depth, input_offset=-x.qzero,
                  filter_offset=filter_offset, output_offset=out.qzero, act_min=lo, act_max=hi,
                  multiplier="{A:mult}", shift="{A:shift}")
    bias = f"{{T{b.index}}}" if b is not None else "0"
    return Step(op, f"el_fully_connected(&{{P}}, {{T{x.index}}}, {{T{w.index}}}, {bias}, {{T{out.index}}});",
                "el_fc_params", fields, {"mult": ("int32_t", mult), "shift": ("int32_t", shift)})


def _conv_fields(g: Graph, op: Operator, depthwise: bool) -> tuple[dict[str, Any], dict, Tensor, Tensor, Tensor | None, Tensor]:
    x, out = _int8_input(g, op), g.tensors[op.outputs[0]]
    w = _const(g, op, 1, "filter", "int8")
    b = _const(g, op, 2, "bias", "int32")
    _need(w is not None, "filter missing")
    n, h, wd, c = _nhwc(x.shape, "input")
    on, oh, ow, oc = _nhwc(out.shape, "output")
    _, kh, kw, kc = _nhwc(w.shape, "filter")
    o = op.options
    sh, sw = int(o.strideH), int(o.strideW)
    dh, dw = int(o.dilationHFactor or 1), int(o.dilationWFactor or 1)
    out_h, pad_h = _padding(int(o.padding), h, kh, sh, dh)
    out_w, pad_w = _padding(int(o.padding), wd, kw, sw, dw)
    _need((out_h, out_w) == (oh, ow) and on == n, f"output {out.shape} is not what padding gives ({out_h}x{out_w})")
    if depthwise:
        _need(oc % c == 0 and kc == oc, f"depthwise filter {w.shape} does not fit {c} -> {oc} channels")
        dm = oc // c
        _need(int(o.depthMultiplier or dm) == dm, f"depth multiplier {o.depthMultiplier} is not {dm}")
        filter_in_c = 1
    else:
        _need(w.shape[0] == oc and c % kc == 0 and oc % (c // kc) == 0, f"filter {w.shape} does not fit input {x.shape}")
        dm, filter_in_c = 1, kc
    _symmetric(w)
    mult, shift = _per_channel(x, w, out, oc)
    lo, hi = _activation(o, out)
    fields = dict(batches=n, in_h=h, in_w=wd, in_c=c, out_h=oh, out_w=ow, out_c=oc, filter_h=kh, filter_w=kw,
                  filter_in_c=filter_in_c, depth_multiplier=dm, stride_h=sh, stride_w=sw, dilation_h=dh,
                  dilation_w=dw, pad_h=pad_h, pad_w=pad_w, input_offset=-x.qzero, output_offset=out.qzero,
                  act_min=lo, act_max=hi, multiplier="{A:mult}", shift="{A:shift}")
    return fields, {"mult": ("int32_t", mult), "shift": ("int32_t", shift)}, x, w, b, out


def _conv2d(g: Graph, op: Operator) -> Step:
    fields, arrays, x, w, b, out = _conv_fields(g, op, depthwise=False)
    bias = f"{{T{b.index}}}" if b is not None else "0"
    step = Step(op, f"el_conv2d(&{{P}}, {{T{x.index}}}, {{T{w.index}}}, {bias}, {{T{out.index}}});",
                "el_conv_params", fields, arrays)
    f = fields
    if (f["filter_h"], f["filter_w"], f["stride_h"], f["stride_w"], f["pad_h"], f["pad_w"]) == (1, 1, 1, 1, 0, 0) \
            and f["filter_in_c"] == f["in_c"] and f["batches"] == 1 and (f["out_h"], f["out_w"]) == (f["in_h"], f["in_w"]) \
            and not x.is_const:
        # output pixel p reads input pixel p only: computed through a one-pixel scratch over the input
        step.inplace, step.eligible = "pointwise", (x.index,)
        step.call_inplace = f"el_pointwise_conv2d_inplace(&{{P}}, {{T{x.index}}}, {{T{w.index}}}, {bias}, {{S}});"
        step.scratch_bytes = f["out_c"]
    return step


def _depthwise(g: Graph, op: Operator) -> Step:
    fields, arrays, x, w, b, out = _conv_fields(g, op, depthwise=True)
    bias = f"{{T{b.index}}}" if b is not None else "0"
    step = Step(op, f"el_depthwise_conv2d(&{{P}}, {{T{x.index}}}, {{T{w.index}}}, {bias}, {{T{out.index}}});",
                "el_conv_params", fields, arrays)
    if fields["depth_multiplier"] == 1 and fields["batches"] == 1 and \
            fields["out_h"] * fields["out_w"] <= fields["in_h"] * fields["in_w"] and not x.is_const:
        step.inplace, step.eligible = "depthwise", (x.index,)
        step.call_inplace = f"el_depthwise_conv2d_inplace(&{{P}}, {{T{x.index}}}, {{T{w.index}}}, {bias}, {{S}});"
        step.scratch_bytes = fields["in_h"] * fields["in_w"]
    return step


def _pool(kernel: str) -> Callable[[Graph, Operator], Step]:
    def lower(g: Graph, op: Operator) -> Step:
        x, out = _int8_input(g, op), g.tensors[op.outputs[0]]
        n, h, w, c = _nhwc(x.shape, "input")
        on, oh, ow, oc = _nhwc(out.shape, "output")
        o = op.options
        fh, fw, sh, sw = int(o.filterHeight), int(o.filterWidth), int(o.strideH), int(o.strideW)
        out_h, pad_h = _padding(int(o.padding), h, fh, sh, 1)
        out_w, pad_w = _padding(int(o.padding), w, fw, sw, 1)
        _need((on, out_h, out_w, oc) == (n, oh, ow, c), f"output {out.shape} is not what padding gives")
        _need(x.qscale == out.qscale and x.qzero == out.qzero, "input and output quantization differ")
        lo, hi = _activation(o, out)
        fields = dict(batches=n, in_h=h, in_w=w, depth=c, out_h=oh, out_w=ow, filter_h=fh, filter_w=fw,
                      stride_h=sh, stride_w=sw, pad_h=pad_h, pad_w=pad_w, act_min=lo, act_max=hi)
        return Step(op, f"{kernel}(&{{P}}, {{T{x.index}}}, {{T{out.index}}});", "el_pool_params", fields)
    return lower


def _padded(shape: tuple[int, ...], rank: int = MAX_DIMS) -> list[int]:
    _need(len(shape) <= rank, f"rank {len(shape)} is above {rank}")
    return [1] * (rank - len(shape)) + list(shape)


def _strides(dims: list[int]) -> list[int]:
    strides, acc = [0] * len(dims), 1
    for k in range(len(dims) - 1, -1, -1):
        strides[k], acc = acc, acc * dims[k]
    return strides


def _broadcast_strides(shape: tuple[int, ...], out_dims: list[int]) -> list[int]:
    dims = _padded(shape)
    return [0 if d == 1 and o != 1 else s for d, o, s in zip(dims, out_dims, _strides(dims))]


def _binary(kind: str) -> Callable[[Graph, Operator], Step]:
    def lower(g: Graph, op: Operator) -> Step:
        a, b, out = _int8_input(g, op, 0), _int8_input(g, op, 1), g.tensors[op.outputs[0]]
        try:
            shape = np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise _Refuse(f"shapes {a.shape} and {b.shape} do not broadcast") from None
        _need(tuple(shape) == out.shape, f"output {out.shape} is not the broadcast shape {tuple(shape)}")
        out_dims = _padded(out.shape)
        fields: dict[str, Any] = dict(out_dims=out_dims, in1_strides=_broadcast_strides(a.shape, out_dims),
                                      in2_strides=_broadcast_strides(b.shape, out_dims),
                                      input1_offset=-a.qzero, input2_offset=-b.qzero, output_offset=out.qzero)
        fields.update(_arith_multipliers(kind, a, b, out))
        fields["act_min"], fields["act_max"] = _activation(op.options, out)
        step = Step(op, f"el_{kind.lower()}(&{{P}}, {{T{a.index}}}, {{T{b.index}}}, {{T{out.index}}});",
                    "el_arith_params", fields)
        step.inplace = "elementwise"
        step.eligible = tuple(t.index for t in (a, b) if t.shape == out.shape and not t.is_const)
        return step
    return lower


def _arith_multipliers(kind: str, a: Tensor, b: Tensor, out: Tensor) -> dict[str, int]:
    f32 = np.float32
    if kind == "MUL":    # mul_common.cc
        m, s = q.quantize_multiplier(float(a.scale[0]) * float(b.scale[0]) / float(out.scale[0]))
        return dict(left_shift=0, output_multiplier=m, output_shift=s, input1_multiplier=0, input1_shift=0,
                    input2_multiplier=0, input2_shift=0)
    if kind == "ADD":    # add_common.cc: doubles
        twice = 2 * float(max(a.scale[0], b.scale[0]))
        reals = (float(a.scale[0]) / twice, float(b.scale[0]) / twice,
                 twice / ((1 << 20) * float(out.scale[0])))
    else:                # sub_common.cc: float32, then double
        twice32 = f32(2) * max(f32(a.scale[0]), f32(b.scale[0]))
        reals = (float(f32(a.scale[0]) / twice32), float(f32(b.scale[0]) / twice32),
                 float(twice32 / (f32(1 << 20) * f32(out.scale[0]))))
    (m1, s1), (m2, s2), (mo, so) = (q.quantize_multiplier(r) for r in reals)
    _need(max(s1, s2, so) <= 0, "a rescaling multiplier is not below one")
    return dict(left_shift=20, input1_multiplier=m1, input1_shift=s1, input2_multiplier=m2, input2_shift=s2,
                output_multiplier=mo, output_shift=so)


def _reshape(g: Graph, op: Operator) -> Step:
    x, out = _int8_input(g, op), g.tensors[op.outputs[0]]
    _need(x.size == out.size, f"input {x.shape} and output {out.shape} differ in size")
    step = Step(op, f"el_copy({out.size}, {{T{x.index}}}, {{T{out.index}}});")
    if not x.is_const:
        step.inplace, step.eligible, step.call_inplace = "alias", (x.index,), ""
    return step


def _softmax(g: Graph, op: Operator) -> Step:
    x, out = _int8_input(g, op), g.tensors[op.outputs[0]]
    _need(out.qzero == -128 and np.float32(out.qscale) == np.float32(1.0 / 256),
          f"int8 softmax needs output scale 1/256 and zero point -128 (has {out.qscale}, {out.qzero})")
    beta = float(np.float32(op.options.beta if op.options is not None else 1.0))
    real = min(beta * float(x.scale[0]) * (1 << (31 - 5)), (1 << 31) - 1.0)   # PreprocessSoftmaxScaling
    _need(real > 1.0, "input scale too small for TFLM's softmax rescaling")
    mult, shift = q.quantize_multiplier(real)
    depth = x.shape[-1] if x.shape else 1
    fields = dict(outer=x.size // depth, depth=depth, input_multiplier=mult, input_left_shift=shift,
                  diff_min=-q.input_radius(5, shift))
    return Step(op, f"el_softmax(&{{P}}, {{T{x.index}}}, {{T{out.index}}});", "el_softmax_params", fields)


def _mean(g: Graph, op: Operator) -> Step:
    x, out = _int8_input(g, op), g.tensors[op.outputs[0]]
    axis_t = _const(g, op, 1, "axis", "int32")
    rank = len(x.shape)
    axes = sorted({int(a) % rank for a in np.atleast_1d(axis_t.data)})
    kept = [k for k in range(rank) if k not in axes]
    strides = _strides(list(x.shape))
    num_out = int(np.prod([x.shape[k] for k in kept], dtype=np.int64))
    num_red = int(np.prod([x.shape[k] for k in axes], dtype=np.int64))
    _need(out.size == num_out, f"output {out.shape} does not hold the mean over axes {axes}")
    mult, shift = q.quantize_multiplier(float(x.scale[0]) / float(out.scale[0]))
    s = min(num_red.bit_length() - 1, 32, 31 + shift)                           # QuantizedMeanOrSum
    _need(s >= 0, "output rescaling out of TFLM's range")
    mult, shift = (mult << s) // num_red, shift - s
    pad = MAX_DIMS

    def pack(ks: list[int]) -> tuple[list[int], list[int]]:
        return [1] * (pad - len(ks)) + [x.shape[k] for k in ks], [0] * (pad - len(ks)) + [strides[k] for k in ks]

    (kd, ks), (rd, rs) = pack(kept), pack(axes)
    fields = dict(keep_dims=kd, keep_strides=ks, red_dims=rd, red_strides=rs, num_outputs=num_out,
                  num_reduced=num_red, input_zero_point=x.qzero, output_zero_point=out.qzero,
                  multiplier=mult, shift=shift)
    return Step(op, f"el_mean(&{{P}}, {{T{x.index}}}, {{T{out.index}}});", "el_mean_params", fields)


def _pad(g: Graph, op: Operator) -> Step:
    x, out = _int8_input(g, op), g.tensors[op.outputs[0]]
    pads_t = _const(g, op, 1, "paddings")
    pads = np.asarray(pads_t.data, dtype=np.int64).reshape(-1, 2)
    _need(len(pads) == len(x.shape), "paddings do not match the input rank")
    _need(bool(np.all(pads >= 0)), "negative paddings")
    _need(tuple(int(d + p0 + p1) for d, (p0, p1) in zip(x.shape, pads)) == out.shape, "output shape is not input + paddings")
    value = _const(g, op, 2, "constant value", "int8")
    pad_value = int(value.data.reshape(-1)[0]) if value is not None else out.qzero
    _need(x.qscale == out.qscale and x.qzero == out.qzero, "input and output quantization differ")
    fields = dict(out_dims=_padded(out.shape), in_dims=_padded(x.shape),
                  before=[0] * (MAX_DIMS - len(pads)) + [int(p) for p in pads[:, 0]],
                  in_strides=_padded(tuple(_strides(list(x.shape))), MAX_DIMS), pad_value=pad_value)
    return Step(op, f"el_pad(&{{P}}, {{T{x.index}}}, {{T{out.index}}});", "el_pad_params", fields)


def _transpose(g: Graph, op: Operator) -> Step:
    x, out = _int8_input(g, op), g.tensors[op.outputs[0]]
    perm = [int(p) for p in np.atleast_1d(_const(g, op, 1, "permutation").data)]
    _need(sorted(perm) == list(range(len(x.shape))), f"permutation {perm} is not one of rank {len(x.shape)}")
    _need(tuple(x.shape[p] for p in perm) == out.shape, "output shape is not the permuted input")
    strides = _strides(list(x.shape))
    fields = dict(out_dims=_padded(out.shape), in_strides=[0] * (MAX_DIMS - len(perm)) + [strides[p] for p in perm])
    return Step(op, f"el_transpose(&{{P}}, {{T{x.index}}}, {{T{out.index}}});", "el_transpose_params", fields)


def _slice_copy(g: Graph, op: Operator, x: Tensor, begins: list[int], steps: list[int], sizes: list[int]) -> Step:
    """A (strided) slice is a gather: output element i reads input at base + sum(i_k * step_k *
    stride_k), with el_transpose's index walk. TFLM's int8 SLICE/STRIDED_SLICE copy raw values."""
    out = g.tensors[op.outputs[0]]
    _need(out.dtype == "int8" and np.float32(out.qscale) == np.float32(x.qscale) and out.qzero == x.qzero,
          "the output is quantized differently from the input")
    _need(int(np.prod(sizes, dtype=np.int64)) == out.size and all(n >= 0 for n in sizes),
          f"the slice {sizes} does not give the output {out.shape}")
    strides = _strides(list(x.shape))
    base = sum(b * st for b, st in zip(begins, strides))
    fields = dict(out_dims=_padded(tuple(sizes)),
                  in_strides=[0] * (MAX_DIMS - len(sizes)) + [st * k for st, k in zip(strides, steps)])
    return Step(op, f"el_transpose(&{{P}}, {{T{x.index}}} + {base}, {{T{out.index}}});", "el_transpose_params", fields)


def _slice(g: Graph, op: Operator) -> Step:
    x = _int8_input(g, op)
    begin = [int(v) for v in np.atleast_1d(_const(g, op, 1, "begin").data)]
    size = [int(v) for v in np.atleast_1d(_const(g, op, 2, "size").data)]
    _need(len(begin) == len(size) == len(x.shape), "begin and size must have the input's rank")
    size = [d - b if n == -1 else n for b, n, d in zip(begin, size, x.shape)]
    _need(all(0 <= b and b + n <= d for b, n, d in zip(begin, size, x.shape)), "the slice leaves the input")
    return _slice_copy(g, op, x, begin, [1] * len(begin), size)


def _strided_slice(g: Graph, op: Operator) -> Step:
    """reference_ops::StridedSlice for positive strides, no ellipsis or new axes."""
    x = _int8_input(g, op)
    o = op.options
    _need(not int(o.ellipsisMask or 0) and not int(o.newAxisMask or 0), "ellipsis and new-axis masks are not supported")
    _need(not bool(getattr(o, "offset", False)), "offset strided slices are not supported")
    begin = [int(v) for v in np.atleast_1d(_const(g, op, 1, "begin").data)]
    end = [int(v) for v in np.atleast_1d(_const(g, op, 2, "end").data)]
    step = [int(v) for v in np.atleast_1d(_const(g, op, 3, "strides").data)]
    _need(len(begin) == len(end) == len(step) == len(x.shape), "begin, end and strides must have the input's rank")
    _need(all(k > 0 for k in step), "only positive strides are supported")
    bm, em, sm = int(o.beginMask or 0), int(o.endMask or 0), int(o.shrinkAxisMask or 0)
    starts, sizes = [], []
    for k, d in enumerate(x.shape):
        b = 0 if bm >> k & 1 else (begin[k] + d if begin[k] < 0 else begin[k])
        e = d if em >> k & 1 else (end[k] + d if end[k] < 0 else end[k])
        b, e = min(max(b, 0), d), min(max(e, 0), d)
        if sm >> k & 1:
            e = b + 1
        starts.append(b)
        sizes.append(max(0, -(-(e - b) // step[k])))
    return _slice_copy(g, op, x, starts, step, sizes)


def _concatenation(g: Graph, op: Operator) -> Step:
    out = g.tensors[op.outputs[0]]
    ins = _act_tensors(g, op)
    axis = int(op.options.axis) % len(out.shape)
    _need(int(op.options.fusedActivationFunction or 0) == 0, "a fused activation is not supported")
    for t in ins:
        _need(t.dtype == "int8", f"input '{t.name}' is {t.dtype}")
        _need(np.float32(t.qscale) == np.float32(out.qscale) and t.qzero == out.qzero,
              f"input '{t.name}' is quantized differently from the output (TFLM int8 concatenation does not rescale)")
        _need(len(t.shape) == len(out.shape), "inputs differ in rank")
    outer = int(np.prod(out.shape[:axis], dtype=np.int64))
    chunks = np.array([t.size // max(outer, 1) for t in ins], np.int32)
    _need(int(chunks.sum()) * outer == out.size, "inputs do not add up to the output")
    pointers = ", ".join(f"{{T{t.index}}}" for t in ins)
    call = (f"{{ const int8_t *const inputs[{len(ins)}] = {{{pointers}}};\n"
            f"    el_concatenation({outer}, {len(ins)}, inputs, {{A:chunks}}, {{T{out.index}}}); }}")
    return Step(op, call, arrays={"chunks": ("int32_t", chunks)})


def _relu(lo: float, hi: float | None) -> Callable[[Graph, Operator], Step]:
    """activations_common.cc CalculateReluOpData: the input/output rescale and the clamp."""
    def lower(g: Graph, op: Operator) -> Step:
        x, out = _int8_input(g, op), g.tensors[op.outputs[0]]
        _need(out.dtype == "int8", f"output is {out.dtype}")
        m, s = q.quantize_multiplier(float(x.scale[0]) / float(out.scale[0]))
        scale = np.float32(out.scale[0])
        def roundf(v: np.float32) -> int:     # C roundf: half away from zero
            return int(np.sign(v) * np.floor(np.abs(v) + np.float32(0.5)))
        act_min = max(-128, out.qzero + roundf(np.float32(lo) / scale))
        act_max = 127 if hi is None else min(127, out.qzero + roundf(np.float32(hi) / scale))
        fields = dict(size=x.size, input_offset=x.qzero, output_offset=out.qzero, multiplier=m, shift=s,
                      act_min=act_min, act_max=act_max)
        return _elementwise(Step(op, f"el_relu(&{{P}}, {{T{x.index}}}, {{T{out.index}}});", "el_relu_params", fields), x)
    return lower


def _max_min(kind: str) -> Callable[[Graph, Operator], Step]:
    inner = _binary("ADD")

    def lower(g: Graph, op: Operator) -> Step:
        a, b, out = _int8_input(g, op, 0), _int8_input(g, op, 1), g.tensors[op.outputs[0]]
        for t in (a, b):
            _need(np.float32(t.qscale) == np.float32(out.qscale) and t.qzero == out.qzero,
                  f"input '{t.name}' is quantized differently from the output (TFLM compares raw values)")
        step = inner(g, op)      # the broadcast shape and strides; the ADD multipliers go unused
        step.call = step.call.replace("el_add(", f"el_{kind}(")
        return step
    return lower


def _quantize(g: Graph, op: Operator) -> Step:
    x, out = _int8_input(g, op), g.tensors[op.outputs[0]]
    m, s = q.quantize_multiplier(float(x.scale[0]) / float(out.scale[0]))
    fields = dict(size=x.size, input_zero_point=x.qzero, output_zero_point=out.qzero, multiplier=m, shift=s)
    return _elementwise(Step(op, f"el_requantize(&{{P}}, {{T{x.index}}}, {{T{out.index}}});",
                             "el_requantize_params", fields), x)


def _elementwise(step: Step, x: Tensor) -> Step:
    if not x.is_const:
        step.inplace, step.eligible = "elementwise", (x.index,)
    return step


def _sigmoid(kind: str) -> Callable[[Graph, Operator], Step]:
    def lower(g: Graph, op: Operator) -> Step:
        x, out = _int8_input(g, op), g.tensors[op.outputs[0]]
        if kind == "logistic":
            _need(out.qzero == -128, "int8 logistic needs output zero point -128")
        mult, shift = q.frexp_multiplier(float(x.scale[0]) * float(1 << (31 - 4)))
        _need(0 <= shift and mult < (1 << 31), "input scale out of TFLM's range")
        fields = dict(size=x.size, input_zero_point=x.qzero, input_range_radius=q.input_radius(4, shift),
                      input_multiplier=mult, input_left_shift=shift)
        return _elementwise(Step(op, f"el_{kind}(&{{P}}, {{T{x.index}}}, {{T{out.index}}});",
                                 "el_sigmoid_params", fields), x)
    return lower


def _hard_swish(g: Graph, op: Operator) -> Step:
    x, out = _int8_input(g, op), g.tensors[op.outputs[0]]
    f32 = np.float32
    hires = f32(1.0 / 128.0) * f32(x.scale[0])                       # hard_swish_common.cc, float32
    om, oe = q.quantize_multiplier(float(hires / f32(out.scale[0])))
    rm, re_ = q.quantize_multiplier(float(hires / (f32(3.0) / f32(32768.0))))
    _need(oe <= 0, "output multiplier exponent above 0")
    fields = dict(size=x.size, input_zero_point=x.qzero, output_zero_point=out.qzero,
                  output_multiplier_exponent=oe, reluish_multiplier_exponent=re_,
                  output_multiplier_fixedpoint_int16=q.downscale_to_int16(om),
                  reluish_multiplier_fixedpoint_int16=q.downscale_to_int16(rm))
    return _elementwise(Step(op, f"el_hard_swish(&{{P}}, {{T{x.index}}}, {{T{out.index}}});",
                             "el_hard_swish_params", fields), x)


LOWERINGS: dict[str, Callable[[Graph, Operator], Step]] = {
    "FULLY_CONNECTED": _fully_connected,
    "CONV_2D": _conv2d,
    "DEPTHWISE_CONV_2D": _depthwise,
    "AVERAGE_POOL_2D": _pool("el_average_pool2d"),
    "MAX_POOL_2D": _pool("el_max_pool2d"),
    "ADD": _binary("ADD"),
    "SUB": _binary("SUB"),
    "MUL": _binary("MUL"),
    "RESHAPE": _reshape,
    "SQUEEZE": _reshape,
    "EXPAND_DIMS": _reshape,
    "SOFTMAX": _softmax,
    "MEAN": _mean,
    "PAD": _pad,
    "PADV2": _pad,
    "CONCATENATION": _concatenation,
    "TRANSPOSE": _transpose,
    "SLICE": _slice,
    "RELU": _relu(0.0, None),
    "MAXIMUM": _max_min("maximum"),
    "STRIDED_SLICE": _strided_slice,
    "QUANTIZE": _quantize,
    "LOGISTIC": _sigmoid("logistic"),
    "TANH": _sigmoid("tanh"),
    "HARD_SWISH": _hard_swish,
}


def lower(graph: Graph, op: Operator) -> Step:
    """The kernel call for ``op``. Raises UnsupportedByCompiler, one line naming the operator."""
    where = f"operator {op.index} ({op.kind}, output '{graph.out_name(op)}')"
    handler = LOWERINGS.get(op.kind)
    if handler is None:
        raise UnsupportedByCompiler(f"{where}: the compiler has no kernel for {op.kind}")
    try:
        return handler(graph, op)
    except _Refuse as e:
        raise UnsupportedByCompiler(f"{where}: {e}") from None
    except (AttributeError, TypeError, IndexError, ValueError) as e:
        raise UnsupportedByCompiler(f"{where}: malformed operator ({type(e).__name__}: {e})") from e
