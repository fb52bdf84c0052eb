"""prune: weight pruning of linears, and its short names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from memsave.config.base import FamilyConfig, LayerSelection, OptionError


PRUNE_STRUCTURES = ("unstructured", "structured", "2:4", "4:8")
PRUNE_METHODS = ("magnitude", "wanda")
PRUNE_GRANULARITIES = ("channels+heads", "channels", "heads")


def _parse_prune_name(name: str) -> dict[str, Any] | None:
    """`2:4`, `wanda-2:4`, `magnitude-unstructured-50`, `structured-25`, `structured-heads-25`,
    ... → PruneConfig fields."""
    m = re.fullmatch(
        r"(?:(magnitude|wanda)-)?(unstructured|structured|2:4|4:8)(?:-(channels|heads))?(?:-(\d{1,2}))?", name
    )
    if m is None:
        return None
    method, structure, granularity, percent = m.groups()
    if granularity is not None and structure != "structured":
        return None
    fields_: dict[str, Any] = {"structure": structure}
    if method is not None:
        fields_["method"] = method
    if granularity is not None:
        fields_["granularity"] = granularity
    if percent is not None:
        fields_["sparsity"] = int(percent) / 100
    return fields_


@dataclass(frozen=True)
class PruneConfig(LayerSelection, FamilyConfig):
    """Weight pruning of linear layers, stored so that it saves memory.

    structure: "unstructured" (any weights; stored as bitmask + values where that is smaller
    than dense, otherwise left dense and reported), "2:4"/"4:8" (n of every m consecutive
    input weights kept; packed values + position indices; sparsity is implied), or
    "structured" (whole MLP neurons / output channels and whole attention heads removed, the
    next layer's inputs shrunk to match: a smaller dense model). granularity (structured only):
    "channels+heads", "channels" or "heads"; under grouped-query attention heads go in whole
    kv groups. method: "magnitude" (|W|) or "wanda" (|W| times the input channel's RMS on
    calibration data; needs memsave.calibrate). sparsity: the fraction of weights (structured:
    of each group's channels, heads or kv groups) removed, in [0, 1). include/exclude: glob
    patterns over weight names (layers in exclude stay dense); overrides: {pattern: {field:
    value}}. free_weights: release the dense originals once the graph reads only the pruned form.
    """

    family: ClassVar[str] = "prune"
    name_pattern: ClassVar[str] = "'[magnitude-/wanda-]<unstructured/structured[-channels/-heads]/2:4/4:8>[-<percent>]'"
    name_parser: ClassVar = staticmethod(_parse_prune_name)
    name_example: ClassVar[str] = 'wanda-2:4'
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {}
    override_keys: ClassVar[tuple[str, ...]] = ("structure", "method", "sparsity", "granularity")

    structure: str = "unstructured"
    method: str = "magnitude"
    sparsity: float = 0.5
    granularity: str = "channels+heads"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    free_weights: bool = True

    def __post_init__(self):
        self._check_choice("structure", self.structure, PRUNE_STRUCTURES)
        self._check_choice("method", self.method, PRUNE_METHODS)
        self._check_choice("granularity", self.granularity, PRUNE_GRANULARITIES)
        if self.granularity != "channels+heads" and self.structure != "structured":
            raise OptionError(
                f"options['prune']['granularity']: {self.granularity!r} applies to structure 'structured' "
                f"only, not {self.structure!r}"
            )
        self._check_choice("free_weights", self.free_weights, (True, False))
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise OptionError(
                f"options['prune']['sparsity']: {self.sparsity!r} is not a fraction in [0, 1) "
                "(the share of weights removed; 1 would remove all)"
            )
        object.__setattr__(self, "sparsity", float(self.sparsity))
        self._normalize_selection()

    @property
    def n_m(self) -> tuple[int, int] | None:
        if ":" not in self.structure:
            return None
        n, m = self.structure.split(":")
        return int(n), int(m)

    @property
    def effective_sparsity(self) -> float:
        nm = self.n_m
        return 1 - nm[0] / nm[1] if nm else self.sparsity

    def describe(self) -> str:
        what = self.structure if self.granularity == "channels+heads" else f"{self.structure} {self.granularity}"
        return f"{self.method} {what} {self.effective_sparsity:.0%}"
