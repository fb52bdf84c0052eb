"""Factorize: replace a linear's weight W (out×in) by a low-rank product U·V.

    y = mm(x, t(W))            →   y = mm(mm(x, t(V)), t(U))          V: (r, in), U: (out, r)
    y = addmm(b, x, t(W))      →   y = addmm(b, mm(x, t(V)), t(U))

Two smaller linears, so every later pass and kernel handles them as they are (quantize stores
U and V in int4 like any weight). Applied only where r·(out+in) < out·in, i.e. where it stores
less.

Rank: `reduction` keeps (1 − reduction) of each layer's parameters ("uniform"), or of the
selected layers' total with ranks allocated by sensitivity (the layers whose spectrum decays
slowly get more); `energy` keeps the smallest rank holding that share of the spectrum's
energy. Method "svd" is the plain truncated SVD (the best rank-r approximation of W);
"svd-llm" whitens by the Cholesky factor of the calibration inputs' second moment first, so
the truncation minimizes the error of the layer's outputs on real inputs (SVD-LLM). Both are
in ops/lowrank.py. The spectra and factors are cached per weight (weights.py).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

import memsave.weight_keys as weight_keys
from memsave.calibrate import CALIBRATION
from memsave.config import FactorizeConfig
from memsave.graph.linears import linear_uses
from memsave.graph.rewrite import GraphBuilder, erase_if_dead
from memsave.ops.lowrank import (
    Decomposition,
    allocate_ranks,
    factor_error,
    max_useful_rank,
    rank_for_energy,
    rank_for_ratio,
    spectrum,
    svd_decomposition,
    whitened_decomposition,
)
from memsave.passes.base import DERIVED_KEY, PassContext, PassResult
from memsave.report import fmt_bytes
from memsave.weights import WEIGHTS, release_streamed

aten = torch.ops.aten


def factorize_weights(gm: fx.GraphModule, config: FactorizeConfig, ctx: PassContext) -> PassResult:
    if ctx.stage != "inference":
        return PassResult(False, ("training graph: weights stay dense",))
    builder = GraphBuilder(gm, "factorize")
    candidates, notes = [], []
    for w in ctx.weight_nodes(gm):
        # Derived weights (e.g. a structurally pruned layer) are factorized like the original.
        cfg = config.for_weight(w.name)
        if cfg is None or w.tensor.dim() != 2 or not w.tensor.dtype.is_floating_point:
            continue
        uses = linear_uses(w.node)
        if uses is None:
            notes.append(f"left {w.label} dense: not used only as a linear layer's weight")
            continue
        candidates.append((w, uses, cfg))
    with unset_fake_temporarily():  # passes run under the compile's fake mode; spectra are real
        ranks = _ranks(candidates, config)
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    layers = {}
    for w, uses, cfg in candidates:
        n, k = w.tensor.shape
        rank = ranks[w.label]
        dense = n * k * w.tensor.element_size()
        if rank == 0 or rank > max_useful_rank(n, k):
            notes.append(f"left {w.label} dense: rank {rank} would store as much as dense ({n}×{k})")
            continue
        u, v, error = _factors(w, cfg, rank)
        _rewrite(builder, w, uses, u, v, first=min((use.transpose for use in uses), key=position.__getitem__))
        for use in uses:
            erase_if_dead(gm, use.matmul)  # the replaced matmul, then its transpose of the weight
        if not w.derived and not w.node.users:
            # Note [Streaming compression] (memsave/weights.py): the graph reads only the factors
            # now; free the original before the next weight's SVD, not after the whole model.
            release_streamed(w.tensor, w.name, ctx)
        layers[w.label] = {
            "rank": rank, "shape": (n, k), "bytes_before": dense,
            "bytes_after": (u.numel() + v.numel()) * u.element_size(), "relative_error": error,
            "method": cfg.method,  # a per-layer override may choose it (memsave.plan does)
        }
    gm.graph.eliminate_dead_code()
    gm.recompile()
    # with per-layer overrides (a plan's ranks), the top level describes no layer: each line says its own
    what = "" if config.overrides else f" ({config.describe()})"
    lines = [f"factorized {len(layers)} weights{what}; per layer, worst error first:"] if layers else []
    for label, info in sorted(layers.items(), key=lambda kv: -kv[1]["relative_error"]):
        lines.append(
            f"  {label}: rank {info['rank']} of {min(info['shape'])}, relative "
            f"{'output' if info['method'] == 'svd-llm' else 'weight'} error "  # what the method minimizes
            f"{info['relative_error']:.3f}, {fmt_bytes(info['bytes_before'])} → {fmt_bytes(info['bytes_after'])}"
        )
    return PassResult(bool(layers), tuple(lines + notes), {"layers": layers})


def _gram(weight: torch.Tensor, label: str, cfg: FactorizeConfig) -> torch.Tensor | None:
    if cfg.method == "svd":
        return None
    stats = CALIBRATION.get(weight)
    if stats is None or stats.gram is None:
        raise RuntimeError(
            f"memsave factorize: method 'svd-llm' needs the input Gram matrix of {label}: run "
            "memsave.calibrate(model, batches) (with hessian=True, the default) before compiling, or use method 'svd'"
        )
    return stats.gram


def _spectrum(w, cfg: FactorizeConfig) -> torch.Tensor:
    key = weight_keys.spectrum(cfg.method, cfg.damp)
    return WEIGHTS.get_or_build(w.tensor, key, lambda: spectrum(w.tensor.float(), _gram(w.tensor, w.label, cfg), cfg.damp))


def _ranks(candidates, config: FactorizeConfig) -> dict[str, int]:
    """Each candidate's rank. Only energy targets and sensitivity allocation look at the
    spectra (a fixed rank or reduction does not: no SVD beyond the one that makes the factors)."""
    if config.allocation == "sensitivity":
        layers = {w.label: (*w.tensor.shape, _spectrum(w, cfg)) for w, _, cfg in candidates}
        return allocate_ranks(layers, 1 - config.reduction) if layers else {}
    ranks = {}
    for w, _, cfg in candidates:
        n, k = w.tensor.shape
        if cfg.rank is not None:
            if cfg.rank > min(n, k):
                raise ValueError(
                    f"memsave factorize: rank {cfg.rank} is larger than {w.label} allows ({n}×{k}: at most "
                    f"{min(n, k)}, and below {max_useful_rank(n, k) + 1} to store less than dense)"
                )
            ranks[w.label] = cfg.rank
        elif cfg.energy is not None:
            ranks[w.label] = rank_for_energy(_spectrum(w, cfg), cfg.energy)
        else:
            ranks[w.label] = rank_for_ratio(n, k, 1 - cfg.reduction)
    return ranks


def decomposition(weight: torch.Tensor, label: str, cfg: FactorizeConfig) -> Decomposition:
    """The SVD that `cfg`'s method truncates: of W (svd), or of W whitened by the inputs' Gram
    matrix (svd-llm)."""
    w = weight.float()
    if cfg.method == "svd":
        return svd_decomposition(w)
    return whitened_decomposition(w, _gram(weight, label, cfg), cfg.damp)


def factor_parts(weight: torch.Tensor, label: str, cfg: FactorizeConfig, rank: int,
                 decomposed: Decomposition | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(U, V, relative error) of `weight` at `rank` by `cfg`'s method: what the pass stores and
    caches. The budget planner scores its low-rank forms with it too, passing one `decomposition`
    for all the ranks it scores."""
    gram = _gram(weight, label, cfg)
    w = weight.float()
    u, v = (decomposed or decomposition(weight, label, cfg)).factors(rank)
    # The error the method minimizes: of the weight (svd) or of the outputs (svd-llm).
    error = factor_error(w, u, v, gram)
    return u.to(weight.dtype).contiguous(), v.to(weight.dtype).contiguous(), error


def _factors(w, cfg: FactorizeConfig, rank: int):
    def build():
        return factor_parts(w.tensor, w.label, cfg, rank)

    u, v, error = WEIGHTS.get_or_build(w.tensor, weight_keys.factors(cfg.method, rank, cfg.damp), build)
    WEIGHTS.mark_derived(u, v)
    return u, v, error


def _rewrite(builder: GraphBuilder, w, uses, u: torch.Tensor, v: torch.Tensor, *, first: fx.Node) -> None:
    prefix = f"{w.part}·" if w.derived else ""  # a factor of a pruned weight: "rows·U"
    u_node = builder.constant("memsave_factor_u", u, before=first)
    u_node.meta[DERIVED_KEY] = (w.name, f"{prefix}U")
    v_node = builder.constant("memsave_factor_v", v, before=first)
    v_node.meta[DERIVED_KEY] = (w.name, f"{prefix}V")
    ut = builder.call(aten.permute.default, (u_node, [1, 0]), before=first)
    vt = builder.call(aten.permute.default, (v_node, [1, 0]), before=first)
    for use in uses:
        mm = use.matmul
        inner = builder.call(aten.mm.default, (use.x, vt), before=mm)
        args = (inner, ut) if use.bias is None else (use.bias, inner, ut)
        outer = builder.call(mm.target, args, dict(mm.kwargs), before=mm)
        mm.replace_all_uses_with(outer)
