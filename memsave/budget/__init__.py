"""Fit a model in a byte budget: one plan over the forms each layer can take (planner.py);
memsave.plan is planner.plan."""

from memsave.config.units import parse_bytes
from memsave.budget.knapsack import BudgetError
from memsave.budget.planner import LayerPlan, Plan, plan

__all__ = ["BudgetError", "LayerPlan", "Plan", "parse_bytes", "plan"]
