"""Choose one form per layer: least total predicted error with total bytes within the budget
(a multiple-choice knapsack).

Exact with HiGHS (scipy.optimize.milp) up to MILP_MAX_VARIABLES binaries and a time limit;
above that, or when the solver gives up, a greedy heuristic: start every layer at its smallest
form, then repeatedly take the upgrade (to a larger form of one layer) with the largest error
reduction per extra byte that still fits, until none fits. The greedy result is feasible and
usually close (it is the classic LP-relaxation order on each layer's convex hull), not
guaranteed optimal; the plan records which solver chose it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from memsave.config.base import BudgetError  # noqa: F401  (defined low: passes raise it too)

MILP_MAX_VARIABLES = 20000
MILP_TIME_LIMIT_S = 20.0


def choose(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]], capacity: int) -> tuple[list[int], str]:
    """Per layer the index of its chosen option, and the solver's name ("highs" or "greedy").
    `costs[l][o]` and `sizes[l][o]` describe option o of layer l."""
    smallest = sum(min(s) for s in sizes)
    if smallest > capacity:
        raise BudgetError(f"the smallest plan needs {smallest} bytes for these layers, {smallest - capacity} more "
                          f"than the {capacity} bytes left for them", smallest)
    n_vars = sum(len(s) for s in sizes)
    if n_vars <= MILP_MAX_VARIABLES:
        picked = _milp(costs, sizes, capacity)
        if picked is not None:
            return picked, "highs"
    return _greedy(costs, sizes, capacity), "greedy"


def _milp(costs, sizes, capacity) -> list[int] | None:
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:  # scipy is optional: the greedy choice still plans
        return None
    c = np.concatenate([np.asarray(x, dtype=float) for x in costs])
    w = np.concatenate([np.asarray(s, dtype=float) for s in sizes])
    n, layers = len(c), len(sizes)
    one_each = np.zeros((layers, n))
    start = 0
    for i, s in enumerate(sizes):
        one_each[i, start : start + len(s)] = 1
        start += len(s)
    # Bytes in MiB keep the constraint's coefficients near 1 (HiGHS's tolerances are absolute).
    scale = 2.0**20
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(w[None, :] / scale, 0, capacity / scale)]
    result = milp(c, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1),
                  options={"time_limit": MILP_TIME_LIMIT_S, "mip_rel_gap": 1e-6})
    if result.x is None:
        return None
    x = np.round(result.x).astype(int)
    picked, start = [], 0
    for s in sizes:
        picked.append(int(np.argmax(x[start : start + len(s)])))
        start += len(s)
    if sum(sizes[i][o] for i, o in enumerate(picked)) > capacity:  # tolerance slack: not a plan
        return None
    return picked


def _greedy(costs, sizes, capacity) -> list[int]:
    picked = [min(range(len(s)), key=lambda o, s=s, c=c: (s[o], c[o])) for s, c in zip(sizes, costs)]
    used = sum(sizes[i][o] for i, o in enumerate(picked))
    while True:
        best, best_gain = None, 0.0
        for i, (s, c) in enumerate(zip(sizes, costs)):
            o0 = picked[i]
            for o in range(len(s)):
                extra = s[o] - s[o0]
                if extra <= 0 or c[o] >= c[o0] or used + extra > capacity:
                    continue
                gain = (c[o0] - c[o]) / extra
                if gain > best_gain:
                    best, best_gain = (i, o), gain
        if best is None:
            return picked
        i, o = best
        used += sizes[i][o] - sizes[i][picked[i]]
        picked[i] = o
