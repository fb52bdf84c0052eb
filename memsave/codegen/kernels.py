"""The seam where fast kernels replace memsave's reference ops.

Every memsave op (`memsave/ops/`) is a torch.library custom op whose default implementation
is the plain-torch reference. A fast implementation (a Triton kernel on GPU, an ATen packed
kernel on CPU) registers here as another custom op with the same inputs and outputs, plus a
predicate saying when it applies (device, dtype, shapes, whether Triton is usable). Just
before lowering, `select_kernels` retargets each reference-op node to the first registered
kernel whose predicate accepts it; nodes no kernel accepts keep the reference op. The choice
is recorded on the node (`meta["memsave_kernel"]`) so debug dumps show it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

KERNEL_TAG = "memsave_kernel"


@dataclass(frozen=True)
class Kernel:
    name: str
    op: torch._ops.OpOverload  # same schema as the reference op it replaces
    applies: Callable[[fx.Node], bool]  # looks at node.meta["val"] of args/outputs


_KERNELS: dict[torch._ops.OpOverload, list[Kernel]] = {}


def register_kernel(reference: torch._ops.OpOverload, kernel: Kernel) -> None:
    """Offer `kernel` for nodes of `reference`; earlier registrations are preferred."""
    if str(reference._schema.arguments) != str(kernel.op._schema.arguments):
        raise ValueError(
            f"kernel {kernel.name!r}: schema {kernel.op._schema} does not match reference {reference._schema}"
        )
    _KERNELS.setdefault(reference, []).append(kernel)


def kernels_for(reference: torch._ops.OpOverload) -> list[Kernel]:
    return list(_KERNELS.get(reference, ()))


def select_kernels(gm: fx.GraphModule) -> int:
    """Retarget reference-op nodes to applicable fast kernels; returns how many were swapped."""
    swapped = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _KERNELS:
            continue
        for kernel in _KERNELS[node.target]:
            if kernel.applies(node):
                node.target = kernel.op
                node.meta[KERNEL_TAG] = kernel.name
                swapped += 1
                break
        else:
            node.meta[KERNEL_TAG] = "reference"
    if swapped:
        gm.recompile()
    return swapped
