"""Attention over a quantized key/value cache, without the dequantized cache.

memsave's quantized cache layers (memsave/kv_cache.py) return the whole cache dequantized, and
HF's attention reads it, in the Dynamo graph (int8; KIVI's int4/2-bit layout alike, with
`dequantize_kv_channels` / `dequantize_kv_tokens` and `memsave.attention_kivi`):

    k = memsave.dequantize_kv_int8(k_codes, k_scale, dtype)          # (B, H_kv, L, D)
    [k = k[:, :, None].expand(B, H_kv, r, L, D).reshape(B, H_kv·r, L, D)]   # repeat_kv (GQA)
    (same for v)
    o = scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0, scale=c, is_causal=False)
      ⟶  o = memsave.attention_int8_kv(q, k_codes, k_scale, v_codes, v_scale, m, c)

which reads the codes tile by tile (ops/kv_cache.py): no dequantized layer, and no repeated
heads, exist at any time. `enable_gqa` is what the op does anyway (kv head j serves q heads
j·r … j·r + r − 1, as repeat_interleave). `is_causal` (a prefill) becomes a (T, L) lower-triangular bool mask. Left as it was, with the
reason in the report: dropout, is_causal beside a mask, keys and values repeated differently, a dequantized
cache that something else reads too (it must exist then anyway), and an ordinary
full-precision cache (HF's StaticCache / DynamicCache: the report says so and names memsave's).
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


def _kind(node: Any) -> str | None:
    """Which cache a dequantize node reads: "int8", "kivi-keys", "kivi-values", or None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return None
    ops = torch.ops.memsave
    for kind, op in (("int8", ops.dequantize_kv_int8), ("kivi-keys", ops.dequantize_kv_channels),
                     ("kivi-values", ops.dequantize_kv_tokens)):
        if node.target in (op, op.default):
            return kind
    return None


def _is_dequantize(node: Any) -> bool:
    return _kind(node) is not None


def _method_or_function(node: fx.Node, name: str) -> bool:
    return (node.op == "call_method" and node.target == name) or (
        node.op == "call_function" and getattr(node.target, "__name__", None) == name)


def _cache_read(node: Any) -> tuple[fx.Node | None, slice | None, list[fx.Node]]:
    """(the dequantize node, the slice of tokens read or None, the slice's node) when `node` is
    the dequantized cache, or a slice of its tokens (HF reads the first T in a prefill)."""
    if _is_dequantize(node):
        return node, None, []
    tokens = _token_slice(node)
    if tokens is None:
        return None, None, []
    source = node.args[0]
    if _is_dequantize(source):
        return source, tokens, [node]
    # A slice of a slice (options['kv_cache'] reads HF's L of the whole groups, a prefill its T of
    # those): both of the first tokens, so the first min(T, L).
    inner = _token_slice(source)
    if inner is not None and _is_dequantize(source.args[0]) and _first_tokens(tokens) and _first_tokens(inner):
        return source.args[0], slice(None, min(tokens.stop, inner.stop)), [node, source]
    return None, None, []


def _token_slice(node: Any) -> slice | None:
    """The slice of `node[:, :, tokens]` (or `[:, :, tokens, :]`) when `node` is that, else None."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        key = node.args[1]
        if isinstance(key, tuple) and len(key) in (3, 4) and isinstance(key[2], slice) and all(
                k == slice(None) for i, k in enumerate(key) if i != 2):
            return key[2]
    return None


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
    wanted = (slice(None), slice(None), None, slice(None), slice(None))  # HF's; memsave's decoder: x[:, :, None]
    if not (isinstance(key, tuple) and key in (wanted, wanted[:3])):
        return missing
    source, tokens, between = _cache_read(inner)
    shape = expand.args[1:] if len(expand.args) > 2 else expand.args[1]
    if source is None or len(shape) != 5 or not isinstance(shape[2], int):
        return missing
    return source, tokens, shape[2], [node, expand, index, *between]


def _strip(node: Any) -> Any:
    """Through HF's repeat_kv and slices to what they read."""
    for _ in range(4):
        if not isinstance(node, fx.Node):
            return node
        if _method_or_function(node, "reshape") or _method_or_function(node, "expand") or (
                node.op == "call_function" and node.target is operator.getitem):
            node = node.args[0]
        else:
            return node
    return node


def _full_precision_cache(key: Any) -> bool:
    """Keys an ordinary cache holds: a graph input written in place at the new positions (a
    static cache: `index_copy_`, or an index assignment), or a concatenation onto a graph input
    along the tokens (a dynamic cache)."""
    source = _strip(key)
    if not isinstance(source, fx.Node):
        return False
    if source.op == "placeholder":
        return any(_method_or_function(u, "index_copy_") or (u.op == "call_function" and u.target is operator.setitem)
                   for u in source.users)
    if source.op == "call_function" and source.target is torch.cat and source.args:
        parts = source.args[0]
        return isinstance(parts, (list, tuple)) and any(isinstance(p, fx.Node) and p.op == "placeholder" for p in parts)
    return False


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
        if _full_precision_cache(bound["key"]):
            return ("a full-precision kv cache (HF's StaticCache or DynamicCache): left as it is; "
                    "options['kv_cache'] holds HF's static cache in int8 / int4 / kivi2 when the compiled graph allocates it, "
                    "memsave.QuantizedStaticCache holds it in int8 / int4 / kivi2")
        return ""  # not a cache read at all: nothing to say
    if k is None or v is None or k_rep != v_rep or k_tokens != v_tokens:
        return "keys and values are not both read from the quantized cache the same way"
    kinds = (_kind(k), _kind(v))
    if kinds not in (("int8", "int8"), ("kivi-keys", "kivi-values")):
        return f"keys and values from different caches ({kinds[0]}, {kinds[1]})"
    if kinds[0] != "int8" and k_tokens is not None and not causal and not _first_tokens(k_tokens):
        return "a slice of a kivi cache other than its first tokens, read with a mask"
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
            "tokens": k_tokens, "kind": kinds[0],
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
            fused = _fused(graph, m)
        fused.meta.update(node.meta)  # same output: shape, dtype, fake value
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        for dead in m["dead"]:  # repeat first, the dequantize last
            if not dead.users:
                graph.erase_node(dead)
        count += 1
    notes = []
    if count:
        notes.append(f"kv cache: {count} attention(s) read the quantized cache tile by tile (no dequantized cache)")
        graph.lint()
        gm.recompile()
    notes += [f"kv cache attention left as is ({n}x): {why}" for why, n in refusals.items()]
    return PassResult(bool(count), tuple(notes), {"fused": count, "left": dict(refusals)})


def _causal_mask(graph: fx.Graph, q: fx.Node, keys: fx.Node) -> fx.Node:
    """SDPA's is_causal as a (T, L) bool mask: query i sees keys 0..i (a prefill that starts the
    cache; over a whole static cache the keys past T are hidden by it too)."""
    rows = graph.call_method("size", (q, -2))
    cols = graph.call_method("size", (keys, -2))
    ones = graph.call_function(torch.ones, (rows, cols), {"dtype": torch.bool, "device": example_val(q).device})
    return graph.call_method("tril", (ones,))


def _fused(graph: fx.Graph, m: dict[str, Any]) -> fx.Node:
    if m["kind"] == "int8":
        k_codes, k_scale, v_codes, v_scale = (*m["k"].args[:2], *m["v"].args[:2])
        if m["tokens"] is not None:  # the same tokens of codes and scales
            whole = (slice(None), slice(None), m["tokens"])
            k_codes, k_scale, v_codes, v_scale = (
                graph.call_function(operator.getitem, (t, whole)) for t in (k_codes, k_scale, v_codes, v_scale))
        mask = _causal_mask(graph, m["q"], k_codes) if m["causal"] else m["mask"]
        return graph.call_function(
            torch.ops.memsave.attention_int8_kv.default, (m["q"], k_codes, k_scale, v_codes, v_scale, mask, m["scale"]))
    # KIVI: keys per channel in whole groups, so never sliced; a causal prefill's slice of the
    # first T tokens is the whole cache under the (T, L) causal mask, and a masked read of the
    # first L (options['kv_cache'] holds HF's L tokens as whole groups) is the whole cache with
    # the tokens past L hidden.
    k_packed, k_scale, k_min, k_window, length, bits, k_group = m["k"].args[:7]
    v_packed, v_scale, v_min, _, v_group = m["v"].args[:5]  # bits: the same as the keys
    if m["causal"]:
        mask = _causal_mask(graph, m["q"], k_packed)
    elif m["tokens"] is not None:
        mask = graph.call_function(hide_tokens_past, (m["mask"], m["q"], k_packed, m["tokens"].stop))
    else:
        mask = m["mask"]
    return graph.call_function(
        torch.ops.memsave.attention_kivi.default,
        (m["q"], k_packed, k_scale, k_min, k_window, length, v_packed, v_scale, v_min, mask, m["scale"], bits, k_group, v_group))


def _first_tokens(tokens: slice) -> bool:
    return tokens.start in (None, 0) and tokens.step in (None, 1) and isinstance(tokens.stop, int)


def hide_tokens_past(mask: torch.Tensor | None, q: torch.Tensor, keys: torch.Tensor, length: int) -> torch.Tensor:
    """`mask` over `length` keys, widened to all of `keys`' tokens with those past `length`
    hidden (bool: False; additive: -inf); no mask: every query sees the first `length`."""
    total = keys.shape[-2]
    if mask is None:
        seen = torch.arange(total, device=keys.device) < length
        return seen.expand(q.shape[-2], total)
    return F.pad(mask, (0, total - length), value=False if mask.dtype == torch.bool else float("-inf"))


def reads_quantized_cache(gm: fx.GraphModule) -> bool:
    return any(_is_dequantize(n) for n in gm.graph.nodes)


def reads_a_cache(gm: fx.GraphModule) -> bool:
    """Whether an attention in `gm` reads a kv cache, memsave's or not (the pass then runs: it
    fuses the first and names the second in the report)."""
    return reads_quantized_cache(gm) or any(
        n.op == "call_function" and n.target in SDPA and _full_precision_cache(_bound(n).get("key")) for n in gm.graph.nodes)
