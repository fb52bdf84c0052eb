"""Reading shape/dtype metadata off FX nodes: sizes in bytes, symbolic sizes, aliasing.

Every node of an ATen graph from AOTAutograd carries `node.meta["val"]`: a FakeTensor, a tuple
of them, a SymInt, or None. Sizes may be symbolic (dynamic shapes); byte counts here use the
size hint of the example that was traced, which is what a memory estimate for that example
needs.
"""

from __future__ import annotations

import operator
from typing import Any, Iterator

import torch
import torch.fx as fx

PROVENANCE = "memsave_pass"  # node.meta key: the pass that made the node (shown in debug dumps)


def hint_int(value: Any) -> int:
    """A concrete int for an int or SymInt (its hint from the traced example)."""
    if isinstance(value, torch.SymInt):
        node = value.node
        if node.hint is not None:
            return int(node.hint)
        return int(node.shape_env.size_hint(node.expr))
    return int(value)


def tensor_storage_bytes(t: torch.Tensor) -> int:
    """Bytes of the smallest storage that holds `t` with its strides."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((hint_int(size) - 1) * abs(hint_int(stride)) for size, stride in zip(t.shape, t.stride()))
    return span * t.element_size()


def tensor_bytes(t: torch.Tensor) -> int:
    """numel × itemsize (what a dense copy of `t` would take)."""
    return hint_int(t.numel()) * t.element_size()


def iter_tensors(val: Any) -> Iterator[torch.Tensor]:
    if isinstance(val, torch.Tensor):
        yield val
    elif isinstance(val, (list, tuple)):
        for v in val:
            yield from iter_tensors(v)


def node_val(node: fx.Node) -> Any:
    return node.meta.get("val", node.meta.get("example_value"))


def example_val(node: Any) -> Any:
    """A Dynamo graph node's traced value (`example_value`; `val` appears once ATen-traced);
    None for a constant argument."""
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def arg_val(arg: Any) -> Any:
    """The traced value of a call's argument: its node's value, None for a constant."""
    return node_val(arg) if isinstance(arg, fx.Node) else None


def call_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call's argument `name`: positional at `index`, else by keyword, else `default`."""
    return node.args[index] if index < len(node.args) else node.kwargs.get(name, default)


def op_arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """`call_arg` for a call of an op with a schema (ATen's or memsave's own): the position
    comes from the schema."""
    names = [a.name for a in node.target._schema.arguments]
    return call_arg(node, names.index(name), name, default)


def node_tensor_bytes(node: fx.Node) -> int:
    """Bytes of every tensor a node produces (sum over tuple outputs)."""
    return sum(tensor_storage_bytes(t) for t in iter_tensors(node_val(node)))


def describe_val(val: Any, hints: bool = False) -> str:
    """A short `float32[4, 16]` description for reports; hints=True shows symbolic sizes as
    the traced example's numbers."""
    if isinstance(val, torch.Tensor):
        dtype = str(val.dtype).replace("torch.", "")
        sizes = [hint_int(s) if hints else s for s in val.shape]
        return f"{dtype}[{', '.join(str(s) for s in sizes)}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(describe_val(v, hints) for v in val) + ")"
    if isinstance(val, torch.SymInt) and hints:
        return "int"
    if isinstance(val, (int, torch.SymInt)):
        return "int"
    return type(val).__name__ if val is not None else "None"


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def aliased_input(node: fx.Node) -> fx.Node | None:
    """The node whose storage `node`'s output shares, or None when the op allocates.

    Uses the op's schema: a return annotated `Tensor(a)` aliases the argument annotated
    `Tensor(a)` (views such as aten.view/t/permute/expand/slice, and in-place ops).
    """
    if node.op != "call_function":
        return None
    if is_getitem(node):
        return None  # handled per tuple element by the caller
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    for ret in schema.returns:
        if ret.alias_info is None:
            continue
        alias_sets = ret.alias_info.before_set
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is None or not (arg.alias_info.before_set & alias_sets):
                continue
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if isinstance(value, fx.Node):
                return value
    return None


def alias_base(node: fx.Node) -> fx.Node:
    """The node whose storage `node` shares, followed through every view and in-place op
    (`aliased_input` until none): a placeholder, or the op that allocated it."""
    while (base := aliased_input(node)) is not None:
        node = base
    return node


def op_name(node: fx.Node) -> str:
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return str(target.overloadpacket._qualified_op_name).replace("::", ".") + (
                "" if target._overloadname == "default" else f".{target._overloadname}"
            )
        return getattr(target, "__name__", str(target))
    return node.op
