"""Triton kernels for memsave::linear_affine (quantized linear) on CUDA.

- `spec.py`: what a generated kernel is specialized on (bits, scale grouping, symmetric,
  bias, dot dtype), `templates.py`: the kernel source for a spec (GEMV for decode, GEMM for
  prefill), `source.py`: hash-named source files in a cache directory, imported from there,
  `configs.py`: block sizes to autotune over, `launcher.py`: the launcher and the custom op
  `memsave::linear_affine_triton` (same schema as the reference).
- `sparse_nm.py`: the kernel for memsave::linear_nm (n:m-sparse linear, op
  `memsave::linear_nm_triton`); `sparse_semi_structured.py`: 2:4 on sparse tensor cores
  through torch's semi-structured sparse tensors (not Triton; offered first where it applies).
- `register()` offers the op to codegen's kernel registry (`codegen/kernels.py`) for
  `memsave::linear_affine` nodes (and the sparse kernels for `memsave::linear_nm` nodes) whose
  activations are on a CUDA device. It is not called on import: whoever sets up codegen calls
  it when CUDA is available.

Tests run the same kernels on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.fx as fx

from memsave.graph.meta import arg_val, op_arg
from memsave.codegen.triton.launcher import interpreting, launch, linear_affine_triton
from memsave.codegen.triton.spec import GEMV_MAX_ROWS, SUPPORTED_BITS, SUPPORTED_DTYPES, KernelSpec

KERNEL_NAME = "triton-linear-affine"

__all__ = [
    "GEMV_MAX_ROWS",
    "KERNEL_NAME",
    "SUPPORTED_BITS",
    "SUPPORTED_DTYPES",
    "KernelSpec",
    "applies",
    "interpreting",
    "launch",
    "linear_affine_triton",
    "register",
    "triton_available",
]


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def applies(node: fx.Node) -> bool:
    """A memsave::linear_affine node the Triton kernel can run: CUDA activations of a
    supported dtype (bf16 needs sm80+), supported bits, weights on the same device."""
    x, packed = arg_val(op_arg(node, "x")), arg_val(op_arg(node, "packed"))
    if not isinstance(x, torch.Tensor) or not isinstance(packed, torch.Tensor):
        return False
    if x.device.type != "cuda" or packed.device != x.device or packed.dtype != torch.uint8:
        return False
    if x.dtype not in SUPPORTED_DTYPES or op_arg(node, "bits") not in SUPPORTED_BITS:
        return False
    if x.dtype == torch.bfloat16 and not _has_bf16_dot(x.device):
        return False
    return triton_available()


def _has_bf16_dot(device: torch.device) -> bool:
    try:
        return torch.cuda.get_device_capability(device) >= (8, 0)  # bf16 tl.dot: Ampere and later
    except (AssertionError, RuntimeError):  # no usable CUDA here (e.g. tracing with fake tensors)
        return False


def register() -> None:
    """Offer the Triton kernel for memsave::linear_affine (idempotent)."""
    import memsave.ops  # noqa: F401  (defines memsave::linear_affine)
    from memsave.codegen.kernels import Kernel, register_kernel

    kernel = Kernel.retarget(KERNEL_NAME, torch.ops.memsave.linear_affine_triton.default, applies)
    register_kernel(torch.ops.memsave.linear_affine.default, kernel)
    # memsave::linear_nm: 2:4 on sparse tensor cores where it applies, else the Triton kernel.
    from memsave.codegen.triton import sparse_nm, sparse_semi_structured

    sparse_semi_structured.register()
    sparse_nm.register()
    # memsave::linear_cross_entropy(_backward): the fused LM-head loss, no logits in memory.
    from memsave.codegen.triton import chunked_ce

    chunked_ce.register()
    # memsave::attention_int8_kv: attention read straight from an int8 kv cache (kv_cache.py).
    from memsave.codegen.triton import kv_attention

    kv_attention.register()
    # memsave::attention_kivi: the same for the 4- and 2-bit KIVI layouts.
    from memsave.codegen.triton import kv_attention_kivi

    kv_attention_kivi.register()
