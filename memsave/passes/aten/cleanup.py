"""Remove nodes whose values nobody uses.

AOTAutograd and earlier passes leave dead nodes behind (e.g. a weight's original path after
the weight was replaced); they cost nothing at run time under Inductor but inflate every
count and estimate in the report, so the pipeline runs this first and after rewriting passes.
"""

from __future__ import annotations

import torch.fx as fx

from memsave.passes.base import PassContext, PassResult


def eliminate_dead_code(gm: fx.GraphModule, config: None, ctx: PassContext) -> PassResult:
    before = len(gm.graph.nodes)
    # FX's DCE keeps impure nodes (in-place ops, RNG ops such as dropout's), which is what we
    # want: removing them would change RNG state or mutations.
    changed = gm.graph.eliminate_dead_code()
    if changed:
        gm.recompile()
    removed = before - len(gm.graph.nodes)
    return PassResult(changed, (f"removed {removed} dead nodes",) if removed else ())
