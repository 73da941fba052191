"""Offline memory plan: every activation tensor gets an offset in one static arena.

Tensors that run in place share a *buffer*: a RESHAPE-like output aliases its input; an
element-wise output (ADD/SUB/MUL over a same-shape input, LOGISTIC, TANH, HARD_SWISH,
QUANTIZE) takes over an input that no later operator reads; a depthwise convolution with
depth multiplier 1 overwrites its dying input channel by channel through a scratch buffer
of one channel. A buffer lives from the operator that first writes it to the last one that
reads it (the graph input from before the first operator, the graph output to the end).
Operators folded away by ``_fold`` get no buffer. Buffers are then placed greedily, each at
the lowest 16-byte-aligned offset that does not overlap a placed buffer alive at the same
time, in several orders (largest first, as TFLM's GreedyMemoryPlanner; execution order;
longest-lived first; size x lifetime): the smallest arena wins. A 1x1 convolution runs in
place pixel by pixel through a one-pixel scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._graph import Graph
from ._ops import Step

ALIGN = 16


@dataclass(frozen=True)
class Buffer:
    """One arena region: the tensors (or a scratch) that use it, and when it is alive."""

    members: tuple[int, ...]      # tensor indices; empty for a scratch buffer
    size: int
    first: int                    # operator index that first writes it (-1: the graph input)
    last: int                     # operator index that last reads it (len(ops): the graph output)
    offset: int


@dataclass(frozen=True)
class Plan:
    arena_bytes: int
    buffers: tuple[Buffer, ...]
    tensor_offset: dict[int, int]
    inplace_steps: frozenset[int]           # operator indices run with their in-place call
    scratch_offset: dict[int, int]          # operator index -> offset of its scratch buffer


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _last_reads(graph: Graph, steps: list[Step]) -> dict[int, int]:
    last: dict[int, int] = {}
    for i, step in enumerate(steps):
        for t in step.reads:
            last[t] = i
    last[graph.output] = len(steps)
    return last


def plan(graph: Graph, steps: list[Step], inplace: bool = True) -> Plan:
    """The arena layout for ``steps``; without ``inplace`` every tensor gets its own buffer."""
    last = _last_reads(graph, steps)
    group: dict[int, list[int]] = {graph.input: [graph.input]}     # buffer id -> tensor indices
    owner: dict[int, int] = {graph.input: graph.input}             # tensor -> buffer id
    first: dict[int, int] = {graph.input: -1}
    run_inplace: set[int] = set()
    scratch: list[tuple[int, int]] = []                            # (operator, bytes)

    def buffer_last(buf: int) -> int:
        return max(last.get(t, -1) for t in group[buf])

    for i, step in enumerate(steps):
        if step.folded:
            continue
        out = step.op.outputs[0]
        target = None
        if inplace and step.inplace != "none":
            target = next((owner[t] for t in step.eligible
                           if t in owner and buffer_last(owner[t]) == i and graph.output not in group[owner[t]]
                           and not any(w in group[owner[t]] for w in step.windowed)
                           or (step.inplace == "alias" and t in owner)), None)
        if target is None:
            owner[out], group[out], first[out] = out, [out], i
        else:
            owner[out] = target
            group[target].append(out)
            run_inplace.add(i)
            if step.scratch_bytes:
                scratch.append((i, step.scratch_bytes))
    sizes = {t.index: t.size for t in graph.tensors}
    wanted = [(tuple(ts), max(sizes[t] for t in ts), first[b], buffer_last(b)) for b, ts in group.items()]
    wanted += [((), n, i, i) for i, n in scratch]
    placed = min((_greedy(wanted, order) for order in _ORDERS), key=_peak)
    offsets = {t: b.offset for b in placed for t in b.members}
    scratch_at = {b.first: b.offset for b in placed if not b.members}
    arena = _peak(placed)
    return Plan(arena, tuple(placed), offsets, frozenset(run_inplace), scratch_at)


# placement orders tried; the smallest arena wins (greedy-by-size alone fragments some graphs)
_ORDERS = (lambda w: (-w[1], w[2]),                       # largest first (TFLM's GreedyMemoryPlanner)
           lambda w: (w[2], -w[1]),                       # in execution order
           lambda w: (-(w[3] - w[2]), -w[1]),             # longest-lived first
           lambda w: (-w[1] * (w[3] - w[2] + 1), w[2]))   # largest size x lifetime first


def _peak(placed: list[Buffer]) -> int:
    return max((b.offset + _align(b.size) for b in placed), default=0)


def _greedy(wanted: list[tuple[tuple[int, ...], int, int, int]], order=_ORDERS[0]) -> list[Buffer]:  # noqa: ANN001
    placed: list[Buffer] = []
    for members, size, lo, hi in sorted(wanted, key=order):
        live = sorted((b for b in placed if b.first <= hi and lo <= b.last), key=lambda b: b.offset)
        offset = 0
        for b in live:
            if offset + _align(size) <= b.offset:
                break
            offset = max(offset, b.offset + _align(b.size))
        placed.append(Buffer(members, size, lo, hi, offset))
    return placed
