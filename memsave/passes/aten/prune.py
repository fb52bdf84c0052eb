"""Prune: remove weights of linear layers and store what is left in a form that is smaller.

Zeroing weights in a dense tensor (what torch.nn.utils.prune does) saves nothing. Each
structure here changes what is stored:

- "structured": whole hidden channels (MLP neurons) and whole attention heads go: the
  producing linears lose rows, the consuming linears lose input columns, and the ops between
  them run on fewer channels / heads (graph/channels.py and graph/heads.py find the groups where
  that is exact; prune_structured.py removes them). The result is a smaller dense model that
  every later pass and kernel handles as it is.

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
data (unstructured: compared within each output row, as Wanda does). Structured scores: see
prune_structured.py.

Only inference graphs are pruned (training keeps dense weights). Masks and packed forms are
cached per weight (weights.py), so a recompile costs nothing and never needs the originals.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

import memsave.ops  # noqa: F401  (registers the memsave ops this module refers to)

import memsave.weight_keys as weight_keys
from memsave.config import PruneConfig
from memsave.graph.linears import linear_uses
from memsave.graph.rewrite import GraphBuilder
from memsave.ops.sparse import bitmask_bytes, nm_bytes, nm_keep_mask, pack_bitmask, pack_nm
from memsave.passes.base import DERIVED_KEY, PassContext, PassResult
from memsave.passes.aten.prune_structured import CalibrationMissing, input_rms, prune_structured  # noqa: F401
from memsave.report import fmt_bytes, sqnr_db
from memsave.weights import WEIGHTS, release_streamed

aten = torch.ops.aten
memsave_ops = torch.ops.memsave


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

    def release_replaced(nodes) -> None:
        # Note [Streaming compression] (memsave/weights.py): free an original as soon as the
        # graph reads only its pruned form, not after the whole model is pruned.
        if any(weights[n].tensor in WEIGHTS for n in nodes):
            gm.graph.eliminate_dead_code()  # the rewritten matmuls still read it until erased
        for n in nodes:
            if not n.users:
                release_streamed(weights[n].tensor, weights[n].name, ctx)

    structured = {n for n, cfg in selected.items() if cfg.structure == "structured"}
    if structured:
        notes += prune_structured(builder, weights, selected, structured, layers, on_group=release_replaced)

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
        release_replaced([node])

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
    key = weight_keys.pruned(cfg.structure, cfg.method, cfg.sparsity)
    info = {"describe": cfg.describe(), "bytes_before": dense}

    def build():
        return pruned_parts(weight, w.name, cfg)

    if cfg.n_m is None:
        sparse = bitmask_bytes(n_out, k, kept_weights(n_out, k, cfg), element)
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


def pruned_parts(weight: torch.Tensor, name: str, cfg: PruneConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(values, metadata, weight SQNR in dB) of `weight` pruned by `cfg` (unstructured or N:M):
    what the pass stores and caches. The budget planner scores its prune forms with it too."""
    keep = _keep_mask(weight, name, cfg)
    sqnr = sqnr_db(weight.float(), weight.float() * keep)
    if cfg.n_m is not None:
        values, indices = pack_nm(weight, keep, *cfg.n_m)
        return values, indices, sqnr
    values, mask = pack_bitmask(weight, keep)
    return values.reshape(1, -1), mask, sqnr  # 2-D, so quantize can group it like a weight


def kept_weights(out_features: int, in_features: int, cfg: PruneConfig) -> int:
    """How many weights _keep_mask keeps: n of every m; wanda drops floor(sparsity·K) of each
    row; magnitude drops floor(sparsity·N·K) of the whole layer."""
    if cfg.n_m is not None:
        n, m = cfg.n_m
        return out_features * (in_features // m * n)
    if cfg.method == "wanda":
        return out_features * (in_features - math.floor(cfg.sparsity * in_features))
    return out_features * in_features - math.floor(cfg.sparsity * out_features * in_features)


def _keep_mask(weight: torch.Tensor, name: str, cfg: PruneConfig) -> torch.Tensor:
    w = weight.float()
    scores = w.abs()
    if cfg.method == "wanda":
        scores = scores * input_rms(weight, name)[None, :]
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


def _position(gm: fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return order.__getitem__
