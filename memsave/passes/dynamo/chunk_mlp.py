"""Chunk, capture step: MLP blocks of a long inference prefill computed a chunk of tokens at a time.

An MLP's intermediates are (tokens × intermediate) each, 2.7-4× the width of its input and
output; for a long prefill they set the peak. Every op in an MLP block works on each token on
its own, so the block can run on chunks of tokens and the results be concatenated:

    y = linear(act(linear(x, W1, b1)) [* linear(x, W3, b3)], W2, b2)        # x: (..., H)
      ⟶  xs = split(x.reshape(N, H), c); y = cat([mlp(xs[i]) for i]).reshape(..., H')

(SwiGLU / GeGLU with the gate, or a plain two-layer MLP; act one of silu, gelu, relu.) The
chunks are unrolled in the Dynamo graph, so AOTAutograd and the lowering see plain ops; one
chunk's intermediates are freed before the next chunk runs (codegen "fx" runs in graph order;
Inductor may reorder). Only when a budget or chunk size was given and the intermediates exceed
it, only in inference graphs (training keeps its activations for backward anyway: recompute
is the tool there), and only for a static token count.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from memsave.graph.meta import PROVENANCE, example_val, hint_int
from memsave.report import fmt_bytes

LINEARS = (torch._C._nn.linear, F.linear)
ACTIVATIONS = (F.silu, F.gelu, F.relu, torch.relu, torch.sigmoid, torch.tanh)
MULS = (operator.mul, torch.mul)


def chunk_mlps(gm: fx.GraphModule, config: Any, *, training: bool) -> tuple[int, list[str]]:
    """Unroll every MLP whose intermediates exceed the budget; returns (count, notes)."""
    matches = [m for node in gm.graph.nodes if (m := _match(node)) is not None]
    if not matches:
        return 0, []
    if training:
        return 0, [f"mlp: {len(matches)} MLP block(s) left as is: a training graph keeps activations for "
                   "backward (use recompute); MLP chunking is for inference prefill"]
    count, notes = 0, []
    for m in matches:
        x = example_val(m["x"])
        shape = [d for d in x.shape]
        if any(not isinstance(d, int) for d in shape):
            notes.append(f"mlp {m['out'].name} left as is: the token count is dynamic (chunks are unrolled)")
            continue
        tokens = 1
        for d in shape[:-1]:
            tokens *= d
        widths = [hint_int(example_val(n).shape[-1]) for n in m["inner"]]
        row_bytes = sum(widths) * x.element_size()  # the block's intermediates for one token
        chunk = config.rows_for(row_bytes)
        if chunk >= tokens:
            notes.append(f"mlp {m['out'].name}: {tokens} tokens' intermediates ({fmt_bytes(tokens * row_bytes)}) fit the budget")
            continue
        _unroll(gm, m, tokens, chunk)
        count += 1
        notes.append(
            f"mlp {m['out'].name}: {tokens} tokens in {-(-tokens // chunk)} chunks of {chunk}: intermediates "
            f"{fmt_bytes(chunk * row_bytes)} at a time instead of {fmt_bytes(tokens * row_bytes)}"
        )
    if count:
        gm.graph.lint()
        gm.recompile()
    return count, notes


def _match(out: fx.Node) -> dict[str, Any] | None:
    """An MLP ending at linear node `out`: {'x', 'out', 'inner' (the intermediates), 'nodes'}."""
    if not _is_linear(out):
        return None
    hidden = out.args[0]
    if isinstance(hidden, fx.Node) and hidden.op == "call_function" and hidden.target in MULS:
        a, b = hidden.args
        for act, up in ((a, b), (b, a)):
            if _is_activation(act) and _is_linear(act.args[0]) and _is_linear(up):
                gate = act.args[0]
                if gate.args[0] is up.args[0] and _single_users(gate, act, up, hidden):
                    return {"x": gate.args[0], "out": out, "inner": [gate, act, up, hidden],
                            "nodes": [gate, act, up, hidden, out]}
        return None
    if _is_activation(hidden) and _is_linear(hidden.args[0]) and _single_users(hidden.args[0], hidden):
        first = hidden.args[0]
        return {"x": first.args[0], "out": out, "inner": [first, hidden], "nodes": [first, hidden, out]}
    return None


def _unroll(gm: fx.GraphModule, m: dict[str, Any], tokens: int, chunk: int) -> None:
    graph = gm.graph
    x, out = m["x"], m["out"]
    width_in = example_val(x).shape[-1]
    out_shape = tuple(example_val(out).shape)
    with graph.inserting_before(out):
        flat = _tag(graph.call_method("reshape", (x, tokens, width_in)))  # (N, H)
        pieces = _tag(graph.call_function(torch.split, (flat, chunk)))
        results = []
        for i in range(-(-tokens // chunk)):
            piece = _tag(graph.call_function(operator.getitem, (pieces, i)))  # (c, H)
            env = {x: piece}
            for node in m["nodes"]:  # the block again, reading the chunk
                env[node] = _tag(graph.node_copy(node, lambda n: env.get(n, n)))
            results.append(env[out])
        joined = _tag(graph.call_function(torch.cat, (results,)))  # (N, H')
        shaped = _tag(graph.call_method("reshape", (joined, *out_shape)))
    out.replace_all_uses_with(shaped)
    for node in reversed(m["nodes"]):
        graph.erase_node(node)


def _tag(node: fx.Node) -> fx.Node:
    node.meta[PROVENANCE] = "chunk"
    node.meta.pop("example_value", None)  # the copies' shapes differ from the originals'
    return node


def _is_linear(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in LINEARS and example_val(node) is not None


def _is_activation(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in ACTIVATIONS and not node.kwargs.get("inplace")


def _single_users(*nodes: fx.Node) -> bool:
    """Each intermediate feeds only the next op of the block (else it must exist in full)."""
    return all(len(n.users) == 1 for n in nodes)


