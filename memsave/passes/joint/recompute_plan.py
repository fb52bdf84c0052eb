"""Choosing what the forward saves: memsave's recompute policies over a JointGraph.

    selective  rule: save matmul and attention outputs (and random ops'), recompute the rest
    sqrt       rule: save the values crossing ~sqrt(n) evenly spaced block boundaries
    budget     solver: least recompute cost with saved bytes <= budget
               (exact ILP with HiGHS on graphs up to ILP_MAX_VALUES values, greedy otherwise),
               then candidate plans ranked by simulated peak; see Note [What a fractional budget is a fraction of]
    `{"budget": 0.5}` means half the activation bytes that AOTAutograd's default min-cut
    partition saves for the same joint graph (what `torch.compile` saves with no budget), the
    same reference as PyTorch's `activation_memory_budget`, so the same number is the same
    request for both. memsave's own no-recompute plan saves more than min-cut (min-cut already
    recomputes cheap pointwise ops), so a fraction of that would ask for less. The reference is
    measured by running min-cut on a copy of the joint graph (recompute.py); without it (tests
    calling the solver directly) the no-recompute plan stands in.

Note [Ranking plans by peak]

Every plan goes through JointGraph.closure, so whatever a rule or solver picks, the backward
can compute everything it reads (see recompute_graph.py for the model and the costs).

Note [The budget ILP]
    Per forward value v: s_v = 1 if saved, r_v = 1 if recomputed in the backward; per storage
    root q (views share their base's storage): u_q = 1 if any saved value lives in it.
        s_v + r_v >= 1           for v the backward reads
        s_a + r_a >= r_v         for each input a of v (recomputing v needs a)
        u_q >= s_v               for v stored in q
        sum_q bytes_q u_q <= B
        r_v = 0 for random and impure ops; s_v = 0 for ops with several outputs (their
        elements are saved instead)
    minimize sum_v cost_v r_v  (+ a tie-break on bytes below the smallest positive cost).
    Without the budget row the constraint matrix is a network matrix (the LP relaxation is
    integral); the one knapsack row is what makes it a MILP. Views are never saved in the
    ILP (_free_view: their base is saved instead, at the same bytes), which removes symmetric
    solutions: measured here, HiGHS solves the tiny decoder (322 values) in 0.06-0.4 s and an
    8-layer one (1,168 values) in 0.1-0.9 s.

Note [Ranking plans by peak]
    Saved bytes are what the budget bounds, but what a user runs out of is peak memory: the
    forward's peak, or the saved tensors plus the backward's own peak (recomputation allocates
    there). Two plans with the same saved bytes can differ widely in peak. So the budget
    policy collects several plans that meet the budget (the ILP's, the greedy's, and the
    selective and sqrt rules' when they fit, and AOTAutograd's own min-cut partition when it
    fits, so memsave's choice is never worse than PyTorch's default by its own estimate), keeps
    those within RANK_SLACK of a forward's cost of the cheapest (min-cut whatever its cost),
    builds their forward and backward graphs and picks the lowest simulated peak, then the
    lowest cost.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from memsave.graph.meta import aliased_input, is_getitem, iter_tensors, node_val, tensor_storage_bytes
from memsave.memory.saved_activations import simulated_peak
from memsave.passes.joint.recompute_graph import JointGraph, Plan, Value, split

ILP_MAX_VALUES = 5_000  # forward values; larger graphs use the greedy heuristic
ILP_TIME_LIMIT_S = 10.0
RANK_SLACK = 0.02  # of one forward's cost; see Note [Ranking plans by peak]


# -- rules ----------------------------------------------------------------------------------


def _reads_random(jg: JointGraph, value: Value) -> bool:
    """A value made from a random op's output and no bigger than it: saving it beats
    recomputing it, which would need the (saved) random output."""
    return any(
        jg.values[a].category == "random" and jg.values[a].size >= value.size for a in value.inputs
    )


def plan_selective(jg: JointGraph) -> Plan:
    """Megatron's selective recompute: keep matmul and attention outputs, recompute
    pointwise ops, norms and views from them."""
    return jg.closure(
        (),
        lambda v: v.category not in ("matmul", "attention") and not _reads_random(jg, v),
        source="selective",
    )


def plan_sqrt(jg: JointGraph, segments: int | None = None) -> Plan:
    """Chen et al.'s segment checkpointing: split the n blocks (transformer layers, or the
    forward's matmuls when no repeated module is found) into k = round(sqrt(n)) segments (or
    `segments`), save the values crossing segment boundaries and recompute everything inside
    a segment."""
    starts = jg.block_starts()
    n = len(starts)
    k = max(1, round(math.sqrt(n))) if segments is None else max(1, min(segments, n))
    boundaries = [starts[round(i * n / k)] for i in range(1, k)]
    saved: set[fx.Node] = set()
    for position in boundaries:
        saved |= jg.live_across(position)
    name = "sqrt" if segments is None else "segments"
    return jg.closure(saved, lambda v: not _reads_random(jg, v), source=f"{name} ({k} segments of {n} blocks)")


# -- the budget solvers -------------------------------------------------------------------


def solve_ilp(jg: JointGraph, budget_bytes: int | None, *, minimize_bytes: bool = False, free_only: bool = False,
              time_limit: float = ILP_TIME_LIMIT_S) -> Plan | None:
    """The exact plan of Note [The budget ILP]; None when HiGHS finds no solution in time.
    minimize_bytes: minimize saved bytes instead (ties broken by cost), ignoring the budget;
    free_only: recompute only what costs nothing (views, backward-only work)."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array

    nodes = [n for n, v in jg.values.items() if v.kind != "const"]
    index = {n: i for i, n in enumerate(nodes)}
    roots = sorted({jg.values[n].root for n in nodes if jg.values[n].root is not None}, key=lambda r: jg.values[r].position)
    root_index = {r: i for i, r in enumerate(roots)}
    n, m = len(nodes), len(roots)
    S, R, U = 0, n, 2 * n  # variable offsets
    rows, cols, data, lower, upper = [], [], [], [], []

    def constraint(entries: list[tuple[int, float]], lo: float, hi: float) -> None:
        row = len(lower)
        for col, coef in entries:
            rows.append(row)
            cols.append(col)
            data.append(coef)
        lower.append(lo)
        upper.append(hi)

    for node in nodes:
        value, i = jg.values[node], index[node]
        if value.needed:
            constraint([(S + i, 1), (R + i, 1)], 1, np.inf)
        for arg in value.inputs:
            if arg in index:
                j = index[arg]
                constraint([(S + j, 1), (R + j, 1), (R + i, -1)], 0, np.inf)
        if value.root is not None:
            constraint([(U + root_index[value.root], 1), (S + i, -1)], 0, np.inf)
    nbytes = np.array([jg.values[r].nbytes for r in roots], dtype=float)
    if budget_bytes is not None and not minimize_bytes:
        constraint([(U + q, float(b)) for q, b in enumerate(nbytes)], -np.inf, float(budget_bytes))

    # Scaled so that the main term's smallest nonzero step is 1 and the whole tie-break term
    # is below 0.1: HiGHS then stops at the true optimum (its gaps are 1e-6 absolute).
    cost = np.array([jg.values[node].cost for node in nodes], dtype=float)
    c = np.zeros(2 * n + m)
    if minimize_bytes:
        positive = nbytes[nbytes > 0]
        c[U:] = nbytes / (positive.min() if positive.size else 1.0)
        c[R:U] = 0.1 * cost / max(cost.sum(), 1.0)
    else:
        positive = cost[cost > 0]
        c[R:U] = cost / (positive.min() if positive.size else 1.0)
        c[U:] = 0.1 * nbytes / max(nbytes.sum(), 1.0)
    lb, ub = np.zeros(2 * n + m), np.ones(2 * n + m)
    for node in nodes:
        value, i = jg.values[node], index[node]
        if value.kind == "tuple" or _free_view(jg, node):
            ub[S + i] = 0
        if not (value.recomputable and value.kind in ("tensor", "tuple")) or (free_only and value.cost > 0):
            ub[R + i] = 0
    matrix = coo_array((data, (rows, cols)), shape=(len(lower), 2 * n + m)).tocsr()
    result = milp(
        c,
        integrality=np.ones(2 * n + m),
        bounds=Bounds(lb, ub),
        constraints=[LinearConstraint(matrix, np.array(lower), np.array(upper))],
        options={"time_limit": time_limit, "disp": False},
    )
    if result.x is None:
        return None
    x = np.round(result.x)
    saved = {node for node in nodes if x[S + index[node]] > 0.5}
    recomputed = {node for node in nodes if x[R + index[node]] > 0.5}
    source = "ilp" if result.status == 0 else "ilp (time limit)"
    return jg.closure(saved, lambda v: v.node in recomputed, source=source)


def _free_view(jg: JointGraph, node: fx.Node) -> bool:
    """A view (or chain of views) of another value's storage: saving it costs the same bytes
    as saving that value and recomputing the views, which is free. The ILP saves the base
    only, which removes symmetric solutions that slow HiGHS down."""
    value = jg.values[node]
    if value.root is node:
        return False
    while node is not value.root:
        current = jg.values.get(node)
        if current is None or not current.recomputable or current.cost > 0:
            return False
        if is_getitem(node):
            node = node.args[0]
        base = aliased_input(node)
        if base is None:
            return node is value.root
        node = base
        if node.op in ("placeholder", "get_attr"):
            return value.root is None
    return True


@dataclass(order=True)
class _Move:
    score: float
    root: Any = field(compare=False)


def no_recompute_plan(jg: JointGraph) -> Plan:
    """The fewest saved bytes without recomputing any forward op: the reference a fractional
    budget is a fraction of. Only free moves are made: views, and backward-only work that
    AOTAutograd left unclaimed, computed in the backward from what it reads."""
    if "no_recompute" not in jg.__dict__:
        plan = solve_greedy(jg, 0, start=jg.save_all, max_cost=0.0)
        if len(jg.values) <= ILP_MAX_VALUES:
            exact = solve_ilp(jg, None, minimize_bytes=True, free_only=True)
            if exact is not None and exact.saved_bytes < plan.saved_bytes:
                plan = exact
        jg.__dict__["no_recompute"] = Plan(plan.saved, plan.recomputed, plan.saved_bytes, plan.cost, "no recompute")
    return jg.__dict__["no_recompute"]


def solve_greedy(jg: JointGraph, budget_bytes: int, *, start: Plan | None = None, max_cost: float | None = None) -> Plan:
    """Start from saving everything the backward reads (less what is free to recompute);
    repeatedly stop saving the storage whose recomputation frees the most bytes per unit of
    cost, until the saved bytes fit `budget_bytes` (0: as few as possible). Recomputing a
    value also recomputes the unsaved values it reads, back to saved ones; random ops it
    reaches are saved instead. max_cost: skip moves that cost more."""
    start = start if start is not None else no_recompute_plan(jg)
    saved, recomputed = set(start.saved), set(start.recomputed)
    charged: dict[fx.Node, set[fx.Node]] = {}
    for node in saved:
        root = jg.values[node].root
        if root is not None:
            charged.setdefault(root, set()).add(node)

    def evaluate(root: fx.Node):
        group = charged.get(root)
        if not group or any(not jg.values[n].recomputable or jg.values[n].kind != "tensor" for n in group):
            return None
        new_recomputed: set[fx.Node] = set()
        new_saved: set[fx.Node] = set()
        stack = list(group)
        while stack:
            node = stack.pop()
            if node in new_recomputed or node in new_saved or node in recomputed:
                continue
            if node in saved and node not in group:
                continue
            value = jg.values[node]
            if value.kind == "const":
                continue
            if value.recomputable and value.kind in ("tensor", "tuple"):
                new_recomputed.add(node)
                stack.extend(value.inputs)
            else:
                new_saved.add(node)
        new_roots = {jg.values[n].root for n in new_saved} - {None}
        freed = 0 if root in new_roots else jg.values[root].nbytes
        added = sum(jg.values[r].nbytes for r in new_roots if r not in charged and r is not root)
        cost = sum(jg.values[n].cost for n in new_recomputed)
        return freed - added, cost, group, new_recomputed, new_saved

    def score(gain: int, cost: float) -> float:
        return gain / (cost + 1e-9 * (jg.forward_cost + 1))

    heap: list[_Move] = []
    for root in charged:
        move = evaluate(root)
        if move is not None and move[0] > 0 and (max_cost is None or move[1] <= max_cost):
            heapq.heappush(heap, _Move(-score(move[0], move[1]), root))
    current = jg.bytes_of(saved)
    while heap and current > budget_bytes:
        top = heapq.heappop(heap)
        move = evaluate(top.root)
        if move is None or move[0] <= 0 or (max_cost is not None and move[1] > max_cost):
            continue
        fresh = -score(move[0], move[1])
        if heap and fresh > heap[0].score + 1e-12:  # stale: worse than the next; look again
            heapq.heappush(heap, _Move(fresh, top.root))
            continue
        _, _, group, new_recomputed, new_saved = move
        saved -= group
        del charged[top.root]
        saved |= new_saved
        recomputed |= new_recomputed
        for node in new_saved:
            root = jg.values[node].root
            if root is not None:
                charged.setdefault(root, set()).add(node)
        current = jg.bytes_of(saved)
    return jg.closure(saved, lambda v: v.node in recomputed, source="greedy")


# -- the budget policy --------------------------------------------------------------------


@dataclass
class Choice:
    plan: Plan
    fw: fx.GraphModule
    bw: fx.GraphModule
    peak: dict[str, int]
    budget_bytes: int | None
    budget_met: bool
    candidates: list[dict[str, Any]]
    seconds: float
    margin: int = 0  # a training budget's (step_peak_margin)


def budget_bytes_for(jg: JointGraph, budget: float | int | str, reference_bytes: int | None = None) -> int | None:
    """A fraction of the reference saved bytes (see Note [What a fractional budget is a
    fraction of]), a byte count, or None for "min"."""
    if budget == "min":
        return None
    if isinstance(budget, float):
        reference = reference_bytes if reference_bytes is not None else no_recompute_plan(jg).saved_bytes
        return int(budget * reference)
    return int(budget)


def minimum_plan(jg: JointGraph, *, use_ilp: bool) -> Plan:
    """The fewest saved bytes possible (then the cheapest plan with that many)."""
    plans = [solve_greedy(jg, 0)]
    if use_ilp:
        plans.append(solve_ilp(jg, None, minimize_bytes=True))
    return min((p for p in plans if p is not None), key=lambda p: (p.saved_bytes, p.cost))


Prebuilt = tuple[Plan, fx.GraphModule, fx.GraphModule]  # a plan another partitioner already split


def _rank(jg: JointGraph, plans: list[Plan], prebuilt: list[Prebuilt] = (),
          consumed_grads: Mapping[int, int] | None = None) -> list[tuple[Plan, fx.GraphModule, fx.GraphModule, dict[str, int]]]:
    """Forward and backward graphs and the simulated peak of each distinct plan (gradients at
    `consumed_grads` stepped in the backward: see simulated_peak)."""
    ranked, seen = [], set()
    for plan, fw, bw in prebuilt:
        seen.add(plan.saved)
        ranked.append((plan, fw, bw, simulated_peak(fw, bw, jg.num_fwd_outputs, consumed_grads)))
    for plan in sorted(plans, key=lambda p: p.cost):
        if plan.saved in seen:
            continue
        seen.add(plan.saved)
        jg.check(plan)
        fw, bw = split(jg, plan)
        ranked.append((plan, fw, bw, simulated_peak(fw, bw, jg.num_fwd_outputs, consumed_grads)))
    return ranked


MIN_PEAK_FRACTIONS = (1.0, 0.5, 0.25, 0.1)  # budgets "min" also tries; see Note [Budget "min"]
MIN_PEAK_MAX_SEGMENTS = 16  # segment counts tried by "min": 1..n up to this many, else a spread


def _segment_counts(n: int) -> list[int]:
    if n <= MIN_PEAK_MAX_SEGMENTS:
        return list(range(1, n + 1))
    return sorted({max(1, round(n ** (i / 8))) for i in range(9)} | {round(math.sqrt(n))})


def choose_budget_plan(jg: JointGraph, budget: float | int | str, reference_bytes: int | None = None,
                       prebuilt: list[Prebuilt] = ()) -> Choice:
    """The budget policy: solve, collect candidate plans, rank them by simulated peak.

    Note [Budget "min"]
        What a user runs out of is peak memory, not saved bytes: saving nothing at all makes
        the backward recompute the whole forward before its first step and keep it, so its
        peak is eager's. "min" therefore looks for the lowest simulated peak: segment
        checkpointing at every segment count (Chen et al.'s sqrt(n) is one of them), the
        budget solver at a spread of fractions, selective, and the fewest-bytes plan; the
        lowest peak wins, then the least recompute cost.
    """
    start = time.perf_counter()
    use_ilp = len(jg.values) <= ILP_MAX_VALUES
    if budget == "min":
        return _choose_min_peak(jg, reference_bytes, use_ilp, start, prebuilt)
    limit = budget_bytes_for(jg, budget, reference_bytes)
    plans: list[Plan] = []
    if use_ilp:
        plans.append(solve_ilp(jg, limit))
    plans.append(solve_greedy(jg, limit))
    plans += [plan_selective(jg), plan_sqrt(jg)]
    feasible = [p for p in plans if p is not None and p.saved_bytes <= limit]
    ready = [item for item in prebuilt if item[0].saved_bytes <= limit]
    met = bool(feasible or ready)
    if not met:  # the budget cannot be met: the fewest saved bytes possible
        feasible = [minimum_plan(jg, use_ilp=use_ilp)]
    cheapest = min(p.cost for p in [*feasible, *(item[0] for item in ready)])
    admissible = lambda p: p.cost <= cheapest + RANK_SLACK * jg.forward_cost  # noqa: E731
    # Prebuilt plans (min-cut) are ranked whatever their cost in memsave's model: they are
    # what the user would get without memsave's budget, so its choice must not peak above them.
    ranked = _rank(jg, [p for p in feasible if admissible(p)], ready)
    considered = [*(item[0] for item in prebuilt), *plans, *([] if met else feasible)]
    return _lowest_peak(ranked, considered, limit, met, start)


def _lowest_peak(ranked, plans: list[Plan | None], limit: int | None, met: bool, start: float) -> Choice:
    """The ranked plan with the lowest simulated peak (then the least cost), and the record of
    every candidate considered."""
    plan, fw, bw, peak = min(ranked, key=lambda item: (item[3]["peak"], item[0].cost))
    peaks = {p.saved: pk["peak"] for p, _, _, pk in ranked}
    candidates = [
        {"source": p.source, "saved_bytes": p.saved_bytes, "cost": p.cost, "simulated_peak": peaks.get(p.saved),
         "chosen": p is plan}
        for p in plans if p is not None
    ]
    return Choice(plan, fw, bw, peak, limit, met, candidates, time.perf_counter() - start)


def _choose_min_peak(jg: JointGraph, reference_bytes: int | None, use_ilp: bool, start: float,
                     prebuilt: list[Prebuilt] = ()) -> Choice:
    """Budget "min": the plan with the lowest simulated peak (Note [Budget "min"])."""
    n = len(jg.block_starts())
    plans: list[Plan] = [plan_sqrt(jg, k) for k in _segment_counts(n)]
    for fraction in MIN_PEAK_FRACTIONS:
        limit = budget_bytes_for(jg, fraction, reference_bytes)
        plans.append(solve_ilp(jg, limit) if use_ilp else solve_greedy(jg, limit))
    plans += [plan_selective(jg), minimum_plan(jg, use_ilp=use_ilp)]
    ranked = _rank(jg, [p for p in plans if p is not None], list(prebuilt))
    return _lowest_peak(ranked, [*(item[0] for item in prebuilt), *plans], None, True, start)


# Saved-bytes limits, as fractions of the no-recompute plan's, that choose_peak_plan solves for
# beside segment checkpointing, selective and the fewest-bytes plan.
STEP_PEAK_FRACTIONS = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05)


def choose_peak_plan(jg: JointGraph, step_peak: int, prebuilt: list[Prebuilt] = (),
                     consumed_grads: Mapping[int, int] | None = None, codegen: str = "inductor",
                     if_stepped: Mapping[int, int] | None = None) -> Choice:
    """A training budget (options['budget']): the plan with the least recompute cost whose step
    peak, the weights + the simulated peak of forward then backward (saved activations,
    gradients, the backward's working set), fits `step_peak`; then the lowest peak. Candidates:
    no recompute, the prebuilt (min-cut), the budget solver at a spread of saved-bytes limits,
    segment checkpointing at every segment count, selective, the fewest saved bytes. None fits:
    a BudgetError naming the lowest step peak found and its plan. `consumed_grads`: the
    backward's outputs (gradients) memsave.optimizer_in_backward steps and frees inside it, with
    each step's temporary bytes; `codegen` sizes the margin. `if_stepped`: where no gradient is
    stepped in the backward, the gradients that could be (the trainable parameters'): a budget
    nothing fits is then ranked again as if they were, and the error says what that would reach."""
    from memsave.config.base import BudgetError
    from memsave.report import fmt_bytes

    start = time.perf_counter()
    use_ilp = len(jg.values) <= ILP_MAX_VALUES
    none = no_recompute_plan(jg)
    plans: list[Plan | None] = [none]
    for fraction in STEP_PEAK_FRACTIONS:
        limit = int(fraction * none.saved_bytes)
        plans.append(solve_ilp(jg, limit) if use_ilp else solve_greedy(jg, limit))
    plans += [plan_sqrt(jg, k) for k in _segment_counts(len(jg.block_starts()))]
    plans += [plan_selective(jg), minimum_plan(jg, use_ilp=use_ilp)]
    solved = [p for p in plans if p is not None]
    ranked = _rank(jg, solved, list(prebuilt), consumed_grads)
    weights = ranked[0][3]["weight_bytes"]
    margin = step_peak_margin(jg.joint, gradients=jg.gradients, codegen=codegen)
    fits = [item for item in ranked if weights + item[3]["peak"] + margin <= step_peak]
    considered = [*(item[0] for item in prebuilt), *plans]
    if not fits:
        plan, _, _, peak = min(ranked, key=lambda item: (item[3]["peak"], item[0].cost))
        smallest = weights + peak["peak"] + margin
        hint = "chunk the loss, save in lower precision, or step the optimizer in the backward to go lower"
        if if_stepped and not consumed_grads:
            # What the user can do that the compile cannot (the optimizer is theirs): measured by
            # the same simulation, each gradient freed after its step inside the backward.
            stepped = _rank(jg, solved, list(prebuilt), if_stepped)
            lowest = weights + min(item[3]["peak"] for item in stepped) + margin
            hint = (f"with memsave.optimizer_in_backward holding the {len(if_stepped)} trainable parameters (each "
                    f"gradient stepped and freed inside the backward), the lowest peak would be {fmt_bytes(lowest)}, the "
                    f"optimizer step's own temporaries aside"
                    + (": within this budget" if lowest <= step_peak else f"; {hint}"))
        raise BudgetError(
            f"options['budget'] {fmt_bytes(step_peak)} cannot be met by this training step: the lowest peak memsave "
            f"found is {fmt_bytes(smallest)} (weights {fmt_bytes(weights)} + {fmt_bytes(peak['peak'])} simulated for "
            f"saved activations, gradients and the backward's working set + a margin of {fmt_bytes(margin)}, plan "
            f"{plan.source!r}, of {len(ranked)} plans); {hint}",
            smallest)
    plan, fw, bw, peak = min(fits, key=lambda item: (item[0].cost, item[3]["peak"]))
    peaks = {p.saved: pk["peak"] for p, _, _, pk in ranked}
    candidates = [{"source": p.source, "saved_bytes": p.saved_bytes, "cost": p.cost, "simulated_peak": peaks.get(p.saved),
                   "chosen": p is plan} for p in considered if p is not None]
    return Choice(plan, fw, bw, peak, step_peak - weights - margin, True, candidates, time.perf_counter() - start,
                  margin)


# How many of the largest intermediate tensors a training budget keeps back (step_peak_margin).
MARGIN_TENSORS = {"fx": 1, "inductor": 3}


def step_peak_margin(*graphs: fx.GraphModule, gradients: Collection[fx.Node] = (), codegen: str = "inductor") -> int:
    """What a training budget keeps back from the simulated peak: MARGIN_TENSORS[codegen] times
    the graphs' largest intermediate tensor, gradient-sized ones aside: the `gradients` (the
    backward's outputs) and tensors of their shapes (partial sums, e.g. a tied embedding's two
    halves, made by matmuls and adds in their order, alive to the end or to their step), which
    the simulation follows exactly; counted tensor by tensor.

    The simulation runs the graphs' ops in their order, each value freed after its last use,
    each op's internal temporaries counted (memory.estimate.WORKSPACE), and an optimizer's
    step's where it steps in the backward (optim/step_workspace.py). Run as FX code, that is
    what happens: the tests' small decoder peaks within 0.25 MiB of it (asserted in
    tests/test_budget_training.py). Inductor fuses and orders the backward its own way (e.g.
    allocating the outputs of a fused group of recomputed ops at once): on the same decoder, with
    the loss chunked and attention as SDPA, its step peaked up to 0.82 MiB above the simulation
    where the largest intermediate was 0.375 MiB (2.2 of them, seen by hand at four budgets;
    the test holds the measured peak within the budget at its tightest, 50 %); on the 112M
    decoder of bench_budget_training.py, within 4 MiB of it."""
    skip = set(gradients)
    shapes = {tuple(v.shape) for g in skip if isinstance(v := node_val(g), torch.Tensor)}
    # Tensor by tensor: an op with several outputs (memsave::linear_cross_entropy_backward's
    # input and weight gradients) has one of each size.
    largest = max((tensor_storage_bytes(t) for gm in graphs for n in gm.graph.nodes
                   if n.op == "call_function" and n not in skip and aliased_input(n) is None  # views allocate nothing
                   for t in iter_tensors(node_val(n)) if tuple(t.shape) not in shapes), default=0)
    return MARGIN_TENSORS.get(codegen, max(MARGIN_TENSORS.values())) * largest
