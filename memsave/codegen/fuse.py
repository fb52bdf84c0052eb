"""Fuse dequantize → matmul into one quantized-linear op, so no full weight is materialized.

Before (what quantize + fold_weights leave):

    dq = memsave.dequantize_affine(packed, scale, offset, bits, group, K, dtype)   # (N, K)
    t  = aten.permute(dq, [1, 0])
    y  = aten.mm(x, t)            # or aten.addmm(bias, x, t)

After:

    y  = memsave.linear_affine(x, packed, scale, offset, bias, bits, group, K)

Sparse weights the same way: densify_nm → matmul becomes linear_nm, densify_bitmask → matmul
becomes linear_bitmask (the values slot may itself be a dequantize: pruned, then quantized).

Run as the pipeline's last step, so the report and the estimate describe what runs; kernel
selection (`codegen/kernels.py`) then picks the fastest implementation of linear_affine for
each node. An embedding lookup of an affine-quantized table gathers the rows it reads before
dequantizing them (the whole table is never rebuilt); a dequantize with any other user (a
weight also used elsewhere) is left as it is.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

import memsave.ops  # noqa: F401  (registers the memsave ops this module refers to)

from memsave.graph.linears import is_transpose, plain_matmul_of
from memsave.graph.rewrite import GraphBuilder, erase_if_dead
from memsave.ops.schemes import DEQUANTIZE_TO_LINEAR
from memsave.passes.base import PassContext, PassResult

aten = torch.ops.aten
memsave_ops = torch.ops.memsave
# Ops that rebuild a full weight from its stored form → the linear op that multiplies with the
# stored form directly, and how many side tensors follow the first argument. Both kinds share
# one argument shape: rebuild(stored, *side, *extras, K, dtype) and
# linear(x, stored, *side, bias, *extras, K).
REBUILD_TO_LINEAR = {
    **DEQUANTIZE_TO_LINEAR,
    memsave_ops.densify_bitmask.default: (memsave_ops.linear_bitmask.default, 1),
    memsave_ops.densify_nm.default: (memsave_ops.linear_nm.default, 1),
}


def fuse_dequant_matmul(gm: fx.GraphModule, config: object, ctx: PassContext) -> PassResult:
    builder = GraphBuilder(gm, "fuse_dequant_matmul")
    fused = 0
    for dq in list(gm.graph.nodes):
        if dq.op != "call_function" or dq.target not in REBUILD_TO_LINEAR:
            continue
        linear_op, n_params = REBUILD_TO_LINEAR[dq.target]
        codes, params = dq.args[0], dq.args[1 : 1 + n_params]
        extras, (k, dtype) = dq.args[1 + n_params : -2], dq.args[-2:]
        transposes = list(dq.users)
        if not transposes or not all(is_transpose(t) for t in transposes):
            continue
        matmuls = [m for t in transposes for m in t.users]
        if not all(plain_matmul_of(m, t) for t in transposes for m in t.users):
            continue
        for mm in matmuls:
            x, bias = (mm.args[0], None) if mm.target == aten.mm.default else (mm.args[1], mm.args[0])
            if _node_dtype(x) != dtype:
                continue
            activations = _per_token_source(x)
            if activations is not None and _is_int8_per_channel(dq):
                # W8A8: quantized activations × int8 weights in one integer matmul.
                linear = builder.call(memsave_ops.linear_w8a8.default, (activations, codes, params[0], bias), before=mm)
                mm.replace_all_uses_with(linear)
                gm.graph.erase_node(mm)
                erase_if_dead(gm, x)
                fused += 1
                continue
            linear = builder.call(linear_op, (x, codes, *params, bias, *extras, k), before=mm)
            mm.replace_all_uses_with(linear)
            gm.graph.erase_node(mm)
            fused += 1
        for t in transposes:
            if not t.users:
                gm.graph.erase_node(t)
        if not dq.users:
            gm.graph.erase_node(dq)
    gathered = _gather_before_dequantize(gm, builder)
    gm.recompile()
    notes = []
    if fused:
        notes.append(f"fused {fused} dequantize/densify→matmul pairs into linears on the stored weights")
    if gathered:
        notes.append(f"{gathered} embedding lookups dequantize only the rows they read")
    return PassResult(bool(fused or gathered), tuple(notes))


def _gather_before_dequantize(gm: fx.GraphModule, builder: GraphBuilder) -> int:
    """embedding(dequantize_affine(codes, scale, offset, ...), ids) → the rows of ids gathered
    from the codes and their scales, then dequantized: a lookup no longer rebuilds the whole
    table (for MiniLM's 30522 x 384 table, 45 MiB a call). Affine rows are quantized on their
    own (groups run along a row), so the rows come out bit for bit the same. Static shapes
    only: a lookup whose output shape is symbolic is left as it is."""
    gathered = 0
    for dq in list(gm.graph.nodes):
        if dq.op != "call_function" or dq.target != memsave_ops.dequantize_affine.default:
            continue
        codes, scale, offset, bits, group, k, dtype = dq.args
        for emb in list(dq.users):
            if emb.target != aten.embedding.default or emb.args[0] is not dq:
                continue
            shape = getattr(emb.meta.get("val"), "shape", None)
            if shape is None or not all(isinstance(d, int) for d in shape):
                continue
            ids = emb.args[1]
            ids_val = ids.meta.get("val") if isinstance(ids, fx.Node) else None
            if not isinstance(ids_val, torch.Tensor):
                continue
            if not ids_val.is_contiguous():  # e.g. BERT's token types: a buffer expanded to the batch
                ids = builder.call(aten.clone.default, (ids,), {"memory_format": torch.contiguous_format}, before=emb)
            flat = builder.call(aten.view.default, (ids, [-1]), before=emb)
            # aten.embedding, not index_select: Inductor lowers it (index_select it both decomposes
            # and falls back on, which it refuses).
            rows = [builder.call(aten.embedding.default, (t, flat), before=emb) if t is not None else None
                    for t in (codes, scale, offset)]
            values = builder.call(memsave_ops.dequantize_affine.default, (*rows, bits, group, k, dtype), before=emb)
            out = builder.call(aten.view.default, (values, list(shape)), before=emb)
            emb.replace_all_uses_with(out)
            gm.graph.erase_node(emb)
            gathered += 1
        if not dq.users:
            gm.graph.erase_node(dq)
    return gathered


def _is_int8_per_channel(dq: fx.Node) -> bool:
    if dq.target != memsave_ops.dequantize_affine.default:
        return False
    _, _, offset, bits, group, k, _ = dq.args
    return bits == 8 and offset is None and group == k


def _per_token_source(x) -> fx.Node | None:
    """x0 if x is dequantize_per_token(quantize_per_token(x0)), else None."""
    if not (isinstance(x, fx.Node) and x.target == memsave_ops.dequantize_per_token.default):
        return None
    codes, scales = x.args[0], x.args[1]
    if not all(isinstance(n, fx.Node) and n.target is operator.getitem for n in (codes, scales)):
        return None
    q = codes.args[0]
    if q is not scales.args[0] or q.target != memsave_ops.quantize_per_token.default:
        return None
    return q.args[0]


def _node_dtype(node) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None
