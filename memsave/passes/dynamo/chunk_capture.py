"""Chunk, capture step: rewrite the LM-head loss and eager attention in the Dynamo graph.

These rewrites need their own backward (a chunked loss whose gradient is also chunked;
SDPA's memory-efficient backward), so they happen on the Dynamo (torch IR) graph BEFORE
AOTAutograd, which then traces forward and backward of the replacements: a custom op with
registered autograd (memsave::linear_cross_entropy) and torch's own SDPA. The ATen-level
chunk pass (passes/aten/chunk.py) later picks the loss's chunk size from the budget.

Loss pattern (HF-style and memsave's decoder):

    logits = linear(h, W, b)                  # (..., V)   h: (..., H)
    x = logits[.float()][.view/.reshape/.flatten(-1, V)]   # (N, V)
    loss = cross_entropy(x, labels, ignore_index=i, reduction=r)   # labels (N,) int64
      ⟶  loss = memsave::linear_cross_entropy(h.reshape(-1, H), W, b, labels, i, r, 0, upcast)[0]

Left alone, with the reason in the report: logits used anywhere else (e.g. also returned to
the user: then they must exist in full anyway, unless options['chunk']['logits'] is "drop":
then, in a training graph, the output gets an empty tensor in their place), class weights,
label smoothing, probability targets, inputs that are not (N, V). Attention routing lives in
chunk_attention.py.
"""

from __future__ import annotations

import inspect
import operator
import time
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

import memsave.ops  # noqa: F401  (registers memsave::linear_cross_entropy)
from memsave.graph.meta import PROVENANCE, example_val, hint_int
from memsave.passes.base import PassResult
from memsave.report import fmt_bytes

LINEARS = (torch._C._nn.linear, F.linear)
CROSS_ENTROPY = (F.cross_entropy, torch.nn.functional.cross_entropy)
RESHAPE_METHODS = ("view", "reshape", "flatten", "contiguous")
RESHAPE_FUNCTIONS = (torch.reshape, torch.flatten)
_CE_SIGNATURE = inspect.signature(F.cross_entropy)


def capture_loss(gm: fx.GraphModule, *, drop_logits: bool = False) -> tuple[int, list[str], int]:
    """Rewrite every fusable LM-head loss; returns (count, notes, logits bytes no longer held).
    `drop_logits`: logits that are also graph outputs are returned as an empty tensor."""
    count, notes, saved = 0, [], 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in CROSS_ENTROPY:
            continue
        match = _match_loss(node, drop_logits)
        if isinstance(match, str):
            notes.append(f"loss ({node.name}) left as is: {match}")
            continue
        linear, chain, args, upcast = match
        logits = example_val(linear)
        h, w = linear.args[:2]  # linear(input, weight, bias=None)
        b = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
        hidden_size = hint_int(example_val(h).shape[-1])
        graph = gm.graph
        with graph.inserting_before(node):
            flat = graph.call_method("reshape", (h, -1, hidden_size))
            fused = graph.call_function(
                torch.ops.memsave.linear_cross_entropy.default,
                (flat, w, b, args["target"], args["ignore_index"], args["reduction"], 0, upcast),
            )
            loss = graph.call_function(operator.getitem, (fused, 0))
        for new in (flat, fused, loss):
            new.meta[PROVENANCE] = "chunk"
        node.replace_all_uses_with(loss)
        dropped = ""
        for returned in (linear, *chain):  # _match_loss let graph outputs through only with drop_logits
            outputs = [u for u in returned.users if u.op == "output"]
            if not outputs:
                continue
            val = example_val(returned)
            with graph.inserting_before(node):
                empty = graph.call_function(torch.empty, ((0,),), {"dtype": val.dtype, "device": val.device})
            empty.meta[PROVENANCE] = "chunk"
            empty.meta["example_value"] = val.new_empty((0,))  # a fake tensor, as Dynamo's values are
            for user in outputs:
                user.replace_input_with(returned, empty)
            dropped = "; the logits the model also returns are an empty tensor (options['chunk']['logits'] = 'drop')"
        for dead in [node, *reversed(chain), linear]:
            graph.erase_node(dead)
        nbytes = hint_int(logits.numel()) * logits.element_size()
        saved += nbytes
        count += 1
        notes.append(
            f"loss ({node.name}): lm-head linear {tuple(hint_int(s) for s in logits.shape)} + cross_entropy "
            f"({args['reduction']}, ignore_index={args['ignore_index']}) fused; the {fmt_bytes(nbytes)} of logits "
            "(and their log-softmax and gradient) are computed a chunk of tokens at a time" + dropped
        )
    if count:
        gm.graph.lint()
        gm.recompile()
    return count, notes, saved


def _match_loss(ce: fx.Node, drop_logits: bool = False) -> tuple[fx.Node, list[fx.Node], dict[str, Any], bool] | str:
    """(linear, reshape chain, cross_entropy arguments, upcast), or why the pattern does not fit.
    `drop_logits`: the logits (or a step of the chain) may also be graph outputs."""
    try:
        args = _CE_SIGNATURE.bind(*ce.args, **ce.kwargs)
    except TypeError as e:
        return f"unrecognized cross_entropy call ({e})"
    args.apply_defaults()
    args = dict(args.arguments)
    if args["weight"] is not None:
        return "class weights (weight=...) are not supported by the chunked loss"
    if args["label_smoothing"] != 0.0:
        return f"label_smoothing={args['label_smoothing']} is not supported by the chunked loss"
    if args["size_average"] is not None or args["reduce"] is not None:
        return "legacy size_average/reduce arguments"
    if args["reduction"] not in ("mean", "sum", "none"):
        return f"reduction {args['reduction']!r}"
    if not isinstance(args["ignore_index"], int):
        return "ignore_index is not a constant int"
    source, target = args["input"], args["target"]
    source_val, target_val = example_val(source), example_val(target)
    if not isinstance(source_val, torch.Tensor) or source_val.dim() != 2:
        return "the loss input is not a (tokens, vocab) matrix"
    if not isinstance(target_val, torch.Tensor) or target_val.dtype != torch.int64 or target_val.dim() != 1:
        return "targets are not int64 class indices of shape (tokens,)"
    chain, upcast, node = [], False, source
    while not (node.op == "call_function" and node.target in LINEARS):
        step = _chain_step(node)
        if step is None:
            return f"the loss input is made by {_describe(node)}, not by a linear (plus reshapes / an fp32 cast)"
        if step == "upcast":
            upcast = True
        chain.append(node)
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return "the loss input is not computed in the graph"
    linear = node
    steps = [linear, *reversed(chain)]
    for n, consumer in zip(steps, [*steps[1:], ce]):
        others = [u for u in n.users if u is not consumer]
        if others and not (drop_logits and all(u.op == "output" for u in others)):
            names = ", ".join(u.name if u.op != "output" else "the graph output" for u in others)
            hint = " (options['chunk']['logits'] = 'drop' returns an empty tensor there)" if all(
                u.op == "output" for u in others) else ""
            return f"the logits are also used by {names}: they must exist in full anyway{hint}"
    logits_val = example_val(linear)
    if logits_val is None or hint_int(logits_val.shape[-1]) != hint_int(source_val.shape[-1]):
        return "the loss input's last dimension is not the linear's output features"
    return linear, list(reversed(chain)), args, upcast


def _chain_step(node: fx.Node) -> str | None:
    """'reshape' or 'upcast' for the ops allowed between the linear and the loss, else None."""
    val = example_val(node)
    if node.op == "call_method" and node.target in RESHAPE_METHODS:
        return "reshape"
    if node.op == "call_function" and node.target in RESHAPE_FUNCTIONS:
        return "reshape"
    if node.op == "call_method" and node.target in ("float", "to") and isinstance(val, torch.Tensor):
        src = example_val(node.args[0])
        extra = [a for a in node.args[1:] if not isinstance(a, torch.dtype)] + [
            k for k in node.kwargs if k != "dtype"
        ]
        if not extra and val.dtype == torch.float32 and src is not None and src.is_floating_point() and src.element_size() <= 4:
            return "upcast"
    return None


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


def capture_chunk_patterns(gm: fx.GraphModule, config: Any, *, training: bool) -> PassResult:
    """The capture step, as a pass record for the report (see backend.GraphCompilation).
    `training`: AOTAutograd will build a joint forward+backward graph from this one."""
    from memsave.passes.dynamo.chunk_attention import route_attention
    from memsave.passes.dynamo.chunk_mlp import chunk_mlps

    start = time.perf_counter()
    notes: list[str] = []
    details: dict[str, Any] = {"seconds": 0.0}
    if "loss" in config.targets:
        count, loss_notes, logits_bytes = capture_loss(gm, drop_logits=training and config.logits == "drop")
        notes += loss_notes
        details.update(losses=count, logits_bytes=logits_bytes)
    if "attention" in config.targets:
        count, attention_notes, score_bytes = route_attention(gm)
        notes += attention_notes
        details.update(attentions=count, score_bytes=score_bytes)
    if "mlp" in config.targets and config.explicit:  # "when a budget asks for it"
        count, mlp_notes = chunk_mlps(gm, config, training=training)
        notes += mlp_notes
        details.update(mlps=count)
    details["seconds"] = time.perf_counter() - start
    changed = bool(details.get("losses") or details.get("attentions") or details.get("mlps"))
    return PassResult(changed, tuple(notes), details)
