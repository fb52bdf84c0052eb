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

import memsave.weight_keys as weight_keys
from memsave.graph.rewrite import GraphBuilder, drop_unused_constants, erase_if_dead
from memsave.ops.schemes import QUANTIZE_OPS
from memsave.passes.base import QPARAMS_KEY, PassContext, PassResult
from memsave.weights import WEIGHTS

memsave_ops = torch.ops.memsave
FOLDABLE = QUANTIZE_OPS + (memsave_ops.quantize_affine_gptq.default,)  # every weight-side quantize


def fold_weights(gm: fx.GraphModule, config: object, ctx: PassContext) -> PassResult:
    builder = GraphBuilder(gm, "fold_weights")
    weights = {w.node: w for w in ctx.weight_nodes(gm)}
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in FOLDABLE:
            continue
        source, *rest = node.args
        weight_node = _root_weight(source, weights)
        if weight_node is None or not all(_is_constant(a, weights) for a in rest):
            continue
        found = weights[weight_node]
        weight = found.tensor
        constants = [getattr(gm, a.target) if isinstance(a, fx.Node) else a for a in rest]
        # Keyed by how the weight was quantized (scheme, bits, group, method), not by the scale
        # tensors' identity: a recompile may get those rebuilt (see WeightCache.convert) and
        # must still find the codes.
        if node.meta.get(QPARAMS_KEY) is None:
            continue  # a quantize node this pass did not make: its scales' provenance is unknown
        key = weight_keys.packed(node.meta[QPARAMS_KEY])
        packed = WEIGHTS.get_or_build(weight, key, lambda: node.target(_evaluate(source, gm, weights), *constants))
        constant = builder.constant("memsave_packed", packed, before=node)
        constant.meta["memsave_weight_of"] = found.label
        node.replace_all_uses_with(constant)
        gm.graph.erase_node(node)
        erase_if_dead(gm, source)
        folded += 1
    drop_unused_constants(gm)  # e.g. GPTQ's Hessians: needed to pick codes, not to run
    gm.recompile()
    return PassResult(bool(folded), (f"packed {folded} weights at compile time",) if folded else ())


def _is_constant(arg, weights: dict) -> bool:
    return not isinstance(arg, fx.Node) or (arg.op == "get_attr" and arg not in weights)


def _root_weight(source, weights: dict) -> fx.Node | None:
    """The weight (a parameter placeholder, or a constant derived from one) an expression of
    one weight and constants is computed from (the weight itself, or e.g. W·s for AWQ); None
    if it reads anything else."""
    if not isinstance(source, fx.Node):
        return None
    if source in weights:
        return source
    if source.op != "call_function":
        return None
    roots = {_root_weight(a, weights) for a in source.args if isinstance(a, fx.Node) and not _is_constant(a, weights)}
    others_constant = all(_is_constant(a, weights) or _root_weight(a, weights) is not None for a in source.args)
    return roots.pop() if len(roots) == 1 and None not in roots and others_constant else None


def _evaluate(source: fx.Node, gm: fx.GraphModule, weights: dict):
    """The real value of a weight expression (runs on real tensors, inside the cache's build)."""
    if source in weights:
        return weights[source].tensor
    if source.op == "get_attr":
        return getattr(gm, source.target)
    args = [_evaluate(a, gm, weights) if isinstance(a, fx.Node) else a for a in source.args]
    return source.target(*args, **source.kwargs)
