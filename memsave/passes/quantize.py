"""Quantize: put explicit quantize → dequantize nodes on the weights of linears (and embeddings).

Before (what AOTAutograd makes of nn.Linear):

    t = aten.permute(w, [1, 0]);  mm = aten.mm(x, t)          # or aten.t; or addmm(bias, x, t)

After:

    q  = memsave.quantize_affine(w, scale, offset, bits, group)          # weight side
    dq = memsave.dequantize_affine(q, scale, offset, bits, group, K, dtype)
    t  = aten.permute(dq, [1, 0]);  mm = aten.mm(x, t)

The graph now says exactly what numerics the model gets, with memsave ops visible by name in
the debug dumps. `fold_weights` then evaluates the weight-side quantize once, at compile time,
into stored packed codes; codegen fuses dequantize → matmul into one kernel.

Scales (and offsets) are chosen per weight by the configured method, once per weight (the
weight cache), and become constants of the graph. Only inference graphs are quantized:
training graphs keep full-precision weights (the weights are what they learn).
"""

from __future__ import annotations

import torch
import torch.fx as fx

import memsave.ops  # noqa: F401  (registers the memsave ops this module refers to)

from memsave.config import QuantizeConfig
from memsave.graph.meta import node_val
from memsave.graph.rewrite import GraphBuilder, users_are
from memsave.ops.affine import choose_qparams_affine, choose_qparams_mse
from memsave.passes.base import QPARAMS_KEY, PassContext, PassResult
from memsave.weights import WEIGHTS

aten = torch.ops.aten
memsave_ops = torch.ops.memsave
_MATMULS = (aten.mm.default, aten.addmm.default)


def insert_qdq(gm: fx.GraphModule, config: QuantizeConfig, ctx: PassContext) -> PassResult:
    if ctx.stage != "inference":
        return PassResult(False, ("training graph: weights stay in full precision",))
    builder = GraphBuilder(gm, "quantize")
    quantized, skipped = [], []
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op != "placeholder" or node.name not in ctx.weights:
            continue
        name = ctx.weights[node.name].name
        scheme = config.for_weight(name)
        uses = _quantizable_uses(node, config.embeddings)
        if scheme is None or not uses:
            continue
        val = node_val(node)
        if not (isinstance(val, torch.Tensor) and val.dim() == 2 and val.dtype.is_floating_point):
            skipped.append(f"{name}: not a 2-D float weight")
            continue
        weight = ctx.weight_tensor(node.name)
        if weight is None:
            skipped.append(f"{name}: no real tensor at compile time")
            continue
        k = val.shape[1]
        group = k if scheme.group_size is None or scheme.group_size >= k else scheme.group_size
        qparams_key = ("qparams", scheme.bits, group, scheme.symmetric, scheme.method)
        scale, offset = WEIGHTS.get_or_build(weight, qparams_key, lambda: _choose(weight, scheme, group))
        first_use = min(uses, key=position.__getitem__)
        scale_node = builder.constant("memsave_scale", scale, before=first_use)
        offset_node = builder.constant("memsave_offset", offset, before=first_use) if offset is not None else None
        q = builder.call(
            memsave_ops.quantize_affine.default, (node, scale_node, offset_node, scheme.bits, group), before=first_use
        )
        q.meta[QPARAMS_KEY] = qparams_key  # fold_weights caches the packed codes under it
        compute = getattr(torch, scheme.compute_dtype) if scheme.compute_dtype else val.dtype
        dequantized: dict[torch.dtype, fx.Node] = {}

        def dequantize(dtype: torch.dtype) -> fx.Node:
            if dtype not in dequantized:
                dequantized[dtype] = builder.call(
                    memsave_ops.dequantize_affine.default,
                    (q, scale_node, offset_node, scheme.bits, group, k, dtype),
                    before=first_use,
                )
            return dequantized[dtype]

        for use in uses:
            if compute != val.dtype and _is_transpose(use):
                _compute_in(builder, use, node, dequantize(compute), compute)
            else:
                use.replace_input_with(node, dequantize(val.dtype))
        quantized.append(f"{name}: {scheme.describe()}" + (f" (group {group})" if group != scheme.group_size and scheme.group_size else ""))
    gm.recompile()
    notes = tuple([f"quantized {len(quantized)} weights"] + [f"skipped {s}" for s in skipped])
    return PassResult(bool(quantized), notes, {"quantized": quantized, "skipped": skipped})


def _quantizable_uses(weight: fx.Node, embeddings: bool) -> list[fx.Node]:
    """Users through which the weight feeds a linear (t → mm/addmm) or, optionally, an embedding."""
    uses = []
    for user in weight.users:
        if user.op != "call_function":
            continue
        if _is_transpose(user) and users_are(user, _MATMULS):
            uses.append(user)
        elif user.target == aten.linear.default and user.args[1] is weight:
            uses.append(user)
        elif embeddings and user.target == aten.embedding.default and user.args[0] is weight:
            uses.append(user)
    return uses


def _compute_in(builder: GraphBuilder, transpose: fx.Node, weight: fx.Node, dq: fx.Node, dtype: torch.dtype) -> None:
    """Rewrite `transpose(w)` → matmuls to run in `dtype`: cast x (and bias) in, the result back.

        t = permute(w); y = mm(x, t)
    becomes
        t = permute(dq_bf16); y16 = mm(to_bf16(x), t); y = to_fp32(y16)
    """
    transpose_bf = builder.call(transpose.target, (dq, *transpose.args[1:]), before=transpose)
    for mm in list(transpose.users):
        args = list(mm.args)
        for i, arg in enumerate(args):
            if arg is transpose:
                args[i] = transpose_bf
            elif isinstance(arg, fx.Node):
                args[i] = builder.call(aten._to_copy.default, (arg,), {"dtype": dtype}, before=mm)
        narrow = builder.call(mm.target, tuple(args), dict(mm.kwargs), before=mm)
        back = builder.call(aten._to_copy.default, (narrow,), {"dtype": mm.meta["val"].dtype}, before=mm)
        mm.replace_all_uses_with(back)
        builder.gm.graph.erase_node(mm)
    builder.gm.graph.erase_node(transpose)


def _is_transpose(node: fx.Node) -> bool:
    # aten.t, or aten.permute(w, [1, 0]) as Inductor's decomposition table writes it.
    if node.target == aten.t.default:
        return True
    return node.target == aten.permute.default and list(node.args[1]) == [1, 0]


def _choose(weight: torch.Tensor, scheme: QuantizeConfig, group: int):
    if scheme.method == "mse":
        return choose_qparams_mse(weight, scheme.bits, group, scheme.symmetric)
    return choose_qparams_affine(weight, scheme.bits, group, scheme.symmetric)
