"""The .tflite flatbuffer as plain data: tensors (shape, type, quantization, constant data),
operators (builtin name, option table) and the graph's input and output, read with the schema
bindings shipped in LiteRT. Refuses, in one line, bytes that are not a .tflite, more than one
subgraph, more than one input or output, and a model that is not fully int8."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .errors import UnsupportedByCompiler

_DTYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16",
           9: "int8", 17: "int4"}
_NP = {"float32": np.float32, "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "int64": np.int64,
       "int16": np.int16, "float16": np.float16, "bool": np.bool_}


@dataclass(frozen=True)
class Tensor:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: np.ndarray | None          # float32, one per tensor or one per channel
    zero_point: np.ndarray | None     # int64
    quantized_dimension: int
    data: np.ndarray | None           # constant contents, shaped, or None for activations

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def is_const(self) -> bool:
        return self.data is not None

    @property
    def qscale(self) -> float:
        return float(self.scale[0]) if self.scale is not None and len(self.scale) else 0.0

    @property
    def qzero(self) -> int:
        return int(self.zero_point[0]) if self.zero_point is not None and len(self.zero_point) else 0


@dataclass(frozen=True)
class Operator:
    index: int
    kind: str                         # builtin operator name, e.g. "CONV_2D"
    inputs: tuple[int, ...]           # tensor indices, -1 for an omitted optional input
    outputs: tuple[int, ...]
    options: Any                      # the schema's *OptionsT object, or None


@dataclass(frozen=True)
class Graph:
    tensors: tuple[Tensor, ...]
    operators: tuple[Operator, ...]
    input: int
    output: int

    def out_name(self, op: Operator) -> str:
        return self.tensors[op.outputs[0]].name if op.outputs else "?"


@lru_cache(maxsize=1)
def builtin_operator_names() -> dict[int, str]:
    """TFLite builtin operator code -> name, from the schema that ships with LiteRT."""
    from ai_edge_litert import schema_py_generated as tfl

    return {v: k for k, v in vars(tfl.BuiltinOperator).items() if not k.startswith("_")}


def _buffer_bytes(model: bytes, buffer: Any) -> bytes | None:
    if buffer is None:
        return None
    if buffer.offset and buffer.offset > 1:      # external buffer, data after the flatbuffer
        return model[buffer.offset:buffer.offset + buffer.size]
    if buffer.data is None or len(buffer.data) == 0:
        return None
    return np.asarray(buffer.data, dtype=np.uint8).tobytes()


def _tensor(model: bytes, flat: Any, index: int, t: Any) -> Tensor:
    dtype = _DTYPES.get(t.type, f"type{t.type}")
    shape = tuple(int(d) for d in (t.shape if t.shape is not None else ()))
    raw = _buffer_bytes(model, flat.buffers[t.buffer]) if t.buffer < len(flat.buffers) else None
    data = None
    if raw is not None and dtype in _NP:
        data = np.frombuffer(raw, dtype=np.dtype(_NP[dtype]).newbyteorder("<")).copy()
        data = data.reshape(shape) if data.size == int(np.prod(shape, dtype=np.int64)) else data
    q = t.quantization
    scale = np.asarray(q.scale, dtype=np.float32) if q is not None and q.scale is not None else None
    zero = np.asarray(q.zeroPoint, dtype=np.int64) if q is not None and q.zeroPoint is not None else None
    name = t.name.decode(errors="replace") if isinstance(t.name, bytes) else str(t.name)
    return Tensor(index, name, shape, dtype, scale, zero, int(q.quantizedDimension) if q else 0, data)


def _unpack(model: bytes) -> Any:
    from ai_edge_litert import schema_py_generated as tfl

    if len(model) < 8 or model[4:8] != b"TFL3":
        raise UnsupportedByCompiler(f"not a .tflite flatbuffer ({len(model)} bytes, no TFL3 identifier)")
    try:
        return tfl.ModelT.InitFromPackedBuf(bytearray(model), 0)
    except Exception as e:           # the bindings raise whatever a corrupt offset leads to
        raise UnsupportedByCompiler(f"corrupt .tflite flatbuffer ({len(model)} bytes): "
                                    f"{type(e).__name__}: {e}") from e


def read_graph(model: bytes) -> Graph:
    """The model's only subgraph as a :class:`Graph`. Raises UnsupportedByCompiler."""
    flat = _unpack(model)
    if not flat.subgraphs or len(flat.subgraphs) != 1:
        raise UnsupportedByCompiler(f"the model has {len(flat.subgraphs or [])} subgraphs; "
                                    "the compiler takes exactly one")
    sub = flat.subgraphs[0]
    names = builtin_operator_names()
    try:
        tensors = tuple(_tensor(model, flat, i, t) for i, t in enumerate(sub.tensors or []))
        ops = []
        for i, op in enumerate(sub.operators or []):
            code = flat.operatorCodes[op.opcodeIndex]
            builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
            kind = names.get(builtin, f"BUILTIN_{builtin}")
            if kind == "CUSTOM":
                kind = f"CUSTOM({code.customCode.decode(errors='replace') if code.customCode else '?'})"
            ops.append(Operator(i, kind, tuple(int(x) for x in (op.inputs if op.inputs is not None else ())),
                                tuple(int(x) for x in (op.outputs if op.outputs is not None else ())),
                                op.builtinOptions))
    except (IndexError, ValueError, TypeError) as e:
        raise UnsupportedByCompiler(f"corrupt .tflite flatbuffer: {type(e).__name__}: {e}") from e
    inputs = [int(x) for x in (sub.inputs if sub.inputs is not None else ())]
    outputs = [int(x) for x in (sub.outputs if sub.outputs is not None else ())]
    if len(inputs) != 1 or len(outputs) != 1:
        raise UnsupportedByCompiler(f"the model has {len(inputs)} inputs and {len(outputs)} outputs; "
                                    "the compiler takes one of each")
    graph = Graph(tensors, tuple(ops), inputs[0], outputs[0])
    _check_fully_int8(graph)
    return graph


def _check_fully_int8(graph: Graph) -> None:
    for role, index in (("input", graph.input), ("output", graph.output)):
        t = graph.tensors[index]
        if t.dtype != "int8":
            raise UnsupportedByCompiler(f"the model is not fully int8: its {role} '{t.name}' is {t.dtype} "
                                        "(quantize it with the full-int8 recipe)")
    for op in graph.operators:
        for index in op.outputs:
            t = graph.tensors[index]
            if t.dtype != "int8":
                raise UnsupportedByCompiler(
                    f"the model is not fully int8: operator {op.index} ({op.kind}) outputs "
                    f"'{t.name}' as {t.dtype}")
