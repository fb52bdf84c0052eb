"""Head groups: attention heads that can be removed as a whole, found in the ATen graph.

Structured pruning of attention removes heads: the rows of Q, K and V that compute a head, and
the matching input columns of the output projection. That is exact — the same function as
zeroing those o_proj columns — only if every op between the projections and o_proj treats each
head on its own. In the ATen graph of a Llama attention block (decomposed softmax, GQA):

    q = mm(x, t(Wq)) → view (B,T,H,D) → permute (B,H,T,D) → RoPE (mul/split/neg/cat/add)
    k = mm(x, t(Wk)) → view (B,T,KV,D) → permute → RoPE → unsqueeze/expand/clone/view (B,H,T,D)
    scores = view(q) (B·H,T,D) bmm view(kᵀ) → view (B,H,T,T) → mul, where(mask) → amax/sub/exp/sum/div
    out = bmm(probs, v) → view (B,H,T,D) → permute → view (B,T,H·D) → mm(·, t(Wo))

(or one `_scaled_dot_product_flash_attention_for_cpu(q, k, v)` instead of the bmm/softmax part).

Note [Head axis]
Each tensor between the projections and o_proj carries the heads in one dimension, possibly
merged with other factors: (B·H, T, D) merges the batch before them, (B, T, H·D) the head size
after them. `HeadAxis(dim, pre, post)` says: size[dim] = pre · U · post, unit u occupies
indices [a·U·post + u·post, … + post) for every a < pre. A row-major reshape keeps the units in
one dimension iff the period P = post · (product of the sizes after `dim`) is unchanged, which
is how views are followed (`_reshape_axis`). Pointwise ops must see the other operands either
broadcast over the axis (RoPE tables, masks, scalars) or carry it the same way; reductions and
softmax must not reduce over it; bmm must batch over it; SDPA must find it in dim 1 of q, k, v.

Note [Units under grouped-query attention]
A unit is one key/value head with the query heads that share it (U = KV; with MHA, KV = H and a
unit is one head). Removing a kv head is exact only together with all the query heads that read
it, and removing only query heads would change the repeat (expand) factor from H/KV to a smaller
one, which we would have to rewrite as well. Whole KV groups keep the model a valid GQA model
with the same grouping, shrink K and V (and so any KV cache) too, and need no rewrite beyond the
head count. The price is granularity: with KV = 2, pruning removes 0, 1 kv group (half the
heads) — `sparsity` is a fraction of the KV groups, rounded down. U is found, not assumed: each
projection's own head count A is read off its reshape into (…, A, D), and U = gcd of the A's
of the projections the group reaches.

The group is grown in graph order from one projection; an operand that carries the heads but
is not yet in the group (K and V reached from Q at the bmm) sends the search back to the
projections behind it, and it restarts with them. Anything else — a reshape that splits a head,
a reduction over heads, an op not in the table below, a graph output, a fused QKV split along
the heads (GPT-2's c_attn) — makes the group unprunable, and the reason names the node.
"""

from __future__ import annotations

import heapq
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from memsave.graph.channels import CHANNELWISE_EXTRA, VIEWS, _linear_at
from memsave.graph.linears import LinearUse
from memsave.graph.meta import hint_int, node_val

aten = torch.ops.aten
SDPA_OPS = {  # op -> (argument position, name) of its additive mask, if it has one
    aten._scaled_dot_product_flash_attention_for_cpu.default: (None, "attn_mask"),
    aten._scaled_dot_product_flash_attention.default: (None, None),
    aten._scaled_dot_product_efficient_attention.default: (3, "attn_bias"),
    aten.scaled_dot_product_attention.default: (3, "attn_mask"),
}
REDUCTIONS = (aten.amax.default, aten.amin.default, aten.sum.dim_IntList, aten.mean.dim)
SOFTMAX = (aten._softmax.default, aten._log_softmax.default)
SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)


@dataclass(frozen=True)
class HeadAxis:
    dim: int  # which dimension carries the units
    pre: int  # factor merged before them (e.g. the batch in (B·H, T, D)); see Note [Head axis]
    post: int  # factor merged after them (e.g. D in (B, T, H·D), or the query heads per kv head)


@dataclass
class HeadGroup:
    units: int  # U: kv heads (= heads without GQA); see Note [Units under grouped-query attention]
    heads: dict[fx.Node, int]  # producer matmul -> its own head count A
    producers: list[LinearUse] = field(default_factory=list)  # unit u = rows [u·post, (u+1)·post)
    consumers: list[LinearUse] = field(default_factory=list)  # unit u = columns [u·post, (u+1)·post)
    axes: dict[fx.Node, object] = field(default_factory=dict)  # node -> HeadAxis (tuple for multi-output)
    region: list[fx.Node] = field(default_factory=list)  # nodes carrying heads, graph order, producers excluded

    def post(self, use: LinearUse) -> int:
        """Rows (producer) or columns (consumer) per unit."""
        return self.axes[use.matmul].post if use.matmul in self.axes else self.axes[use.x].post


class _Refused(Exception):
    pass


class _Missing(Exception):
    """An operand carries the heads but is not in the group yet."""

    def __init__(self, node: fx.Node, read_by: fx.Node):
        self.node, self.read_by = node, read_by


def _shape(node) -> list[int] | None:
    val = node_val(node) if isinstance(node, fx.Node) else None
    return [hint_int(s) for s in val.shape] if isinstance(val, torch.Tensor) else None


def head_count(producer: LinearUse) -> int | None:
    """A in the producer's reshape (N, C) → … → (…, A, C / A), following views only."""
    node, channels = producer.matmul, _shape(producer.matmul)[-1]
    while len(node.users) == 1:
        (node,) = node.users
        shape = _shape(node)
        if node.target not in VIEWS or shape is None:
            return None
        if shape[-1] != channels:
            if len(shape) >= 2 and shape[-1] * shape[-2] == channels and shape[-2] > 1:
                return shape[-2]
            return None
    return None


def find_head_group(start: LinearUse, is_weight) -> tuple[HeadGroup | None, str]:
    """The head group grown from projection `start`, or (None, why not)."""
    a = head_count(start)
    if a is None:
        return None, f"{start.matmul.name}'s output is not reshaped into heads (…, H, D)"
    heads = {start.matmul: a}
    producers = {start.matmul: start}
    for _ in range(8):  # each round adds at least one projection; q, k, v need at most 3
        units = math.gcd(*heads.values())
        try:
            return _grow(producers, heads, units, is_weight), ""
        except _Refused as e:
            return None, str(e)
        except _Missing as m:
            found = _projections_behind(m.node, is_weight, set(producers))
            if not found:
                return None, f"{m.read_by.name} combines the heads with {m.node.name}, which no prunable projection computes"
            for use in found:
                count = head_count(use)
                if count is None:
                    return None, (f"{m.read_by.name} combines the heads with {use.matmul.name}, whose output is "
                                  "not reshaped into heads")
                heads[use.matmul], producers[use.matmul] = count, use
    return None, "too many projections meet in one attention block"


def _projections_behind(node: fx.Node, is_weight, known: set) -> list[LinearUse]:
    """The nearest linear matmuls on every path into `node` (not crossing a linear)."""
    found, seen, work = {}, set(), [node]
    while work:
        n = work.pop()
        if n in seen:
            continue
        seen.add(n)
        use = _linear_at(n, is_weight)
        if use is not None:
            if n not in known:
                found[n] = use
            continue
        work.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(found.values(), key=lambda u: order[u.matmul])


def _grow(producers: dict, heads: dict, units: int, is_weight) -> HeadGroup:
    if units < 2:
        raise _Refused(f"the projections' head counts {sorted(set(heads.values()))} leave fewer than 2 removable units")
    graph = next(iter(producers)).graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    group = HeadGroup(units, dict(heads))
    work = [(order[n], n) for n in producers]
    heapq.heapify(work)
    consumers, queued = {}, set(producers)
    while work:  # graph order: every input of a node is settled before the node
        _, node = heapq.heappop(work)
        if node in producers:
            if producers[node].x in group.axes:  # it would need its columns cut too
                raise _Refused(f"{node.name} both reads and computes heads")
            channels = _shape(node)[-1]
            if channels % units:
                raise _Refused(f"{node.name} has {channels} channels, not a multiple of {units} units")
            group.axes[node] = HeadAxis(1, 1, channels // units)
        else:
            group.axes[node] = _transfer(node, group.axes, units)
            group.region.append(node)
        for user in node.users:
            if user.op == "output":
                raise _Refused(f"{node.name} is a graph output")
            linear = _linear_at(user, is_weight)
            if linear is not None and linear.x is node and user not in producers:
                axis = group.axes[node]
                if not (isinstance(axis, HeadAxis) and axis.dim == 1 and axis.pre == 1):
                    raise _Refused(f"{user.name} reads the heads mixed with other rows")
                consumers[user] = linear
                group.axes[user] = axis  # consumer input: columns per unit = axis.post
                continue
            if user not in queued:
                queued.add(user)
                heapq.heappush(work, (order[user], user))
    if not consumers:
        raise _Refused("no linear consumes the heads")
    group.producers = sorted(producers.values(), key=lambda u: order[u.matmul])
    group.consumers = sorted(consumers.values(), key=lambda u: order[u.matmul])
    if any(p.matmul in consumers for p in group.producers):
        raise _Refused("a linear both produces and consumes the heads")
    return group


# -- transfer rules: the axis of a node's output from its inputs' -----------------------------


def _in(axes, arg):
    return axes.get(arg) if isinstance(arg, fx.Node) else None


def _norm(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


def _transfer(node: fx.Node, axes: dict, units: int):
    if node.op != "call_function":
        raise _Refused(f"{node.name} ({node.op}) reads the heads")
    target = node.target
    if target is operator.getitem:
        parts = axes[node.args[0]]
        axis = parts[node.args[1]] if isinstance(parts, tuple) else None
        if axis is None:
            raise _Refused(f"{node.name} reads an output of {node.args[0].name} that does not keep the heads apart")
        return axis
    first = _in(axes, node.args[0]) if node.args else None
    if target in VIEWS:
        if first is None or any(a in axes for a in node.args[1] if isinstance(a, fx.Node)):
            raise _Refused(f"{node.name} uses a head-carrying tensor as a shape")
        return _reshape_axis(node, first, units)
    if target in CHANNELWISE_EXTRA or target in (aten.alias.default, aten.detach.default):
        return _only_input(node, first, axes)
    if target == aten.permute.default:
        dims = [_norm(d, len(node.args[1])) for d in node.args[1]]
        return HeadAxis(dims.index(_only_input(node, first, axes).dim), first.pre, first.post)
    if target == aten.transpose.int:
        axis, rank = _only_input(node, first, axes), len(_shape(node))
        a, b = _norm(node.args[1], rank), _norm(node.args[2], rank)
        dim = {a: b, b: a}.get(axis.dim, axis.dim)
        return HeadAxis(dim, axis.pre, axis.post)
    if target == aten.unsqueeze.default:
        axis, rank = _only_input(node, first, axes), len(_shape(node))
        return HeadAxis(axis.dim + (_norm(node.args[1], rank) <= axis.dim), axis.pre, axis.post)
    if target == aten.expand.default:
        axis = _only_input(node, first, axes)
        return HeadAxis(axis.dim + len(_shape(node)) - len(_shape(node.args[0])), axis.pre, axis.post)
    if target == aten.slice.Tensor or target in SPLITS:
        axis = _only_input(node, first, axes)
        position = 1 if target == aten.slice.Tensor else 2  # slice(x, dim, …), split(x, sizes, dim)
        dim = node.args[position] if len(node.args) > position else node.kwargs.get("dim", 0)
        if _norm(dim, len(_shape(node.args[0]))) == axis.dim:
            # e.g. GPT-2's fused c_attn output split into q, k, v (not reached today: its
            # Conv1D is not a linear to memsave), or a slice of some heads.
            raise _Refused(f"{node.name} slices along the heads dimension")
        return axis if target == aten.slice.Tensor else tuple(axis for _ in node_val(node))
    if target == aten.cat.default:
        return _cat(node, axes)
    if target in SOFTMAX or target in REDUCTIONS:
        return _reduction(node, _only_input(node, first, axes))
    if target == aten.bmm.default:
        return _bmm(node, axes)
    if target in SDPA_OPS:
        return _sdpa(node, axes)
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return _pointwise(node, axes)
    raise _Refused(f"{node.name} ({target}) mixes heads")


def _only_input(node: fx.Node, first, axes) -> HeadAxis:
    others = [a for a in node.all_input_nodes[1:] if a in axes]
    if not isinstance(first, HeadAxis) or others:
        raise _Refused(f"{node.name} ({node.target}) combines heads in a way memsave does not follow")
    return first


def _reshape_axis(node: fx.Node, axis: HeadAxis, units: int) -> HeadAxis:
    """Note [Head axis]: the output dim whose period matches the input's."""
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    period = axis.post * math.prod(in_shape[axis.dim + 1:])
    for e, size in enumerate(out_shape):
        inner = math.prod(out_shape[e + 1:])
        if period % inner == 0 and (size * inner) % (units * period) == 0:
            return HeadAxis(e, size * inner // (units * period), period // inner)
    raise _Refused(f"{node.name} reshapes {in_shape} to {out_shape}, which splits a head across dimensions")


def _cat(node: fx.Node, axes) -> HeadAxis:
    tensors = node.args[0]
    found = {axes.get(t) for t in tensors}
    if None in found or len(found) != 1:
        raise _Refused(f"{node.name} concatenates head-carrying tensors with others")
    (axis,) = found
    dim = node.args[1] if len(node.args) > 1 else 0
    if _norm(dim, len(_shape(node))) == axis.dim:
        raise _Refused(f"{node.name} concatenates along the heads dimension")
    return axis


def _reduction(node: fx.Node, axis: HeadAxis) -> HeadAxis:
    rank = len(_shape(node.args[0]))
    if node.target in SOFTMAX:
        dims, keep = [node.args[1]], True
    else:
        dims = node.args[1] if len(node.args) > 1 and node.args[1] is not None else list(range(rank))
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dims = {_norm(d, rank) for d in dims} or set(range(rank))  # amax(x, []) reduces over all
    if axis.dim in dims:
        raise _Refused(f"{node.name} ({node.target}) reduces over the heads")
    shift = 0 if keep else sum(d < axis.dim for d in dims)
    return HeadAxis(axis.dim - shift, axis.pre, axis.post)


def _bmm(node: fx.Node, axes) -> HeadAxis:
    a, b = node.args[0], node.args[1]
    for x, y in ((a, b), (b, a)):
        if x in axes and y not in axes:
            raise _Missing(y, node)
    if axes[a] != axes[b] or axes[a].dim != 0:
        raise _Refused(f"{node.name} multiplies along the heads instead of batching over them")
    return axes[a]


def _sdpa(node: fx.Node, axes) -> tuple:
    q, k, v = node.args[:3]
    for x in (q, k, v):
        if x not in axes:
            raise _Missing(x, node)
    if axes[q] != axes[k] or axes[q] != axes[v] or axes[q].dim != 1:
        raise _Refused(f"{node.name} does not find the heads in dimension 1 of q, k and v alike")
    if node.kwargs.get("enable_gqa"):
        raise _Refused(f"{node.name} uses enable_gqa, which memsave does not follow")
    position, name = SDPA_OPS[node.target]
    mask = node.kwargs.get(name) if name else None
    if mask is None and position is not None and len(node.args) > position:
        mask = node.args[position]
    if isinstance(mask, fx.Node):
        shape = _shape(mask)
        offset = 4 - len(shape)
        if mask in axes or (offset <= 1 and shape[1 - offset] != 1):
            raise _Refused(f"{node.name}'s mask {mask.name} differs per head")
    return (axes[q],) + (None,) * (len(node_val(node)) - 1)


def _pointwise(node: fx.Node, axes) -> HeadAxis:
    rank = len(_shape(node))
    found: set[tuple] = set()
    for arg in node.all_input_nodes:
        shape = _shape(arg)
        if arg in axes:
            axis = axes[arg]
            found.add((axis.dim + rank - len(shape), axis.pre, axis.post))
    if len(found) != 1:
        raise _Refused(f"{node.name} combines tensors that carry the heads differently")
    ((dim, pre, post),) = found
    for arg in node.all_input_nodes:
        shape = _shape(arg)
        if arg in axes or shape is None:
            continue
        aligned = dim - (rank - len(shape))
        if aligned >= 0 and shape[aligned] != 1:
            raise _Missing(arg, node)
    return HeadAxis(dim, pre, post)
