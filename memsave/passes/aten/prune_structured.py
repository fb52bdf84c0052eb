"""Structured pruning: whole MLP channels and whole attention heads go, leaving a smaller dense model.

Called by the prune pass (prune.py) for the weights selected with structure "structured". Two
kinds of group, tried in this order for each selected weight (`granularity` picks which):

- channels (graph/channels.py): producers' rows, consumers' columns, the channel-wise ops
  between them run on fewer channels;

      mm(x, t(W_up)) … mm(h, t(W_down))  →  mm(x, t(W_up[keep])) … mm(h', t(W_down[:, keep]))

- heads (graph/heads.py): the rows of Q, K, V that compute a head (a kv head and the query
  heads sharing it, under GQA), o_proj's columns for it, and every view/expand between them
  rewritten to the smaller head count:

      mm(x, t(Wq)) → view (B,T,H,D) … view (B,T,H·D) → mm(·, t(Wo))
        →  mm(x, t(Wq[rows of kept heads])) → view (B,T,H',D) … view (B,T,H'·D) → mm(·, t(Wo[:, cols]))

Both are exact: the same function as zeroing the consumers' columns of what was removed.
`sparsity` is the fraction of each group's units removed (channels, or heads / kv groups),
rounded down; at least one unit stays.

Scores per unit, with ‖·‖ the Frobenius norm over the unit's rows or columns:
magnitude  Σ_consumers ‖W[:, unit]‖ · Σ_producers ‖W[unit, :]‖;
wanda      Σ_consumers ‖W[:, unit] · diag(RMS(x_unit))‖, the RMS of the consumer's inputs (for
           heads: the attention output o_proj reads; the Q/K/V inputs are the same for every
           head, so they cannot rank heads). For a channel this is ‖W[:, c]‖ · RMS(h_c).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

import memsave.weight_keys as weight_keys
from memsave.calibrate import CALIBRATION
from memsave.config import PruneConfig
from memsave.graph.channels import VIEWS, ChannelGroup, find_group
from memsave.graph.heads import HeadGroup, find_head_group
from memsave.graph.linears import MATMULS, linear_uses
from memsave.graph.rewrite import GraphBuilder
from memsave.passes.base import DERIVED_KEY
from memsave.report import sqnr_db
from memsave.weights import WEIGHTS

aten = torch.ops.aten


class CalibrationMissing(RuntimeError):
    pass


def input_rms(weight: torch.Tensor, name: str) -> torch.Tensor:
    """RMS of each input channel of a linear over the calibration data (Wanda's ‖x_j‖ / √rows)."""
    stats = CALIBRATION.get(weight)
    if stats is None or stats.sq_mean is None:
        raise CalibrationMissing(
            f"memsave prune: method 'wanda' needs the input statistics of {name}: run "
            "memsave.calibrate(model, batches) before compiling, or use method 'magnitude'"
        )
    return stats.sq_mean.sqrt()


def prune_structured(builder: GraphBuilder, weights, selected, structured, layers, on_group=None) -> list[str]:
    """Find and remove the groups the structured weights belong to; returns report notes.
    `on_group(members)` is called after each group is rewritten (prune.py frees the originals)."""
    notes, done, why_not = [], set(), {}
    is_weight = lambda n: n in weights  # noqa: E731
    order = {n: i for i, n in enumerate(builder.gm.graph.nodes)}
    kinds = {"channels": (find_group, _apply_channels), "heads": (find_head_group, _apply_heads)}
    for node in sorted(structured, key=order.__getitem__):  # graph order: reports are reproducible
        if node in done:
            continue
        uses = linear_uses(node)
        if uses is None or len(uses) != 1:
            why_not[node] = _not_a_linear(node)
            continue
        # Tried from every selected weight: only a producer's output leads to a group (a
        # consumer's output feeds e.g. the residual add), and the group then covers it.
        reasons = []
        for kind in selected[node].granularity.split("+"):
            find, apply = kinds[kind]
            group, why = find(uses[0], is_weight)
            if group is None:
                reasons.append((kind, why))
                continue
            members = [u.weight for u in group.producers + group.consumers]
            done.update(members)
            configs = {selected.get(m) for m in members}
            names = ", ".join(weights[m].name for m in members)
            if len(configs) != 1 or None in configs:
                notes.append(f"left {kind} group [{names}] dense: its layers are not all selected with one structured config")
                break
            info, note = apply(builder, group, weights, configs.pop())
            notes += [note] if note else []
            for m in members:
                if m in info:
                    layers[weights[m].name] = info[m]
            if on_group is not None:
                on_group(members)
            break
        else:
            why_not[node] = reasons[0][1] if len(reasons) == 1 else "; ".join(f"no {k} group: {w}" for k, w in reasons)
    for node in sorted(structured, key=order.__getitem__):
        if node not in done:
            notes.append(f"left {weights[node].name} dense (structured): {why_not.get(node, 'no channel group')}")
    return notes


def _not_a_linear(weight: fx.Node) -> str:
    if any(u.op == "call_function" and u.target in MATMULS and u.args[-1] is weight for u in weight.users):
        # HF's Conv1D (GPT-2's c_attn, c_proj, c_fc): addmm(b, x, W) with W stored (in, out).
        return "used untransposed as x @ W (a Conv1D layer, e.g. GPT-2's fused c_attn), which memsave does not treat as a linear"
    return "not used once as a linear layer's weight"


# -- shared: sliced weights ------------------------------------------------------------------


def _sliced(builder, use, dim: int, index: torch.Tensor, weights, cfg, members, label, before, extra) -> tuple[fx.Node, dict]:
    """A constant holding `use.weight` restricted to `index` along `dim`, transposed for mm."""
    w = weights[use.weight]

    def build():
        value = w.tensor.index_select(dim, index).contiguous()
        dense = w.tensor.float()
        removed = dense.clone().index_fill_(dim, index, 0)
        return value, sqnr_db(dense, dense - removed)

    value, sqnr = WEIGHTS.get_or_build(w.tensor, weight_keys.pruned_group("structured", cfg.method, cfg.sparsity, members), build)
    WEIGHTS.mark_derived(value)
    node = builder.constant("memsave_pruned_weight", value, before=before)
    node.meta[DERIVED_KEY] = (w.name, label)
    info = {
        "describe": cfg.describe(), "stored": "smaller dense", "bytes_before": w.tensor.numel() * w.tensor.element_size(),
        "bytes_after": value.numel() * value.element_size(), "sqnr_db": sqnr, **extra,
    }
    return builder.call(aten.permute.default, (node, [1, 0]), before=before), info


def _sliced_bias(builder, bias_node, keep, before, weights, cfg, members) -> fx.Node:
    if bias_node in weights:
        tensor = weights[bias_node].tensor
        value = WEIGHTS.get_or_build(tensor, weight_keys.pruned_group("structured", cfg.method, cfg.sparsity, members), lambda: tensor.index_select(0, keep).contiguous())
        return builder.constant("memsave_pruned_bias", value, before=before)
    return builder.call(aten.index_select.default, (bias_node, 0, builder.constant("memsave_keep", keep, before=before)), before=before)


def _rebuild(builder, group, weights, cfg, members, rows_of, cols_of, resize, first, extra) -> dict:
    """Producers on their kept rows, the region on the new sizes, consumers on kept columns."""
    new: dict[fx.Node, fx.Node] = {}
    info: dict[fx.Node, dict] = {}
    for producer in group.producers:
        rows = rows_of(producer)
        t, info[producer.weight] = _sliced(builder, producer, 0, rows, weights, cfg, members, "rows", first, extra(producer))
        if producer.bias is not None:
            bias = _sliced_bias(builder, producer.bias, rows, first, weights, cfg, members)
            new[producer.matmul] = builder.call(aten.addmm.default, (bias, producer.x, t), before=producer.matmul)
        else:
            new[producer.matmul] = builder.call(aten.mm.default, (producer.x, t), before=producer.matmul)
    for node in group.region:
        if node in new:  # a producer (channel groups list them in their region)
            continue
        args = fx.node.map_arg(node.args, lambda a: new.get(a, a))
        args = resize(node, args)
        kwargs = fx.node.map_arg(node.kwargs, lambda a: new.get(a, a))
        new[node] = builder.call(node.target, tuple(args), dict(kwargs), before=node)
    for consumer in group.consumers:
        t, info[consumer.weight] = _sliced(builder, consumer, 1, cols_of(consumer), weights, cfg, members, "columns", first, extra(consumer))
        x = new[consumer.x]
        args = (x, t) if consumer.bias is None else (consumer.bias, x, t)
        replacement = builder.call(consumer.matmul.target, args, dict(consumer.matmul.kwargs), before=consumer.matmul)
        consumer.matmul.replace_all_uses_with(replacement)
    return info


# -- channels --------------------------------------------------------------------------------


def _channel_scores(group: ChannelGroup, weights, cfg: PruneConfig) -> torch.Tensor:
    consumer_norm = sum(weights[c.weight].tensor.float().norm(dim=0) for c in group.consumers)
    if cfg.method == "magnitude":
        producer_norm = sum(weights[p.weight].tensor.float().norm(dim=1) for p in group.producers)
        return consumer_norm * producer_norm
    rms = [input_rms(weights[c.weight].tensor, weights[c.weight].name) for c in group.consumers]
    return consumer_norm * torch.stack(rms).mean(0)


def _apply_channels(builder: GraphBuilder, group: ChannelGroup, weights, cfg: PruneConfig) -> tuple[dict, str]:
    channels = group.channels
    kept = max(1, channels - math.floor(cfg.sparsity * channels))
    anchor = weights[group.consumers[0].weight].tensor
    members = tuple(weights[u.weight].name for u in group.producers + group.consumers)
    keep = WEIGHTS.get_or_build(
        anchor, weight_keys.pruned_group("channels", cfg.method, cfg.sparsity, members),
        lambda: _channel_scores(group, weights, cfg).argsort(descending=True, stable=True)[:kept].sort().values,
    )

    def resize(node, args):
        if node.target in VIEWS:
            size = list(args[1])
            size[-1] = kept
            args = (args[0], size, *args[2:])
        return args

    extra = lambda use: {"channels": f"{kept}/{channels}"}  # noqa: E731
    info = _rebuild(builder, group, weights, cfg, members, lambda p: keep, lambda c: keep, resize, group.region[0], extra)
    return info, ""


# -- heads -----------------------------------------------------------------------------------


def _blocks(keep: torch.Tensor, post: int) -> torch.Tensor:
    """Row (or column) indices of the kept units, `post` consecutive ones per unit."""
    with unset_fake_temporarily():  # passes run under AOTAutograd's fake mode; these are real
        return (keep[:, None] * post + torch.arange(post)).flatten()


def _head_scores(group: HeadGroup, weights, cfg: PruneConfig) -> torch.Tensor:
    units = group.units
    score = torch.zeros(units)
    for c in group.consumers:
        w = weights[c.weight].tensor.float()  # (N, U·post)
        if cfg.method == "wanda":
            w = w * input_rms(weights[c.weight].tensor, weights[c.weight].name)[None, :]
        score += w.t().reshape(units, -1).norm(dim=1)  # ‖W[:, unit]‖ (· RMS of its inputs)
    if cfg.method == "magnitude":
        score = score * sum(weights[p.weight].tensor.float().reshape(units, -1).norm(dim=1) for p in group.producers)
    return score


def _apply_heads(builder: GraphBuilder, group: HeadGroup, weights, cfg: PruneConfig) -> tuple[dict, str]:
    units = group.units
    query_heads = max(group.heads.values())
    members = tuple(weights[u.weight].name for u in group.producers + group.consumers)
    kind = "heads" if units == query_heads else f"kv groups (1 kv head + {query_heads // units} query heads each)"
    removed = math.floor(cfg.sparsity * units)
    if removed == 0:
        return {}, f"left heads of [{', '.join(members)}] as they are: {cfg.sparsity:.0%} of {units} {kind} removes none"
    kept = units - removed
    anchor = weights[group.consumers[0].weight].tensor
    keep = WEIGHTS.get_or_build(
        anchor, weight_keys.pruned_group("heads", cfg.method, cfg.sparsity, members),
        lambda: _head_scores(group, weights, cfg).argsort(descending=True, stable=True)[:kept].sort().values,
    )

    def resize(node, args):
        if node.target in VIEWS or node.target == aten.expand.default:
            size, dim = list(args[1]), group.axes[node].dim
            if isinstance(size[dim], fx.Node):  # a symbolic size: size // U * U', in the graph
                quotient = builder.call(operator.floordiv, (size[dim], units), before=node)
                size[dim] = builder.call(operator.mul, (quotient, kept), before=node)
            elif size[dim] != -1:
                size[dim] = size[dim] // units * kept
            args = (args[0], size, *args[2:])
        return args

    def extra(use):
        heads = group.heads.get(use.matmul, query_heads)
        return {"heads": f"{kept * heads // units}/{heads}"}

    rows = lambda p: _blocks(keep, group.post(p))  # noqa: E731
    info = _rebuild(builder, group, weights, cfg, members, rows, rows, resize, group.producers[0].matmul, extra)
    prefix = _common_prefix(members)
    note = f"heads of {prefix or '[' + ', '.join(members) + ']'}: kept {kept}/{units} {kind}"
    if units != query_heads:
        note += f" = {kept * query_heads // units}/{query_heads} query heads (grouped-query attention: whole kv groups go)"
    return info, note


def _common_prefix(names: tuple[str, ...]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)
