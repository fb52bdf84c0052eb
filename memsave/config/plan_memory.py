"""plan_memory: buffer planning of the final graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from memsave.config.base import FamilyConfig


@dataclass(frozen=True)
class PlanMemoryConfig(FamilyConfig):
    """Memory planning of the final graph: liveness, in-place reuse, planned/measured/lower-bound peak.

    inplace: let an elementwise op write into an input that dies at it (same shape, strides and
    dtype), through the op's out= form; only with codegen "fx" (Inductor plans its own buffers,
    and the pass then only reports). layout: drop copies that change nothing (clone/contiguous
    of a tensor already in that layout, same-dtype casts) and fold chains of permutes.
    measure: run the planned graph once at compile time on the example input (when it is
    known) under memsave.MemoryTracker, to report the measured peak (always in debug mode).
    """

    family: ClassVar[str] = "plan_memory"
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {
        "on": {},
        "report": {"inplace": False, "layout": False},
    }

    inplace: bool = True
    layout: bool = True
    measure: bool = False

    def __post_init__(self):
        for name in ("inplace", "layout", "measure"):
            self._check_choice(name, getattr(self, name), (True, False))

    def describe(self) -> str:
        parts = [p for p, on in (("in-place", self.inplace), ("layout", self.layout)) if on]
        return "plan " + (", ".join(parts) if parts else "report only")
