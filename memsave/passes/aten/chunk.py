"""Chunk: size the chunks of the fused LM-head losses in an ATen graph.

The capture step (chunk_capture.py, run on the Dynamo graph before AOTAutograd) turned each
LM-head linear + cross-entropy into memsave::linear_cross_entropy with chunk_size 0 (all
tokens at once). Here, where shapes, dtypes and the memory estimator are at hand, each such
node (and its backward node, in a joint graph) gets the number of tokens per chunk:

    chunk = config.chunk_size, or budget // bytes of one token's logits (32 MiB by default)

so one chunk's logits fit the budget whatever the sequence length and vocabulary. The
runner's before/after peak estimate shows the bytes this saves (the op declares its chunk's
workspace to memory.estimate).

Example: 2 × 4096 tokens, vocab 32000, fp32, default budget: chunks of 262 tokens, 32 MiB of
logits at a time instead of 1000 MiB.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from memsave.graph.meta import hint_int
from memsave.passes.base import PassContext, PassResult
from memsave.report import fmt_bytes

FORWARD = torch.ops.memsave.linear_cross_entropy.default
BACKWARD = torch.ops.memsave.linear_cross_entropy_backward.default
_CHUNK_ARG = {FORWARD: 6, BACKWARD: 8}
_HIDDEN_ARG = {FORWARD: 0, BACKWARD: 1}
_WEIGHT_ARG = {FORWARD: 1, BACKWARD: 2}


def chunk_sequences(gm: fx.GraphModule, config: Any, ctx: PassContext) -> PassResult:
    notes, sized = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _CHUNK_ARG:
            continue
        index = _CHUNK_ARG[node.target]
        if node.args[index] != 0:
            continue  # sized already (the forward/backward graphs of a partitioned joint)
        hidden = node.args[_HIDDEN_ARG[node.target]].meta["val"]  # (N, H)
        weight = node.args[_WEIGHT_ARG[node.target]].meta["val"]  # (V, H)
        tokens, vocab = hint_int(hidden.shape[0]), hint_int(weight.shape[0])
        # One token's logits row: fp32 (the softmax statistics), plus a copy in the inputs' dtype
        # when that is narrower.
        row_bytes = vocab * (4 + (hidden.element_size() if hidden.element_size() < 4 else 0))
        chunk = min(config.rows_for(row_bytes), tokens)
        node.args = (*node.args[:index], chunk, *node.args[index + 1 :])
        sized.append(node.name)
        which = "loss" if node.target is FORWARD else "loss gradient"
        notes.append(
            f"{which} {node.name}: {tokens} tokens × {vocab} vocab in chunks of {chunk} "
            f"({fmt_bytes(chunk * row_bytes)} of logits at a time instead of {fmt_bytes(tokens * row_bytes)})"
        )
    if sized:
        gm.recompile()
    return PassResult(bool(sized), tuple(notes), {"sized": sized})
