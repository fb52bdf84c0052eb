"""Release full-precision weights that no compiled graph reads any more.

After `quantize` and `fold_weights`, a quantized weight's placeholder has no users: the graph
reads the packed copy. Its full-precision tensor still sits in the user's module, and freeing
it is the whole point. This pass frees it (see Note [Releasing full-precision weights] in
memsave/weights.py) when the quantize config allows (`free_weights`), and reports the bytes.

A weight with any other use left in the graph (an op memsave does not quantize, a tied weight
used by an unquantized embedding) is kept.
"""

from __future__ import annotations

import torch.fx as fx

from memsave.config import QuantizeConfig
from memsave.passes.base import PassContext, PassResult
from memsave.report import fmt_bytes
from memsave.weights import WEIGHTS, can_release, is_released, release


def release_weights(gm: fx.GraphModule, config: QuantizeConfig, ctx: PassContext) -> PassResult:
    if not config.free_weights or ctx.stage != "inference":
        return PassResult(False)
    freed, names, mapped = 0, [], []
    for node in gm.graph.nodes:
        if node.op != "placeholder" or node.name not in ctx.weights or node.users:
            continue
        weight = ctx.weight_tensor(node.name)
        # Only weights memsave compressed: an unused weight it never touched stays as it is.
        if weight is None or weight not in WEIGHTS or is_released(weight):
            continue
        if not can_release(weight):
            mapped.append(ctx.weights[node.name].name)
            continue
        freed += release(weight, ctx.weights[node.name].name)
        names.append(ctx.weights[node.name].name)
    notes = (f"released {len(names)} full-precision weights ({fmt_bytes(freed)})",) if names else ()
    if mapped:
        notes += (
            f"kept {len(mapped)} weights whose storage cannot be freed (memory-mapped from a file, e.g. "
            "safetensors); their pages are file-backed and the graph no longer reads them",
        )
    return PassResult(bool(names), notes, {"released": names, "released_bytes": freed, "not_releasable": mapped})
