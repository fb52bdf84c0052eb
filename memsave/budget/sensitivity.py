"""How much error a form adds to one layer: its output's noise on the layer's calibration inputs.

For inputs x with second moment G = E[x xᵀ] (calibrate's Gram matrix), a weight change ΔW adds
E‖ΔW x‖² = Σ_rows Δw G Δwᵀ to the output, against a signal E‖W x‖² = Σ_rows w G wᵀ. Their
ratio, the layer's relative output noise, is what a plan adds up over layers. Without
calibration statistics G is the identity (the weight's own relative error): a weaker guide,
since it ignores which input channels carry large activations.
"""

from __future__ import annotations

import torch

from memsave.calibrate import CALIBRATION
from memsave.ops.lowrank import output_error_sums

def input_moment(weight: torch.Tensor) -> torch.Tensor | None:
    """E[x xᵀ] of the inputs this weight multiplied (memsave.calibrate(..., hessian=True)), or None."""
    stats = CALIBRATION.get(weight)
    return None if stats is None or stats.gram is None else stats.gram


def relative_output_noise(weight: torch.Tensor, approx: torch.Tensor, moment: torch.Tensor | None) -> float:
    """E‖(Ŵ − W) x‖² / E‖W x‖² (G = `moment`, or the identity when None)."""
    noise, signal = output_error_sums(weight, lambda rows: approx[rows], moment, torch.float32)
    return noise / signal if signal > 0 else 0.0
