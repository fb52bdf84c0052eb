"""Activation-aware weight quantization (AWQ, Lin et al. 2023): scale input channels before
quantizing, so the weights that meet large activations lose less.

For a linear y = x Wᵀ, any per-input-channel s > 0 gives y = (x / s)(W·s)ᵀ. Quantizing W·s
instead of W spends more of each group's range on the columns that matter (those multiplied
by large activations), and x / s undoes the scaling exactly at run time. AWQ picks
s = mean|x|^α per channel and searches α on calibration activations for the smallest output
error ‖X Wᵀ − X Ŵᵀ‖², where Ŵ = dequantize(quantize(W·s)) / s. α = 0 is plain quantization, so
the search never does worse than it on the calibration data.
"""

from __future__ import annotations

import torch

from memsave.ops.affine import choose_qparams_mse, dequantize_affine, quantize_affine


def choose_awq(
    weight: torch.Tensor,
    mean_abs: torch.Tensor,
    sample: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    grid: int = 11,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Returns (s (K,) fp32 column scales, scale, offset, alpha) minimizing the output error.

    weight (N, K); mean_abs (K,) mean |x| per input channel; sample (S, K) calibration rows.
    """
    w = weight.detach().float()
    k = w.shape[1]
    x = sample.float()
    reference = x @ w.t()  # (S, N)
    mean_abs = mean_abs.float().clamp_min(1e-8)
    best = None
    for alpha in torch.linspace(0, 1, grid).tolist():
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centred on 1, so W·s keeps its magnitude
        scaled = w * s
        scale, offset = choose_qparams_mse(scaled, bits, group_size, symmetric)
        packed = quantize_affine(scaled, scale, offset, bits, group_size)
        w_hat = dequantize_affine(packed, scale, offset, bits, group_size, k, torch.float32) / s
        loss = (x @ w_hat.t() - reference).pow(2).sum().item()
        if best is None or loss < best[0]:
            best = (loss, s, scale, offset, alpha)
    _, s, scale, offset, alpha = best
    return s, scale, offset, alpha
