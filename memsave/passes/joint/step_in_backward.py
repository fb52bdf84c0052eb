"""Step in the backward: each gradient goes to its optimizer as soon as it is final, and the
backward graph returns none for that parameter, so no full set of gradients ever exists.

Runs on the partitioned backward graph. Its outputs are the gradients of the joint graph's
primals, one per primal in order (None where an input needs none); for a primal that is a
parameter held by `memsave.optimizer_in_backward`, the pass calls
`memsave::step_in_backward(grad, slot)` right after the gradient's last use in the graph and
drops it from the outputs. The graph then frees the gradient right after the call (FX frees a
value after its last use; Inductor deletes a buffer after its last reader), and autograd gets
None, so it accumulates nothing and runs no hook.

A parameter read by two compiled graphs (a graph break between tied uses) has its gradient
summed by autograd across them, and the first graph already steps it with its own share: the
second graph's compile refuses with a clear error (memsave/optim/in_backward.py: claim).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from memsave.config import OptionError
from memsave.graph.meta import alias_base, aliased_input, is_getitem, node_val


@dataclass
class StepResult:
    changed: bool
    notes: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)


def step_in_backward(
    fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, primals: Sequence[Any],
    primal_names: Sequence[str], graph_id: int,
) -> StepResult:
    """`primals`: the joint graph's real primal inputs in order (the forward's placeholders);
    `primal_names`: what the model calls them."""
    from memsave.optim.in_backward import claim, is_held

    output = bw.graph.output_node()
    outs = list(output.args[0])
    held = [i for i, v in enumerate(primals) if isinstance(v, torch.Tensor) and is_held(v)]
    if not held:
        return StepResult(False)
    if len(outs) != len(primals):
        return StepResult(False, (f"backward returns {len(outs)} values for {len(primals)} inputs; "
                                  "gradients left to autograd (the optimizer's hooks step them)",))
    fw_inputs = [n for n in fw.graph.nodes if n.op == "placeholder"]
    stepped, grad_bytes, notes = [], 0, []
    for i in held:
        grad = outs[i]
        if not isinstance(grad, fx.Node):
            continue
        if sum(1 for o in outs if o is grad) > 1:
            notes.append(f"{primal_names[i]}: its gradient is also another input's; left to autograd")
            continue
        why_not = claim(primals[i], graph_id)
        if why_not is not None:
            # The earlier graph already steps it with its own share of the gradient: the hook
            # would step it again with this graph's share. Refuse rather than update twice.
            raise OptionError(
                f"memsave.optimizer_in_backward: parameter {primal_names[i]!r} is {why_not.split(';')[0]}: "
                "a graph break between its uses splits its gradient, and it cannot be stepped inside the "
                "backward; remove the graph break (torch.compile(..., fullgraph=True) shows where it is) "
                "or use the ordinary optimizer"
            )
        param = _saved_for_backward(fw, bw, num_fwd_outputs, fw_inputs[i])
        position = {n: k for k, n in enumerate(bw.graph.nodes)}
        readers = _readers(fw, bw, num_fwd_outputs, fw_inputs[i], param, position)
        last = max([u for u in grad.users if u.op != "output"] + readers + [grad], key=position.__getitem__)
        with bw.graph.inserting_after(last):
            call = bw.graph.call_function(
                torch.ops.memsave.step_in_backward.default, (param, grad, _not_before(readers, grad))
            )
        call.meta["val"] = None
        outs[i] = None
        stepped.append(primal_names[i])
        val = node_val(grad)
        if isinstance(val, torch.Tensor):
            grad_bytes += val.numel() * val.element_size()
    if not stepped:
        return StepResult(False, tuple(notes))
    output.args = (tuple(outs),)
    for gm in (fw, bw):
        gm.graph.lint()
        gm.recompile()
    notes.insert(0, f"{len(stepped)} parameters step inside the backward; their {grad_bytes / 2**20:.2f} MiB of "
                    "gradients are freed one by one, never returned")
    return StepResult(True, tuple(notes), {"stepped": stepped, "gradient_bytes": grad_bytes})


def _readers(
    fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, primal: fx.Node, param: fx.Node, position: dict
) -> list[fx.Node]:
    """Backward nodes that read the parameter's storage: through its own placeholder or through a
    saved view of it (the forward often saves `t(weight)`), and through views of those. The
    update writes the parameter in place, so it must come after every one of them."""
    aliases_param = {out.name for out in fw.graph.output_node().args[0][num_fwd_outputs:]
                     if isinstance(out, fx.Node) and alias_base(out) is primal}
    views = {n for n in bw.graph.nodes if n is param or (n.op == "placeholder" and n.name in aliases_param)}
    for node in bw.graph.nodes:
        base = aliased_input(node)
        if base is not None and base in views:
            views.add(node)
    step = torch.ops.memsave.step_in_backward.default
    return sorted({u for v in views for u in v.users if u not in views and u.op != "output" and u.target is not step},
                  key=position.__getitem__)


def _not_before(readers: list[fx.Node], grad: fx.Node) -> list[fx.Node]:
    """Readers the update must wait for that the gradient does not already depend on, as tensors
    the op takes (and ignores): Inductor orders by data dependencies, and cannot see that a
    saved view of the weight shares the parameter's storage."""
    ancestors, stack = set(), [grad]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in ancestors:
                ancestors.add(arg)
                stack.append(arg)
    waits = []
    for reader in readers:
        if reader in ancestors:
            continue
        if isinstance(node_val(reader), torch.Tensor):
            waits.append(reader)
            continue
        element = next((u for u in reader.users if is_getitem(u) and isinstance(node_val(u), torch.Tensor)), None)
        if element is None:
            raise NotImplementedError(f"memsave step_in_backward: {reader.format_node()} reads the weight and "
                                      "returns no tensor to wait on")
        waits.append(element)
    return waits


def _saved_for_backward(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, primal: fx.Node) -> fx.Node:
    """The backward's placeholder for a forward input, added to the saved values if the backward
    does not read it yet. The partitioner's layout: the forward returns its outputs, then saved
    tensors, then saved sizes (SymInts); the backward takes saved sizes, saved tensors, then
    tangents, by the same names. A new saved tensor goes last among the tensors in both."""
    placeholders = [n for n in bw.graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        if node.name == primal.name:
            return node
    fw_out = fw.graph.output_node()
    outs = list(fw_out.args[0])
    saved = outs[num_fwd_outputs:]
    tensors_end = num_fwd_outputs + sum(1 for n in saved if not _is_size(n))
    outs.insert(tensors_end, primal)
    fw_out.args = (tuple(outs),)
    saved_names = {n.name for n in saved if isinstance(n, fx.Node)}
    after_saved = next((n for n in placeholders if n.name not in saved_names), None)
    if after_saved is None:
        with bw.graph.inserting_after(placeholders[-1]):
            node = bw.graph.placeholder(primal.name)
    else:
        with bw.graph.inserting_before(after_saved):
            node = bw.graph.placeholder(primal.name)
    node.meta.update(primal.meta)
    return node


def _is_size(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, int, float))
