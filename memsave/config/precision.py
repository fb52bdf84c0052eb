"""precision: mixed precision of matmuls, weights and saved activations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from memsave.config.base import FamilyConfig


PRECISION_COMPUTE = ("bf16", "fp16", "fp32")
PRECISION_SAVED = (None, "bf16", "fp8", "int8")


@dataclass(frozen=True)
class PrecisionConfig(FamilyConfig):
    """Mixed precision: matmuls in bf16/fp16, norms, softmax, loss and reductions in fp32.

    compute: "bf16" or "fp16" (matmul-like ops run in it, pointwise ops follow their inputs,
    numerically sensitive ops run in fp32; outputs keep their dtype), or "fp32" (no compute
    casting; use with saved). Trainable weights stay fp32 (master weights) and are cast per
    call, so their gradients are fp32; graph constants are cast once at compile time.
    saved (training): store the activations saved for backward as "bf16", "fp8" (e4m3 with
    a per-tensor scale) or "int8" (with an fp32 scale per row of the last dimension) between
    forward and backward; None keeps their dtype.
    weights (inference): "narrow" stores each weight that only matmul-like ops read as one
    compute-dtype copy made at compile time and releases its fp32 original (the model then runs
    only compiled); "fp32" keeps the fp32 weights and casts them per call.
    fp16 training needs loss scaling: use memsave.passes.aten.mixed_precision.loss_scaler().
    """

    family: ClassVar[str] = "precision"
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {
        "bf16": {"compute": "bf16"},
        "fp16": {"compute": "fp16"},
        "saved-bf16": {"compute": "fp32", "saved": "bf16"},
        "saved-fp8": {"compute": "fp32", "saved": "fp8"},
        "saved-int8": {"compute": "fp32", "saved": "int8"},
    }

    compute: str = "bf16"
    saved: str | None = None
    weights: str = "narrow"

    def __post_init__(self):
        self._check_choice("compute", self.compute, PRECISION_COMPUTE)
        self._check_choice("saved", self.saved, PRECISION_SAVED)
        self._check_choice("weights", self.weights, ("narrow", "fp32"))

    def describe(self) -> str:
        return f"compute {self.compute}" + (f", saved {self.saved}" if self.saved else "")
