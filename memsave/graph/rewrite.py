"""Helpers for passes that add nodes: every new node gets `meta["val"]` and a provenance tag.

`GraphBuilder` finds the graph's fake mode once and uses it to compute the metadata of each
node a pass inserts (running the op's fake kernel), so invariant I2 holds by construction.
Constants (compressed weights, scales) become module buffers read by `get_attr` nodes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from memsave.graph.meta import PROVENANCE, node_val


class GraphBuilder:
    def __init__(self, gm: fx.GraphModule, pass_name: str):
        self.gm, self.pass_name = gm, pass_name
        self.fake_mode = _fake_mode_of(gm)

    def constant(self, name: str, value: torch.Tensor, *, before: fx.Node) -> fx.Node:
        """A get_attr node reading `value`, registered on the module as buffer `name`."""
        name = _unique_attr(self.gm, name)
        self.gm.register_buffer(name, value, persistent=False)
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.get_attr(name)
        with unset_fake_temporarily():
            node.meta["val"] = self.fake_mode.from_tensor(value, static_shapes=True)
        node.meta[PROVENANCE] = self.pass_name
        return node

    def call(self, op, args: tuple, kwargs: dict | None = None, *, before: fx.Node) -> fx.Node:
        """A call_function node for `op`, placed before `before`, with fake-computed metadata."""
        kwargs = kwargs or {}
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.call_function(op, args, kwargs)
        fake_args, fake_kwargs = fx.node.map_arg((args, kwargs), node_val)
        with self.fake_mode:
            node.meta["val"] = op(*fake_args, **fake_kwargs)
        node.meta[PROVENANCE] = self.pass_name
        return node


def _fake_mode_of(gm: fx.GraphModule) -> FakeTensorMode:
    from torch._guards import detect_fake_mode

    vals = [node_val(n) for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    return mode if mode is not None else FakeTensorMode(allow_non_fake_inputs=True)


def _unique_attr(gm: fx.GraphModule, name: str) -> str:
    candidate, i = name, 0
    while hasattr(gm, candidate):
        i += 1
        candidate = f"{name}_{i}"
    return candidate


def users_are(node: fx.Node, targets: tuple[Any, ...]) -> bool:
    return bool(node.users) and all(u.op == "call_function" and u.target in targets for u in node.users)


def erase_if_dead(gm: fx.GraphModule, node) -> None:
    """Erase `node` if nothing reads it, then the inputs that leaves unread, and so on."""
    if isinstance(node, fx.Node) and node.op == "call_function" and not node.users:
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        gm.graph.erase_node(node)
        for a in inputs:
            erase_if_dead(gm, a)


def drop_unused_constants(gm: fx.GraphModule) -> None:
    """Erase get_attr nodes nothing reads and free the buffers behind them."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
            if "." not in node.target and node.target in gm._buffers:
                del gm._buffers[node.target]
