"""Chunk, capture step: eager attention that materializes the (T, S) score matrix → SDPA.

In the Dynamo graph (before AOTAutograd, so SDPA's own memory-efficient backward is traced):

    s = q @ k.transpose(-2, -1)        # (B, H, T, S): the score matrix
    s = s * c   | s / c                # optional scale (a number, or a 0-d torch.full(c))
    s = s.masked_fill(m, -inf) | s + a # optional boolean or additive mask
    p = softmax(s, dim=-1)[.to(dtype)] # fp32 softmax then a cast back is allowed
    p = dropout(p, p=0 or training=False)
    o = p @ v                          # (B, H, T, Dv)
      ⟶  o = scaled_dot_product_attention(q, k, v, attn_mask=~m | a | None, scale=c, is_causal=...)

A boolean mask built in the graph as `ones(T, T).triu(1)` (memsave's decoder) becomes
is_causal=True: no mask tensor at all. Left alone, with the reason: dropout that is active
(SDPA draws a different random mask, so the result would not match), a masked_fill value other
than -inf, scores used elsewhere (e.g. attention weights returned), softmax over another dim.
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from memsave.graph.meta import PROVENANCE, example_val, hint_int
from memsave.report import fmt_bytes

MATMULS = (operator.matmul, torch.matmul)
SOFTMAXES = (F.softmax, torch.softmax)
DROPOUTS = (F.dropout,)
_DROPOUT_SIGNATURE = inspect.signature(F.dropout)


def route_attention(gm: fx.GraphModule) -> tuple[int, list[str], int]:
    """Rewrite every matching attention; returns (count, notes, score bytes no longer held)."""
    count, refusals, saved = 0, {}, 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target in MATMULS):
            continue
        first = node.args[0]
        if not _is_softmax_side(first):
            continue  # an ordinary matmul (e.g. the q @ k^T one itself)
        match = _match(node)
        if isinstance(match, str):
            refusals[match] = refusals.get(match, 0) + 1
            continue
        saved += _rewrite(gm, node, match)
        count += 1
    notes = []
    if count:
        notes.append(
            f"attention: {count} eager attention(s) routed to scaled_dot_product_attention; "
            f"{fmt_bytes(saved)} of score matrices (per forward, one copy each) not materialized"
        )
        gm.graph.lint()
        gm.recompile()
    notes += [f"attention left as is ({n}×): {why}" for why, n in refusals.items()]
    return count, notes, saved


def _is_softmax_side(node: Any) -> bool:
    """Whether `node` is a softmax, possibly behind a dropout and a cast (cheap pre-filter)."""
    for _ in range(3):
        if not isinstance(node, fx.Node):
            return False
        if _is_softmax(node):
            return True
        node = node.args[0] if node.args else None
    return False


def _is_softmax(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in SOFTMAXES) or (node.op == "call_method" and node.target == "softmax")


def _match(out: fx.Node) -> dict[str, Any] | str:
    chain = [out]
    probs, v = out.args[0], out.args[1]
    if example_val(out) is None or example_val(out).dim() != 4:
        return "not 4-D (batch, heads, tokens, head_dim) attention"
    # dropout, then casts, then softmax
    node = probs
    if node.op == "call_function" and node.target in DROPOUTS:
        bound = _DROPOUT_SIGNATURE.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        if bound.arguments["training"] is not False and bound.arguments["p"] != 0:
            return f"dropout p={bound.arguments['p']} is active: SDPA would draw a different random mask"
        chain.append(node)
        node = node.args[0]
    while node.op == "call_method" and node.target in ("to", "type", "type_as", "float"):
        chain.append(node)
        node = node.args[0]
    if not _is_softmax(node):
        return "the probabilities are not a softmax"
    softmax = node
    chain.append(softmax)
    dim = softmax.kwargs.get("dim", softmax.args[1] if len(softmax.args) > 1 else None)
    if dim not in (-1, 3):
        return f"softmax over dim {dim}, not the keys"
    dtype = softmax.kwargs.get("dtype", softmax.args[3] if softmax.op == "call_function" and len(softmax.args) > 3 else None)
    if dtype not in (None, torch.float32):
        return f"softmax in {dtype}"
    if example_val(out).dtype != example_val(v).dtype:
        return "probabilities and values differ in dtype"
    # mask
    node = softmax.args[0]
    mask = {"kind": None}
    if node.op == "call_method" and node.target == "masked_fill":
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
        if not (isinstance(value, float) and value == -math.inf):
            return f"masked_fill with {value!r}, not -inf"
        mask = {"kind": "bool", "mask": node.args[1]}
        chain.append(node)
        node = node.args[0]
    elif node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2:
        a, b = node.args
        scores_side, mask_node = (a, b) if _is_scores(a) else (b, a)
        if not _is_scores(scores_side) or not isinstance(mask_node, fx.Node):
            return "the additive mask is not a tensor added to the scores"
        mask = {"kind": "add", "mask": mask_node}
        chain.append(node)
        node = scores_side
    # scale
    scale = 1.0
    if node.op == "call_function" and node.target in (operator.mul, operator.truediv):
        a, b = node.args
        constant = _constant(b)
        if constant is None:
            return "the scores are scaled by a non-constant"
        scale = constant if node.target is operator.mul else 1.0 / constant
        chain.append(node)
        node = a
    if not (node.op == "call_function" and node.target in MATMULS):
        return "the scores are not q @ k^T"
    transpose = node.args[1]
    if not (isinstance(transpose, fx.Node) and transpose.op == "call_method" and transpose.target == "transpose"
            and set(transpose.args[1:]) in ({-2, -1}, {2, 3})):
        return "the keys are not transposed in the last two dims"
    chain.append(node)
    q, k = node.args[0], transpose.args[0]
    for n in chain[1:]:
        if len(n.users) != 1:
            return f"{n.name} (scores or probabilities) is also used elsewhere"
    if mask["kind"] == "bool" and example_val(mask["mask"]).dtype != torch.bool:
        return "masked_fill mask is not boolean"
    if mask["kind"] == "add" and example_val(mask["mask"]).dtype != example_val(q).dtype:
        return "additive mask dtype differs from the queries'"
    return {"q": q, "k": k, "v": v, "scale": scale, "mask": mask, "chain": chain, "transpose": transpose}


def _is_scores(node: Any) -> bool:
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in (operator.mul, operator.truediv):
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in MATMULS


def _constant(arg: Any) -> float | None:
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    # HF GPT-2 divides by torch.full([], sqrt(d)): a 0-d constant built in the graph.
    if isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target is torch.full:
        size, fill = arg.args[0], arg.args[1] if len(arg.args) > 1 else arg.kwargs.get("fill_value")
        if tuple(size) == () and isinstance(fill, (int, float)):
            return float(fill)
    return None


def _is_causal_mask(mask: fx.Node, t: int, s: int) -> bool:
    """`ones(T, T, dtype=bool).triu(1)`: True strictly above the diagonal (future positions)."""
    if t != s or mask.op != "call_method" or mask.target != "triu":
        return False
    diagonal = mask.args[1] if len(mask.args) > 1 else mask.kwargs.get("diagonal", 0)
    ones = mask.args[0]
    return (
        diagonal == 1
        and isinstance(ones, fx.Node)
        and ones.op == "call_function"
        and ones.target is torch.ones
        and example_val(ones) is not None
        and example_val(ones).dtype == torch.bool
        and [hint_int(d) for d in example_val(ones).shape] == [t, s]
    )


def _rewrite(gm: fx.GraphModule, out: fx.Node, m: dict[str, Any]) -> int:
    graph = gm.graph
    scores = example_val(m["chain"][-1])  # (B, H, T, S)
    t, s = hint_int(scores.shape[-2]), hint_int(scores.shape[-1])
    kwargs: dict[str, Any] = {"dropout_p": 0.0, "scale": m["scale"]}
    with graph.inserting_before(out):
        kind = m["mask"]["kind"]
        if kind == "bool" and _is_causal_mask(m["mask"]["mask"], t, s):
            kwargs["is_causal"] = True
        elif kind == "bool":
            # masked_fill's True = masked out; SDPA's boolean mask True = may attend.
            keep = graph.call_function(torch.logical_not, (m["mask"]["mask"],))
            keep.meta[PROVENANCE] = "chunk"
            kwargs["attn_mask"] = keep
        elif kind == "add":
            kwargs["attn_mask"] = m["mask"]["mask"]
        sdpa = graph.call_function(F.scaled_dot_product_attention, (m["q"], m["k"], m["v"]), kwargs)
    sdpa.meta[PROVENANCE] = "chunk"
    out.replace_all_uses_with(sdpa)
    for dead in m["chain"]:
        graph.erase_node(dead)
    if not m["transpose"].users:
        graph.erase_node(m["transpose"])
    return hint_int(scores.numel()) * scores.element_size()


