"""``compile_tflite``: a fully int8 .tflite -> portable C99 that computes what TensorFlow Lite
Micro computes, bit for bit, with every activation in one statically planned arena."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from . import _codegen
from ._fold import fold_pads, fuse_conv_add
from ._graph import Graph, read_graph
from ._ops import Step, lower
from ._planner import plan

__all__ = ["CompiledModel", "compile_tflite", "lowered_steps"]

KERNEL_FILES = ("edgeloop_kernels.h", "edgeloop_kernels.c")


@dataclass(frozen=True)
class CompiledModel:
    """The generated sources (file name -> text) and what the plan measured."""

    prefix: str
    files: dict[str, str]
    arena_bytes: int                 # planned peak arena, with in-place execution
    arena_bytes_no_inplace: int      # the same plan with every tensor in its own buffer
    operators: tuple[str, ...]       # operator kinds in execution order
    inplace_operators: tuple[int, ...]
    folded_operators: tuple[int, ...]  # PADs folded into a convolution, CONV_2Ds computed inside an ADD
    const_bytes: int                 # weights, biases and constant tables (flash)
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int

    @property
    def input_size(self) -> int:
        return _size(self.input_shape)

    @property
    def output_size(self) -> int:
        return _size(self.output_shape)


def _size(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _kernel_sources() -> dict[str, str]:
    folder = resources.files(__package__).joinpath("c")
    return {name: folder.joinpath(name).read_text() for name in KERNEL_FILES}


def lowered_steps(graph: Graph) -> list[Step]:
    """Every operator lowered to its kernel call, then the rewrites: PADs folded into
    convolutions, convolutions computed inside the residual ADD they feed."""
    return fuse_conv_add(graph, fold_pads(graph, [lower(graph, op) for op in graph.operators]))


def compile_tflite(model: bytes, prefix: str = "edgeloop_model") -> CompiledModel:
    """Compile a fully int8 .tflite (one subgraph, one input, one output) to C.

    Raises :class:`~kernels.aot.errors.UnsupportedByCompiler` (one line) for corrupt bytes, a
    model that is not fully int8, or an operator or option without a bit-exact kernel."""
    if not prefix.isidentifier():
        raise ValueError(f"prefix {prefix!r} is not a C identifier")
    graph = read_graph(bytes(model))
    steps = lowered_steps(graph)
    flat = plan(graph, steps, inplace=False)
    planned = min(plan(graph, steps, inplace=True), flat, key=lambda p: p.arena_bytes)   # in place wins ties
    files = {"model.h": _codegen.header(prefix, graph, planned),
             "model.c": _codegen.source(prefix, graph, steps, planned), **_kernel_sources()}
    used = {t for s in steps for t in s.reads if graph.tensors[t].is_const}
    const_bytes = sum(graph.tensors[t].data.nbytes for t in used) + sum(
        arr.nbytes for s in steps for _, arr in s.arrays.values())
    x, y = graph.tensors[graph.input], graph.tensors[graph.output]
    return CompiledModel(prefix, files, planned.arena_bytes, flat.arena_bytes,
                         tuple(op.kind for op in graph.operators), tuple(sorted(planned.inplace_steps)),
                         tuple(s.op.index for s in steps if s.folded),
                         int(const_bytes), x.shape, y.shape, x.qscale, x.qzero, y.qscale, y.qzero)
