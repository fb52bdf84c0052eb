"""Quantize: put explicit quantize → dequantize nodes on the weights of linears (and embeddings).

Before (what AOTAutograd makes of nn.Linear):

    t = aten.permute(w, [1, 0]);  mm = aten.mm(x, t)          # or aten.t; or addmm(bias, x, t)

After:

    q  = memsave.quantize_affine(w, scale, offset, bits, group)          # weight side
    dq = memsave.dequantize_affine(q, scale, offset, bits, group, K, dtype)
    t  = aten.permute(dq, [1, 0]);  mm = aten.mm(x, t)

The graph now says exactly what numerics the model gets, with memsave ops visible by name in
the debug dumps. `fold_weights` then evaluates the weight-side quantize once, at compile time,
into stored packed codes; codegen fuses dequantize → matmul into one kernel.

Scales (and offsets) are chosen per weight by the configured method, once per weight (the
weight cache), and become constants of the graph. In training (the joint graph) only frozen
weights are quantized, those that do not require grad (a base model under adapters); the
weights being learned stay in full precision. A frozen weight's dequantize is tagged
MUST_RECOMPUTE, so the partition recomputes it in the backward instead of saving a
full-precision copy between the passes.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils.checkpoint import CheckpointPolicy

import memsave.ops  # noqa: F401  (registers the memsave ops this module refers to)

import memsave.weight_keys as weight_keys
from memsave.calibrate import CALIBRATION
from memsave.config import QuantizeConfig
from memsave.graph.meta import node_val
from memsave.graph.linears import MATMULS, is_transpose
from memsave.graph.rewrite import GraphBuilder, users_are
from memsave.ops.awq import choose_awq
from memsave.ops.schemes import SCHEMES, QuantSpec
from memsave.passes.base import QPARAMS_KEY, PassContext, PassResult
from memsave.weights import WEIGHTS, compressible_in, release_streamed

aten = torch.ops.aten
memsave_ops = torch.ops.memsave
# Casts as the decomposed graph spells them: Inductor lowers prims.convert_element_type, while
# aten._to_copy (which AOTAutograd has already decomposed) makes it fail with "both a fallback
# and a decomp for same op".
CAST = torch.ops.prims.convert_element_type.default


def insert_qdq(gm: fx.GraphModule, config: QuantizeConfig, ctx: PassContext) -> PassResult:
    if ctx.stage not in ("inference", "joint"):
        return PassResult(False, ("training graph: weights stay in full precision",))
    frozen_only = ctx.stage == "joint"
    builder = GraphBuilder(gm, "quantize")
    quantized, skipped = [], []
    errors: dict[str, float] = {}  # weight name -> SQNR (dB) of its quantized form
    alphas: dict[str, float] = {}  # weight name -> AWQ's chosen exponent
    skipped_awq: list[str] = []
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    for found in ctx.weight_nodes(gm):
        # A derived weight (a pruned weight, a low-rank factor, sparse values) is quantized
        # like the weight it came from, reported under its own label.
        node, name, weight = found.node, found.label, found.tensor
        if not compressible_in(ctx.stage, weight):
            continue  # a weight being trained stays full precision
        scheme = config.for_weight(found.name)
        uses = _quantizable_uses(node, config.embeddings, training=frozen_only)
        if scheme is None or not uses:
            continue
        val = node_val(node)
        if not (isinstance(val, torch.Tensor) and val.dim() == 2 and val.dtype.is_floating_point):
            skipped.append(f"{name}: not a 2-D float weight")
            continue
        k = val.shape[1]
        group = k if scheme.group_size is None or scheme.group_size >= k else scheme.group_size
        # AWQ and GPTQ need calibration statistics, unless their result is cached already (a
        # recompile, or a model loaded with memsave.load).
        resolved = resolve_method(weight, scheme, group)
        if resolved is not scheme:
            skipped_awq.append(f"{name} ({scheme.method})")
            scheme = resolved
        # The codes now rather than in fold_weights (which finds them cached), so the original
        # can be freed before the next weight is touched (release_streamed).
        codes = weight_codes(weight, scheme, group)
        spec, rules, params, column_scale = codes.spec, codes.rules, codes.params, codes.column_scale
        first_use = min(uses, key=position.__getitem__)
        quantized_input = node
        if spec.method == "awq":
            quantized_input = _apply_awq(builder, node, uses, column_scale, val.dtype, first_use)
            alphas[name] = codes.alpha
        param_nodes = [
            builder.constant(f"memsave_{spec.scheme}_param", p, before=first_use) if p is not None else None
            for p in params
        ]
        quantize_op, extra_nodes = rules.quantize, []
        if spec.method == "gptq":
            # The Hessian is a compile-time constant that fold_weights drops.
            quantize_op = memsave_ops.quantize_affine_gptq.default
            extra_nodes = [builder.constant("memsave_gptq_hessian", _hessian(weight), before=first_use)]
        q = builder.call(
            quantize_op, (quantized_input, *param_nodes, *extra_nodes, *rules.quantize_extra(spec)), before=first_use
        )
        q.meta[QPARAMS_KEY] = codes.key  # fold_weights caches the packed codes under it
        # None (codegen picks the kernel) and "float32" (exact) leave the graph's dtypes alone.
        compute = getattr(torch, scheme.compute_dtype) if scheme.compute_dtype in ("bfloat16", "float16") else val.dtype
        dequantized: dict[torch.dtype, fx.Node] = {}

        def dequantize(dtype: torch.dtype) -> fx.Node:
            if dtype not in dequantized:
                args = (q, *param_nodes, *rules.dequantize_extra(spec), k, dtype)
                dequantized[dtype] = builder.call(rules.dequantize, args, before=first_use)
                if frozen_only:
                    # Training: the backward recomputes the dequantized weight where it needs it;
                    # saving it would keep a full-precision copy alive between the passes.
                    dequantized[dtype].meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            return dequantized[dtype]

        if scheme.activations == "int8":
            for use in uses:
                for mm in list(use.users) if is_transpose(use) else []:
                    _quantize_activations(builder, mm)
        for use in uses:
            if compute != val.dtype and is_transpose(use):
                _compute_in(builder, use, node, dequantize(compute), compute)
            else:
                use.replace_input_with(node, dequantize(val.dtype))
        errors[name] = weight_sqnr(weight, codes)
        if all(user is q or user is quantized_input for user in node.users):
            release_streamed(weight, name, ctx)  # only the quantize node reads it, and its codes are cached
        quantized.append(f"{name}: {scheme.describe()}" + (f" (group {group})" if group != scheme.group_size and scheme.group_size else ""))
    gm.recompile()
    if frozen_only and not quantized:
        return PassResult(False, ("training graph: every weight requires grad and stays in full precision "
                                  "(only frozen weights are quantized)",))
    worst_first = sorted(errors.items(), key=lambda item: item[1])
    notes = tuple(
        [f"quantized {len(quantized)} weights; weight SQNR per layer, worst first:"]
        + [f"  {name}: {db:.1f} dB" + (f" (awq alpha {alphas[name]:.1f})" if name in alphas else "") for name, db in worst_first]
        + [f"skipped {s}" for s in skipped]
        + (
            [f"no calibration statistics for {', '.join(skipped_awq)} (run memsave.calibrate first): used mse"]
            if skipped_awq
            else []
        )
    )
    details = {"quantized": quantized, "skipped": skipped, "sqnr_db": errors, "awq_alpha": alphas}
    return PassResult(bool(quantized), notes, details)


@dataclasses.dataclass(frozen=True)
class WeightCodes:
    """What insert_qdq stores for one weight: the side parameters, the packed codes, AWQ's
    column scale (and exponent) where the method is AWQ."""

    spec: QuantSpec
    rules: object
    key: tuple
    params: tuple
    packed: torch.Tensor
    column_scale: torch.Tensor | None = None
    alpha: float | None = None

    def dequantized(self, in_features: int) -> torch.Tensor:
        """ŵ in fp32: what the model computes with (AWQ's column scale undone)."""
        s = self.spec
        w_hat = self.rules.dequantize(self.packed, *self.params, *self.rules.dequantize_extra(s), in_features, torch.float32)
        return w_hat if self.column_scale is None else w_hat / self.column_scale


def resolve_method(weight: torch.Tensor, scheme: QuantizeConfig, group: int) -> QuantizeConfig:
    """`scheme`, with AWQ or GPTQ replaced by "mse" where neither calibration statistics nor a
    cached result exist for `weight` (the pass reports which)."""
    if scheme.method in ("awq", "gptq") and not _calibrated(weight, scheme, group):
        return dataclasses.replace(scheme, method="mse")
    return scheme


def weight_codes(weight: torch.Tensor, scheme: QuantizeConfig, group: int, cached=None) -> WeightCodes:
    """The codes insert_qdq stores for `weight` under `scheme` (method already resolved, see
    resolve_method) with groups of `group`. `cached(key, build)` keeps each result (default: the
    weight cache, which the pass, fold_weights and memsave.save share); the planner passes one
    that keeps nothing, to score candidate forms without holding their codes."""
    if cached is None:
        def cached(key, build):
            return WEIGHTS.get_or_build(weight, key, build)
    spec = QuantSpec(scheme.scheme, scheme.bits, group, scheme.symmetric, scheme.method)
    rules, key = SCHEMES[spec.scheme], _params_key(scheme, group)
    column_scale = alpha = None
    if spec.method == "awq":
        params, column_scale, alpha = _awq(weight, spec, key, cached)
    else:
        # GPTQ starts from the MSE grid and then picks each code with the inputs' Hessian.
        choose = dataclasses.replace(spec, method="mse" if spec.method == "gptq" else spec.method)
        params = cached(key, lambda: _choose_in_blocks(weight, rules, choose))
    if spec.method == "gptq":
        packed = cached(weight_keys.packed(key), lambda: memsave_ops.quantize_affine_gptq(
            weight, *params, _hessian(weight), *rules.quantize_extra(spec)))
    else:
        packed = cached(weight_keys.packed(key), lambda: _quantize_in_blocks(weight, rules, spec, params, column_scale))
    return WeightCodes(spec, rules, key, tuple(params), packed, column_scale, alpha)


def weight_sqnr(weight: torch.Tensor, codes: WeightCodes, cached=None) -> float:
    """The SQNR (dB) the pass reports for `weight` under `codes`, kept like weight_codes' results
    (`cached` as there; the loader builds it while the original is still there)."""
    if cached is None:
        def cached(key, build):
            return WEIGHTS.get_or_build(weight, key, build)
    return cached(weight_keys.sqnr(codes.key), lambda: _weight_sqnr(
        weight, codes.rules, codes.spec, codes.params, codes.column_scale, codes.packed))


def _params_key(scheme: QuantizeConfig, group: int) -> tuple:
    """The weight-cache key of a weight's side parameters (memsave.save relies on the affine form)."""
    return weight_keys.quant_params(scheme.scheme, scheme.bits, group, scheme.symmetric, scheme.method)


def _calibrated(weight: torch.Tensor, scheme: QuantizeConfig, group: int) -> bool:
    """Calibration statistics for this method, or its result already cached."""
    key = _params_key(scheme, group)
    stats = CALIBRATION.get(weight)
    if scheme.method == "awq":
        return stats is not None or WEIGHTS.has(weight, weight_keys.awq(key))
    return (stats is not None and stats.gram is not None) or WEIGHTS.has(weight, weight_keys.packed(key))


def _hessian(weight: torch.Tensor) -> torch.Tensor:
    stats = CALIBRATION.get(weight)
    if stats is not None and stats.gram is not None:
        return stats.gram
    # The codes are cached (e.g. memsave.load): the Hessian is not needed to pick them again.
    return torch.empty(0)


def _awq(weight: torch.Tensor, spec: QuantSpec, key: tuple, cached):
    """AWQ's channel scales and the affine parameters of W·s, once per weight (`cached`)."""
    found: list = []

    def search():
        stats = CALIBRATION[weight]
        found.extend(choose_awq(weight, stats.mean_abs, stats.sample, spec.bits, spec.group, spec.symmetric))
        return found[0], found[3]

    column_scale, alpha = cached(weight_keys.awq(key), search)
    params = cached(key, lambda: (found[1], found[2]))
    return params, column_scale, alpha


def _apply_awq(builder: GraphBuilder, node: fx.Node, uses, column_scale, dtype, first_use) -> fx.Node:
    """W·s goes to the quantizer (fold_weights evaluates it at compile time), and each matmul's
    input gets x · (1/s), which undoes the scaling exactly: (x / s)(W·s)ᵀ = x Wᵀ."""
    s_node = builder.constant("memsave_awq_scale", column_scale, before=first_use)
    scaled = builder.call(aten.mul.Tensor, (node, s_node), before=first_use)
    with unset_fake_temporarily():  # passes run under the compile's fake mode
        inverse_value = (1 / column_scale).to(dtype)
    inverse = builder.constant("memsave_awq_inverse", inverse_value, before=first_use)
    for use in uses:
        for mm in list(use.users) if is_transpose(use) else []:
            x = mm.args[0 if mm.target == aten.mm.default else 1]
            mm.replace_input_with(x, builder.call(aten.mul.Tensor, (x, inverse), before=mm))
    return scaled


# Ops that rebuild a weight from stored sparse parts; their first argument (the kept values)
# is a weight in its own right, which quantize may store in fewer bits.
SPARSE_DENSIFY = (memsave_ops.densify_bitmask.default, memsave_ops.densify_nm.default)


def _quantizable_uses(weight: fx.Node, embeddings: bool, training: bool = False) -> list[fx.Node]:
    """Users through which the weight feeds a linear (t → mm/addmm), a sparse weight's values
    slot, or, optionally, an embedding. In a joint graph (`training`) the backward also reads
    the transposed weight, transposed back, for the input's gradient (t → t → mm)."""
    uses = []
    for user in weight.users:
        if user.op != "call_function":
            continue
        if user.target in SPARSE_DENSIFY and user.args[0] is weight:
            uses.append(user)
            continue
        if is_transpose(user) and (users_are(user, MATMULS) or (training and _feeds_matmuls(user))):
            uses.append(user)
        elif user.target == aten.linear.default and user.args[1] is weight:
            uses.append(user)
        elif embeddings and user.target == aten.embedding.default and user.args[0] is weight:
            uses.append(user)
    return uses


def _feeds_matmuls(transpose: fx.Node) -> bool:
    return all(u.target in MATMULS or (is_transpose(u) and users_are(u, MATMULS)) for u in transpose.users)


def _quantize_activations(builder: GraphBuilder, mm: fx.Node) -> None:
    """x → dequantize_per_token(quantize_per_token(x)) in front of a matmul (W8A8)."""
    index = 0 if mm.target == aten.mm.default else 1
    x = mm.args[index]
    q = builder.call(memsave_ops.quantize_per_token.default, (x,), before=mm)
    codes = builder.call(operator.getitem, (q, 0), before=mm)
    scales = builder.call(operator.getitem, (q, 1), before=mm)
    dq = builder.call(memsave_ops.dequantize_per_token.default, (codes, scales, x.meta["val"].dtype), before=mm)
    mm.replace_input_with(x, dq)


def _compute_in(builder: GraphBuilder, transpose: fx.Node, weight: fx.Node, dq: fx.Node, dtype: torch.dtype) -> None:
    """Rewrite `transpose(w)` → matmuls to run in `dtype`: cast x (and bias) in, the result back.

        t = permute(w); y = mm(x, t)
    becomes
        t = permute(dq_bf16); y16 = mm(to_bf16(x), t); y = to_fp32(y16)
    """
    transpose_bf = builder.call(transpose.target, (dq, *transpose.args[1:]), before=transpose)
    for mm in list(transpose.users):
        args = list(mm.args)
        for i, arg in enumerate(args):
            if arg is transpose:
                args[i] = transpose_bf
            elif isinstance(arg, fx.Node):
                args[i] = builder.call(CAST, (arg, dtype), before=mm)
        narrow = builder.call(mm.target, tuple(args), dict(mm.kwargs), before=mm)
        back = builder.call(CAST, (narrow, mm.meta["val"].dtype), before=mm)
        mm.replace_all_uses_with(back)
        builder.gm.graph.erase_node(mm)
    builder.gm.graph.erase_node(transpose)


# Working memory of the compile-time work on one weight. The reference ops make several
# weight-sized temporaries (quantize_affine → pack_bits holds the codes as int64: 8 bytes a
# weight), 6x the fp32 weight at their peak. Scales, codes and errors of affine weights are
# computed for blocks of rows of at most this many fp32 bytes (rows are independent: the same
# codes, the same SQNR); see Note [Streaming compression] in weights.py. Measured on a
# 5632 x 2048 int8 weight: peak 286 -> 19 MiB, and 0.30 -> 0.06 s (the blocks stay in cache);
# 4 MiB blocks peaked at 82 MiB on MiniLM's embedding table: glibc did not reuse the freed ones.
BLOCK_BYTES = 512 << 10


def _row_blocks(weight: torch.Tensor, spec: QuantSpec, params) -> list[tuple[slice, tuple]]:
    """(rows, their params) per block; one block unless the scheme is affine (per-row params)."""
    n, k = weight.shape
    rows = max(1, BLOCK_BYTES // (4 * k))
    if spec.scheme != "affine" or n <= rows:
        return [(slice(None), tuple(params))]
    return [(slice(i, i + rows), tuple(p[i : i + rows] if p is not None else None for p in params)) for i in range(0, n, rows)]


def _choose_in_blocks(weight: torch.Tensor, rules, spec: QuantSpec) -> tuple:
    """rules.choose(w, spec), a block of rows at a time for affine weights (per-row groups)."""
    blocks = _row_blocks(weight, spec, ())
    if len(blocks) == 1:
        return rules.choose(weight, spec)
    parts = [rules.choose(weight[rows], spec) for rows, _ in blocks]
    return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))


def _quantize_in_blocks(weight: torch.Tensor, rules, spec: QuantSpec, params, column_scale=None) -> torch.Tensor:
    """rules.quantize(w, *params, ...) (AWQ: of W·s, as fold_weights would), a block of rows at a time."""
    out = None
    blocks = _row_blocks(weight, spec, params)
    for rows, p in blocks:
        codes = rules.quantize(weight[rows] if column_scale is None else weight[rows] * column_scale, *p, *rules.quantize_extra(spec))
        if len(blocks) == 1:
            return codes
        if out is None:
            out = codes.new_empty((weight.shape[0], *codes.shape[1:]))
        out[rows] = codes
    return out


def _weight_sqnr(weight: torch.Tensor, rules, spec: QuantSpec, params, column_scale=None, codes=None) -> float:
    """10·log10(‖w‖² / ‖w − ŵ‖²): how much of the weight survives quantization (a block of rows
    at a time, see BLOCK_BYTES)."""
    k = weight.shape[1]
    s = column_scale if column_scale is not None else torch.ones(k)
    signal = noise = 0.0
    for rows, p in _row_blocks(weight, spec, params):
        w = weight[rows].float()
        c = codes[rows] if codes is not None else rules.quantize(w * s, *p, *rules.quantize_extra(spec))
        w_hat = rules.dequantize(c, *p, *rules.dequantize_extra(spec), k, torch.float32) / s
        signal += w.pow(2).sum().item()
        noise += (w_hat - w).pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf
