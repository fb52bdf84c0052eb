"""Graph invariants every pass must keep, checked after each pass in tests and in debug mode.

The list is written down for people in docs/invariants.md; keep the two in step. Each check
returns messages instead of raising, so one run reports every broken invariant at once, and
the pipeline turns them into one error that names the pass and the passes before it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from memsave.graph.meta import aliased_input, describe_val, hint_int, is_getitem, node_val


@dataclass(frozen=True)
class GraphSignature:
    """What the rest of the system relies on from a graph's outside: its calling convention."""

    placeholders: tuple[str, ...]
    outputs: tuple[str, ...]  # describe_val of each output (dtype and shape)
    output_alias_roots: tuple[str | None, ...]  # placeholder an output aliases, if any


class GraphInvariantError(RuntimeError):
    pass


def graph_signature(gm: fx.GraphModule) -> GraphSignature:
    placeholders = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    out_nodes = _output_nodes(gm)
    return GraphSignature(
        placeholders,
        tuple(describe_val(node_val(n)) if isinstance(n, fx.Node) else repr(n) for n in out_nodes),
        tuple(_alias_root(n) if isinstance(n, fx.Node) else None for n in out_nodes),
    )


def check_invariants(gm: fx.GraphModule, before: GraphSignature) -> list[str]:
    """Every violation of the invariants in docs/invariants.md, as readable messages."""
    problems: list[str] = []
    # I1: the graph is well formed (topological order, consistent users) and compiles to code.
    try:
        gm.graph.lint()
        gm.recompile()
    except Exception as e:  # noqa: BLE001 - any lint failure is reported, not raised here
        return [f"I1 graph is malformed: {type(e).__name__}: {e}"]

    for node in gm.graph.nodes:
        # I2: every value-producing node carries shape/dtype metadata.
        if node.op in ("placeholder", "call_function") and "val" not in node.meta:
            problems.append(f"I2 node {node.name!r} ({node.op} {node.target}) has no meta['val']")
        # I3: only ATen ops, getitem and registered custom ops (Inductor and the FX runner
        # both handle exactly these); no Python callables or module calls.
        if node.op == "call_function" and not _is_allowed_target(node.target):
            problems.append(f"I3 node {node.name!r} calls {node.target!r}, which is not an ATen/custom op")
        if node.op in ("call_module", "call_method"):
            problems.append(f"I3 node {node.name!r} is a {node.op}; ATen graphs have only call_function")

    if not problems:
        problems += _stale_meta(gm)

    after = graph_signature(gm)
    # I5: the calling convention is unchanged: same inputs, in order, same outputs.
    if after.placeholders != before.placeholders:
        problems.append(
            f"I5 graph inputs changed: {list(before.placeholders)} -> {list(after.placeholders)}"
        )
    if len(after.outputs) != len(before.outputs):
        problems.append(f"I5 number of outputs changed: {len(before.outputs)} -> {len(after.outputs)}")
    else:
        for i, (b, a) in enumerate(zip(before.outputs, after.outputs)):
            if a != b:
                problems.append(f"I5 output {i} changed from {b} to {a}")
    # I6: no new aliasing: an output may alias an input only where it did before.
    for i, (b, a) in enumerate(zip(before.output_alias_roots, after.output_alias_roots)):
        if a is not None and a != b:
            problems.append(f"I6 output {i} now aliases graph input {a!r} (before: {b!r})")
    return problems


def _stale_meta(gm: fx.GraphModule) -> list[str]:
    """I4: recorded shapes/dtypes are what the ops really produce.

    The graph is re-run on fake tensors of a fresh FakeTensorMode with the traced example's
    concrete sizes. Re-running it on its own symbolic fakes would let ops add guards to (and
    specialize) the ShapeEnv that Dynamo is still using for this compile.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    recorded_inputs = [node_val(n) for n in gm.graph.nodes if n.op == "placeholder"]
    problems: list[str] = []
    with unset_fake_temporarily():
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        inputs = [_concrete_fake(mode, v) for v in recorded_inputs]

    class Recheck(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node.op == "call_function" and "val" in node.meta:
                recorded, fresh = describe_val(node.meta["val"], hints=True), describe_val(result)
                if recorded != fresh:
                    problems.append(f"I4 node {node.name!r} meta says {recorded} but {node.target} gives {fresh}")
                    # Go on with the recorded value, so each later node is checked against
                    # its own record instead of failing on this one's consequences.
                    return _concrete_fake(mode, node.meta["val"])
            return result

    try:
        with unset_fake_temporarily(), mode:
            Recheck(gm).run(*inputs)
    except Exception as e:  # noqa: BLE001 - an op that fails on its own recorded inputs is a violation
        problems.append(f"I4 graph does not run on its recorded input metadata: {type(e).__name__}: {e}")
    return problems


def _concrete_fake(mode, value):
    """A fake tensor (or int) with the example's concrete sizes for a recorded value."""
    if isinstance(value, torch.Tensor):
        with mode:
            return torch.empty_strided(
                [hint_int(d) for d in value.shape], [hint_int(d) for d in value.stride()],
                dtype=value.dtype, device=value.device,
            )
    if isinstance(value, (list, tuple)):
        return type(value)(_concrete_fake(mode, v) for v in value)
    if isinstance(value, torch.SymInt):
        return hint_int(value)
    return value


def _output_nodes(gm: fx.GraphModule) -> list:
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    out = output.args[0]
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _alias_root(node: fx.Node) -> str | None:
    """The placeholder whose storage `node` shares, following view ops; None if it allocates."""
    seen = 0
    while node is not None and seen < 10_000:
        if node.op == "placeholder":
            return node.name
        if is_getitem(node):
            parent = node.args[0]
            base = aliased_input(parent) if isinstance(parent, fx.Node) else None
            node = base
        else:
            node = aliased_input(node)
        seen += 1
    return None


def _is_allowed_target(target) -> bool:
    if target is operator.getitem:
        return True
    if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return True
    # SymInt arithmetic that AOTAutograd leaves in graphs with dynamic shapes.
    return getattr(target, "__module__", None) in ("_operator", "operator", "torch.sym_float", "math") or (
        target in _SYM_FUNCTIONS
    )


_SYM_FUNCTIONS = {torch.sym_float, torch.sym_int, torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_sum}
