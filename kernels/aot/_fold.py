"""Graph rewrites before planning.

:func:`fold_pads`: an explicit PAD feeding only a CONV_2D or DEPTHWISE_CONV_2D
becomes that convolution's implicit padding. Bit-exact: TFLM's PAD fills with the output
zero point, which is the convolution's input zero point, so every padded tap contributes
``w * (zp - zp) == 0``, exactly what the kernel's skipping of out-of-image taps contributes.
The padded tensor is never materialised, which removes the arena peak of input plus padded
copy alive together.

:func:`fuse_conv_add`: a CONV_2D whose only reader is a same-shape ADD runs inside the ADD
(``el_conv2d_add``): each convolution value is added to the other input's at once, so the
convolution's output is never stored and the sum may overwrite the dying other input. In a
residual block that is the difference between three activations alive and two (TinyEngine
calls this in-place residual). Bit-exact: the same per-element arithmetic, in the same order."""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from ._graph import Graph
from ._ops import Step

CONVOLUTIONS = ("CONV_2D", "DEPTHWISE_CONV_2D")


def _readers(steps: list[Step], tensor: int) -> list[int]:
    return [i for i, s in enumerate(steps) if tensor in s.reads]


def fold_pads(graph: Graph, steps: list[Step]) -> list[Step]:
    """``steps`` with every foldable PAD removed and its convolution reading the unpadded input."""
    out = list(steps)
    for i, pad in enumerate(steps):
        if pad.op.kind not in ("PAD", "PADV2") or pad.fields.get("pad_value") is None:
            continue
        padded, source = pad.op.outputs[0], pad.op.inputs[0]
        readers = _readers(out, padded)
        if padded == graph.output or len(readers) != 1:
            continue
        conv = out[readers[0]]
        before, dims = pad.fields["before"], pad.fields["in_dims"]
        x = graph.tensors[source]
        if conv.op.kind not in CONVOLUTIONS or conv.op.inputs[0] != padded or len(x.shape) != 4:
            continue
        after = [o - d - b for o, d, b in zip(pad.fields["out_dims"], dims, before)]
        if any(before[k] or after[k] for k in (0, 1, 2, 5)) or pad.fields["pad_value"] != graph.tensors[padded].qzero:
            continue
        out[readers[0]] = _reading_unpadded(conv, padded, source, x.shape, before[3], before[4])
        out[i] = dataclasses.replace(pad, call="", inplace="none", eligible=(),
                                     op=dataclasses.replace(pad.op, inputs=()), fields={}, struct_type=None,
                                     arrays={}, folded=True)
    return out


def _reading_unpadded(conv: Step, padded: int, source: int, shape: tuple[int, ...], top: int, left: int) -> Step:
    fields = dict(conv.fields, in_h=int(shape[1]), in_w=int(shape[2]),
                  pad_h=conv.fields["pad_h"] + int(top), pad_w=conv.fields["pad_w"] + int(left))
    swap = (lambda text: re.sub(rf"\{{T{padded}\}}", f"{{T{source}}}", text))
    step = dataclasses.replace(conv, fields=fields, call=swap(conv.call),
                               op=dataclasses.replace(conv.op, inputs=tuple(source if t == padded else t
                                                                            for t in conv.op.inputs)))
    if conv.inplace == "depthwise":
        fits = fields["out_h"] * fields["out_w"] <= fields["in_h"] * fields["in_w"]
        step.eligible = (source,) if fits else ()
        step.call_inplace = swap(conv.call_inplace or "") if fits else None
        step.scratch_bytes = int(np.int64(fields["in_h"]) * fields["in_w"]) if fits else 0
        step.inplace = "depthwise" if fits else "none"
    return step


def fuse_conv_add(graph: Graph, steps: list[Step]) -> list[Step]:
    """``steps`` with every fusable CONV_2D -> ADD pair run as one ``el_conv2d_add`` (module text)."""
    out = list(steps)
    for a_i, add in enumerate(steps):
        if add.op.kind != "ADD" or len(add.op.inputs) != 2 or add.folded:
            continue
        out_t = graph.tensors[add.op.outputs[0]]
        candidates = []
        for pos, t in enumerate(add.op.inputs):
            readers = _readers(out, t)
            producer = next((j for j, s in enumerate(out) if not s.folded and s.op.outputs and s.op.outputs[0] == t), None)
            if producer is None or readers != [a_i] or t == graph.output:
                continue
            conv = out[producer]
            other = add.op.inputs[1 - pos]
            o = graph.tensors[other]
            if conv.op.kind != "CONV_2D" or conv.fields.get("batches") != 1 or o.is_const \
                    or o.shape != out_t.shape or graph.tensors[t].shape != out_t.shape \
                    or other in conv.reads or conv.op.inputs[0] == other:
                continue
            candidates.append((producer, pos, conv, other))
        if not candidates:
            continue
        producer, pos, conv, other = max(candidates, key=lambda c: c[0])   # the latest-computed convolution
        x, w = conv.op.inputs[0], conv.op.inputs[1]
        bias = f"{{T{conv.op.inputs[2]}}}" if len(conv.op.inputs) > 2 and conv.op.inputs[2] >= 0 else "0"
        c = conv.op.index

        def call(dest: int) -> str:
            return (f"el_conv2d_add(&{{P{c}}}, {{T{x}}}, {{T{w}}}, {bias}, &{{P}}, {{T{other}}}, {{T{dest}}}, "
                    f"{1 if pos == 0 else 0});")
        inputs = (other, *[t for t in conv.op.inputs if t >= 0])
        out[a_i] = dataclasses.replace(add, op=dataclasses.replace(add.op, inputs=inputs), call=call(out_t.index),
                                       call_inplace=call(other), inplace="elementwise", eligible=(other,),
                                       windowed=(x,))
        out[producer] = dataclasses.replace(conv, call="", inplace="none", eligible=(), call_inplace=None,
                                            scratch_bytes=0, op=dataclasses.replace(conv.op, inputs=()),
                                            folded=True, folded_into=f"computed inside ADD {add.op.index}")
    return out
