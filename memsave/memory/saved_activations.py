"""What a forward/backward pair costs in activation memory: the bytes the forward saves for
the backward, and the simulated peak of running the two (memsave's recompute planners rank
plans by it; the report shows it before and after the partition).

Storages are found by the shared alias walk (graph/storages.py): two views of one saved tensor
count once, and saved weights and inputs (alive anyway) are counted apart.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.fx as fx

from memsave.graph.meta import iter_tensors, node_val, tensor_storage_bytes
from memsave.graph.storages import storage_root
from memsave.memory.estimate import estimate_memory


def saved_outputs(fw: fx.GraphModule, num_fwd_outputs: int) -> list[fx.Node]:
    output = next(n for n in reversed(fw.graph.nodes) if n.op == "output")
    return [n for n in output.args[0][num_fwd_outputs:] if isinstance(n, fx.Node)]


def saved_activation_bytes(fw: fx.GraphModule, num_fwd_outputs: int) -> tuple[int, int]:
    """(activation bytes, graph-input bytes) the forward hands the backward: unique storages,
    so two views of one tensor count once; saved weights and inputs are alive anyway."""
    activations: dict[fx.Node, int] = {}
    inputs = 0
    for node in saved_outputs(fw, num_fwd_outputs):
        root = storage_root(node)
        if root is None:
            inputs += sum(tensor_storage_bytes(t) for t in iter_tensors(node_val(node)))
        elif root not in activations:
            activations[root] = sum(tensor_storage_bytes(t) for t in iter_tensors(node_val(root)))
    return sum(activations.values()), inputs


def simulated_peak(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int,
                   consumed_grads: Mapping[int, int] | None = None) -> dict[str, int]:
    """Peak activation bytes of running the forward, then the backward, with saved tensors
    alive in between and each one freed after its last use in the backward (the boxed
    calling convention). The forward's peak counts its saved outputs, which it allocates."""
    fw_est = estimate_memory(fw)
    saved_bytes, _ = saved_activation_bytes(fw, num_fwd_outputs)
    bw_est = estimate_memory(bw, consumed_grads)  # a stepped-in-backward gradient dies at its last use
    # Saved activations (and the outputs' gradients) arrive as the backward's inputs:
    # estimate_memory does not count those, so add each one's storage until the last use of any
    # view of it here.
    root_of = {n.name: storage_root(n) for n in saved_outputs(fw, num_fwd_outputs)}
    nodes = list(bw.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    last_use: dict[fx.Node, int] = {}
    for node in nodes:
        root = root_of.get(node.name) if node.op == "placeholder" else None
        # The incoming gradients of the forward's outputs too: autograd materializes zeros for an
        # output the loss does not use (an HF model's logits beside its loss: one logits-sized
        # tensor the simulation missed, measured on a small HF Llama).
        if node.op == "placeholder" and node.name.startswith("tangents"):
            root = node
        if root is not None:
            last = max((position[u] for u in node.users), default=0)
            last_use[root] = max(last_use.get(root, 0), last)
    dies_at = [(last, sum(tensor_storage_bytes(t) for t in iter_tensors(node_val(root)))) for root, last in last_use.items()]
    peak_bw = 0
    for index, (_, live) in enumerate(bw_est.timeline):
        alive = sum(b for last, b in dies_at if last >= index)
        peak_bw = max(peak_bw, live + alive)
    return {
        "forward_peak": fw_est.peak_activation_bytes,
        "backward_peak": peak_bw,
        "peak": max(fw_est.peak_activation_bytes, peak_bw),
        "saved_bytes": saved_bytes,
        "weight_bytes": fw_est.weight_bytes,
    }
