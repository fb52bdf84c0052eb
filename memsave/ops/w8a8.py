"""Dynamic int8 activations × int8 weights (W8A8) for linears.

Activations are quantized per token (per row of the (M, K) input) at run time, symmetric:
    s_x = max|x_row| / 127,   x_q = clip(round(x / s_x), −127, 127)
Weights are int8 per-channel symmetric (memsave's affine format: bits 8, group = K, codes
stored as q + 128). The product is an exact int8×int8→int32 matmul, rescaled once:
    y = s_x · s_w · (x_q @ w_qᵀ) + bias

In the graph the activation side is explicit — quantize_per_token → dequantize_per_token in
front of the matmul — so the numerics are visible and measurable like any other Q/DQ; codegen
fuses the pattern into linear_w8a8, whose reference does the integer matmul with
torch._int_mm (exact on CPU for any M).
"""

from __future__ import annotations

import torch

from memsave.memory.estimate import WORKSPACE

QMAX = 127


@torch.library.custom_op("memsave::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) float → (..., K) int8 codes and (..., 1) fp32 scales."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / QMAX).clamp_min(1e-12)
    codes = torch.round(xf / scale).clamp(-QMAX, QMAX).to(torch.int8)
    return codes, scale


@quantize_per_token.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("memsave::dequantize_per_token", mutates_args=())
def dequantize_per_token(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale).to(dtype)


@dequantize_per_token.register_fake
def _(codes, scale, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


@torch.library.custom_op("memsave::linear_w8a8", mutates_args=())
def linear_w8a8(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """(..., K) float × int8 per-channel weight (N, K) codes + 128, fp16 scales (N, 1) → (..., N)."""
    k = x.shape[-1]
    codes, x_scale = quantize_per_token(x.reshape(-1, k))  # (M, K), (M, 1)
    w = (packed ^ 0x80).view(torch.int8)  # (N, K) signed codes
    acc = torch._int_mm(codes, w.t())  # (M, N) int32, exact; the transposed view needs no copy
    y = acc.float() * x_scale * scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], packed.shape[0])


@linear_w8a8.register_fake
def _(x, packed, scale, bias):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _w8a8_workspace(node) -> int:
    # The reference's temporaries at their peak: two fp32 copies of x while it rounds, its
    # int8 codes, the int32 accumulator and its fp32 rescale (the weight is read as a view).
    x = node.args[0].meta["val"]
    n, k = (int(d) for d in node.args[1].meta["val"].shape)
    m = x.numel() // max(1, int(x.shape[-1]))
    return m * k * (2 * 4 + 1) + m * n * (4 + 4)


WORKSPACE[torch.ops.memsave.linear_w8a8.default] = _w8a8_workspace
