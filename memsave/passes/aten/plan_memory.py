"""Plan memory: the last pass over the graph that runs. Liveness, in-place reuse, layout copies.

What each lowering already does, and what this pass adds:

- Frees after last use. FX's generated code writes `x = None` after a value's last use, and
  memsave's boxed lowering clears the argument list, so inputs (a backward's saved
  activations) die at their last use too; Inductor does the same in its own code. This pass
  computes that liveness (memory/liveness.py) and reports what it implies.
- Reuse of a dying input's buffer (codegen "fx"): an elementwise op whose input dies at it,
  with the same shape, strides and dtype as its result, writes into that input through the
  op's out= form. Exact (each element is read before it is written), and the new buffer is
  never allocated:

      y = aten.mul.Tensor(a, b)          # a dies here, a and y: float32[8, 64], same strides
  becomes
      y = aten.mul.out(a, b, out=a)

  Inductor plans its own buffers (and does this in-place reuse itself), so with codegen
  "inductor" the pass leaves the graph to it and only reports.
- Needless layout copies: `clone`/`_to_copy` that produce exactly the layout and dtype they
  were given (a defensive `.clone()`, `.contiguous()` of a contiguous intermediate) are
  dropped, and chains of permutes fold into one (or none).

The report gives the lower bound (most bytes alive at once), the planned peak (arena of a
greedy-by-size placement: >= the lower bound), and, when the example input is known and
measuring is on, the measured peak of the graph before and after this pass (MemoryTracker).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from memsave.config import PlanMemoryConfig
from memsave.graph.meta import alias_base, aliased_input, is_getitem, node_val
from memsave.memory.liveness import is_dense, plan_buffers
from memsave.passes.base import PassContext, PassResult, tag
from memsave.report import fmt_bytes

aten = torch.ops.aten
STAGES = ("inference", "forward", "backward")  # not the joint graph: the partitioner needs it functional
COPIES = (aten.clone.default, aten._to_copy.default, torch.ops.prims.convert_element_type.default)
PERMUTES = (aten.permute.default, aten.t.default, aten.transpose.int)


def plan_memory(gm: fx.GraphModule, config: PlanMemoryConfig, ctx: PassContext) -> PassResult:
    measuring = (config.measure or ctx.config.debug) and ctx.stage != "backward"
    measured_before = _measure(gm, ctx) if measuring else None
    removed = drop_needless_layout_ops(gm) if config.layout else []
    inplace = []
    if config.inplace and ctx.config.codegen == "fx":
        inplace = reuse_dying_inputs(gm)
    if removed or inplace:
        gm.graph.lint()
        gm.recompile()
    plan = plan_buffers(gm, inputs_die=ctx.stage == "backward")
    measured = _measure(gm, ctx) if measuring else None
    details: dict[str, Any] = {
        "lower_bound_bytes": plan.lower_bound_bytes,
        "lower_bound_node": plan.lower_bound_node,
        "planned_peak_bytes": plan.planned_peak_bytes,
        "measured_peak_bytes": measured,
        "measured_peak_before_bytes": measured_before,
        "buffers": len(plan.buffers),
        "inplace": inplace,  # names of the ops that now write into a dying input
        "layout_removed": removed,
        "codegen": ctx.config.codegen,
    }
    measured_note = "" if measured is None else f", measured {fmt_bytes(measured)} (before this pass {fmt_bytes(measured_before)})"
    notes = [
        f"lower bound {fmt_bytes(plan.lower_bound_bytes)} (at {plan.lower_bound_node}), planned "
        f"{fmt_bytes(plan.planned_peak_bytes)} in {len(plan.buffers)} buffers{measured_note}",
        f"{len(inplace)} ops write into a dying input; {len(removed)} needless layout ops removed",
    ]
    if config.inplace and ctx.config.codegen != "fx":
        notes.append("codegen inductor: Inductor plans and reuses its own buffers; this pass only reports")
    return PassResult(bool(removed or inplace), tuple(notes), details)


# -- in-place reuse -----------------------------------------------------------------------


def reuse_dying_inputs(gm: fx.GraphModule) -> list[str]:
    """Rewrite elementwise ops to write into an input that dies at them; names of the ops."""
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    outputs = set(nodes[-1].all_input_nodes)
    done = []
    for node in nodes:
        if not _elementwise(node):
            continue
        out_op = out_variant(node.target)
        if out_op is None:
            continue
        for arg in node.args:
            if isinstance(arg, fx.Node) and _can_write_into(arg, node, position, outputs):
                node.target = out_op
                node.kwargs = {**node.kwargs, "out": arg}
                tag(node, "plan_memory")
                done.append(node.name)
                break
    return done


def _elementwise(node: fx.Node) -> bool:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    tags = node.target.tags
    if torch.Tag.pointwise not in tags or torch.Tag.nondeterministic_seeded in tags:
        return False
    return isinstance(node_val(node), torch.Tensor) and aliased_input(node) is None


def out_variant(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """The overload of `op` that takes the same arguments plus `out=` (e.g. mul.Tensor → mul.out)."""
    args = [(a.name, str(a.type)) for a in op._schema.arguments]
    for name in op.overloadpacket.overloads():
        candidate = getattr(op.overloadpacket, name)
        schema = candidate._schema
        outs = [a for a in schema.arguments if a.is_out]
        rest = [(a.name, str(a.type)) for a in schema.arguments if not a.is_out]
        if len(outs) == 1 and outs[0].name == "out" and rest == args and len(schema.returns) == 1:
            return candidate
    return None


def _can_write_into(arg: fx.Node, node: fx.Node, position: dict[fx.Node, int], outputs: set[fx.Node]) -> bool:
    """`arg`'s buffer belongs to the graph, nothing reads that buffer after `node`, and `node`'s
    result has exactly `arg`'s layout, so writing the result over it element by element is exact."""
    root = _storage_root(arg)
    if root is None:
        return False  # inputs and constants belong to someone else
    a, y = node_val(arg), node_val(node)
    if not isinstance(a, torch.Tensor) or not isinstance(y, torch.Tensor):
        return False
    if a.dtype != y.dtype or a.device != y.device or tuple(a.shape) != tuple(y.shape) or a.stride() != y.stride():
        return False
    if not is_dense(a):
        return False
    aliases = _aliases_of(root)
    if aliases & outputs:
        return False
    for alias in aliases:
        for user in alias.users:
            if user is not node and position[user] > position[node]:
                return False
    # Another argument reading the same buffer through a different view (add(x, x.t())) would
    # see elements already overwritten.
    return all(other is arg or other not in aliases for other in node.all_input_nodes)


def _storage_root(node: fx.Node) -> fx.Node | None:
    """The node that allocated `node`'s buffer, through views and out= writes; None for graph
    inputs, constants and elements of multi-output ops."""
    node = alias_base(node)
    if node.op != "call_function" or is_getitem(node):
        return None
    return node


def _aliases_of(root: fx.Node) -> set[fx.Node]:
    """root and every view of it, transitively."""
    found, stack = {root}, [root]
    while stack:
        for user in stack.pop().users:
            if user not in found and (aliased_input(user) in found):
                found.add(user)
                stack.append(user)
    return found


# -- layout copies ------------------------------------------------------------------------


def drop_needless_layout_ops(gm: fx.GraphModule) -> list[str]:
    """Remove copies that change nothing and fold permute chains; names of what went."""
    removed = []
    outputs = set(next(reversed(gm.graph.nodes)).all_input_nodes)
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in COPIES and _copy_changes_nothing(node, outputs):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed.append(node.name)
        elif node.target in PERMUTES and _fold_permutes(gm, node):
            removed.append(node.name)
    return removed


def _copy_changes_nothing(node: fx.Node, outputs: set[fx.Node]) -> bool:
    src = node.args[0]
    if not isinstance(src, fx.Node) or node in outputs:
        return False
    a, y = node_val(src), node_val(node)
    if not isinstance(a, torch.Tensor) or not isinstance(y, torch.Tensor):
        return False
    same = a.dtype == y.dtype and a.device == y.device and a.layout == y.layout
    same = same and tuple(a.shape) == tuple(y.shape) and a.stride() == y.stride()
    # A copy of a graph input (or of an output's buffer) can be what keeps an output from
    # aliasing it, or an input from being written through; only intermediates are dropped.
    root = _storage_root(src)
    return same and root is not None and not (_aliases_of(root) & outputs)


def _permutation(node: fx.Node, ndim: int) -> list[int] | None:
    if node.target == aten.permute.default:
        return [d % ndim for d in node.args[1]]
    if node.target == aten.t.default:
        return [1, 0] if ndim == 2 else list(range(ndim))
    if node.target == aten.transpose.int:
        perm = list(range(ndim))
        i, j = node.args[1] % ndim, node.args[2] % ndim
        perm[i], perm[j] = perm[j], perm[i]
        return perm
    return None


def _fold_permutes(gm: fx.GraphModule, node: fx.Node) -> bool:
    """permute(permute(x, p), q) → permute(x, p∘q), or x itself when that is the identity."""
    inner = node.args[0]
    if not isinstance(inner, fx.Node) or inner.op != "call_function" or inner.target not in PERMUTES:
        return False
    x = inner.args[0]
    val = node_val(node)
    if not isinstance(val, torch.Tensor) or not isinstance(x, fx.Node):
        return False
    p, q = _permutation(inner, val.dim()), _permutation(node, val.dim())
    composed = [p[i] for i in q]
    if composed == list(range(val.dim())):
        node.replace_all_uses_with(x)
    else:
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(aten.permute.default, (x, composed))
        new.meta["val"] = val
        tag(new, "plan_memory")
        node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    if not inner.users:
        gm.graph.erase_node(inner)
    return True


# -- measured peak ------------------------------------------------------------------------


def _measure(gm: fx.GraphModule, ctx: PassContext) -> int | None:
    """Peak bytes allocated while the graph runs once on the example input (None without one)."""
    from memsave.memory.track import MemoryTracker

    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if not all(name in ctx.real_inputs for name in names) or torch.autograd.profiler._is_profiler_enabled:
        return None
    # Inputs the graph writes to (BatchNorm's running stats) are cloned: measuring must not
    # change the user's model.
    written = {n for node in gm.graph.nodes if node.op == "call_function" for n in _written_args(node)}
    args = [ctx.real_inputs[name] for name in names]
    with unset_fake_temporarily():
        args = [a.clone() if name in written else a for name, a in zip(names, args)]
    if any(isinstance(a, torch.Tensor) and a.untyped_storage().nbytes() == 0 and a.numel() > 0 for a in args):
        return None  # a released weight: the graph reads its compressed form, the placeholder is empty
    with unset_fake_temporarily(), torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with MemoryTracker("cpu") as tracker:
            out = gm(*args)
        del out
    return tracker.stats.peak_bytes


def _written_args(node: fx.Node) -> list[str]:
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return []
    names = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if isinstance(value, fx.Node):
                names.append(value.name)
    return names
