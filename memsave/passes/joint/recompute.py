"""Recompute: split a training graph's joint forward+backward into the two graphs that run.

This is AOTAutograd's partition function. What the forward saves for the backward is the
activation memory of training; what the backward recomputes instead is the extra compute.

Policies (RecomputeConfig.policy):
  "none"      save every intermediate the backward reads (AOTAutograd's default_partition);
  "min-cut"   max-flow/min-cut over the joint graph, recomputing cheap ops where that saves
              bytes (AOTAutograd's min_cut_rematerialization_partition, as Inductor uses it);
  "budget"    memsave's solver: saved bytes <= budget at the least recompute cost, plans
              ranked by the simulated peak of forward + backward (recompute_plan.py);
  "selective" save matmul and attention outputs, recompute pointwise ops and norms;
  "sqrt"      save the values at ~sqrt(n) evenly spaced block boundaries.
memsave's policies build the two graphs with AOTAutograd's own extraction from the list of
saved values (recompute_graph.split), and save the outputs of random ops rather than
recompute them, so gradients with dropout are exact.

The result says exactly what is saved (name, shape, bytes), what the backward recomputes and
its estimated extra flops, for the report and `memsave explain --train`. Saved bytes count
activations only (unique storages): saved weights and inputs are alive anyway.
"""

from __future__ import annotations

import contextvars
from typing import Any

import torch
import torch.fx as fx

from memsave.graph.meta import describe_val, node_tensor_bytes
from memsave.memory.saved_activations import saved_activation_bytes, saved_outputs, simulated_peak
from memsave.passes.base import PassContext, PassResult
from memsave.passes.joint.recompute_graph import (
    JointGraph,
    node_flops,
    Plan,
    recomputed_in_backward,
    split,
)
from memsave.passes.joint.recompute_plan import (
    choose_budget_plan,
    choose_peak_plan,
    no_recompute_plan,
    plan_selective,
    plan_sqrt,
    step_peak_margin,
)
from memsave.report import fmt_bytes


def partition(
    joint: fx.GraphModule,
    config: Any,
    ctx: PassContext,
    *,
    joint_inputs: Any,
    num_fwd_outputs: int,
    **partition_kwargs: Any,
) -> tuple[fx.GraphModule, fx.GraphModule, PassResult]:
    from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition

    policy = getattr(config, "policy", "none") if config is not None else "none"
    # Gradients memsave.optimizer_in_backward steps and frees inside the backward (usually none).
    consumed = stepped_gradients(joint, ctx)
    codegen = ctx.config.codegen if ctx is not None else "inductor"  # sizes a training budget's margin
    plan_details: dict[str, Any] = {}
    budget_note = ""
    if policy == "none":
        fw, bw = default_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **partition_kwargs)
    elif policy == "min-cut":
        fw, bw = min_cut_rematerialization_partition(
            joint, joint_inputs, compiler="inductor", num_fwd_outputs=num_fwd_outputs, **partition_kwargs
        )
    elif policy in ("budget", "selective", "sqrt"):
        jg = JointGraph(
            joint,
            num_fwd_outputs=num_fwd_outputs,
            static_lifetime_input_indices=partition_kwargs.get("static_lifetime_input_indices"),
        )
        plan_details["no_recompute_saved_bytes"] = no_recompute_plan(jg).saved_bytes
        if policy == "budget":
            # AOTAutograd's own min-cut answer: the reference of a fractional budget, and one
            # more candidate plan (so memsave's choice is never worse than it, by its estimate).
            mc_fw, mc_bw = min_cut_rematerialization_partition(
                copy_joint(joint), joint_inputs, compiler="inductor", num_fwd_outputs=num_fwd_outputs,
                **partition_kwargs,
            )
            min_cut = plan_of_partition(jg, mc_fw, mc_bw, source="min-cut")
            reference = None if isinstance(config.budget, int) else min_cut.saved_bytes
            plan_details["reference_saved_bytes"] = min_cut.saved_bytes
            if config.fits_step_peak:  # a training budget: the step's whole peak (choose_peak_plan)
                choice = choose_peak_plan(jg, config.step_peak, prebuilt=[(min_cut, mc_fw, mc_bw)],
                                          consumed_grads=consumed, codegen=codegen, if_stepped=trainable_gradients(joint, ctx))
            else:
                choice = choose_budget_plan(jg, config.budget, reference, prebuilt=[(min_cut, mc_fw, mc_bw)])
            fw, bw, plan = choice.fw, choice.bw, choice.plan
            plan_details.update(
                budget_bytes=choice.budget_bytes,
                budget_met=choice.budget_met,
                candidates=choice.candidates,
                solve_seconds=choice.seconds,
            )
            if config.fits_step_peak:
                plan_details["step_peak_margin"] = choice.margin
                budget_note = (f" (the cheapest of {len(choice.candidates)} plans whose step peak fits "
                               f"{fmt_bytes(config.step_peak)})")
            elif choice.budget_bytes is None:  # "min": the lowest simulated peak, whatever it saves
                budget_note = f" ({config.describe()}: the lowest simulated peak of {len(choice.candidates)} plans)"
            else:
                budget_note = f" of a {fmt_bytes(choice.budget_bytes)} budget ({config.describe()})"
            if not choice.budget_met:
                budget_note += f"; budget NOT met: {fmt_bytes(plan.saved_bytes)} is the fewest bytes this graph can save"
        else:
            plan = plan_selective(jg) if policy == "selective" else plan_sqrt(jg)
            jg.check(plan)
            fw, bw = split(jg, plan)
        plan_details["plan"] = plan.source
    else:  # RecomputeConfig validates policies; this guards a config built around validation
        raise ValueError(f"recompute: unknown policy {policy!r}")

    saved = saved_for_backward(fw, num_fwd_outputs)
    saved_inputs = saved_for_backward(fw, num_fwd_outputs, inputs=True)
    recomputed, views, extra_flops = recomputed_in_backward(fw, bw)
    saved_bytes, saved_input_bytes = saved_activation_bytes(fw, num_fwd_outputs)
    peak = simulated_peak(fw, bw, num_fwd_outputs)
    step_peak = getattr(config, "step_peak", None)
    # What a training budget bounds: the weights + the simulated peak, the gradients that
    # memsave.optimizer_in_backward steps freed inside the backward.
    stepped = simulated_peak(fw, bw, num_fwd_outputs, consumed) if consumed else peak
    if step_peak is not None:
        plan_details["step_peak_budget"] = step_peak
    if step_peak is not None and not config.fits_step_peak:  # a plan the user pinned: checked, not chosen
        gradients = [g for g in bw.graph.output_node().args[0] if isinstance(g, fx.Node)]
        margin = step_peak_margin(fw, bw, gradients=gradients, codegen=codegen)  # as choose_peak_plan
        plan_details["step_peak_margin"] = margin
        total = stepped["weight_bytes"] + stepped["peak"] + margin
        if total > step_peak:
            from memsave.config.base import BudgetError

            raise BudgetError(
                f"options['budget'] {fmt_bytes(step_peak)} cannot be met with options['recompute'] "
                f"{config.describe()!r}: this training step's peak is {fmt_bytes(total)} (weights "
                f"{fmt_bytes(stepped['weight_bytes'])} + {fmt_bytes(stepped['peak'])} simulated + a margin of "
                f"{fmt_bytes(margin)}); leave options['recompute'] out and the budget chooses the plan", total)
    notes = (
        f"policy {policy}: saves {len(saved)} tensors ({fmt_bytes(saved_bytes)} of activations{budget_note}) "
        f"for backward, recomputes {len(recomputed)} ops ({extra_flops / 1e6:.3g} MFLOP extra) and {views} views",
    )
    details = {
        "policy": policy,
        "saved": saved,  # activations
        "saved_inputs": saved_inputs,  # graph inputs handed on to the backward
        "saved_bytes": saved_bytes,
        "saved_input_bytes": saved_input_bytes,
        "recomputed": recomputed,  # ops only; views and getitems re-made in the backward are counted apart
        "recomputed_views": views,
        "extra_flops": extra_flops,
        "forward_flops": sum(node_flops(n) for n in fw.graph.nodes if n.op == "call_function"),
        "budget_bytes": plan_details.pop("budget_bytes", None),
        "weight_bytes": peak["weight_bytes"],
        "step_peak_bytes": stepped["weight_bytes"] + stepped["peak"],  # what a training budget bounds
        # The simulated peak of forward then backward, saved tensors alive in between.
        "peak_activation_bytes": peak["peak"],
        "forward_peak_bytes": peak["forward_peak"],
        "backward_peak_bytes": peak["backward_peak"],
        **plan_details,
    }
    return fw, bw, PassResult(bool(recomputed), notes, details)


def stepped_gradients(joint: fx.GraphModule, ctx: PassContext | None) -> dict[int, int]:
    """Positions among the backward's outputs (one gradient per primal, in order) of the
    parameters memsave.optimizer_in_backward holds, each with the temporary bytes its
    optimizer's step allocates: passes/joint/step_in_backward.py steps and frees those
    gradients inside the backward, after the partition."""
    from memsave.optim.in_backward import is_held, step_workspace_bytes

    return {i: step_workspace_bytes(v) for i, v in _primal_values(joint, ctx) if is_held(v)}


def trainable_gradients(joint: fx.GraphModule, ctx: PassContext | None) -> dict[int, int]:
    """Positions among the backward's outputs of the trainable parameters' gradients, each with
    no step temporaries: what stepped_gradients would give if memsave.optimizer_in_backward held
    them all (with a step that allocates nothing beside the gradient, as plain SGD's)."""
    return {i: 0 for i, v in _primal_values(joint, ctx) if isinstance(v, torch.nn.Parameter) and v.requires_grad}


def _primal_values(joint: fx.GraphModule, ctx: PassContext | None) -> list[tuple[int, torch.Tensor]]:
    """(position among the joint graph's primals, i.e. among the backward's outputs, the real
    tensor) for each primal whose real value is a tensor."""
    if ctx is None:
        return []
    primals = [n for n in joint.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]
    return [(i, v) for i, n in enumerate(primals) if isinstance(v := ctx.real_inputs.get(n.name), torch.Tensor)]


def plan_of_partition(jg: JointGraph, fw: fx.GraphModule, bw: fx.GraphModule, *, source: str) -> Plan:
    """The Plan another partitioner's forward and backward amount to, read by node name
    (partitioners keep the joint graph's names): what the forward saves, what the backward
    re-makes, its activation bytes and its recompute cost in memsave's units."""
    by_name = {n.name: n for n in jg.values}
    saved = {by_name[n.name] for n in saved_outputs(fw, jg.num_fwd_outputs) if n.name in by_name}
    names, _, _ = recomputed_in_backward(fw, bw)
    recomputed = {by_name[name] for name in names if name in by_name}
    cost = sum(jg.values[n].cost for n in recomputed)
    return Plan(frozenset(saved), frozenset(recomputed), saved_activation_bytes(fw, jg.num_fwd_outputs)[0], cost, source)


def copy_joint(joint: fx.GraphModule) -> fx.GraphModule:
    """A copy of a joint graph with its own nodes (metadata dicts copied, values shared), so
    a partitioner that rewrites or tags its input leaves `joint` as it was."""
    graph = fx.Graph()
    value, output = graph.graph_copy(joint.graph, {}, return_output_node=True)
    graph.output(value).meta = dict(output.meta)
    return fx.GraphModule(joint, graph)


# Set by `memsave.explain(train=True)` while it compiles: the backend then compares every
# policy on each joint graph (several partitions: too slow for every debug-mode compile).
COMPARING_POLICIES: contextvars.ContextVar[bool] = contextvars.ContextVar("memsave_compare_recompute", default=False)

# The policies `memsave explain --train` compares on every joint graph.
COMPARED_POLICIES = (
    ("none", {"policy": "none"}),
    ("min-cut", {"policy": "min-cut"}),
    ("selective", {"policy": "selective"}),
    ("sqrt", {"policy": "sqrt"}),
    ("budget 50%", {"budget": 0.5}),
    ("budget 25%", {"budget": 0.25}),
    ("budget min", {"budget": "min"}),
)


def compare_policies(joint: fx.GraphModule, ctx: PassContext, *, num_fwd_outputs: int, **partition_kwargs: Any) -> list[dict[str, Any]]:
    """Saved bytes, extra FLOPs and simulated peak of each of COMPARED_POLICIES on a copy of
    `joint`: the question a user asks before choosing one."""
    from memsave.config import RecomputeConfig

    rows = []
    for name, options in COMPARED_POLICIES:
        _, _, result = partition(
            copy_joint(joint), RecomputeConfig(**options), ctx, joint_inputs=None, num_fwd_outputs=num_fwd_outputs,
            **partition_kwargs,
        )
        d = result.details
        rows.append({
            "policy": name, "saved_bytes": d["saved_bytes"], "saved_tensors": len(d["saved"]),
            "recomputed_ops": len(d["recomputed"]), "extra_flops": d["extra_flops"],
            "forward_flops": d["forward_flops"], "peak_activation_bytes": d["peak_activation_bytes"],
        })
    return rows


def saved_for_backward(fw: fx.GraphModule, num_fwd_outputs: int, *, inputs: bool = False) -> list[tuple[str, str, int]]:
    """(name, dtype[shape], bytes) of each forward output that exists only for the backward:
    the activations, or with inputs=True the graph inputs (weights, the batch) it hands on,
    which are alive anyway."""
    return [
        (n.name, describe_val(n.meta.get("val")), node_tensor_bytes(n))
        for n in saved_outputs(fw, num_fwd_outputs)
        if (n.op == "placeholder") == inputs
    ]
