"""recompute: which activations a training graph saves and which it recomputes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from memsave.config.base import FamilyConfig, OptionError


RECOMPUTE_POLICIES = ("none", "min-cut", "budget", "sqrt", "selective")


def _parse_recompute_name(name: str) -> dict[str, Any] | None:
    """`budget` (half the saved bytes), `budget-25` (25%), `budget-min` → RecomputeConfig fields."""
    m = re.fullmatch(r"budget(?:-(\d{1,3}|min))?", name)
    if m is None:
        return None
    budget = m.group(1)
    if budget is None:
        return {"policy": "budget"}
    return {"policy": "budget", "budget": "min" if budget == "min" else int(budget) / 100}


@dataclass(frozen=True)
class RecomputeConfig(FamilyConfig):
    """Which activations a training graph saves for backward and which it recomputes.

    policy:
      "none"      save every activation the backward needs (no recomputation);
      "min-cut"   AOTAutograd-style max-flow/min-cut: recompute cheap ops when that saves bytes;
      "budget"    memsave's solver: save at most `budget` bytes, recomputing what costs least
                  (exact ILP on small graphs, a greedy heuristic on large ones; plans ranked by
                  the simulated peak of forward + backward);
      "sqrt"      segment checkpointing: save only the values crossing ~sqrt(n) evenly spaced
                  block boundaries, recompute inside segments;
      "selective" save matmul and attention outputs, recompute pointwise ops and norms.
    budget (policy "budget" only; default 0.5): a fraction in (0, 1] of the bytes saved with no
    recomputation, an int number of bytes, or "min" (the fewest saved bytes possible). Giving a
    budget implies policy "budget". Outputs of random ops (dropout) are always saved.
    """

    family: ClassVar[str] = "recompute"
    POLICIES: ClassVar[tuple[str, ...]] = RECOMPUTE_POLICIES
    name_pattern: ClassVar[str] = "'budget[-<percent>]', 'budget-min'"
    name_parser: ClassVar = staticmethod(_parse_recompute_name)
    name_example: ClassVar[str] = 'budget-50'
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {
        "min-cut": {"policy": "min-cut"},
        "sqrt": {"policy": "sqrt"},
        "selective": {"policy": "selective"},
    }

    policy: str | None = None  # None: "budget" when a budget is given, else "min-cut"
    budget: float | int | str | None = None
    # Bytes the training step's peak must fit: the weights + the simulated peak of forward then
    # backward (saved activations, gradients, the backward's working set). Set by
    # options['budget'] on a training graph. With policy "budget" and no saved-bytes budget, the
    # plan with the least recompute cost that fits is chosen; with any other plan, it is checked.
    # Either way a step that cannot fit is a BudgetError naming the lowest peak found.
    step_peak: int | None = None

    def __post_init__(self):
        if self.step_peak is not None and (isinstance(self.step_peak, bool) or not isinstance(self.step_peak, int)
                                           or self.step_peak < 1024):
            raise OptionError(f"options['recompute']['step_peak']: {self.step_peak!r} is not a number of bytes (an int "
                              ">= 1024) or None")
        if self.policy is None:
            chosen = self.budget is not None or self.step_peak is not None
            object.__setattr__(self, "policy", "budget" if chosen else "min-cut")
        self._check_choice("policy", self.policy, self.POLICIES)
        if self.fits_step_peak:
            return  # the step's peak chooses the plan (recompute_plan.choose_peak_plan)
        if self.policy != "budget":
            if self.budget is not None:
                raise OptionError(
                    f"options['recompute']['budget']: a budget applies to policy 'budget' only, "
                    f"not {self.policy!r} (leave 'policy' out to get 'budget')"
                )
            return
        budget = 0.5 if self.budget is None else self.budget
        if isinstance(budget, str) and budget.strip().lower() == "min":
            budget = "min"
        elif isinstance(budget, float) and 0 < budget <= 1:
            pass
        elif isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1024:
            pass
        else:
            raise OptionError(
                f"options['recompute']['budget']: invalid value {budget!r}; valid choices: a fraction in "
                "(0, 1] of the bytes saved without recomputation (a float, e.g. 0.5), a number of bytes "
                "(an int, at least 1024), or 'min'"
            )
        object.__setattr__(self, "budget", budget)

    @property
    def fits_step_peak(self) -> bool:
        """The plan is chosen to fit step_peak (not checked against it)."""
        return self.policy == "budget" and self.budget is None and self.step_peak is not None

    def describe(self) -> str:
        if self.fits_step_peak:
            return f"step peak <= {self.step_peak} bytes"
        if self.policy != "budget":
            return self.policy
        if isinstance(self.budget, float):
            return f"budget {self.budget:.0%}"
        return f"budget {self.budget}" + (" bytes" if isinstance(self.budget, int) else "")
