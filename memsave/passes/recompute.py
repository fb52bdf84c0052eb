"""Recompute: split a training graph's joint forward+backward into the two graphs that run.

This is AOTAutograd's partition function. What the forward saves for the backward is the
activation memory of training; what the backward recomputes instead is the extra compute.

Policies (RecomputeConfig.policy):
  "none"     save every intermediate the backward reads (AOTAutograd's default_partition);
  "min-cut"  max-flow/min-cut over the joint graph, recomputing cheap ops where that saves
             bytes (AOTAutograd's min_cut_rematerialization_partition, as Inductor uses it).

The result says exactly what is saved (name, shape, bytes) and how many nodes the backward
recomputes, for the report and `memsave explain --train`.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from memsave.graph.meta import describe_val, node_tensor_bytes
from memsave.memory.estimate import estimate_memory
from memsave.passes.base import PassContext, PassResult
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
    if policy == "none":
        fw, bw = default_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **partition_kwargs)
    elif policy == "min-cut":
        fw, bw = min_cut_rematerialization_partition(
            joint, joint_inputs, compiler="inductor", num_fwd_outputs=num_fwd_outputs, **partition_kwargs
        )
    else:  # RecomputeConfig validates policies; this guards a config built around validation
        raise ValueError(f"recompute: unknown policy {policy!r}")
    saved = saved_for_backward(fw, num_fwd_outputs)
    recomputed = recomputed_nodes(fw, bw)
    saved_bytes = sum(b for _, _, b in saved)
    fw_est, bw_est = estimate_memory(fw), estimate_memory(bw)
    notes = (
        f"policy {policy}: saves {len(saved)} tensors ({fmt_bytes(saved_bytes)}) for backward, "
        f"recomputes {len(recomputed)} nodes",
    )
    details = {
        "policy": policy,
        "saved": saved,
        "saved_bytes": saved_bytes,
        "recomputed": recomputed,
        "weight_bytes": fw_est.weight_bytes,
        # The forward's peak, or the backward's peak on top of what the forward saved.
        "peak_activation_bytes": max(fw_est.peak_activation_bytes, saved_bytes + bw_est.peak_activation_bytes),
    }
    return fw, bw, PassResult(bool(recomputed), notes, details)


def saved_for_backward(fw: fx.GraphModule, num_fwd_outputs: int) -> list[tuple[str, str, int]]:
    """(name, dtype[shape], bytes) of each forward output that exists only for the backward."""
    output = next(n for n in reversed(fw.graph.nodes) if n.op == "output")
    saved = output.args[0][num_fwd_outputs:]
    return [
        (n.name, describe_val(n.meta.get("val")), node_tensor_bytes(n))
        for n in saved
        if isinstance(n, fx.Node)
    ]


def recomputed_nodes(fw: fx.GraphModule, bw: fx.GraphModule) -> list[str]:
    """Backward nodes that recompute a forward op (the partitioner keeps forward node names)."""
    forward_ops = {n.name for n in fw.graph.nodes if n.op == "call_function"}
    return [n.name for n in bw.graph.nodes if n.op == "call_function" and n.name in forward_ops]
