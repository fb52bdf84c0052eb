"""Channel groups: the hidden channels between linears that can be removed as a whole.

Structured pruning removes hidden channels (MLP neurons): rows of the linears that produce
them and the matching input columns of the linears that consume them, so the result is a
smaller dense model. That is exact — the same function as zeroing the consumer's columns — only
if every op between producers and consumers treats each channel on its own. In the ATen
graph of a Llama MLP:

    g = mm(x, t(W_gate)); u = mm(x, t(W_up))          producers: output channel c = row c
    h = view(g) → neg → exp → add 1 → div (silu)  …  mul(silu(g), view(u)) → view
    y = mm(h, t(W_down))                               consumer: input feature c = column c

A group is found by a fixed point from one producer: follow its output forward through
channel-wise ops (views that keep the last dimension, pointwise ops whose other operands are
scalars or broadcast over the channels), and backward from any other operand that carries the
channels (which must come from another producer, like `up` above). Every path must end in a
consumer linear's input. Anything else — a residual add, a reduction over the channels (norm,
softmax), a reshape into attention heads, a graph output — makes the group unprunable, and
the reason says which node. Attention projections, whose channels are reshaped into heads, are
pruned a head at a time instead: graph/heads.py finds those groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from memsave.graph.linears import LinearUse, is_transpose, plain_matmul_of
from memsave.graph.meta import node_val

aten = torch.ops.aten
VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
CHANNELWISE_EXTRA = (aten.clone.default, aten._to_copy.default, torch.ops.prims.convert_element_type.default)


@dataclass
class ChannelGroup:
    channels: int
    producers: list[LinearUse] = field(default_factory=list)  # output channel c = weight row c
    consumers: list[LinearUse] = field(default_factory=list)  # input feature c = weight column c
    region: list[fx.Node] = field(default_factory=list)  # every channel-carrying node, graph order


def _linear_at(mm: fx.Node, is_weight) -> LinearUse | None:
    """The LinearUse if `mm` is `x @ t(weight)` (+ bias) for a weight node."""
    if mm.op != "call_function" or mm.target not in (aten.mm.default, aten.addmm.default):
        return None
    t = mm.args[1] if mm.target == aten.mm.default else mm.args[2]
    if not (isinstance(t, fx.Node) and is_transpose(t) and plain_matmul_of(mm, t)):
        return None
    weight = t.args[0]
    return LinearUse(weight, t, mm) if is_weight(weight) else None


def _last_dim(node) -> int | None:
    val = node_val(node) if isinstance(node, fx.Node) else None
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() >= 1 else None


def _is_channelwise(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in VIEWS or node.target in CHANNELWISE_EXTRA:
        return True
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags


def _broadcast_over_channels(arg) -> bool:
    """A scalar, or a tensor whose last dimension is 1 (the same value for every channel)."""
    if not isinstance(arg, fx.Node):
        return True
    val = node_val(arg)
    return not isinstance(val, torch.Tensor) or val.dim() == 0 or val.shape[-1] == 1


def find_group(producer: LinearUse, is_weight) -> tuple[ChannelGroup | None, str]:
    """The channel group grown from `producer`'s output, or (None, why not)."""
    channels = _last_dim(producer.matmul)
    group = ChannelGroup(channels)
    in_region: set[fx.Node] = set()
    producers: dict[fx.Node, LinearUse] = {}
    work: list[fx.Node] = []

    def add(node: fx.Node, read_by: fx.Node | None = None) -> str | None:
        if node in in_region:
            return None
        if _last_dim(node) != channels:
            return f"{node.name} does not keep the channels in its last dimension"
        linear = _linear_at(node, is_weight)
        if linear is not None:
            producers[node] = linear
        elif not _is_channelwise(node):
            if read_by is not None:  # e.g. the residual add: x + o_proj(...)
                return f"{read_by.name} combines the channels with {node.name}, which no prunable linear computes"
            return f"{node.name} ({node.target}) mixes channels"
        in_region.add(node)
        work.append(node)
        return None

    why = add(producer.matmul)
    consumers: dict[fx.Node, LinearUse] = {}
    while work and why is None:
        node = work.pop()
        # Backward: other operands that carry the channels must be in the group too.
        if node not in producers:
            view_input = node.args[0] if node.target in VIEWS else None
            for arg in node.all_input_nodes:
                if node.target in VIEWS and arg is not view_input:
                    continue
                if arg is view_input or not _broadcast_over_channels(arg):
                    why = why or add(arg, read_by=node)
        # Forward: every user is a consumer's input or channel-wise.
        for user in node.users:
            if user.op == "output":
                why = why or f"{node.name} is a graph output"
                continue
            linear = _linear_at(user, is_weight)
            if linear is not None and linear.x is node and user not in producers:
                consumers[user] = linear
                continue
            if user.target in VIEWS and user.args[0] is not node:
                why = why or f"{user.name} uses {node.name} as a shape"
                continue
            if not _is_channelwise(user):
                why = why or f"{node.name} feeds {user.name} ({user.target}), which mixes channels"
                continue
            why = why or add(user)
    if why is not None:
        return None, why
    if not consumers:
        return None, "no linear consumes the channels"
    order = {n: i for i, n in enumerate(producer.matmul.graph.nodes)}
    group.region = sorted(in_region, key=order.__getitem__)
    group.producers = sorted(producers.values(), key=lambda u: order[u.matmul])
    group.consumers = sorted(consumers.values(), key=lambda u: order[u.matmul])
    if any(p.matmul is c.matmul for p in group.producers for c in group.consumers):
        return None, "a linear both produces and consumes the channels"
    return group, ""
