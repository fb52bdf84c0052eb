"""memsave::linear_affine — a linear layer whose weight is stored affine-quantized.

    y = x @ dequantize_affine(packed, scale, offset, bits, group_size, K, x.dtype).T + bias

This is what codegen turns `dequantize_affine → permute → mm/addmm` into: one op, so a fast
kernel can read the packed codes directly and never materialize the full-precision weight.
The reference below does materialize it (one weight at a time, freed right after); fast
kernels registered in `codegen/kernels.py` (CPU packed kernels, Triton) replace it where they
apply, and are tested against it.
"""

from __future__ import annotations

import torch

from memsave.memory.estimate import WORKSPACE
from memsave.ops.affine import dequantize_affine


@torch.library.custom_op("memsave::linear_affine", mutates_args=())
def linear_affine(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """(..., K) activations × quantized (N, K) weight → (..., N)."""
    w = dequantize_affine(packed, scale, offset, bits, group_size, in_features, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


@linear_affine.register_fake
def _(x, packed, scale, offset, bias, bits, group_size, in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _reference_workspace(node) -> int:
    # The reference dequantizes the whole (N, K) weight for the call: in fp32, then a copy in
    # the activation dtype when that is narrower.
    x = node.args[0].meta["val"]
    weights = int(node.args[1].meta["val"].shape[0]) * int(node.args[7])
    return weights * (4 + (x.element_size() if x.dtype != torch.float32 else 0))


WORKSPACE[torch.ops.memsave.linear_affine.default] = _reference_workspace
