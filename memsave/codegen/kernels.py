"""The seam where fast kernels replace memsave's reference ops.

Every memsave op (`memsave/ops/`) is a torch.library custom op whose default implementation
is the plain-torch reference. A fast implementation registers here against the reference op:

- `Kernel.retarget(name, op, applies)`: a custom op with the same schema (a Triton kernel
  reading memsave's own packed format); selecting it only changes the node's target.
- `Kernel(name, applies, lower)`: a kernel that needs its own weight layout (e.g. an ATen
  packed CPU kernel); `lower(gm, node)` rewrites the node and its constants and returns the
  node that now runs the kernel.

`applies(node)` looks at the node's metadata (device, dtype, shapes, bits) and says whether
the kernel can run it exactly as the reference would. Just before lowering,
`select_kernels` gives each reference-op node to the first registered kernel that applies;
nodes no kernel takes keep the reference. The choice is recorded on the node
(`meta["memsave_kernel"]`) and shows in debug dumps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from memsave.graph.rewrite import drop_unused_constants

KERNEL_TAG = "memsave_kernel"


@dataclass(frozen=True)
class Kernel:
    name: str
    applies: Callable[[fx.Node], bool]
    lower: Callable[[fx.GraphModule, fx.Node], fx.Node]  # returns the node that now runs the kernel
    op: torch._ops.OpOverload | None = None  # set for same-schema kernels (checked at registration)
    # Computes in a narrower dtype than the node's activations (e.g. fp32 in, bf16 inside): only
    # chosen when the config lets codegen pick the fastest kernel over the exact one.
    narrows: bool = False

    @classmethod
    def retarget(
        cls, name: str, op: torch._ops.OpOverload, applies: Callable[[fx.Node], bool], *, narrows: bool = False
    ) -> Kernel:
        def lower(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
            node.target = op
            return node

        return cls(name, applies, lower, op, narrows)


_KERNELS: dict[torch._ops.OpOverload, list[Kernel]] = {}


def register_kernel(reference: torch._ops.OpOverload, kernel: Kernel) -> None:
    """Offer `kernel` for nodes of `reference`; earlier registrations are preferred."""
    if kernel.op is not None and _arguments(reference) != _arguments(kernel.op):
        raise ValueError(
            f"kernel {kernel.name!r}: schema {kernel.op._schema} does not match reference {reference._schema}"
        )
    if any(k.name == kernel.name for k in _KERNELS.get(reference, ())):
        return  # registering twice (e.g. a module imported again) changes nothing
    _KERNELS.setdefault(reference, []).append(kernel)


def _arguments(op: torch._ops.OpOverload) -> list[tuple[str, str]]:
    return [(a.name, str(a.type)) for a in op._schema.arguments]


def kernels_for(reference: torch._ops.OpOverload) -> list[Kernel]:
    return list(_KERNELS.get(reference, ()))


def select_kernels(gm: fx.GraphModule, *, narrow: bool = True, per_layer: dict[str, str] | None = None) -> dict[str, int]:
    """Give each reference-op node to the first kernel that applies (skipping kernels that
    narrow the activations unless `narrow`); returns counts by kernel, and fills `per_layer`
    (weight name -> kernel) when given."""
    chosen: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _KERNELS:
            continue
        layer = weight_name(node)
        name = "reference"
        for kernel in _KERNELS[node.target]:
            if (narrow or not kernel.narrows) and kernel.applies(node):
                kernel.lower(gm, node).meta[KERNEL_TAG] = name = kernel.name
                break
        else:
            node.meta[KERNEL_TAG] = name
        chosen[name] = chosen.get(name, 0) + 1
        if per_layer is not None:
            per_layer[layer] = name
    if any(name != "reference" for name in chosen):
        drop_unused_constants(gm)  # a kernel with its own layout leaves the old constants unread
        gm.recompile()
    return chosen


def select_kernels_pass(gm: fx.GraphModule, config: object, ctx: object):
    """select_kernels as a recorded pipeline step: the report shows which kernels run, and in
    debug mode the invariants and the error against the untransformed graph are checked after it."""
    from memsave.passes.base import PassResult

    quantize = getattr(getattr(ctx, "config", None), "quantize", None)
    narrow = quantize is None or quantize.compute_dtype != "float32"
    per_layer: dict[str, str] = {}
    chosen = select_kernels(gm, narrow=narrow, per_layer=per_layer)
    fast = {name: count for name, count in chosen.items() if name != "reference"}
    notes = ("kernels: " + ", ".join(f"{name} ×{count}" for name, count in sorted(chosen.items())),) if chosen else ()
    notes += tuple(f"  {layer}: {kernel}" for layer, kernel in per_layer.items())
    return PassResult(bool(fast), notes, {"kernels": chosen, "per_layer": per_layer})


def weight_name(node: fx.Node) -> str:
    """The weight a compressed linear multiplies with, by the name the report uses for it
    (its stored form's first tensor, followed through a dequantize of it), else the node's."""
    stored = node.args[1] if len(node.args) > 1 else None
    for _ in range(4):
        if not isinstance(stored, fx.Node):
            break
        label = stored.meta.get("memsave_weight_of") or stored.meta.get("memsave_derived")
        if label is not None:
            return label if isinstance(label, str) else f"{label[0]}[{label[1]}]"
        stored = stored.args[0] if stored.op == "call_function" and stored.args else None
    return node.name
