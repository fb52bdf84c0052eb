"""Which storage each node's value lives in: the one walk over views and tuple elements that
the memory estimate (memory/estimate.py), the liveness plan (memory/liveness.py) and the
recompute planner (passes/joint/recompute_graph.py) share.

A node either allocates (a new storage per tensor it produces) or aliases: a view or in-place
op (a `Tensor(a)` return in its schema, `aliased_input`) lives in its base's storage, a getitem
in its tuple parent's element. Graph inputs and constants bring storages the graph does not own.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch.fx as fx

from memsave.graph.meta import aliased_input, is_getitem, iter_tensors, node_val

S = TypeVar("S")


def storages_by_node(nodes, allocate: Callable[[fx.Node], list[S]]) -> dict[fx.Node, list[S]]:
    """Each node's storages, one entry per tensor it produces. `allocate(node)` makes the
    storages of a node that brings or allocates its own (placeholder, get_attr, an allocating
    call_function; it may return [] for what a caller does not count); a view repeats its
    base's first storage, a getitem takes its parent's element, anything else has none."""
    of: dict[fx.Node, list[S]] = {}
    for node in nodes:
        if is_getitem(node):
            parent, index = node.args
            parent_storages = of.get(parent, [])
            of[node] = [parent_storages[index]] if isinstance(index, int) and index < len(parent_storages) else []
        elif aliased_input(node) is not None:
            base = of.get(aliased_input(node), [])
            of[node] = [base[0]] * len(list(iter_tensors(node_val(node)))) if base else []
        elif node.op in ("placeholder", "get_attr", "call_function"):
            of[node] = allocate(node)
        else:  # output (call_module/call_method do not occur in ATen graphs)
            of[node] = []
    return of


def storage_root(node: fx.Node) -> fx.Node | None:
    """The node owning `node`'s storage: itself, or the base a view (or a view's getitem) reads;
    an element of a multi-output op is its own; None when the storage is a graph input's."""
    while True:
        if node.op in ("placeholder", "get_attr"):
            return None
        if is_getitem(node):
            parent = node.args[0]
            base = aliased_input(parent) if isinstance(parent, fx.Node) else None
            if base is None:
                return node
            node = base
            continue
        base = aliased_input(node)
        if base is None:
            return node
        node = base
