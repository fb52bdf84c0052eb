"""Attention over an int8 key/value cache, without the dequantized cache.

memsave's int8 cache layer (memsave/kv_cache.py) returns the whole cache dequantized, and HF's
attention reads it, in the Dynamo graph:

    k = memsave.dequantize_kv_int8(k_codes, k_scale, dtype)          # (B, H_kv, L, D)
    [k = k[:, :, None].expand(B, H_kv, r, L, D).reshape(B, H_kv·r, L, D)]   # repeat_kv (GQA)
    (same for v)
    o = scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0, scale=c, is_causal=False)
      ⟶  o = memsave.attention_int8_kv(q, k_codes, k_scale, v_codes, v_scale, m, c)

which reads the codes tile by tile (ops/kv_cache.py): no dequantized layer, and no repeated
heads, exist at any time. `enable_gqa` is what the op does anyway (kv head j serves q heads
j·r … j·r + r − 1, as repeat_interleave). `is_causal` (a prefill) becomes a (T, L) lower-triangular bool mask. Left as it was, with the
reason in the report: dropout, is_causal beside a mask, keys and values repeated differently, a dequantized
cache that something else reads too (it must exist then anyway).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from memsave.graph.meta import example_val
from memsave.passes.base import PassResult

SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _is_dequantize(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (
        torch.ops.memsave.dequantize_kv_int8, torch.ops.memsave.dequantize_kv_int8.default)


def _method_or_function(node: fx.Node, name: str) -> bool:
    return (node.op == "call_method" and node.target == name) or (
        node.op == "call_function" and getattr(node.target, "__name__", None) == name)


def _cache_read(node: Any) -> tuple[fx.Node | None, slice | None, list[fx.Node]]:
    """(the dequantize node, the slice of tokens read or None, the slice's node) when `node` is
    the dequantized cache, or a slice of its tokens (HF reads the first T in a prefill)."""
    if _is_dequantize(node):
        return node, None, []
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        source, key = node.args
        if _is_dequantize(source) and isinstance(key, tuple) and len(key) == 4 and isinstance(key[2], slice) and all(
                k == slice(None) for i, k in enumerate(key) if i != 2):
            return source, key[2], [node]
    return None, None, []


def _through_repeat(node: Any) -> tuple[fx.Node | None, slice | None, int, list[fx.Node]]:
    """(the dequantize node, tokens read, heads repeated, the nodes between) behind `node`:
    the cache read itself (r = 1) or HF's repeat_kv of it; (None, None, 0, []) otherwise."""
    source, tokens, between = _cache_read(node)
    if source is not None:
        return source, tokens, 1, between
    missing = (None, None, 0, [])
    if not (isinstance(node, fx.Node) and _method_or_function(node, "reshape")):
        return missing
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and _method_or_function(expand, "expand")):
        return missing
    index = expand.args[0]
    if not (isinstance(index, fx.Node) and index.op == "call_function" and index.target is operator.getitem):
        return missing
    inner, key = index.args
    wanted = (slice(None), slice(None), None, slice(None), slice(None))
    if not (isinstance(key, tuple) and key == wanted):
        return missing
    source, tokens, between = _cache_read(inner)
    shape = expand.args[1:] if len(expand.args) > 2 else expand.args[1]
    if source is None or len(shape) != 5 or not isinstance(shape[2], int):
        return missing
    return source, tokens, shape[2], [node, expand, index, *between]


def _bound(node: fx.Node) -> dict[str, Any]:
    bound = dict(zip(_SDPA_ARGS, node.args))
    bound.update(node.kwargs)
    return bound


def _match(node: fx.Node) -> dict[str, Any] | str:
    bound = _bound(node)
    if bound.get("dropout_p", 0.0) not in (0, 0.0):
        return "dropout in the attention"
    causal = bool(bound.get("is_causal", False))
    if causal and bound.get("attn_mask") is not None:
        return "is_causal together with a mask"
    k, k_tokens, k_rep, k_nodes = _through_repeat(bound["key"])
    v, v_tokens, v_rep, v_nodes = _through_repeat(bound["value"])
    if k is None and v is None:
        return ""  # not a cache read at all: nothing to say
    if k is None or v is None or k_rep != v_rep or k_tokens != v_tokens:
        return "keys and values are not both read from the int8 cache the same way"
    for n in [k, v, *k_nodes, *v_nodes]:
        if len(n.users) != 1:
            return "the dequantized cache has another reader"
    scale = bound.get("scale")
    if scale is None:
        q = example_val(bound["query"])
        if q is None:
            return "no head size known for the default scale"
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif not isinstance(scale, (int, float)):
        return "a scale that is not a number"
    return {"q": bound["query"], "k": k, "v": v, "mask": bound.get("attn_mask"), "causal": causal, "scale": float(scale),
            "tokens": k_tokens,
            "dead": [*k_nodes, *v_nodes, k, v]}


def fuse_kv_attention(gm: fx.GraphModule) -> PassResult:
    """Rewrite every matching attention; the notes say how many and why others were left."""
    count, refusals = 0, {}
    graph = gm.graph
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target in SDPA):
            continue
        m = _match(node)
        if isinstance(m, str):
            if m:
                refusals[m] = refusals.get(m, 0) + 1
            continue
        with graph.inserting_before(node):
            k_codes, k_scale, v_codes, v_scale = (*m["k"].args[:2], *m["v"].args[:2])
            if m["tokens"] is not None:  # the same tokens of codes and scales
                whole = (slice(None), slice(None), m["tokens"])
                k_codes, k_scale, v_codes, v_scale = (
                    graph.call_function(operator.getitem, (t, whole)) for t in (k_codes, k_scale, v_codes, v_scale))
            mask = m["mask"]
            if m["causal"]:
                # SDPA's is_causal: query i sees keys 0..i (a prefill that starts the cache)
                rows = graph.call_method("size", (m["q"], -2))
                cols = graph.call_method("size", (k_codes, -2))
                ones = graph.call_function(torch.ones, (rows, cols), {"dtype": torch.bool, "device": example_val(m["q"]).device})
                mask = graph.call_method("tril", (ones,))
            fused = graph.call_function(
                torch.ops.memsave.attention_int8_kv.default, (m["q"], k_codes, k_scale, v_codes, v_scale, mask, m["scale"]))
        fused.meta.update(node.meta)  # same output: shape, dtype, fake value
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        for dead in m["dead"]:  # repeat first, the dequantize last
            if not dead.users:
                graph.erase_node(dead)
        count += 1
    notes = []
    if count:
        notes.append(f"kv cache: {count} attention(s) read the int8 cache tile by tile (no dequantized cache)")
        graph.lint()
        gm.recompile()
    notes += [f"kv cache attention left as is ({n}x): {why}" for why, n in refusals.items()]
    return PassResult(bool(count), tuple(notes), {"fused": count, "left": dict(refusals)})


def reads_int8_cache(gm: fx.GraphModule) -> bool:
    return any(_is_dequantize(n) for n in gm.graph.nodes)
