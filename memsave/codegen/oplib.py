"""Kernel ops: torch ops whose CPU implementation is a fast kernel for a memsave reference op.

Registered with `torch.library.Library` rather than `torch.library.custom_op`: a call then
costs ~1.6 µs of dispatch instead of ~17 µs (measured on this CPU), and a decoded token of a
4-layer model calls ~30 of them. The fake kernel (shapes and dtypes for tracing) is given
explicitly, usually by calling the reference op itself under the fake mode.
"""

from __future__ import annotations

from typing import Callable

import torch

_LIBRARY = torch.library.Library("memsave", "FRAGMENT")
# Triton kernels' key: every device, since they also run on CPU tensors under TRITON_INTERPRET=1.
TRITON_DISPATCH = "CompositeExplicitAutograd"


def schema_of(reference: torch._ops.OpOverload) -> str:
    """`(Tensor x, ...) -> Tensor`: a reference op's schema without its name."""
    text = str(reference._schema)
    return text[text.index("(") :]


def define_kernel_op(
    name: str, schema: str, impl: Callable, fake: Callable, *, dispatch_key: str = "CPU"
) -> torch._ops.OpOverload:
    """`memsave::<name>` with `schema`, `impl` as its kernel for `dispatch_key` ("CPU" for the
    native and ATen-packed kernels; "CompositeExplicitAutograd", every device, for Triton's,
    which also run on CPU tensors under TRITON_INTERPRET=1) and `fake` for tracing."""
    _LIBRARY.define(name + schema)
    _LIBRARY.impl(name, impl, dispatch_key)
    torch.library.register_fake(f"memsave::{name}", lib=_LIBRARY)(fake)
    return getattr(torch.ops.memsave, name).default


def twin(reference: torch._ops.OpOverload, name: str, impl: Callable, *, dispatch_key: str = "CPU") -> torch._ops.OpOverload:
    """A kernel op with exactly `reference`'s schema (so selecting it only changes a node's
    target) and the reference's fake kernel."""
    return define_kernel_op(
        name, schema_of(reference), impl, lambda *args, **kwargs: reference(*args, **kwargs), dispatch_key=dispatch_key
    )
