"""Which linears of a Dynamo graph can be split across tensor-parallel ranks, and how.

Megatron's pairing: a column-parallel linear (its output features split across ranks: QKV,
MLP gate/up) feeds a row-parallel one (its input features split: attention output, MLP down)
through ops that treat each rank's slice on its own. Between them every value carries one
"sharded" dimension: the MLP's hidden features, or the attention heads once QKV is viewed as
(B, T, H, D). This module finds those regions on the torch-level graph Dynamo captures
(before AOTAutograd) by propagating a sharded dimension through the graph in order:

    linear(x_replicated, W)          → sharded on its last dim         (column-parallel producer)
    view / reshape / transpose / ... → the sharded dim moves with the data
    pointwise, softmax, matmul, sdpa → kept, if other operands agree or broadcast over it
    linear(x_sharded_on_last, W)     → replicated after an all-reduce  (row-parallel consumer)

Anything else that reads a sharded value (a residual add of a full-size replicated tensor, a
softmax or reduction over the sharded dim, a graph output, an op without a rule) is a conflict:
the producers that reached it are kept replicated and the propagation runs again, until none
is left (a fixed point; each round replicates at least one more linear). So an unknown pattern
is left as it was, never approximated. Sizes that do not divide by the number of ranks (heads,
features) are collected as problems: the caller raises them, naming the node.

Note [Contiguous blocks]: rank r holds block r of every sharded dimension. A view that splits
a sharded dim into (outer, inner) shards the outer one, and a merge keeps the outer one
sharded, so blocks stay blocks (features [rF/N, (r+1)F/N) are heads [rH/N, (r+1)H/N)). GQA's
expand+reshape of KV heads (Hkv, g) → H keeps key/value head h // g with query head h on the
same rank. Ops that would interleave blocks (repeat, tensor indexing, slicing the sharded dim)
have no rule and so are conflicts.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from memsave.graph.meta import call_arg


@dataclass(frozen=True)
class Sharded:
    dim: int  # the sharded dimension of this value (index into its full shape)
    sources: frozenset  # the producer linear nodes whose shards reach this value


class Conflict(Exception):
    pass


@dataclass
class ShardPlan:
    world: int
    producers: dict[fx.Node, fx.Node] = field(default_factory=dict)  # linear node -> weight placeholder
    consumers: dict[fx.Node, fx.Node] = field(default_factory=dict)
    states: dict[fx.Node, object] = field(default_factory=dict)  # node -> Sharded | tuple | None
    # (node, argument path, new size): shape arguments that must shrink to the shard's size.
    resizes: list[tuple[fx.Node, tuple, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # sizes not divisible by the world size
    conflicts: list[tuple[frozenset, str]] = field(default_factory=list)  # (producers that reach it, why)
    replicated: dict[fx.Node, str] = field(default_factory=dict)  # linear kept whole -> why

    def region(self) -> list[fx.Node]:
        return [n for n, s in self.states.items() if s is not None]


POINTWISE = {
    "add", "sub", "mul", "truediv", "div", "neg", "silu", "gelu", "relu", "sigmoid", "tanh", "exp",
    "rsqrt", "sqrt", "pow", "float", "half", "bfloat16", "to", "contiguous", "clone", "dropout",
    "masked_fill", "where", "abs", "sin", "cos", "erf", "reciprocal", "square", "type",
}
SOFTMAX = {"softmax", "log_softmax"}
VIEWS = {"view", "reshape"}
MATMULS = {"matmul", "bmm"}
REDUCTIONS = {"mean", "sum", "amax"}


def op_name(node: fx.Node) -> str | None:
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return None
    target = node.target
    if target is F.linear:
        return "linear"
    if target is F.scaled_dot_product_attention:
        return "sdpa"
    if target is operator.getitem:
        return "getitem"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None)
    # Only torch's own functions and Python's operators: a user function named "add" is unknown.
    if name and (module.startswith("torch") or module in ("_operator", "operator")):
        return name
    return None


def shape(node) -> tuple | None:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _known_eq(a, b) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b)) if not (isinstance(a, int) and isinstance(b, int)) else a == b


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def plan_sharding(gm: fx.GraphModule, world: int, shardable) -> ShardPlan:
    """The fixed point described above. `shardable(linear_node, weight_node) -> str | None`
    says why a linear must stay whole (a tied weight, excluded by the options), or None."""
    forced: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if op_name(node) == "linear":
            why = shardable(node, node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
            if why:
                forced[node] = why
    while True:
        plan = _propagate(gm, world, forced)
        if not plan.conflicts:
            plan.replicated = dict(forced)
            return plan
        for sources, why in plan.conflicts:
            for linear in sources:
                forced.setdefault(linear, why)


def _propagate(gm: fx.GraphModule, world: int, forced: dict[fx.Node, str]) -> ShardPlan:
    plan = ShardPlan(world)
    states = plan.states
    for node in gm.graph.nodes:
        inputs = [a for a in node.all_input_nodes if states.get(a) is not None]
        try:
            if op_name(node) == "linear" and node not in forced:
                states[node] = _linear(node, states, plan)
            elif not inputs:
                states[node] = None
            else:
                states[node] = _rule(node, states, plan)
        except Conflict as e:
            sources = frozenset().union(*(_sources(states[a]) for a in inputs))
            plan.conflicts.append((sources, f"{node.name}: {e}"))
            states[node] = None
    return plan


def _sources(state) -> frozenset:
    if isinstance(state, tuple):
        return frozenset().union(*(_sources(s) for s in state))
    return state.sources if isinstance(state, Sharded) else frozenset()


def _divides(size, what: str, node: fx.Node, plan: ShardPlan) -> None:
    if not isinstance(size, int) or size % plan.world:
        plan.problems.append(
            f"{what} of {node.name} is {size}, which does not divide by {plan.world} tensor-parallel ranks"
        )


def _linear(node: fx.Node, states, plan: ShardPlan):
    x, weight = node.args[0], node.args[1]
    bias = call_arg(node, 2, "bias")
    if any(states.get(a) is not None for a in (weight, bias) if isinstance(a, fx.Node)):
        raise Conflict("a sharded value is used as a weight")
    state = states.get(x)
    out = shape(node)
    if state is None:  # column-parallel: output features split
        _divides(out[-1], "the output features", node, plan)
        plan.producers[node] = weight
        return Sharded(len(out) - 1, frozenset([node]))
    if state.dim != len(shape(x)) - 1:
        raise Conflict("the input is sharded on a dimension other than the features")
    _divides(shape(x)[-1], "the input features", node, plan)
    plan.consumers[node] = weight
    return None  # row-parallel: complete after the all-reduce


def _rule(node: fx.Node, states, plan: ShardPlan):
    """The sharding of `node`'s result from its operands', by the rule table below; an op
    with no rule (or a rule that finds the operands incompatible) is a Conflict."""
    if node.op == "output":
        raise Conflict("a sharded value is a graph output")
    name = op_name(node)
    if name == "linear":  # kept whole
        raise Conflict("a linear kept whole reads a sharded value")
    rule = RULES.get(name)
    if rule is None:
        raise Conflict(f"no sharding rule for {name or node.target!r}")
    return rule(node, states, plan)


def _pointwise(node: fx.Node, states, plan: ShardPlan) -> Sharded:
    casts = op_name(node) in ("to", "type")  # their other arguments are dtypes, not operands
    operands = [node.args[0]] if casts else list(node.args) + list(node.kwargs.values())
    return _broadcast(node, operands, states)


def _softmax(node: fx.Node, states, plan: ShardPlan) -> Sharded:
    state = _broadcast(node, [node.args[0]], states)
    if _norm(call_arg(node, 1, "dim"), len(shape(node))) == state.dim:
        raise Conflict("softmax over the sharded dimension")
    return state


def _transpose(node: fx.Node, states, plan: ShardPlan) -> Sharded:
    state, nd = states[node.args[0]], len(shape(node))
    a, b = _norm(node.args[1], nd), _norm(node.args[2], nd)
    return Sharded({a: b, b: a}.get(state.dim, state.dim), state.sources)


def _permute(node: fx.Node, states, plan: ShardPlan) -> Sharded:
    state = states[node.args[0]]
    dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
    return Sharded([_norm(d, len(dims)) for d in dims].index(state.dim), state.sources)


def _unsqueeze(node: fx.Node, states, plan: ShardPlan) -> Sharded:
    state = states[node.args[0]]
    dim = _norm(call_arg(node, 1, "dim"), len(shape(node)))
    return Sharded(state.dim + (dim <= state.dim), state.sources)


def _split(node: fx.Node, states, plan: ShardPlan) -> tuple:
    state = states[node.args[0]]
    if not isinstance(state, Sharded) or _norm(call_arg(node, 2, "dim", 0), len(shape(node.args[0]))) == state.dim:
        raise Conflict("split along the sharded dimension")
    return tuple(state for _ in node.meta["example_value"])


def _broadcast(node: fx.Node, operands: list, states) -> Sharded:
    """Pointwise with broadcasting: sharded operands agree on the (right-aligned) dimension,
    replicated ones have size 1 there or lack it."""
    out_nd = len(shape(node))
    dim, sources = None, frozenset()
    for arg in operands:
        state = states.get(arg) if isinstance(arg, fx.Node) else None
        if isinstance(state, tuple):
            raise Conflict("a tuple of sharded values used as a tensor")
        if isinstance(state, Sharded):
            aligned = state.dim + out_nd - len(shape(arg))
            if dim is not None and aligned != dim:
                raise Conflict("operands sharded on different dimensions")
            dim, sources = aligned, sources | state.sources
    for arg in operands:
        arg_shape = shape(arg)
        if arg_shape is None or states.get(arg) is not None:
            continue
        at = dim - (out_nd - len(arg_shape))
        if at >= 0 and not _known_eq(arg_shape[at], 1):
            raise Conflict(f"{arg.name} is replicated at full size on the sharded dimension")
    return Sharded(dim, sources)


def _reduce(node: fx.Node, states) -> Sharded:
    state, nd = states[node.args[0]], len(shape(node.args[0]))
    dims = call_arg(node, 1, "dim")
    if dims is None:
        raise Conflict("a reduction over all dimensions")
    dims = [_norm(d, nd) for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
    if state.dim in dims:
        raise Conflict("a reduction over the sharded dimension")
    keepdim = call_arg(node, 2, "keepdim", False)
    return Sharded(state.dim - (0 if keepdim else sum(d < state.dim for d in dims)), state.sources)


def _shape_args(node: fx.Node) -> tuple[list, tuple]:
    """The size arguments of view/reshape/expand and the path prefix of where they sit."""
    if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        return list(node.args[1]), (1,)
    return list(node.args[1:]), ()


def _resize(node: fx.Node, j: int, full: int, plan: ShardPlan) -> None:
    sizes, prefix = _shape_args(node)
    size = sizes[j]
    if isinstance(size, int) and size == -1:
        return  # inferred: becomes the shard's size by itself
    if not (isinstance(size, int) and size == full):
        raise Conflict(f"the size argument for the sharded dimension is {size!r}, not the constant {full}")
    _divides(full, "a sharded size (e.g. the number of heads)", node, plan)
    path = prefix + (j,) if prefix else (1 + j,)
    plan.resizes.append((node, path, full // plan.world))


def _view(node: fx.Node, states, plan: ShardPlan) -> Sharded:
    state, s_in, s_out = states[node.args[0]], shape(node.args[0]), shape(node)
    size = s_in[state.dim]
    before = math.prod(s_in[: state.dim])
    for j in range(len(s_out)):
        if _known_eq(math.prod(s_out[:j]), before) and not _known_eq(s_out[j], 1):
            break
    else:
        raise Conflict("the view does not keep the sharded dimension whole")
    out_size = s_out[j]
    # (F) → (H, D): the outer factor H is sharded; (H, D) → (F): the merged dim is sharded.
    split = any(_known_eq(size, math.prod(s_out[j:k])) for k in range(j + 1, len(s_out) + 1))
    merge = any(_known_eq(out_size, math.prod(s_in[state.dim : m])) for m in range(state.dim + 1, len(s_in) + 1))
    if not (split or merge):
        raise Conflict("the view mixes the sharded dimension with others")
    _resize(node, j, out_size, plan)
    return Sharded(j, state.sources)


def _expand(node: fx.Node, states, plan: ShardPlan) -> Sharded:
    state, s_in, s_out = states[node.args[0]], shape(node.args[0]), shape(node)
    dim = state.dim + len(s_out) - len(s_in)
    if not _known_eq(s_out[dim], s_in[state.dim]):
        raise Conflict("expand along the sharded dimension")
    _resize(node, dim, s_out[dim], plan)
    return Sharded(dim, state.sources)


def _getitem(node: fx.Node, states):
    state, index = states[node.args[0]], node.args[1]
    if isinstance(state, tuple):
        return state[index]
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, fx.Node) for i in index):
        raise Conflict("tensor indexing of a sharded value")
    consuming = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded = []
    for i in index:
        expanded += [slice(None)] * (len(shape(node.args[0])) - consuming) if i is Ellipsis else [i]
    in_dim = out_dim = 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        if in_dim == state.dim:
            if not (isinstance(i, slice) and i == slice(None)):
                raise Conflict("indexing along the sharded dimension")
            return Sharded(out_dim, state.sources)
        in_dim += 1
        out_dim += isinstance(i, slice)
    return Sharded(out_dim + state.dim - in_dim, state.sources)  # trailing dims not indexed


def _cat(node: fx.Node, states) -> Sharded:
    tensors, nd = node.args[0], len(shape(node))
    dim = _norm(call_arg(node, 1, "dim", 0), nd)
    found = [states.get(t) for t in tensors]
    if not all(isinstance(s, Sharded) and s.dim == found[0].dim for s in found) or found[0].dim == dim:
        raise Conflict("cat of values not all sharded alike, or along the sharded dimension")
    return Sharded(found[0].dim, frozenset().union(*(s.sources for s in found)))


def _matmul(node: fx.Node, states) -> Sharded:
    """Batched matmul sharded on a batch dimension (attention heads): its batch dims broadcast
    like a pointwise op's (right-aligned, as the two matrix dims are last in every operand)."""
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    for arg in operands:
        state = states.get(arg)
        if isinstance(state, Sharded) and state.dim >= len(shape(arg)) - 2:
            raise Conflict("a matmul contracts or spans the sharded dimension")
    return _broadcast(node, operands, states)


def _sdpa(node: fx.Node, states) -> Sharded:
    q, k, v = (call_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    qkv = [states.get(t) for t in (q, k, v)]
    nd = len(shape(q))
    if not all(isinstance(s, Sharded) and s.dim == qkv[0].dim for s in qkv) or qkv[0].dim >= nd - 2:
        raise Conflict("attention whose query, key and value are not all sharded on the heads")
    mask = call_arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        _broadcast(node, [q, mask], states)
    return Sharded(qkv[0].dim, frozenset().union(*(s.sources for s in qkv)))


# op name -> rule(node, states, plan): the sharding of the result, or Conflict. An op not listed
# has no rule, so a sharded value reaching it is a conflict (left as it was, never approximated).
RULES = {
    **{name: _pointwise for name in POINTWISE},
    "type_as": lambda node, states, plan: _broadcast(node, [node.args[0]], states),
    **{name: _softmax for name in SOFTMAX},
    **{name: lambda node, states, plan: _reduce(node, states) for name in REDUCTIONS},
    **{name: _view for name in VIEWS},
    "transpose": _transpose,
    "swapaxes": _transpose,
    "permute": _permute,
    "unsqueeze": _unsqueeze,
    "expand": _expand,
    "getitem": lambda node, states, plan: _getitem(node, states),
    "chunk": _split,
    "split": _split,
    "cat": lambda node, states, plan: _cat(node, states),
    **{name: lambda node, states, plan: _matmul(node, states) for name in MATMULS},
    "sdpa": lambda node, states, plan: _sdpa(node, states),
}
