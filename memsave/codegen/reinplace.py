"""Write a buffer in place when the graph only ever wanted it written: for the fx codegen.

AOTAutograd functionalizes an in-place write, e.g. a static kv cache's `keys.index_copy_(2,
position, k)`, into a copy and a write back:

    new = index_put(keys, [None, None, position], k)   # a whole new buffer
    ... readers of new ...
    copy_(keys, new)                                      # at the end: the input mutation

which holds a second copy of the whole cache layer at every decode step (measured: 1.39 MiB
tracked peak for a 1 MiB int8 layer at 4k tokens). Inductor undoes this itself (its reinplace
pass); the fx codegen runs the graph as written, so `reinplace_writes` does it here:
`index_put`/`index_copy` of a base that nothing reads afterwards becomes `index_put_`/
`index_copy_` on the base, and the write back disappears. A graph input is written in place only
where the graph writes it back anyway (AOTAutograd's copy_ says the caller wants it mutated).
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten
INPLACE = {aten.index_put.default: aten.index_put_.default, aten.index_copy.default: aten.index_copy_.default}


def reinplace_writes(gm: fx.GraphModule) -> int:
    """Rewrite what can be written in place; returns how many writes changed."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    changed = 0
    for node in list(graph.nodes):
        target = INPLACE.get(node.target) if node.op == "call_function" else None
        if target is None or node.kwargs:
            continue
        if node.target is aten.index_put.default and len(node.args) > 3 and node.args[3]:
            continue  # accumulate=True: kept functional (rare; not a cache write)
        base = node.args[0]
        if not isinstance(base, fx.Node):
            continue
        write_back = [u for u in base.users if u.op == "call_function" and u.target is aten.copy_.default
                      and u.args[0] is base and u.args[1] is node]
        others = [u for u in base.users if u is not node and u not in write_back]
        if any(order[u] > order[node] for u in others):
            continue  # the old contents are read after the write
        if base.op == "placeholder" and not write_back:
            continue  # an input the caller does not expect to change
        if base.op != "placeholder" and not _fresh(base):
            continue  # a view (its writes would reach another tensor) or something unknown
        node.target = target
        for copy in write_back:
            copy.replace_all_uses_with(node)
            graph.erase_node(copy)
        changed += 1
    if changed:
        graph.lint()
        gm.recompile()
    return changed


def _fresh(node: fx.Node) -> bool:
    """An op result with storage of its own (an aten op whose result aliases no input)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return schema is not None and len(schema.returns) == 1 and schema.returns[0].alias_info is None
