"""The forms a linear weight can take in a plan, with their exact stored bytes and the weight
the compiled model will compute with.

Affine quantization only for now (int8 per channel; int4 in groups of 32/64/128; int3 and int2 in
groups of 32 and 128), each through the quantize pass's own code (weight_codes), so the error a plan
predicts is that of the codes the compile stores. GPTQ where calibration statistics exist (its
codes need the inputs' Hessian), else the MSE grid search: the same fallback as the pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memsave.config import QuantizeConfig
from memsave.ops.affine import bits_per_weight


@dataclass(frozen=True)
class Form:
    name: str
    bits: int | None  # None: the weight stays as it is
    group_size: int | None = None  # None: per output channel
    symmetric: bool = False
    method: str = "gptq"

    def bytes(self, n: int, k: int, element_size: int = 4) -> int:
        """Stored bytes; a last group that the row does not fill is stored whole (zero-padded),
        as the quantize ops store it."""
        if self.bits is None:
            return n * k * element_size
        group = k if self.group_size is None or self.group_size >= k else self.group_size
        return round(bits_per_weight(n, k, self.bits, group, self.symmetric) * n * k / 8)

    def scheme(self) -> QuantizeConfig:
        return QuantizeConfig(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, method=self.method)

    def override(self) -> dict[str, Any]:
        """The per-layer fields of options['quantize']['overrides'] that select this form."""
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, "method": self.method}


DENSE = Form("dense", None)
FORMS: tuple[Form, ...] = (
    DENSE,
    Form("int8", 8, None, True, "rtn"),
    Form("int4-g128", 4, 128),
    Form("int4-g64", 4, 64),
    Form("int4-g32", 4, 32),
    Form("int3-g32", 3, 32),
    Form("int3-g128", 3, 128),
    Form("int2-g32", 2, 32),
    Form("int2-g128", 2, 128),
)
FORMS_BY_NAME = {f.name: f for f in FORMS}


def reconstructed(weight: torch.Tensor, form: Form) -> torch.Tensor:
    """The fp32 weight the compiled model computes with under `form` (nothing cached)."""
    from memsave.passes.aten.quantize import resolve_method, weight_codes

    if form.bits is None:
        return weight.detach().float()
    k = weight.shape[1]
    group = k if form.group_size is None or form.group_size >= k else form.group_size
    scheme = resolve_method(weight, form.scheme(), group)
    with torch.no_grad():
        # the parameter itself: calibration statistics are keyed by it
        codes = weight_codes(weight, scheme, group, cached=lambda key, build: build())
        return codes.dequantized(k)
