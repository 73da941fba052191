"""Graph passes over a converted .tflite, run before a tier checks and measures it.

:func:`fold_layout_transposes` removes the TRANSPOSE the converter inserts where a
channels-last tensor (LiteRT runs convolutions NHWC, or NLC for 1-D) is flattened for a
FULLY_CONNECTED in the PyTorch model's channels-first order::

    X (1,H,W,C) -> TRANSPOSE perm (0,3,1,2) -> (1,C,H,W) -> RESHAPE (1,C*H*W) -> FULLY_CONNECTED W

becomes ``X -> RESHAPE (1,H*W*C) -> FULLY_CONNECTED W'`` with the weight columns permuted into
the channels-last order (``W' = W.reshape(O,C,H,W).transpose(0,2,3,1).reshape(O,-1)``). The
FULLY_CONNECTED computes the same sums over the same products, so the result is bit-identical;
one operator and its output buffer are gone (RAM on an MCU). A TRANSPOSE whose output anything
else reads, whose quantization differs from its input's, or whose weights another tensor
shares, is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["fold_layout_transposes", "FoldResult"]

# channels-last -> channels-first permutations and how to permute the FC weight columns back
_PERMS = {(0, 3, 1, 2): "NHWC", (0, 2, 1): "NLC"}


@dataclass(frozen=True)
class FoldResult:
    model: bytes
    folded: int           # TRANSPOSE operators removed


def _opcode_names(model) -> list[str]:  # noqa: ANN001 - schema ModelT
    from edgeloop.kernels.aot._graph import builtin_operator_names

    names = builtin_operator_names()
    return [names.get(max(int(c.builtinCode), int(c.deprecatedBuiltinCode)), "?") for c in model.operatorCodes]


def _array(buffer, dtype, shape) -> np.ndarray:  # noqa: ANN001
    return np.frombuffer(bytes(bytearray(buffer.data)), dtype=dtype).reshape(shape)


def fold_layout_transposes(model_bytes: bytes) -> FoldResult:
    """Fold every TRANSPOSE -> RESHAPE -> FULLY_CONNECTED layout chain (module text). The model
    is returned unchanged (``folded == 0``) when there is none."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    codes = _opcode_names(model)
    folded = 0
    for graph in model.subgraphs:
        ops = list(graph.operators)
        consumers: dict[int, list[int]] = {}
        for i, op in enumerate(ops):
            for t in op.inputs if op.inputs is not None else []:
                consumers.setdefault(int(t), []).append(i)
        outputs = {int(t) for t in graph.outputs}
        drop: set[int] = set()
        for i, op in enumerate(ops):
            if codes[op.opcodeIndex] != "TRANSPOSE" or len(op.inputs) != 2:
                continue
            x, perm_t, y = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
            perm_buf = model.buffers[graph.tensors[perm_t].buffer]
            if perm_buf.data is None:
                continue
            perm = tuple(int(v) for v in _array(perm_buf, np.int32, (-1,)))
            if perm not in _PERMS or y in outputs or len(consumers.get(y, [])) != 1:
                continue
            r = consumers[y][0]
            reshape = ops[r]
            if codes[reshape.opcodeIndex] != "RESHAPE" or int(reshape.inputs[0]) != y:
                continue
            z = int(reshape.outputs[0])
            fcs = consumers.get(z, [])
            if not fcs or z in outputs or any(codes[ops[j].opcodeIndex] != "FULLY_CONNECTED" or
                                              int(ops[j].inputs[0]) != z for j in fcs):
                continue
            tx, ty = graph.tensors[x], graph.tensors[y]
            if not _same_quantization(tx, ty):
                continue
            shape = tuple(int(d) for d in tx.shape)       # channels-last (1, H, W, C) or (1, L, C)
            weights = [graph.tensors[int(ops[j].inputs[1])] for j in fcs]
            if any(_buffer_users(graph, w.buffer) != 1 or model.buffers[w.buffer].data is None for w in weights):
                continue
            for w in weights:
                _permute_columns(model.buffers[w.buffer], w, shape)
            reshape.inputs[0] = x
            drop.add(i)
            folded += 1
        graph.operators = [op for i, op in enumerate(ops) if i not in drop]
    if not folded:
        return FoldResult(model_bytes, 0)
    builder = flatbuffers.Builder(len(model_bytes) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return FoldResult(bytes(builder.Output()), folded)


def _same_quantization(a, b) -> bool:  # noqa: ANN001
    qa, qb = a.quantization, b.quantization
    if qa is None or qb is None:
        return qa is None and qb is None and a.type == b.type
    same = lambda u, v: (None if u is None else list(u)) == (None if v is None else list(v))  # noqa: E731
    return a.type == b.type and same(qa.scale, qb.scale) and same(qa.zeroPoint, qb.zeroPoint)


def _buffer_users(graph, buffer: int) -> int:  # noqa: ANN001
    return sum(1 for t in graph.tensors if t.buffer == buffer)


def _permute_columns(buffer, tensor, channels_last: tuple[int, ...]) -> None:  # noqa: ANN001
    """Reorder a FULLY_CONNECTED weight's input columns from channels-first to channels-last."""
    from ai_edge_litert import schema_py_generated as schema

    dtype = {schema.TensorType.INT8: np.int8, schema.TensorType.FLOAT32: np.float32,
             schema.TensorType.INT16: np.int16}[tensor.type]
    out_dim, in_dim = (int(d) for d in tensor.shape)
    w = _array(buffer, dtype, (out_dim, in_dim))
    spatial, c = channels_last[1:-1], channels_last[-1]
    first = w.reshape(out_dim, c, *spatial)                       # the columns as the model flattened them
    order = (0, *range(2, 2 + len(spatial)), 1)                   # -> (O, *spatial, C)
    buffer.data = np.ascontiguousarray(first.transpose(order)).reshape(-1).view(np.uint8).copy()
