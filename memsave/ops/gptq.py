"""GPTQ (Frantar et al. 2022): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's output error ‖X Wᵀ − X Ŵᵀ‖² (H = 2 XᵀX from calibration inputs).

memsave::quantize_affine_gptq produces codes in exactly the format of quantize_affine (same
scales, offsets, packing), so dequantize_affine, the kernels and memsave.save read them as
they are; only the choice of codes differs. Scales and offsets are chosen beforehand from the
weight (the MSE clip search, "static groups"), so they can be graph constants.

Reference implementation: blocks of 128 columns with the lazy batch update, Cholesky of the
inverse Hessian, 1% dampening, dead input channels (never active in calibration) zeroed.
"""

from __future__ import annotations

import torch

from memsave.ops.affine import _offset, check_qparams, num_groups
from memsave.ops.pack import pack_bits

BLOCK = 128


@torch.library.custom_op("memsave::quantize_affine_gptq", mutates_args=())
def quantize_affine_gptq(
    w: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """(N, K) weight, (K, K) Hessian of the layer's inputs → packed codes, as quantize_affine."""
    check_qparams(bits, group_size, w.shape[-1])
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"quantize_affine_gptq: hessian must be ({k}, {k}) for this weight, got {tuple(hessian.shape)}")
    qmax = 2**bits - 1
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += 0.01 * torch.diagonal(H).mean() * torch.eye(k, dtype=H.dtype)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (K, K)
    s = scale.float()  # (N, G)
    m = _offset(scale, offset, bits)  # (N, G)
    groups = num_groups(k, group_size)
    codes = torch.zeros(n, groups * group_size, dtype=torch.uint8)
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        block = W[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            g = column // group_size
            q = torch.clamp(torch.round((block[:, i] - m[:, g]) / s[:, g]), 0, qmax)
            codes[:, column] = q.to(torch.uint8)
            error = (block[:, i] - (q * s[:, g] + m[:, g])) / h_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * h_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        W[:, end:] -= errors @ h_inv[start:end, end:]
    # The padding of a last partial group is quantized as zeros, as quantize_affine does.
    if groups * group_size > k:
        g = groups - 1
        zero_code = torch.clamp(torch.round(-m[:, g] / s[:, g]), 0, qmax).to(torch.uint8)
        codes[:, k:] = zero_code.unsqueeze(1)
    return pack_bits(codes, bits)


@quantize_affine_gptq.register_fake
def _(w, scale, offset, hessian, bits, group_size):
    from memsave.ops.pack import packed_length

    padded = num_groups(w.shape[-1], group_size) * group_size
    return w.new_empty((w.shape[0], packed_length(padded, bits)), dtype=torch.uint8)
