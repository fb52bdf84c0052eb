"""Fold weight-side quantization into stored constants.

`quantize` leaves `memsave.quantize_affine(w, scale, offset, ...)` in the graph, reading the
full-precision weight on every call. Its inputs are all known at compile time (a weight and
constants), so this pass computes the packed codes once — through the weight cache, so each
weight is packed once per process whatever the number of graphs — and replaces the call by a
constant. After it, the graph no longer reads the full-precision weight at all (for the uses
that were quantized), which is what lets `release_weights` free it.

Before:  q = memsave.quantize_affine(w, scale, offset, 4, 64);  dq = memsave.dequantize_affine(q, ...)
After:   q = get_attr[memsave_packed];                            dq = memsave.dequantize_affine(q, ...)
"""

from __future__ import annotations

import torch
import torch.fx as fx

import memsave.ops  # noqa: F401  (registers the memsave ops this module refers to)

from memsave.graph.rewrite import GraphBuilder
from memsave.passes.base import QPARAMS_KEY, PassContext, PassResult
from memsave.weights import WEIGHTS

memsave_ops = torch.ops.memsave
FOLDABLE = (memsave_ops.quantize_affine.default,)


def fold_weights(gm: fx.GraphModule, config: object, ctx: PassContext) -> PassResult:
    builder = GraphBuilder(gm, "fold_weights")
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in FOLDABLE:
            continue
        weight_node, *rest = node.args
        weight = ctx.weight_tensor(weight_node.name) if isinstance(weight_node, fx.Node) else None
        if weight is None or not all(_is_constant(a) for a in rest):
            continue
        constants = [getattr(gm, a.target) if isinstance(a, fx.Node) else a for a in rest]
        # Keyed by how the scales were chosen, not by the scale tensors' identity: a recompile
        # may get those rebuilt (see WeightCache.convert) and must still find the codes.
        key = ("packed", node.target.name(), node.meta.get(QPARAMS_KEY), *[c for c in constants if not isinstance(c, torch.Tensor)])
        if node.meta.get(QPARAMS_KEY) is None:
            continue  # a quantize node this pass did not make: its scales' provenance is unknown
        packed = WEIGHTS.get_or_build(weight, key, lambda: node.target(weight, *constants))
        constant = builder.constant("memsave_packed", packed, before=node)
        constant.meta["memsave_weight_of"] = ctx.weights[weight_node.name].name if weight_node.name in ctx.weights else None
        node.replace_all_uses_with(constant)
        gm.graph.erase_node(node)
        folded += 1
    gm.recompile()
    return PassResult(bool(folded), (f"packed {folded} weights at compile time",) if folded else ())


def _is_constant(arg) -> bool:
    return not isinstance(arg, fx.Node) or arg.op == "get_attr"

