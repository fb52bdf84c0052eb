"""Static memory estimate of an FX graph: weight bytes and the peak of live activation bytes.

The liveness walk mirrors how the graph runs as FX code (and, to a first order, how any
lowering that frees buffers after their last use runs it): nodes execute in graph order; a
node's new storage is allocated when it runs; a storage dies after the last node that uses
it or any view of it, unless a graph output aliases it. Views (schema `Tensor(a)` returns)
allocate nothing. Fusing compilers (Inductor) can do better than this estimate; the measured
tracker in `memory.track` tells by how much.

Weights (parameters, buffers, tensor constants) are counted separately: they are alive before
the call and after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from typing import Any, Callable

import torch.fx as fx

from memsave.graph.meta import iter_tensors, node_tensor_bytes, node_val, tensor_storage_bytes
from memsave.graph.storages import storages_by_node

WEIGHT_TAG = "memsave_weight"  # node.meta key set on placeholders that hold parameters/buffers

# Temporary bytes an op allocates and frees inside itself (beyond its outputs), by op (or by its
# name, "ns.op.overload", for ops registered only when another module is imported). Ops
# register here (e.g. memsave::linear_affine's reference materializes its weight); the walk
# adds them at the moment the op runs.
WORKSPACE: dict[Any, Callable[[fx.Node], int]] = {}


# prims.fma (Inductor's softmax backward: fma(-y, sum(g * y), g * y); registered when
# torch._inductor.inductor_prims is imported) runs eagerly as `a * b + c`: the product is a
# temporary of the output's size beside the output. Measured on the tests' small decoder: the
# training step's peak was this one attention-score tensor above the simulation. (Inductor
# fuses it into one kernel; there the estimate stays on the safe side.)
WORKSPACE["prims.fma.default"] = node_tensor_bytes


def workspace_bytes(node: fx.Node) -> int:
    """The temporary bytes `node`'s op allocates inside itself (WORKSPACE), 0 if none registered."""
    if node.op != "call_function":
        return 0
    fn = WORKSPACE.get(node.target) or WORKSPACE.get(str(node.target))
    return fn(node) if fn is not None else 0


@dataclass(frozen=True)
class MemoryEstimate:
    weight_bytes: int  # parameters, buffers and tensor constants the graph reads (unused ones: 0)
    input_bytes: int  # other graph inputs (activations passed in, saved tensors in a backward)
    peak_activation_bytes: int  # most bytes allocated by the graph and alive at one time
    peak_node: str | None  # the node running when the peak was reached
    output_bytes: int  # bytes of outputs the graph allocated (alive after the call)
    timeline: tuple[tuple[str, int], ...] = field(default=(), repr=False)  # (node, live bytes)


@dataclass
class _Storage:
    nbytes: int
    kind: str  # "activation" | "input" | "weight"
    owner: str
    last_use: int = -1
    is_output: bool = False


def is_weight_node(node: fx.Node) -> bool:
    return node.op == "get_attr" or bool(node.meta.get(WEIGHT_TAG))


def estimate_memory(gm: fx.GraphModule, consumed_outputs: Mapping[int, int] | None = None) -> MemoryEstimate:
    """`consumed_outputs`: positions in the graph's (flat) outputs of values that something in
    the graph consumes and frees right after their last use instead of returning them (the
    gradients memsave.optimizer_in_backward steps inside the backward: passes/joint/
    step_in_backward.py rewrites the graph so after this estimate), each with the temporary
    bytes the consumer allocates right after that last use (the optimizer step's:
    optim.in_backward.step_workspace_bytes)."""
    consumed_outputs = consumed_outputs or {}
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    weight_bytes = input_bytes = 0

    def allocate(node: fx.Node) -> list[_Storage]:
        nonlocal weight_bytes, input_bytes
        val = node_val(node)
        if node.op == "get_attr" and val is None:
            val = _get_attr(gm, node.target)
        if node.op == "call_function":
            return [_Storage(tensor_storage_bytes(t), "activation", node.name) for t in iter_tensors(val)]
        kind = "weight" if is_weight_node(node) else "input"
        sts = [_Storage(tensor_storage_bytes(t), kind, node.name) for t in iter_tensors(val)]
        nbytes = sum(s.nbytes for s in sts) if node.users else 0  # an input nothing reads costs nothing
        if kind == "weight":
            weight_bytes += nbytes
        else:
            input_bytes += nbytes
        return sts

    # Each node maps to the storages its value lives in (one per tensor it produces).
    storages_of = storages_by_node(nodes, allocate)

    # A storage dies after the last use of any node that refers to it. FX keeps a tuple-valued
    # node alive until its last getitem, so its elements live at least that long.
    output = next(n for n in reversed(nodes) if n.op == "output")
    returned = _flatten_nodes(output.args)
    consumed: dict[fx.Node, int] = {}  # consumed output -> the temporary bytes its consumer allocates
    for i, arg in enumerate(_output_slots(output.args)):
        if i in consumed_outputs and arg is not None:
            consumed[arg] = consumed.get(arg, 0) + consumed_outputs[i]
    consumer_workspace: dict[int, int] = {}  # position -> the consumers' temporaries right after it
    for node in nodes:
        # a consumed output dies after its last use other than being returned
        last = max((position[u] for u in node.users if not (u is output and node in consumed)), default=position[node])
        for st in storages_of[node]:
            st.last_use = max(st.last_use, last)
        if consumed.get(node):
            consumer_workspace[last] = consumer_workspace.get(last, 0) + consumed[node]
    for arg in returned:
        if arg in consumed:
            continue
        for st in storages_of.get(arg, []):
            st.is_output = True

    live = peak = 0
    peak_node = None
    timeline = []
    dying: dict[int, list[_Storage]] = {}
    seen: set[int] = set()
    for node in nodes:
        for st in storages_of[node]:
            if st.kind != "activation" or id(st) in seen:
                continue
            seen.add(id(st))
            live += st.nbytes
            if not st.is_output:
                dying.setdefault(st.last_use, []).append(st)
        workspace = workspace_bytes(node) + consumer_workspace.get(position[node], 0)
        if live + workspace > peak:
            peak, peak_node = live + workspace, node.name
        timeline.append((node.name, live + workspace))
        for st in dying.pop(position[node], []):
            live -= st.nbytes
    output_bytes = sum(
        st.nbytes for st in {id(s): s for sts in storages_of.values() for s in sts}.values()
        if st.is_output and st.kind == "activation"
    )
    return MemoryEstimate(weight_bytes, input_bytes, peak, peak_node, output_bytes, tuple(timeline))


def _output_slots(args) -> list[fx.Node | None]:
    """The graph's flat outputs in order, None where an output is not a node (a None gradient)."""
    flat = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    return [a if isinstance(a, fx.Node) else None for a in flat]


def _flatten_nodes(args) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, lambda n: out.append(n))
    return out


def weight_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the weights a graph reads (cheaper than a full estimate)."""
    total = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr") and is_weight_node(node) and node.users:
            val = node_val(node)
            if node.op == "get_attr" and val is None:
                val = _get_attr(gm, node.target)
            total += sum(tensor_storage_bytes(t) for t in iter_tensors(val))
    return total


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
