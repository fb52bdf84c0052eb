"""Mixed precision: matmuls in bf16/fp16, numerically sensitive ops in fp32, on the ATen graph.

Each op gets a rule from a table by op (the default rule for ops not in it):

    "narrow"  matmuls, convolutions, attention: float inputs are cast to the compute dtype
              (bf16/fp16); the CPU and CUDA kernels accumulate in fp32 internally
    "fp32"    norms, softmax, losses, reductions, exp/log/pow/rsqrt (the ops autocast keeps
              in fp32): narrow inputs are cast up to fp32
    default   "follow": the op runs on whatever dtypes its inputs have, with torch's type
              promotion (a bf16 matmul output times an fp32 table is fp32, as in autocast)

Before (one linear and a softmax):

    t = aten.t(w);  mm = aten.mm(x, t);  s = aten._softmax(mm, -1, False)
After:

    t = aten.t(w);  x16 = _to_copy(x, bf16);  t16 = _to_copy(t, bf16)
    mm = aten.mm(x16, t16)                                         # bfloat16
    mm32 = _to_copy(mm, fp32);  s = aten._softmax(mm32, -1, False) # float32

Weights: in training a parameter stays fp32 in the graph and is cast per call (a transient
bf16 copy), so training keeps fp32 master weights and gets fp32 gradients. In inference
(`weights="narrow"`, the default) a weight that only narrow matmul-like ops read is cast once
at compile time into a stored bf16/fp16 copy and its fp32 original is released: the weights
take half the memory instead of 1.5x (fp32 + a per-call copy). A weight something else reads
too (an embedding table, a norm's scale) stays fp32. A graph constant (e.g. a pruned or
factorized weight) is cast once at compile time. Graph outputs are cast back to their dtype,
so the calling convention is unchanged; in inference a matmul whose result is only returned
(an LM head's logits) runs in fp32 instead, since computed narrow its output and the cast
back would be alive together (the call's largest tensor, 1.5 times over). An op that refuses
the new dtypes runs on its inputs cast back to what they were: left as it was, never
approximated.

In training the pass runs on the joint graph, so the backward's matmuls run narrow too and
weight gradients come out fp32. `narrow_saved_activations` (called by the backend after the
partition) stores what the forward saves for the backward as bf16 or fp8 (e4m3 with a
per-tensor scale) and widens it again in the backward. fp16 training needs loss scaling:
`loss_scaler()` gives torch's dynamic GradScaler, which works with these graphs because the
loss's gradient is the backward's input.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

import memsave.weight_keys as weight_keys
from memsave.config import PrecisionConfig
from memsave.graph.meta import describe_val, is_getitem, node_val
from memsave.graph.rewrite import GraphBuilder
from memsave.passes.base import PassContext, PassResult, tag
from memsave.report import fmt_bytes
from memsave.weights import WEIGHTS, can_release, is_released, release

aten = torch.ops.aten
PRECISION_STAGES = ("inference", "joint")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _ops(*names: str) -> set:
    return {getattr(aten, n) for n in names if hasattr(aten, n)}


# Rule table by op packet. Anything not here follows its inputs.
RULES: dict[Any, str] = {
    **{op: "narrow" for op in _ops(
        "mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "linear", "convolution", "_convolution",
        "convolution_backward", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
    )},
    **{op: "fp32" for op in _ops(
        # norms and their backward
        "native_layer_norm", "native_layer_norm_backward", "native_group_norm", "native_group_norm_backward",
        "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
        "_native_batch_norm_legit_functional", "native_batch_norm_backward",
        # softmax and losses
        "_softmax", "_log_softmax", "_softmax_backward_data", "_log_softmax_backward_data", "logsumexp",
        "nll_loss_forward", "nll_loss_backward", "nll_loss2d_forward", "nll_loss2d_backward", "mse_loss",
        "mse_loss_backward", "binary_cross_entropy", "binary_cross_entropy_with_logits", "smooth_l1_loss",
        # reductions and the pointwise ops whose range or precision bf16/fp16 lose
        "sum", "mean", "prod", "cumsum", "var", "var_mean", "std", "norm", "linalg_vector_norm",
        "pow", "rsqrt", "reciprocal", "exp", "expm1", "log", "log1p", "log2", "log10", "softplus",
        "erfinv", "acos", "asin", "cosh", "sinh", "tan",
    )},
}
VIEWS = (aten.t.default, aten.permute.default, aten.transpose.int, aten.view.default)
CAST = torch.ops.prims.convert_element_type.default  # Inductor lowers it; _to_copy it decomposes first


def rule_for(node: fx.Node) -> str:
    return RULES.get(getattr(node.target, "overloadpacket", node.target), "follow")


def cast_to_mixed_precision(gm: fx.GraphModule, config: PrecisionConfig, ctx: PassContext) -> PassResult:
    if config.compute == "fp32":
        return PassResult(False, ("compute fp32: no compute casts",))
    low = DTYPES[config.compute]
    builder = GraphBuilder(gm, "mixed_precision")
    original = {n: node_val(n) for n in gm.graph.nodes}
    kept: list[str] = []
    constants: dict[tuple[str, torch.dtype], fx.Node] = {}
    wide = _output_matmuls(gm) if ctx.stage == "inference" else set()
    stored = _narrow_only_weights(gm, ctx, wide) if config.weights == "narrow" and ctx.stage == "inference" else {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is CAST and node.meta.get("memsave_pass") == "mixed_precision":
            continue
        if is_getitem(node):
            node.meta["val"] = node_val(node.args[0])[node.args[1]]
            continue
        rule = "fp32" if node in wide else rule_for(node)
        want = low if rule == "narrow" else torch.float32 if rule == "fp32" else None
        if want is not None:
            _cast_inputs(builder, node, lambda v, want=want: want if v.dtype in FLOATS else None, constants, stored)
        try:
            _refresh(builder, node)
        except Exception:  # noqa: BLE001 - any refusal of the new dtypes: run as it was
            _cast_inputs(builder, node, lambda v, n=node: _original_dtype(v, n, original), constants, stored)
            _refresh(builder, node)
            kept.append(node.name)
    _cast_outputs_back(builder, gm, original)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    released, released_bytes = _release_stored(gm, ctx, stored)
    matmuls = [n for n in gm.graph.nodes if rule_for(n) == "narrow" and _dtype(n) == low]
    in_fp32 = [n for n in gm.graph.nodes if rule_for(n) == "fp32"]
    notes = [
        f"{len(matmuls)} matmul-like ops in {config.compute}, {len(in_fp32)} ops in fp32 "
        f"(norms, softmax, losses, reductions); {sum(1 for n in gm.graph.nodes if n.target is CAST and n.meta.get('memsave_pass') == 'mixed_precision')} casts"
    ]
    if released:
        notes.append(f"stored {len(released)} weights in {config.compute}, released their fp32 originals ({fmt_bytes(released_bytes)})")
    if kept:
        notes.append(f"left in their original dtypes (the op refused the new ones): {', '.join(kept)}")
    details = {"narrow_ops": [n.name for n in matmuls], "fp32_ops": [n.name for n in in_fp32], "kept": kept,
               "compute": config.compute, "stored_weights": released, "released_bytes": released_bytes}
    return PassResult(bool(matmuls), tuple(notes), details)


def _output_matmuls(gm: fx.GraphModule) -> set[fx.Node]:
    """Matmul-like ops (inference) whose result is only returned, through views (an LM head's
    logits): computed narrow, the result would be cast back to its dtype for the caller, and the
    narrow copy and the full-width one would be alive together: the largest tensor of the call,
    1.5 times over. They run in fp32 instead, producing the output directly."""
    output = next(reversed(gm.graph.nodes))
    reshapes = (*VIEWS, aten._unsafe_view.default, aten.reshape.default)

    def returned_only(node: fx.Node) -> bool:
        return bool(node.users) and all(
            u is output or (u.op == "call_function" and u.target in reshapes and u.args[0] is node and returned_only(u))
            for u in node.users
        )

    return {n for n in gm.graph.nodes if n.op == "call_function" and rule_for(n) == "narrow" and returned_only(n)}


def _narrow_only_weights(gm: fx.GraphModule, ctx: PassContext, wide: set) -> dict[fx.Node, torch.Tensor]:
    """Float weight placeholders whose every use (through transposes and views) is a
    matmul-like op that runs narrow: those can be stored narrow, with nothing left reading the
    fp32 original."""

    def only_narrow(node: fx.Node) -> bool:
        return bool(node.users) and all(
            only_narrow(u) if u.op == "call_function" and u.target in VIEWS and u.args[0] is node
            else u.op == "call_function" and rule_for(u) == "narrow" and u not in wide
            for u in node.users
        )

    found = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in ctx.weights:
            tensor = ctx.weight_tensor(node.name)
            # A weight whose storage cannot be freed (memory-mapped from a file) would be held
            # twice: it is cast per call instead. (A released one, on a recompile, can be.)
            if tensor is not None and tensor.dtype == torch.float32 and only_narrow(node) and can_release(tensor):
                found[node] = tensor
    return found


def _stored_weight(builder: GraphBuilder, arg: fx.Node, dtype: torch.dtype, constants: dict, stored: dict, before):
    """The narrow copy of weight placeholder `arg`, made once per weight (WEIGHTS: a recompile
    finds it after the fp32 original is gone)."""
    key = (arg.name, dtype)
    if key not in constants:
        weight = stored[arg]
        value = WEIGHTS.get_or_build(weight, weight_keys.precision(dtype), lambda: weight.detach().to(dtype))
        node = builder.constant(f"{arg.name}_{str(dtype).replace('torch.', '')}", value, before=before)
        constants[key] = node
    return constants[key]


def _release_stored(gm: fx.GraphModule, ctx: PassContext, stored: dict) -> tuple[list[str], int]:
    """Free the fp32 originals of the weights the graph now reads in their narrow copy."""
    names, freed = [], 0
    for node, weight in stored.items():
        if node.users or is_released(weight):
            continue
        name = ctx.weights[node.name].name
        freed += release(weight, f"{name} (stored in a narrower dtype by mixed_precision)")
        names.append(name)
    return names, freed


def _cast_inputs(builder: GraphBuilder, node: fx.Node, target_dtype, constants, stored) -> bool:
    """Cast each float tensor input to `target_dtype(val)` (None: leave it); True if any was."""
    changed = False

    def cast(arg):
        nonlocal changed
        if not isinstance(arg, fx.Node):
            return arg
        val = node_val(arg)
        if not isinstance(val, torch.Tensor) or not val.is_floating_point():
            return arg
        dtype = target_dtype(val)
        if dtype is None or dtype == val.dtype:
            return arg
        changed = True
        constant = _cast_constant(builder, arg, dtype, constants, node, stored)
        return constant if constant is not None else builder.call(CAST, (arg, dtype), before=node)

    node.args = fx.node.map_aggregate(node.args, cast)
    node.kwargs = fx.node.map_aggregate(node.kwargs, cast)
    return changed


def _cast_constant(builder: GraphBuilder, arg: fx.Node, dtype: torch.dtype, constants: dict, before: fx.Node,
                   stored: dict):
    """A constant or a stored weight (or a transpose/view of one, as a linear reads its weight)
    cast once, now, instead of on every call; None when `arg` is not one."""
    if arg in stored:
        return _stored_weight(builder, arg, dtype, constants, stored, before)
    if arg.op == "get_attr":
        key = (arg.target, dtype)
        if key not in constants:
            with unset_fake_temporarily():
                value = getattr(builder.gm, arg.target).to(dtype)
            constants[key] = builder.constant(f"{arg.target}_{str(dtype).replace('torch.', '')}", value, before=before)
        return constants[key]
    if arg.op == "call_function" and arg.target in VIEWS and isinstance(arg.args[0], fx.Node):
        base = _cast_constant(builder, arg.args[0], dtype, constants, before, stored)
        if base is not None:
            return builder.call(arg.target, (base, *arg.args[1:]), dict(arg.kwargs), before=before)
    return None


def _refresh(builder: GraphBuilder, node: fx.Node) -> None:
    """Recompute the node's fake value from its (possibly recast) inputs."""
    fake_args, fake_kwargs = fx.node.map_arg((node.args, node.kwargs), node_val)
    with builder.fake_mode:
        node.meta["val"] = node.target(*fake_args, **fake_kwargs)


def _original_dtype(val: torch.Tensor, node: fx.Node, original: dict) -> torch.dtype | None:
    """For the fallback: the dtype the input had before this pass (read off the original values)."""
    for arg in node.all_input_nodes:
        if node_val(arg) is val:
            before = original.get(_uncast(arg))
            return before.dtype if isinstance(before, torch.Tensor) else None
    return None


def _uncast(node: fx.Node) -> fx.Node:
    while node.target is CAST and node.meta.get("memsave_pass") == "mixed_precision":
        node = node.args[0]
    return node


def _cast_outputs_back(builder: GraphBuilder, gm: fx.GraphModule, original: dict) -> None:
    output = next(reversed(gm.graph.nodes))

    def back(arg):
        if not isinstance(arg, fx.Node):
            return arg
        before, now = original.get(arg), node_val(arg)
        if isinstance(before, torch.Tensor) and isinstance(now, torch.Tensor) and before.dtype != now.dtype:
            return builder.call(CAST, (arg, before.dtype), before=output)
        return arg

    output.args = fx.node.map_aggregate(output.args, back)


def _dtype(node: fx.Node) -> torch.dtype | None:
    val = node_val(node)
    return val.dtype if isinstance(val, torch.Tensor) else None


# -- saved activations in a narrower type (training) -----------------------------------------

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def narrow_saved_activations(
    fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, config: PrecisionConfig | None
) -> PassResult:
    """Store the forward's saved activations as bf16 (or fp8 + a per-tensor scale, or int8 + a
    scale per row), widen them
    again in the backward. Changes fw's extra outputs and bw's matching placeholders together
    (AOTAutograd hands one to the other by position; the names match)."""
    if config is None or config.saved is None:
        return PassResult(False)
    output = next(reversed(fw.graph.nodes))
    outs = list(output.args[0])
    user = set(outs[:num_fwd_outputs])
    bw_inputs = {n.name: n for n in bw.graph.nodes if n.op == "placeholder"}
    fw_builder, bw_builder = GraphBuilder(fw, "mixed_precision"), GraphBuilder(bw, "mixed_precision")
    bw_position = {n: i for i, n in enumerate(bw.graph.nodes)}
    position = {n: i for i, n in enumerate(fw.graph.nodes)}
    narrowed, before_bytes, after_bytes = [], 0, 0
    new_outs = outs[:num_fwd_outputs]
    for saved in outs[num_fwd_outputs:]:
        new_outs.append(saved)
        if not _narrowable(saved, user, bw_inputs):
            continue
        val = node_val(saved)
        placeholder = bw_inputs[saved.name]
        # Cast right after the last forward use, so the fp32 copy dies there, not at the end.
        last = max((u for u in saved.users if u.op != "output"), key=position.__getitem__, default=saved)
        anchor = last.next
        # Widen right before the backward's first use: the wide copy lives no longer than the
        # saved tensor did.
        readers = list(placeholder.users)
        if not readers:
            continue
        first_bw = min(readers, key=bw_position.__getitem__)
        if config.saved == "bf16":
            narrow = fw_builder.call(CAST, (saved, torch.bfloat16), before=anchor)
            new_outs[-1] = narrow
            wide = _widen_bf16(bw_builder, bw, placeholder, val, first_bw)
            stored = narrow
        else:
            if config.saved == "int8" and val.dim() == 0:
                continue
            to_codes, dtype = (_to_int8, torch.int8) if config.saved == "int8" else (_to_fp8, FP8)
            codes, scale = to_codes(fw_builder, saved, anchor)
            new_outs[-1:] = [codes, scale]
            wide = _widen_scaled(bw_builder, bw, placeholder, scale, val, dtype, first_bw)
            stored = codes
            after_bytes += node_val(scale).numel() * 4
        for reader in readers:
            reader.replace_input_with(placeholder, wide)
        narrowed.append(f"{saved.name}: {describe_val(val)} -> {describe_val(node_val(stored))}")
        before_bytes += val.numel() * val.element_size()
        after_bytes += val.numel() * node_val(stored).element_size()
    output.args = (tuple(new_outs),)
    for gm in (fw, bw):
        gm.graph.lint()
        gm.recompile()
    notes = (f"saved activations stored as {config.saved}: {len(narrowed)} tensors, {before_bytes / 2**20:.2f} -> {after_bytes / 2**20:.2f} MiB",)
    return PassResult(bool(narrowed), notes, {"narrowed": narrowed, "saved_bytes_before": before_bytes, "saved_bytes_after": after_bytes})


def _narrowable(saved: Any, user: set, bw_inputs: dict) -> bool:
    """An fp32 activation the forward made (not an input: alive anyway), dense (the cast keeps
    its strides exactly), not also returned to the user, and read by the backward by name."""
    from memsave.graph.meta import alias_base
    from memsave.memory.liveness import is_dense

    if not isinstance(saved, fx.Node) or saved in user or saved.name not in bw_inputs:
        return False
    val = node_val(saved)
    if not isinstance(val, torch.Tensor) or val.dtype != torch.float32 or not is_dense(val):
        return False
    root = alias_base(saved)
    return root.op == "call_function" and root not in user


def _widen_bf16(builder: GraphBuilder, bw: fx.GraphModule, placeholder: fx.Node, val, first: fx.Node) -> fx.Node:
    placeholder.meta = dict(placeholder.meta)  # the extraction shares meta dicts with the joint graph
    placeholder.meta["val"] = _fake_like(builder, val, torch.bfloat16)
    return builder.call(CAST, (placeholder, torch.float32), before=first)


def _to_fp8(builder: GraphBuilder, x: fx.Node, before: fx.Node) -> tuple[fx.Node, fx.Node]:
    """codes = fp8(x / scale), scale = max|x| / 448 (at least tiny, so all-zero tensors work)."""
    amax = builder.call(aten.amax.default, (builder.call(aten.abs.default, (x,), before=before), []), before=before)
    scale = builder.call(aten.clamp_min.default, (builder.call(aten.div.Tensor, (amax, FP8_MAX), before=before), 1e-30), before=before)
    scaled = builder.call(aten.div.Tensor, (x, scale), before=before)
    codes = builder.call(CAST, (scaled, FP8), before=before)
    return codes, scale


def _to_int8(builder: GraphBuilder, x: fx.Node, before: fx.Node) -> tuple[fx.Node, fx.Node]:
    """codes = int8(round(x / scale)), scale = max|x| / 127 per row (the last dimension), kept
    as (..., 1) fp32: one outlier costs its own row's resolution, not the whole tensor's."""
    amax = builder.call(aten.amax.default, (builder.call(aten.abs.default, (x,), before=before), [-1], True), before=before)
    scale = builder.call(aten.clamp_min.default, (builder.call(aten.div.Tensor, (amax, 127.0), before=before), 1e-30), before=before)
    rounded = builder.call(aten.round.default, (builder.call(aten.div.Tensor, (x, scale), before=before),), before=before)
    codes = builder.call(CAST, (rounded, torch.int8), before=before)
    return codes, scale


def _widen_scaled(builder, bw, placeholder, scale, val, dtype, first) -> fx.Node:
    """The backward's copy: codes (fp8 or int8) widened to fp32 times their scale."""
    placeholder.meta = dict(placeholder.meta)
    placeholder.meta["val"] = _fake_like(builder, val, dtype)
    with bw.graph.inserting_after(placeholder):
        scale_in = bw.graph.placeholder(placeholder.name + "_scale")
    scale_in.meta["val"] = _fake_like(builder, node_val(scale), torch.float32)
    tag(scale_in, "mixed_precision")
    wide = builder.call(CAST, (placeholder, torch.float32), before=first)
    return builder.call(aten.mul.Tensor, (wide, scale_in), before=first)


def _fake_like(builder: GraphBuilder, val: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with builder.fake_mode:
        return torch.empty_strided(val.shape, val.stride(), dtype=dtype, device=val.device)


def loss_scaler(init_scale: float = 2.0**16, **kwargs: Any) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 training (torch's GradScaler, on this machine's device).

    The compiled backward takes the loss's gradient as its input, so `scaler.scale(loss)`
    scales every fp16 gradient inside the graph; `scaler.step(opt)` unscales the fp32 weight
    gradients, skips the step when one is inf/nan and halves the scale, and `scaler.update()`
    grows it again after a run of good steps:

        scaler = loss_scaler()
        scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.amp.GradScaler(device, init_scale=init_scale, **kwargs)
