"""factorize: low-rank factorization of linears, and its short names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from memsave.config.base import FamilyConfig, LayerSelection, OptionError


FACTORIZE_METHODS = ("svd", "svd-llm")


def _parse_factorize_name(name: str) -> dict[str, Any] | None:
    """`svd`, `svd-llm`, `svd-llm-20` (20% of the parameters removed) → FactorizeConfig fields."""
    m = re.fullmatch(r"(svd|svd-llm)(?:-(\d{1,2}))?", name)
    if m is None:
        return None
    fields_: dict[str, Any] = {"method": m.group(1)}
    if m.group(2) is not None:
        fields_["reduction"] = int(m.group(2)) / 100
    return fields_


@dataclass(frozen=True)
class FactorizeConfig(LayerSelection, FamilyConfig):
    """Low-rank factorization of linear weights, W (out×in) ≈ U·V: two smaller linears.

    method: "svd" (truncated SVD of W) or "svd-llm" (SVD of W whitened by the Cholesky factor
    of the inputs' second moment, as in SVD-LLM: minimizes the output error; needs
    memsave.calibrate). reduction: the fraction of the selected layers' parameters removed, in
    (0, 1). energy: instead of reduction, keep the smallest rank holding this share of the
    (whitened) spectrum's energy, per layer. rank: instead of both, this rank for every
    selected layer (per layer through overrides). allocation: "uniform" (every layer at the same
    reduction) or "sensitivity" (ranks allocated across layers to lose the least spectral
    energy for the same total). A layer is factorized only where r·(out+in) < out·in.
    include/exclude/overrides: as for quantize (an override may set reduction, energy, rank or
    method). free_weights: release the dense originals.
    """

    family: ClassVar[str] = "factorize"
    name_pattern: ClassVar[str] = "'svd[-<percent>]', 'svd-llm[-<percent>]'"
    name_parser: ClassVar = staticmethod(_parse_factorize_name)
    name_example: ClassVar[str] = 'svd-llm-20'
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {}
    # method too: a plan (memsave.plan) whitens where a layer has calibration statistics only
    override_keys: ClassVar[tuple[str, ...]] = ("reduction", "energy", "rank", "method")

    method: str = "svd-llm"
    reduction: float | None = 0.25
    energy: float | None = None
    rank: int | None = None
    allocation: str = "uniform"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    free_weights: bool = True
    damp: float = 0.01

    def __post_init__(self):
        self._check_choice("method", self.method, FACTORIZE_METHODS)
        self._check_choice("allocation", self.allocation, ("uniform", "sensitivity"))
        self._check_choice("free_weights", self.free_weights, (True, False))
        if self.rank is not None:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise OptionError(f"options['factorize']['rank']: {self.rank!r} is not a positive integer")
            object.__setattr__(self, "reduction", None)
            object.__setattr__(self, "energy", None)
            if self.allocation != "uniform":
                raise OptionError("options['factorize']: allocation='sensitivity' distributes a 'reduction'; it does not combine with 'rank'")
        elif self.energy is not None:
            if not isinstance(self.energy, (int, float)) or isinstance(self.energy, bool) or not 0 < self.energy <= 1:
                raise OptionError(f"options['factorize']['energy']: {self.energy!r} is not a fraction in (0, 1]")
            object.__setattr__(self, "reduction", None)
            if self.allocation != "uniform":
                raise OptionError("options['factorize']: allocation='sensitivity' distributes a 'reduction'; it does not combine with 'energy'")
        elif self.reduction is None:
            raise OptionError("options['factorize']: give 'reduction' (share of parameters removed) or 'energy'")
        elif isinstance(self.reduction, bool) or not isinstance(self.reduction, (int, float)) or not 0 < self.reduction < 1:
            raise OptionError(
                f"options['factorize']['reduction']: {self.reduction!r} is not a fraction in (0, 1) "
                "(the share of the layers' parameters removed)"
            )
        if not isinstance(self.damp, (int, float)) or not self.damp >= 0:
            raise OptionError(f"options['factorize']['damp']: {self.damp!r} must be a number >= 0")
        self._normalize_selection()

    def describe(self) -> str:
        if self.rank is not None:
            return f"{self.method} rank {self.rank}"
        target = f"energy {self.energy:g}" if self.energy is not None else f"-{self.reduction:.0%} params"
        return f"{self.method} {target}"
