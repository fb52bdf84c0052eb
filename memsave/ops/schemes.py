"""The weight-quantization schemes as a rule table: how each chooses its side parameters and
which ops quantize, dequantize and multiply with it.

Every scheme fits one argument shape, so the quantize pass, fold_weights and the fusion in
codegen handle all of them without special cases:

    quantize(w, *params, *quantize_extra)                    -> codes (uint8, packed)
    dequantize(codes, *params, *dequantize_extra, K, dtype)  -> (N, K) weight
    linear(x, codes, *params, bias, *dequantize_extra, K)    -> x @ weightᵀ + bias

    affine: params (scale, offset|None),  extras (bits, group)
    log:    params (log_zmin, step),      extras (bits, group)
    vq:     params (codebook,),           quantize extras (), dequantize extras (index_bits, dim)
    nf4:    params (absmax codes, scales, mean),  extras (group,)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from memsave.ops.affine import choose_qparams_affine, choose_qparams_mse
from memsave.ops.log import choose_logparams, choose_logparams_mse
from memsave.ops.nf4 import choose_nf4params
from memsave.ops.vq import index_bits_for, kmeans_codebook

memsave_ops = torch.ops.memsave


@dataclass(frozen=True)
class QuantSpec:
    """One weight's quantization, as the pass decided it."""

    scheme: str
    bits: int
    group: int  # input features per group (K for per-channel); unused by vq
    symmetric: bool
    method: str

    @property
    def vq_dim(self) -> int:
        return max(d for d in (1, 2, 4) if self.bits * d <= 8)

    @property
    def vq_centroids(self) -> int:
        return 2 ** (self.bits * self.vq_dim)


@dataclass(frozen=True)
class Scheme:
    quantize: Any  # OpOverload
    dequantize: Any
    linear: Any
    choose: Callable[[torch.Tensor, QuantSpec], tuple]  # side parameters, real tensors
    quantize_extra: Callable[[QuantSpec], tuple]
    dequantize_extra: Callable[[QuantSpec], tuple]


def _affine_params(w: torch.Tensor, spec: QuantSpec) -> tuple:
    choose = choose_qparams_mse if spec.method == "mse" else choose_qparams_affine
    return choose(w, spec.bits, spec.group, spec.symmetric)


def _log_params(w: torch.Tensor, spec: QuantSpec) -> tuple:
    choose = choose_logparams_mse if spec.method == "mse" else choose_logparams
    return choose(w, spec.bits, spec.group)


def _vq_params(w: torch.Tensor, spec: QuantSpec) -> tuple:
    codebook, _ = kmeans_codebook(w, spec.vq_dim, spec.vq_centroids)
    return (codebook,)


SCHEMES: dict[str, Scheme] = {
    "affine": Scheme(
        memsave_ops.quantize_affine.default, memsave_ops.dequantize_affine.default, memsave_ops.linear_affine.default,
        _affine_params, lambda s: (s.bits, s.group), lambda s: (s.bits, s.group),
    ),
    "log": Scheme(
        memsave_ops.quantize_log.default, memsave_ops.dequantize_log.default, memsave_ops.linear_log.default,
        _log_params, lambda s: (s.bits, s.group), lambda s: (s.bits, s.group),
    ),
    "vq": Scheme(
        memsave_ops.quantize_vq.default, memsave_ops.dequantize_vq.default, memsave_ops.linear_vq.default,
        _vq_params, lambda s: (), lambda s: (index_bits_for(s.vq_centroids), s.vq_dim),
    ),
    "nf4": Scheme(
        memsave_ops.quantize_nf4.default, memsave_ops.dequantize_nf4.default, memsave_ops.linear_nf4.default,
        lambda w, s: choose_nf4params(w, s.group), lambda s: (s.group,), lambda s: (s.group,),
    ),
}

# dequantize op -> (its scheme's linear op, how many side-parameter tensors follow the codes)
DEQUANTIZE_TO_LINEAR = {
    memsave_ops.dequantize_affine.default: (memsave_ops.linear_affine.default, 2),
    memsave_ops.dequantize_log.default: (memsave_ops.linear_log.default, 2),
    memsave_ops.dequantize_vq.default: (memsave_ops.linear_vq.default, 1),
    memsave_ops.dequantize_nf4.default: (memsave_ops.linear_nf4.default, 3),
}
QUANTIZE_OPS = tuple(s.quantize for s in SCHEMES.values())
