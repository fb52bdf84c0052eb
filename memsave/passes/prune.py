"""Prune: remove weights of linear layers and store what is left in a form that is smaller.

Zeroing weights in a dense tensor (what torch.nn.utils.prune does) saves nothing. Each
structure here changes what is stored:

- "structured": whole hidden channels (MLP neurons) go: the producing linears lose rows, the
  consuming linears lose input columns, and the ops between them run on fewer channels
  (graph/channels.py finds the groups where that is exact). The result is a smaller dense
  model that every later pass and kernel handles as it is.

      mm(x, t(W_up)) … mm(h, t(W_down))  →  mm(x, t(W_up[keep])) … mm(h', t(W_down[:, keep]))

- "2:4" / "4:8": n of every m consecutive input weights are kept, stored as packed values
  (N, K·n/m) plus each value's position in its group:

      t(W)  →  t(memsave.densify_nm(values, indices, n, m, K, dtype))

- "unstructured": any weights, stored as a bitmask plus the kept values, where that is smaller
  than dense at the weight's dtype; a layer where it is not stays dense (the report says so).

      t(W)  →  t(memsave.densify_bitmask(values, mask, K, dtype))

`densify_*` rebuild the dense weight; codegen fuses densify → matmul into `linear_nm` /
`linear_bitmask`, which never materialize it outside a kernel's registers (Triton) or one
layer at a time (reference). The kept values are graph constants marked as derived weights,
so a later quantize stores them in fewer bits.

Scores: "magnitude" |W| (unstructured: one threshold per layer, as in the Wanda paper's
magnitude baseline); "wanda" |W_ij|·‖x_j‖ with ‖x_j‖ the input channel's RMS over calibration
data (unstructured: compared within each output row, as Wanda does). Structured scores per
channel c: magnitude Σ_consumers ‖W[:, c]‖₂ · Σ_producers ‖W[c, :]‖₂; wanda
Σ_consumers ‖W[:, c]‖₂ · RMS(h_c), the channel's activation at the consumers' input.

Only inference graphs are pruned (training keeps dense weights). Masks and packed forms are
cached per weight (weights.py), so a recompile costs nothing and never needs the originals.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

import memsave.ops  # noqa: F401  (registers the memsave ops this module refers to)

from memsave.calibrate import CALIBRATION
from memsave.config import PruneConfig
from memsave.graph.channels import VIEWS, ChannelGroup, find_group
from memsave.graph.linears import linear_uses
from memsave.graph.rewrite import GraphBuilder
from memsave.ops.sparse import bitmask_bytes, nm_bytes, nm_keep_mask, pack_bitmask, pack_nm
from memsave.passes.base import DERIVED_KEY, PassContext, PassResult
from memsave.report import fmt_bytes, sqnr_db
from memsave.weights import WEIGHTS

aten = torch.ops.aten
memsave_ops = torch.ops.memsave


class CalibrationMissing(RuntimeError):
    pass


def prune_weights(gm: fx.GraphModule, config: PruneConfig, ctx: PassContext) -> PassResult:
    if ctx.stage != "inference":
        return PassResult(False, ("training graph: weights stay dense",))
    builder = GraphBuilder(gm, "prune")
    layers: dict[str, dict] = {}  # weight name -> what happened to it
    notes: list[str] = []
    # All weights (structured pruning slices the producers' biases too); only 2-D float ones
    # are pruned: biases, norms and buffers have nothing to prune.
    weights = {w.node: w for w in ctx.weight_nodes(gm) if not w.derived}
    selected = {}
    for node, w in weights.items():
        cfg = config.for_weight(w.name)
        if cfg is not None and cfg.effective_sparsity > 0 and w.tensor.dim() == 2 and w.tensor.dtype.is_floating_point:
            selected[node] = cfg

    structured = {n for n, cfg in selected.items() if cfg.structure == "structured"}
    if structured:
        notes += _prune_structured(builder, weights, selected, structured, layers)

    position = _position(gm)
    for node, cfg in selected.items():
        if cfg.structure == "structured":
            continue
        w = weights[node]
        uses = linear_uses(node)
        if uses is None:
            notes.append(f"left {w.name} dense: not used only as a linear layer's weight")
            continue
        k = w.tensor.shape[1]
        if cfg.n_m is not None and k % cfg.n_m[1] != 0:
            raise ValueError(
                f"memsave prune: {cfg.structure} needs the in-feature count of {w.name} "
                f"({k}) to be divisible by {cfg.n_m[1]}; exclude the layer "
                f"(options['prune']['exclude']) or choose 'unstructured'"
            )
        first = min((u.transpose for u in uses), key=position)
        layers[w.name] = _prune_layer(builder, w, uses, cfg, first)

    gm.graph.eliminate_dead_code()
    gm.recompile()
    pruned = {k: v for k, v in layers.items() if v["stored"] != "dense"}
    lines = [f"pruned {len(pruned)} weights; per layer (weight SQNR, stored bytes):"] if pruned else []
    for name, info in sorted(layers.items(), key=lambda kv: kv[1]["sqnr_db"]):
        lines.append(
            f"  {name}: {info['describe']}, {info['sqnr_db']:.1f} dB, {fmt_bytes(info['bytes_before'])} → "
            f"{fmt_bytes(info['bytes_after'])} ({info['stored']})"
            + (f" — {info['why']}" if info.get("why") else "")
        )
    return PassResult(bool(pruned), tuple(lines + notes), {"layers": layers})


# -- unstructured and N:M -------------------------------------------------------------------


def _prune_layer(builder: GraphBuilder, w, uses, cfg: PruneConfig, first: fx.Node) -> dict:
    weight = w.tensor
    n_out, k = weight.shape
    element = weight.element_size()
    dense = n_out * k * element
    key = ("prune", cfg.structure, cfg.method, cfg.sparsity)
    info = {"describe": cfg.describe(), "bytes_before": dense}

    def build():
        keep = _keep_mask(weight, w.name, cfg)
        sqnr = sqnr_db(weight.float(), weight.float() * keep)
        if cfg.n_m is not None:
            values, indices = pack_nm(weight, keep, *cfg.n_m)
            return values, indices, sqnr
        values, mask = pack_bitmask(weight, keep)
        return values.reshape(1, -1), mask, sqnr  # 2-D, so quantize can group it like a weight

    if cfg.n_m is None:
        nnz_estimate = n_out * k - math.floor(cfg.sparsity * n_out * k)
        sparse = bitmask_bytes(n_out, k, nnz_estimate, element)
        if sparse >= dense:
            info.update(stored="dense", bytes_after=dense, sqnr_db=math.inf,
                        why=f"bitmask + values ({fmt_bytes(sparse)}) is not smaller than dense at {weight.dtype}")
            return info
    values, meta, sqnr = WEIGHTS.get_or_build(weight, key, build)
    WEIGHTS.mark_derived(values)
    values_node = builder.constant("memsave_sparse_values", values, before=first)
    values_node.meta[DERIVED_KEY] = (w.name, "values")
    meta_node = builder.constant("memsave_sparse_meta", meta, before=first)
    if cfg.n_m is not None:
        n, m = cfg.n_m
        dense_node = builder.call(memsave_ops.densify_nm.default, (values_node, meta_node, n, m, k, weight.dtype), before=first)
        after = nm_bytes(n_out, k, n, m, element)
        stored = f"{n}:{m} values + indices"
    else:
        dense_node = builder.call(memsave_ops.densify_bitmask.default, (values_node, meta_node, k, weight.dtype), before=first)
        after = bitmask_bytes(n_out, k, values.numel(), element)
        stored = "bitmask + values"
    for use in uses:
        use.transpose.replace_input_with(w.node, dense_node)
    info.update(stored=stored, bytes_after=after, sqnr_db=sqnr, nonzero=values.numel() / (n_out * k))
    return info


def _keep_mask(weight: torch.Tensor, name: str, cfg: PruneConfig) -> torch.Tensor:
    w = weight.float()
    scores = w.abs()
    if cfg.method == "wanda":
        scores = scores * _input_rms(weight, name)[None, :]
    if cfg.n_m is not None:
        return nm_keep_mask(scores, *cfg.n_m)
    if cfg.method == "wanda":  # per output row, as in Wanda
        drop = math.floor(cfg.sparsity * w.shape[1])
        keep = torch.ones_like(w, dtype=torch.bool)
        if drop:
            keep.scatter_(1, scores.argsort(dim=1, stable=True)[:, :drop], False)
        return keep
    drop = math.floor(cfg.sparsity * w.numel())  # one threshold for the whole layer
    keep = torch.ones(w.numel(), dtype=torch.bool)
    if drop:
        keep[scores.flatten().argsort(stable=True)[:drop]] = False
    return keep.view_as(w)


def _input_rms(weight: torch.Tensor, name: str) -> torch.Tensor:
    stats = CALIBRATION.get(weight)
    if stats is None or stats.sq_mean is None:
        raise CalibrationMissing(
            f"memsave prune: method 'wanda' needs the input statistics of {name}: run "
            "memsave.calibrate(model, batches) before compiling, or use method 'magnitude'"
        )
    return stats.sq_mean.sqrt()


# -- structured -----------------------------------------------------------------------------


def _prune_structured(builder, weights, selected, structured, layers) -> list[str]:
    notes, done, why_not = [], set(), {}
    is_weight = lambda n: n in weights  # noqa: E731
    for node in list(structured):
        if node in done:
            continue
        uses = linear_uses(node)
        if uses is None or len(uses) != 1:
            why_not[node] = "not used once as a linear layer's weight"
            continue
        # Tried from every selected weight: only a producer's output leads to a group (a
        # consumer's output feeds e.g. the residual add), and the group then covers it.
        group, why = find_group(uses[0], is_weight)
        if group is None:
            why_not[node] = why
            continue
        members = [u.weight for u in group.producers + group.consumers]
        done.update(members)
        configs = {selected.get(m) for m in members}
        if len(configs) != 1 or None in configs:
            names = ", ".join(weights[m].name for m in members)
            notes.append(f"left channel group [{names}] dense: its layers are not all selected with one structured config")
            continue
        info = _apply_group(builder, group, weights, configs.pop())
        for m in members:
            layers[weights[m].name] = info[m]
    for node in structured:
        if node not in done:
            notes.append(f"left {weights[node].name} dense (structured): {why_not.get(node, 'no channel group')}")
    return notes


def _group_scores(group: ChannelGroup, weights, cfg: PruneConfig) -> torch.Tensor:
    consumer_norm = sum(weights[c.weight].tensor.float().norm(dim=0) for c in group.consumers)
    if cfg.method == "magnitude":
        producer_norm = sum(weights[p.weight].tensor.float().norm(dim=1) for p in group.producers)
        return consumer_norm * producer_norm
    rms = [_input_rms(weights[c.weight].tensor, weights[c.weight].name) for c in group.consumers]
    return consumer_norm * torch.stack(rms).mean(0)


def _apply_group(builder: GraphBuilder, group: ChannelGroup, weights, cfg: PruneConfig) -> dict:
    channels = group.channels
    kept = max(1, channels - math.floor(cfg.sparsity * channels))
    anchor = weights[group.consumers[0].weight].tensor
    members = tuple(weights[u.weight].name for u in group.producers + group.consumers)
    keep = WEIGHTS.get_or_build(
        anchor, ("prune-channels", cfg.method, cfg.sparsity, members),
        lambda: _group_scores(group, weights, cfg).argsort(descending=True, stable=True)[:kept].sort().values,
    )
    first = group.region[0]
    new: dict[fx.Node, fx.Node] = {}
    info: dict[fx.Node, dict] = {}

    def sliced(use, dim: int, label: str) -> fx.Node:
        w = weights[use.weight]

        def build():
            value = w.tensor.index_select(dim, keep).contiguous()
            dense = w.tensor.float()
            removed = dense.clone().index_fill_(dim, keep, 0)
            return value, sqnr_db(dense, dense - removed)

        value, sqnr = WEIGHTS.get_or_build(w.tensor, ("prune-structured", cfg.method, cfg.sparsity, members), build)
        WEIGHTS.mark_derived(value)
        node = builder.constant("memsave_pruned_weight", value, before=first)
        node.meta[DERIVED_KEY] = (w.name, label)
        info[use.weight] = {
            "describe": cfg.describe(), "stored": "smaller dense", "bytes_before": w.tensor.numel() * w.tensor.element_size(),
            "bytes_after": value.numel() * value.element_size(), "channels": f"{kept}/{channels}", "sqnr_db": sqnr,
        }
        return builder.call(aten.permute.default, (node, [1, 0]), before=first)

    for producer in group.producers:
        t = sliced(producer, 0, "rows")
        if producer.bias is not None:
            bias = _sliced_bias(builder, producer.bias, keep, first, weights, cfg, members)
            new[producer.matmul] = builder.call(aten.addmm.default, (bias, producer.x, t), before=producer.matmul)
        else:
            new[producer.matmul] = builder.call(aten.mm.default, (producer.x, t), before=producer.matmul)
    for node in group.region:
        if node in new:
            continue
        args = fx.node.map_arg(node.args, lambda a: new.get(a, a))
        if node.target in VIEWS:
            size = list(args[1])
            size[-1] = kept
            args = (args[0], size, *args[2:])
        kwargs = fx.node.map_arg(node.kwargs, lambda a: new.get(a, a))
        new[node] = builder.call(node.target, tuple(args), dict(kwargs), before=node)
    for consumer in group.consumers:
        t = sliced(consumer, 1, "columns")
        x = new[consumer.x]
        args = (x, t) if consumer.bias is None else (consumer.bias, x, t)
        replacement = builder.call(consumer.matmul.target, args, dict(consumer.matmul.kwargs), before=consumer.matmul)
        consumer.matmul.replace_all_uses_with(replacement)
    return info


def _sliced_bias(builder, bias_node, keep, before, weights, cfg, members) -> fx.Node:
    if bias_node in weights:
        tensor = weights[bias_node].tensor
        value = WEIGHTS.get_or_build(tensor, ("prune-structured", cfg.method, cfg.sparsity, members), lambda: tensor.index_select(0, keep).contiguous())
        return builder.constant("memsave_pruned_bias", value, before=before)
    return builder.call(aten.index_select.default, (bias_node, 0, builder.constant("memsave_keep", keep, before=before)), before=before)


def _position(gm: fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return order.__getitem__
