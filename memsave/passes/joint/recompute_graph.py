"""The joint forward+backward graph as memsave's recompute planners see it.

A *plan* says which forward values the forward saves for the backward; every other forward
value the backward reads is recomputed in the backward from saved ones. This file knows the
graph side of that: which nodes are forward values, what each costs to recompute and to keep,
which may be recomputed at all, the closure that turns a saved set into a full plan, the
split into forward and backward GraphModules (PyTorch's own helper, so the boxed calling
convention, symbolic sizes and RNG handling are AOTAutograd's). The simulated peak of running
the two is memory accounting (memory/saved_activations.py); the choice of what to save lives in
recompute_plan.py.

    joint graph ──▶ JointGraph (values, costs, needs) ──▶ Plan (saved, recomputed)
                ──▶ split(plan) ──▶ fw, bw GraphModules ──▶ simulated_peak(fw, bw)

Note [Recompute cost]
    Recomputing a node costs max(flops, INTENSITY · bytes moved): a roofline with the ridge at
    INTENSITY flops per byte, so a pointwise op costs its memory traffic and a matmul its
    arithmetic. flops follow a rule table by op (matmul 2·M·N·K, attention 4·B·H·L·S·E, views
    0, everything else one per element of its largest tensor). INTENSITY = 10 is about a
    CPU's ratio of arithmetic to memory bandwidth (a GPU's is higher). Work that only the
    backward needs but that does not depend on the gradients (AOTAutograd leaves it
    "unclaimed", e.g. silu's sigmoid or a weight's transpose) runs once wherever the plan
    puts it, forward or backward, so it costs nothing extra.

Note [Random ops are saved]
    A random op (dropout's mask, rand) recomputed in the backward would draw new numbers, so
    its outputs are never recomputed: when the backward needs them they are saved. Gradients
    with dropout are then exactly those of saving everything. (Replaying the RNG state would
    save those bytes too; it is not done.)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from memsave.graph.meta import aliased_input, hint_int, is_getitem, iter_tensors, node_val, tensor_storage_bytes
from memsave.graph.storages import storage_root

aten = torch.ops.aten
INTENSITY = 10  # flops per byte at the roofline's ridge; see Note [Recompute cost]

MATMUL_OPS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.addbmm, aten.matmul, aten.linear,
              aten.convolution, aten._convolution}
ATTENTION_OPS = {
    getattr(aten, name)
    for name in (
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_attention_math",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    if hasattr(aten, name)
}


# -- flops rule table ---------------------------------------------------------------------


def _shape(value: Any) -> list[int]:
    return [hint_int(s) for s in value.shape] if isinstance(value, torch.Tensor) else []


def _arg_shape(node: fx.Node, index: int) -> list[int]:
    arg = node.args[index] if index < len(node.args) else None
    return _shape(node_val(arg)) if isinstance(arg, fx.Node) else []


def _mm_flops(node: fx.Node, a: int, b: int) -> int:
    sa, sb = _arg_shape(node, a), _arg_shape(node, b)
    if len(sa) < 2 or len(sb) < 2:
        return _default_flops(node)
    batch = math.prod(sa[:-2])
    return 2 * batch * sa[-2] * sa[-1] * sb[-1]


def _conv_flops(node: fx.Node) -> int:
    weight, out = _arg_shape(node, 1), _shape(node_val(node))
    if len(weight) < 2 or not out:
        return _default_flops(node)
    return 2 * math.prod(out) * math.prod(weight[1:])  # per output: C_in/groups · kernel MACs


def _attention_flops(node: fx.Node) -> int:
    q, k, v = _arg_shape(node, 0), _arg_shape(node, 1), _arg_shape(node, 2)
    if len(q) < 2 or len(k) < 2 or len(v) < 2:
        return _default_flops(node)
    return 2 * math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])  # QKᵀ and PV


def _default_flops(node: fx.Node) -> int:
    sizes = [t.numel() for t in iter_tensors(node_val(node))]
    for arg in node.all_input_nodes:
        sizes += [t.numel() for t in iter_tensors(node_val(arg))]
    return max((hint_int(s) for s in sizes), default=0)


FLOPS_RULES: dict[Any, Callable[[fx.Node], int]] = {
    aten.mm: lambda n: _mm_flops(n, 0, 1),
    aten.bmm: lambda n: _mm_flops(n, 0, 1),
    aten.matmul: lambda n: _mm_flops(n, 0, 1),
    aten.addmm: lambda n: _mm_flops(n, 1, 2),
    aten.baddbmm: lambda n: _mm_flops(n, 1, 2),
    aten.addbmm: lambda n: _mm_flops(n, 1, 2),
    aten.linear: lambda n: 2 * math.prod(_shape(node_val(n))) * (_arg_shape(n, 0) or [0])[-1],
    aten.convolution: _conv_flops,
    aten._convolution: _conv_flops,
    **{op: _attention_flops for op in ATTENTION_OPS},
}


def _packet(node: fx.Node) -> Any:
    return getattr(node.target, "overloadpacket", node.target)


def node_flops(node: fx.Node) -> int:
    """Estimated flops of one node (views and getitems: 0); see Note [Recompute cost]."""
    if node.op != "call_function" or is_getitem(node) or aliased_input(node) is not None:
        return 0
    return int(FLOPS_RULES.get(_packet(node), _default_flops)(node))


def node_cost(node: fx.Node) -> float:
    """Recompute cost: max(flops, INTENSITY · bytes read and written)."""
    if node.op != "call_function" or is_getitem(node) or aliased_input(node) is not None:
        return 0.0
    moved = sum(tensor_storage_bytes(t) for t in iter_tensors(node_val(node)))
    moved += sum(tensor_storage_bytes(t) for a in node.all_input_nodes for t in iter_tensors(node_val(a)))
    return float(max(node_flops(node), INTENSITY * moved))


# -- the joint graph ----------------------------------------------------------------------


@dataclass
class Value:
    """One forward-side node of the joint graph: something the backward may read."""

    node: fx.Node
    kind: str  # "input" (primal), "const" (get_attr), "sym" (SymInt), "opaque", "tuple", "tensor"
    category: str  # "matmul", "attention", "random", "view", "impure", "pointwise", "other"
    root: fx.Node | None  # the node owning its storage; None for inputs and non-tensors
    nbytes: int  # storage bytes when this value is its own root, else 0
    size: int  # bytes of the tensors it produces (views included)
    cost: float  # extra cost of recomputing it in the backward
    recomputable: bool
    inputs: list[fx.Node] = field(default_factory=list)  # forward-side nodes it reads
    needed: bool = False  # read directly by the backward
    position: int = 0


@dataclass(frozen=True)
class Plan:
    """What the forward saves and what the backward recomputes."""

    saved: frozenset  # fx.Nodes of the joint graph (inputs and symbolic sizes included)
    recomputed: frozenset
    saved_bytes: int  # activation bytes (unique storages; graph inputs are free)
    cost: float  # see Note [Recompute cost]
    source: str  # which solver or rule made it


class JointGraph:
    """Forward values of a joint graph, their costs, and what the backward reads."""

    def __init__(self, joint: fx.GraphModule, *, num_fwd_outputs: int, static_lifetime_input_indices=None):
        from torch._functorch import partitioners as P

        self.joint = joint
        self.num_fwd_outputs = num_fwd_outputs
        # Dead nodes would count as read by the backward (FX's DCE keeps random ops).
        if joint.graph.eliminate_dead_code():
            joint.recompile()
        # Tags AOTAutograd's partitioners honour: collectives, effectful ops and the sources of
        # backward mutations must be saved. The tags land in node.meta["recompute"].
        P.force_save_collectives(joint)
        P.force_save_effectful_ops(joint)
        P.force_save_bw_mutation_src(joint)
        self.info = P.classify_nodes(joint, list(static_lifetime_input_indices or []), num_fwd_outputs)
        _, bwd_outputs, _, _ = P._extract_fwd_bwd_outputs(joint, num_fwd_outputs=num_fwd_outputs)
        self.gradients = [n for n in bwd_outputs if isinstance(n, fx.Node)]  # the backward's outputs
        backward = set(self.info.required_bw_nodes)

        self.values: dict[fx.Node, Value] = {}
        for position, node in enumerate(joint.graph.nodes):
            if node.op == "output" or node in backward:
                continue
            if node.op == "placeholder" and not (P._is_primal(node) or P._is_fwd_seed_offset(node)):
                continue
            value = self._describe(node, position)
            value.inputs = [a for a in node.all_input_nodes if a in self.values]
            self.values[node] = value
        for node in list(bwd_outputs):
            if isinstance(node, fx.Node) and node in self.values:
                self.values[node].needed = True
        for node, value in self.values.items():
            if any(u in backward and u.op != "output" for u in node.users):  # outputs: bwd_outputs above
                value.needed = True
        self.forward_cost = sum(node_cost(n) for n in self.values if self.info.is_required_fw(n))
        # Every value the backward reads saved as it is: the starting point of the solvers.
        self.save_all = self.closure((), lambda v: False, source="save all")

    def _describe(self, node: fx.Node, position: int) -> Value:
        from torch._functorch import partitioners as P
        from torch.fx.experimental.proxy_tensor import is_sym_node
        from torch.utils.checkpoint import CheckpointPolicy

        val = node_val(node)
        if node.op == "placeholder":
            return Value(node, "input", "input", None, 0, 0, 0.0, False, position=position)
        if node.op == "get_attr":
            return Value(node, "const", "input", None, 0, 0, 0.0, False, position=position)
        if is_sym_node(node):
            return Value(node, "sym", "other", None, 0, 0, 0.0, False, position=position)
        if P.is_opaque_node(node):
            return Value(node, "opaque", "other", None, 0, 0, 0.0, False, position=position)
        kind = "tuple" if isinstance(val, (tuple, list)) else "tensor"
        category = self._category(node)
        root = storage_root(node)
        size = sum(tensor_storage_bytes(t) for t in iter_tensors(val))
        nbytes = size if root is node and kind == "tensor" else 0
        # Backward-only work AOTAutograd left unclaimed runs once wherever it is placed.
        cost = node_cost(node) if self.info.is_required_fw(node) else 0.0
        recomputable = category not in ("random", "impure") and node.meta.get("recompute") != CheckpointPolicy.MUST_SAVE
        return Value(node, kind, category, root, nbytes, size, cost, recomputable, position=position)

    def _category(self, node: fx.Node) -> str:
        from torch._functorch import partitioners as P

        if is_getitem(node):
            parent = self.values.get(node.args[0])
            return parent.category if parent is not None else "other"
        tags = getattr(node.target, "tags", ())
        if torch.Tag.nondeterministic_seeded in tags or torch.Tag.nondeterministic_bitwise in tags:
            return "random"
        if node.is_impure(impure_random=False) or P._must_be_in_forward(node) or P._must_be_in_backward(node):
            return "impure"
        if aliased_input(node) is not None:
            return "view"
        packet = _packet(node)
        if packet in MATMUL_OPS:
            return "matmul"
        if packet in ATTENTION_OPS:
            return "attention"
        if torch.Tag.pointwise in tags:
            return "pointwise"
        return "other"

    # -- plans -----------------------------------------------------------------------------

    def needed(self) -> list[fx.Node]:
        return [n for n, v in self.values.items() if v.needed]

    def bytes_of(self, saved: Iterable[fx.Node]) -> int:
        roots = {self.values[n].root for n in saved if n in self.values}
        return sum(self.values[r].nbytes for r in roots if r is not None and r in self.values)

    def closure(self, saved: Iterable[fx.Node], recompute: Callable[[Value], bool], *, source: str) -> Plan:
        """The plan that keeps `saved` and recomputes what else the backward reads.

        Walks back from what the backward reads: a value in `saved` (or a graph input, a
        symbolic size) is saved; one that `recompute` accepts is recomputed and its inputs are
        read in turn; any other is saved. Saved values the backward never reaches are dropped.
        """
        keep = set(saved)
        out_saved: set[fx.Node] = set()
        recomputed: set[fx.Node] = set()
        stack = self.needed()
        while stack:
            node = stack.pop()
            if node in out_saved or node in recomputed:
                continue
            value = self.values[node]
            if value.kind == "const":
                continue
            if node in keep or value.kind in ("input", "sym", "opaque"):
                out_saved.add(node)
            elif value.recomputable and (value.kind == "tuple" or recompute(value)):
                recomputed.add(node)
                stack.extend(value.inputs)
            elif value.kind == "tuple":
                raise AssertionError(f"recompute: {node.name} has several outputs and cannot be saved whole")
            else:
                out_saved.add(node)
        return self.make_plan(out_saved, recomputed, source)

    def make_plan(self, saved: set[fx.Node], recomputed: set[fx.Node], source: str) -> Plan:
        cost = sum(self.values[n].cost for n in recomputed)
        return Plan(frozenset(saved), frozenset(recomputed), self.bytes_of(saved), cost, source)

    def check(self, plan: Plan) -> None:
        """Every value the backward reads is saved, or recomputed from values that are."""
        for node in self.needed():
            if self.values[node].kind != "const" and node not in plan.saved and node not in plan.recomputed:
                raise AssertionError(f"recompute plan {plan.source}: backward reads {node.name}, neither saved nor recomputed")
        for node in plan.recomputed:
            value = self.values[node]
            if not value.recomputable:
                raise AssertionError(f"recompute plan {plan.source}: {node.name} ({value.category}) may not be recomputed")
            for arg in value.inputs:
                kind = self.values[arg].kind
                if kind != "const" and arg not in plan.saved and arg not in plan.recomputed:
                    raise AssertionError(f"recompute plan {plan.source}: recomputing {node.name} needs {arg.name}")

    # -- structure for the sqrt policy -----------------------------------------------------

    def forward_order(self) -> list[fx.Node]:
        return [n for n, v in self.values.items() if self.info.is_required_fw(n) and v.kind != "input"]

    def live_across(self, boundary: int) -> set[fx.Node]:
        """Forward values made before position `boundary` and read by forward nodes after it
        (for an op with several outputs: the elements read after it)."""
        live = set()
        for node in self.forward_order():
            value = self.values[node]
            if value.position >= boundary or value.kind in ("input", "const", "sym", "opaque"):
                continue
            later = [u for u in node.users if self.info.is_required_fw(u) and self.values[u].position >= boundary]
            if value.kind == "tuple":
                live |= set(later)  # getitems: save the elements, not the tuple
            elif later:
                live.add(node)
        return live

    def block_starts(self) -> list[int]:
        """Positions where each repeated block starts (e.g. `layers.3`), found from the module
        stack Dynamo records; without one, the forward's matmuls stand in for blocks."""
        order = self.forward_order()
        pattern = re.compile(r"^(.*?)\.(\d+)(?=\.|$)")
        by_prefix: dict[str, dict[int, int]] = {}
        for node in order:
            for path in _module_paths(node):
                m = pattern.match("." + path)  # "." so a top-level Sequential's "3.fc" matches too
                if m is not None:
                    starts = by_prefix.setdefault(m.group(1), {})
                    starts.setdefault(int(m.group(2)), self.values[node].position)
        best = max(by_prefix.values(), key=len, default={})
        if len(best) >= 2:
            return sorted(best.values())
        return [self.values[n].position for n in order if self.values[n].category in ("matmul", "attention")]


def _module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for entry in stack.values():
        path = str(entry[0] if isinstance(entry, tuple) else entry)
        path = re.sub(r"\[(\d+)\]", r".\1", path)  # layers[3] -> layers.3
        paths.append(re.sub(r"^L\['self'\]\.?|^L__self__\.?", "", path))
    return paths[::-1]  # deepest first: its first numbered component is the innermost block


# -- forward and backward modules ---------------------------------------------------------


def split(jg: JointGraph, plan: Plan) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Forward and backward GraphModules that save exactly `plan.saved`.

    AOTAutograd's own extraction builds them (saved tensors, then symbolic sizes, tangents;
    the backward copies every forward op it can compute from its inputs and drops the rest,
    which is the recomputation). The backward is then reordered as the autograd engine would
    run it, so recomputed values are made just before their first use. No CSE runs after
    this: it would merge the recomputed copies back into the forward's.
    """
    from torch._functorch import partitioners as P
    from torch.fx.experimental.proxy_tensor import is_sym_node

    saved = sorted(plan.saved, key=lambda n: jg.values[n].position)
    saved_sym = [n for n in saved if is_sym_node(n)]
    saved_opaque = [n for n in saved if P.is_opaque_node(n)]
    saved_values = [n for n in saved if n not in saved_sym and n not in saved_opaque]
    fw, bw = P._extract_fwd_bwd_modules(
        jg.joint,
        saved_values,
        saved_sym_nodes=saved_sym,
        saved_opaque_nodes=saved_opaque,
        num_fwd_outputs=jg.num_fwd_outputs,
        static_lifetime_input_nodes=jg.info.static_lifetime_input_nodes,
    )
    # The extraction keeps random ops it could run in the backward even when nothing reads
    # them (FX's DCE treats them as impure); they would only draw numbers and shift the RNG.
    bw.graph.eliminate_dead_code(is_impure_node=P.is_not_collective)
    bw.recompile()
    bw = P.reordering_to_mimic_autograd_engine(bw)
    fw, bw = P.raise_getitems(fw), P.raise_getitems(bw)
    fw = P.thread_graphsafe_rng_from_hops(fw, is_backward=False)
    bw = P.thread_graphsafe_rng_from_hops(bw, is_backward=True)
    return fw, bw


# -- what the two graphs cost ---------------------------------------------------------------


def recomputed_in_backward(fw: fx.GraphModule, bw: fx.GraphModule) -> tuple[list[str], int, int]:
    """Backward nodes that recompute a forward op (the partitioners keep forward node names):
    (names of the ops, how many views and getitems are re-made besides, estimated flops)."""
    forward_ops = {n.name for n in fw.graph.nodes if n.op == "call_function"}
    nodes = [n for n in bw.graph.nodes if n.op == "call_function" and n.name in forward_ops]
    ops = [n for n in nodes if not is_getitem(n) and aliased_input(n) is None]
    return [n.name for n in ops], len(nodes) - len(ops), sum(node_flops(n) for n in ops)


