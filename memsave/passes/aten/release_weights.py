"""Release full-precision weights that no compiled graph reads any more.

After `quantize` and `fold_weights`, a quantized weight's placeholder has no users: the graph
reads the packed copy. Its full-precision tensor still sits in the user's module, and freeing
it is the whole point. This pass frees it (see Note [Releasing full-precision weights] in
memsave/weights.py) when the configs of the compressing passes allow (`free_weights`), and
reports the bytes. The same holds for prune and factorize, and for the intermediate forms
they make (a fp32 low-rank factor that quantize then stored in int4).

A weight with any other use left in the graph (an op memsave does not quantize, a tied weight
used by an unquantized embedding) is kept.

Most originals are gone before this pass runs: quantize frees each one as soon as its codes
exist (Note [Streaming compression] in memsave/weights.py); this pass reports those with the
ones it frees itself (debug mode, prune and factorize, derived forms). The calibration statistics
of the linears the recipe keeps as they are go too: a recipe that frees originals has settled
the model's form (measured on all-MiniLM-L6-v2 planned at half its fp32 bytes: 75.5 MiB of Gram
matrices outlived the compile). Then it hands the freed memory back to the operating system
(memory/process.py: `give_back`).
"""

from __future__ import annotations

import torch.fx as fx

from memsave.calibrate import CALIBRATION
from memsave.config import Config
from memsave.graph.linears import linear_uses
from memsave.memory.process import give_back
from memsave.passes.base import PassContext, PassResult
from memsave.report import fmt_bytes
from memsave.weights import WEIGHTS, can_release, compressible_in, frees_weights, is_released, release, released_by


def release_weights(gm: fx.GraphModule, config: Config, ctx: PassContext) -> PassResult:
    """`config` is the whole recipe: weights are released only if every compressing family
    that is on allows it (free_weights)."""
    if not frees_weights(config) or ctx.stage not in ("inference", "joint"):
        return PassResult(False)
    streamed = released_by(ctx.graph_id)  # by the compressing passes, as they went
    freed, names, mapped = sum(n for _, n in streamed), [name for name, _ in streamed], []
    held = {id(t) for t in gm.buffers()}
    dropped: dict[int, int] = {}  # id(stats) -> bytes of the calibration statistics dropped
    for node in gm.graph.nodes:
        if node.op != "placeholder" or node.name not in ctx.weights:
            continue
        weight, name = ctx.weight_tensor(node.name), ctx.weights[node.name].name
        if weight is not None and weight not in WEIGHTS and weight in CALIBRATION and linear_uses(node) is not None:
            # A linear this compile keeps as it is: a recipe that frees originals has settled
            # the model's form, and its statistics (Gram matrices: K² floats, up to 4x the
            # weight) could only serve a compression it chose not to make. Only plain linear
            # uses: a weight also read as a table (tied) may be compressed by another graph.
            stats = CALIBRATION.pop(weight)
            dropped[id(stats)] = stats.nbytes
        # Only weights memsave compressed: an unused weight it never touched stays as it is.
        if weight is None or weight not in WEIGHTS or not compressible_in(ctx.stage, weight):
            continue
        # A derived weight (e.g. a low-rank factor) that this graph no longer holds was
        # compressed further (quantized): its uncompressed form goes too.
        for part in _derived_tree(weight):
            if id(part) not in held and part in WEIGHTS and not is_released(part) and can_release(part):
                freed += release(part, f"{name} (derived)", graph_id=ctx.graph_id)
        if node.users or is_released(weight):
            continue
        if not can_release(weight):
            mapped.append(name)
            continue
        freed += release(weight, name, graph_id=ctx.graph_id)
        names.append(name)
        # Its calibration statistics (Gram matrices, input samples) can only serve to compress
        # it again, which a released weight cannot be: they go too.
        CALIBRATION.pop(weight, None)
    still_held = {id(stats) for stats in CALIBRATION.values()}  # shared with a weight of another graph
    dropped_bytes = sum(n for key, n in dropped.items() if key not in still_held)
    if freed or dropped_bytes:
        give_back()
    notes = (f"released {len(names)} full-precision weights ({fmt_bytes(freed)} incl. intermediate forms)",) if freed else ()
    if dropped:
        notes += (f"dropped the calibration statistics of {len(dropped)} input(s) of linears kept as they are "
                  f"({fmt_bytes(dropped_bytes)} freed): they could only serve to compress them",)
    if mapped:
        notes += (
            f"kept {len(mapped)} weights whose storage cannot be freed (memory-mapped from a file, e.g. "
            "safetensors); their pages are file-backed and the graph no longer reads them",
        )
    return PassResult(bool(freed), notes, {"released": names, "released_bytes": freed, "not_releasable": mapped,
                                           "calibration_dropped_bytes": dropped_bytes})


def _derived_tree(weight) -> list:
    """Derived weights of `weight`, and theirs (a pruned weight's low-rank factors), ..."""
    found, seen, todo = [], set(), list(WEIGHTS.derived(weight))
    while todo:
        part = todo.pop()
        if id(part) not in seen:
            seen.add(id(part))
            found.append(part)
            todo.extend(WEIGHTS.derived(part))
    return found
