"""Liveness of a graph's buffers, the lower bound it implies, and a greedy-by-size arena plan.

A *buffer* is one storage a node allocates (views, getitems of views and in-place/out= ops
allocate none: their schema says the result aliases an argument). It is alive from the node
that makes it to the last node that reads it or any view of it; a graph output lives to the
end. In a backward graph the saved activations arrive as inputs and, with the boxed calling
convention, die at their last use too, so they are buffers alive from the start.

    lower bound = max over program points of the bytes of buffers alive there
    planned peak = size of an arena where each buffer gets a fixed offset and two buffers
                   alive at the same time never overlap (greedy by size, as ExecuTorch's
                   greedy planner and XLA's heap simulator place them)

The planned peak is >= the lower bound (the gap is fragmentation); a malloc-based runtime
that frees at last use peaks near the lower bound plus the ops' internal workspace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

import torch

from memsave.graph.meta import hint_int, iter_tensors, node_val, tensor_storage_bytes
from memsave.graph.storages import storages_by_node
from memsave.memory.estimate import is_weight_node

ALIGNMENT = 64  # bytes; CPU and CUDA allocators align at least this much


@dataclass
class Buffer:
    owner: str  # the node that allocates it (or the placeholder that brings it)
    nbytes: int
    start: int  # position of the node that makes it
    end: int  # position of its last use (the output node for graph outputs)
    offset: int = -1  # in the planned arena

    @property
    def aligned(self) -> int:
        return -(-self.nbytes // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class MemoryPlan:
    buffers: tuple[Buffer, ...]
    lower_bound_bytes: int  # most bytes alive at one program point
    lower_bound_node: str | None
    planned_peak_bytes: int  # arena size of the greedy-by-size placement


def buffers_by_node(gm: fx.GraphModule, *, inputs_die: bool) -> tuple[dict[fx.Node, list[Buffer]], list[Buffer]]:
    """Each node's buffers (a view maps to its base's), and the list of all buffers."""
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    buffers: list[Buffer] = []

    def allocate(node: fx.Node) -> list[Buffer]:
        val = node_val(node)
        if node.op == "placeholder":
            # Inputs the caller holds (weights, user inputs) cost the graph nothing; a backward's
            # saved activations are freed by the boxed call at their last use.
            counted = inputs_die and not is_weight_node(node)
            made = [Buffer(node.name, tensor_storage_bytes(t), 0, 0) for t in iter_tensors(val)] if counted else []
        elif node.op == "call_function":
            made = [Buffer(node.name, tensor_storage_bytes(t), position[node], position[node]) for t in iter_tensors(val)]
        else:  # constants (get_attr) belong to the module
            made = []
        buffers.extend(made)
        return made

    of = storages_by_node(nodes, allocate)
    # A buffer dies after the last node reading anything that refers to it; FX holds a
    # tuple-valued node until its last getitem, so its elements live at least that long.
    for node in nodes:
        last = max((position[u] for u in node.users), default=position[node])
        for buffer in of[node]:
            buffer.end = max(buffer.end, last)
    output = nodes[-1]
    for arg in output.all_input_nodes:
        for buffer in of.get(arg, []):
            buffer.end = position[output]
    return of, [b for b in buffers if b.nbytes > 0]


def plan_buffers(gm: fx.GraphModule, *, inputs_die: bool = False) -> MemoryPlan:
    _, buffers = buffers_by_node(gm, inputs_die=inputs_die)
    n = len(gm.graph.nodes)
    # Lower bound: a sweep over program points (+bytes at start, -bytes after end).
    delta = [0] * (n + 1)
    for b in buffers:
        delta[b.start] += b.nbytes
        delta[b.end + 1] -= b.nbytes
    live = peak = 0
    peak_at = None
    names = [node.name for node in gm.graph.nodes]
    for i in range(n):
        live += delta[i]
        if live > peak:
            peak, peak_at = live, names[i]
    arena = _greedy_by_size(buffers)
    return MemoryPlan(tuple(buffers), peak, peak_at, arena)


def _greedy_by_size(buffers: list[Buffer]) -> int:
    """Largest buffer first, each at the lowest offset free for its whole lifetime."""
    placed: list[Buffer] = []
    arena = 0
    for b in sorted(buffers, key=lambda b: (-b.aligned, b.start)):
        busy = sorted(
            ((o.offset, o.offset + o.aligned) for o in placed if o.start <= b.end and b.start <= o.end),
        )
        offset = 0
        for lo, hi in busy:
            if offset + b.aligned <= lo:
                break
            offset = max(offset, hi)
        b.offset = offset
        placed.append(b)
        arena = max(arena, offset + b.aligned)
    return arena


def is_dense(t: torch.Tensor) -> bool:
    """No two elements share memory and there are no gaps: contiguous in some order of its
    dimensions (so a copy that keeps its strides maps element i to element i)."""
    dims = sorted((hint_int(stride), hint_int(size)) for size, stride in zip(t.shape, t.stride()) if hint_int(size) != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True
