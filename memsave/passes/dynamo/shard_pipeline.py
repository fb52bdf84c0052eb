"""Pipeline split: cut a Dynamo graph into S stage graphs at module boundaries.

Runs on the Dynamo-level FX graph (torch IR, parameters as placeholders), before AOTAutograd:
each rank then compiles only its own stage with memsave's normal pipeline, so compression
passes (quantize, prune, ...) run after the split, on that rank's weights only.

Where the cuts go. Nodes are in program order; a stage begins at the first node whose
`nn_module_stack` contains the module named as its start (`split_points`, e.g. "layers.2"),
and holds every node up to the next stage's start. Without split points the candidates are
the repeated blocks (modules whose path ends in an index, e.g. "layers.3", at the shallowest
depth), and the cuts are chosen to minimize the largest stage's estimated memory (see Note
[Stage memory under a schedule]).

What crosses a cut. A stage's inputs are the values it uses that earlier stages (or the user)
made; its outputs are every value a later stage uses, passed through if it only arrived as an
input — so each stage talks only to its neighbours, as `PipelineStage` requires. Values that
do not depend on the batch or on a parameter (RoPE tables sliced from a buffer, a causal mask
built from sizes) are recomputed in every stage that uses them instead of being sent, and
SymInt inputs (a dynamic batch size) are given to every stage directly (runtime.py sets their
per-micro-batch value): ints cannot travel through `PipelineStage`.

    before: one graph   embed → layers.0 → layers.1 → layers.2 → layers.3 → norm → lm_head
    after (S=2):        stage 0: embed, layers.0-1 → x      stage 1: x → layers.2-3, norm, lm_head
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from memsave.config import OptionError, PipelineConfig
from memsave.graph.meta import node_tensor_bytes, node_val
from memsave.memory.estimate import WEIGHT_TAG, estimate_memory
from memsave.report import fmt_bytes


@dataclass(frozen=True)
class GraphInput:
    """One placeholder of the Dynamo graph."""

    name: str  # placeholder name
    # "parameter" | "buffer" | "tensor" (a user input, split into micro-batches) | "scalar"
    # (SymInt/int) | "constant" (another tensor, e.g. a module attribute Dynamo lifted)
    kind: str
    weight: str | None = None  # the model's name for a parameter / buffer
    size_of: tuple[str, int] | None = None  # a scalar that is dim d of user input placeholder


@dataclass
class StageGraph:
    """One stage: its graph and what its placeholders are."""

    index: int
    gm: fx.GraphModule  # placeholders: weights, then scalars, then activations
    weights: list[str]  # placeholder names of the Dynamo graph, in the stage's order
    scalars: list[str]
    inputs: list[str]  # activation inputs (stage 0: the user's tensors)
    outputs: list[str]  # values sent on (last stage: the graph's outputs)
    first_module: str = ""
    last_module: str = ""


@dataclass
class PipelinePlan:
    stages: list[StageGraph]
    training: bool
    microbatches: int
    schedule: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # per stage: modules, bytes

    def describe(self) -> str:
        lines = [f"pipeline: {len(self.stages)} stages, {self.schedule}, {self.microbatches} micro-batches "
                 f"({'training' if self.training else 'inference'})"]
        for row in self.rows:
            lines.append(
                f"  stage {row['stage']}: {row['modules']:32s} weights {fmt_bytes(row['weight_bytes']):>10s}  "
                f"activations/mb {fmt_bytes(row['activation_bytes']):>10s} x{row['in_flight']} in flight  "
                f"sends {fmt_bytes(row['send_bytes']):>10s}  est. {fmt_bytes(row['estimate_bytes'])}"
            )
        return "\n".join(lines)


def module_path(stack_path: str) -> str:
    """`L['self'].layers.0.mlp` / `L['self'].model.layers[0]` → `layers.0.mlp` / `model.layers.0`."""
    path = re.sub(r"^[A-Za-z_]+\['[^']*'\]\.?", "", stack_path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def node_modules(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [module_path(v[0]) for v in stack.values()]


def split_graph(gm: fx.GraphModule, inputs: list[GraphInput], config: PipelineConfig, stages: int,
                *, training: bool) -> PipelinePlan:
    """Plan and build the stage graphs. Raises OptionError for cuts that cannot be made."""
    microbatches = config.check_microbatches(stages)
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    kinds = {i.name: i for i in inputs}
    local = _batch_independent(gm, kinds)
    candidates = _candidate_starts(nodes)
    if config.split_points is not None:
        starts = _named_starts(nodes, config.split_points, candidates)
    else:
        if stages - 1 > len(candidates):
            raise OptionError(
                f"options['pipeline']: {stages} stages need {stages - 1} cuts, but the graph has only "
                f"{len(candidates)} block boundaries to cut at ({', '.join(m for _, m in candidates) or 'none'})"
            )
        starts = _balanced_starts(gm, nodes, candidates, stages, local, kinds, training, microbatches, config.schedule)
    stage_of = _assign(nodes, starts)
    graphs = [_build_stage(gm, s, len(starts) + 1, stage_of, local, kinds) for s in range(len(starts) + 1)]
    for s, stage in enumerate(graphs):
        stage.first_module = "start" if s == 0 else starts[s - 1][1]
        stage.last_module = starts[s][1] if s < len(starts) else "end"
    plan = PipelinePlan(graphs, training, microbatches, config.schedule)
    plan.rows = [_stage_row(stage, len(graphs), microbatches, config.schedule, training) for stage in graphs]
    return plan


def fold_lifted_scalars(gm: fx.GraphModule, inputs: list[GraphInput], example_inputs) -> int:
    """Replace `.item()` of a lifted module float (a "constant" input, e.g. Embedding.norm_type
    under dynamic=True) by its number: stage graphs are compiled from real tensors, where
    `.item()` of an input is data-dependent. Returns how many were folded."""
    folded = 0
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, info, value in zip(placeholders, inputs, example_inputs):
        if info.kind != "constant" or not isinstance(value, torch.Tensor) or value.numel() != 1:
            continue
        for user in list(node.users):
            if user.op == "call_method" and user.target == "item":
                user.replace_all_uses_with(value.item())
                gm.graph.erase_node(user)
                folded += 1
    if folded:
        gm.recompile()
    return folded


# -- where stages may start ------------------------------------------------------------------


def _candidate_starts(nodes: list[fx.Node]) -> list[tuple[int, str]]:
    """(position of first node, module) for every repeated block, at the shallowest depth."""
    first: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for path in node_modules(node):
            first.setdefault(path, i)
    blocks = [p for p in first if re.search(r"\.\d+$", p)]
    if not blocks:
        return []
    depth = min(p.count(".") for p in blocks)
    starts = sorted((first[p], p) for p in blocks if p.count(".") == depth)
    return starts[1:]  # a stage starting at the very first block would leave stage 0 almost empty


def _named_starts(nodes: list[fx.Node], names: tuple[str, ...], candidates) -> list[tuple[int, str]]:
    first: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for path in node_modules(node):
            first.setdefault(path, i)
    starts = []
    for name in names:
        if name not in first:
            raise OptionError(
                f"options['pipeline']['split_points']: no module {name!r} in the graph; block boundaries: "
                f"{', '.join(m for _, m in candidates) or 'none'}"
            )
        starts.append((first[name], name))
    if [s for s, _ in starts] != sorted(s for s, _ in starts) or starts[0][0] == 0:
        raise OptionError(
            f"options['pipeline']['split_points']: {list(names)} must name modules in the order they run, "
            "after the first op of the graph"
        )
    return starts


def _assign(nodes: list[fx.Node], starts: list[tuple[int, str]]) -> dict[fx.Node, int]:
    stage_of, s = {}, 0
    for i, node in enumerate(nodes):
        while s < len(starts) and i >= starts[s][0]:
            s += 1
        stage_of[node] = s
    return stage_of


def _batch_independent(gm: fx.GraphModule, kinds: dict[str, GraphInput]) -> set[fx.Node]:
    """Nodes computed from buffers, scalars and constants only: cheap to recompute per stage."""
    local: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if kinds[node.name].kind in ("buffer", "scalar", "constant"):
                local.add(node)
        elif node.op == "call_function" or node.op == "call_method":
            deps = node.all_input_nodes
            if all(d in local for d in deps) and not _is_random(node):
                local.add(node)
    return local


def _is_random(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", str(node.target))
    return any(k in name for k in ("rand", "dropout", "bernoulli", "normal"))


# -- building one stage's graph --------------------------------------------------------------


def _stage_needs(node: fx.Node, s: int, stage_of: dict[fx.Node, int], last: int) -> bool:
    return any((stage_of.get(u, last) if u.op != "output" else last) == s for u in node.users)


def _build_stage(gm: fx.GraphModule, s: int, n_stages: int, stage_of, local, kinds) -> StageGraph:
    last = n_stages - 1
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    own = [n for n in gm.graph.nodes if stage_of.get(n) == s and n not in local]
    # Batch-independent values this stage uses, with everything they are made from.
    needed_local: set[fx.Node] = set()
    todo = [d for n in own for d in n.all_input_nodes if d in local]
    if s == last:
        todo += [d for d in _output_nodes(gm) if d in local]
    while todo:
        d = todo.pop()
        if d not in needed_local:
            needed_local.add(d)
            todo.extend(x for x in d.all_input_nodes if x in local)
    body = sorted(set(own) | {n for n in needed_local if n.op != "placeholder"}, key=order.__getitem__)
    used = {d for n in body for d in n.all_input_nodes}
    if s == last:
        used |= set(_output_nodes(gm))
    weights = [p.name for p in placeholders if p in used and kinds[p.name].kind in ("parameter", "buffer", "constant")]
    scalars = [p.name for p in placeholders if p in used and kinds[p.name].kind == "scalar"]
    if s == 0:
        inputs = [p.name for p in placeholders if kinds[p.name].kind == "tensor"]
    else:
        inputs = _crossing(gm, s - 1, stage_of, local, kinds, last)
    outputs = [n.name for n in _output_nodes(gm)] if s == last else _crossing(gm, s, stage_of, local, kinds, last)

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    for name in weights + scalars + inputs:
        old = by_name[name]
        new = graph.placeholder(name)
        new.meta = dict(old.meta)
        env[old] = new
    for node in body:
        missing = [d for d in node.all_input_nodes if d not in env]
        if missing:
            raise OptionError(
                f"options['pipeline']: cannot cut here: stage {s} op {node.name!r} reads "
                f"{', '.join(m.name for m in missing)}, which cannot be sent between stages "
                "(not a tensor); choose other split_points"
            )
        env[node] = graph.node_copy(node, lambda n: env[n])
    result = [env[by_name[name]] for name in outputs]
    graph.output(tuple(result))
    stage_gm = fx.GraphModule(gm, graph, f"PipelineStage{s}")
    return StageGraph(s, stage_gm, weights, scalars, inputs, outputs)


def _output_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    flat = list(out) if isinstance(out, (list, tuple)) else [out]
    if not all(isinstance(o, fx.Node) for o in flat):
        raise OptionError("options['pipeline']: the model must return a tensor or a flat tuple of tensors")
    return flat


def _crossing(gm, s: int, stage_of, local, kinds, last: int) -> list[str]:
    """Values made at or before stage s (user tensors count as stage 0) that a later stage uses."""
    names = []
    for node in gm.graph.nodes:
        if node in local or node.op == "output":
            continue
        if node.op == "placeholder":
            if kinds[node.name].kind != "tensor":
                continue
            made = 0
        else:
            made = stage_of[node]
        if made > s:
            continue
        later = any((last if u.op == "output" else stage_of.get(u, 0)) > s for u in node.users)
        if later:
            if not isinstance(node_val(node), torch.Tensor):
                raise OptionError(
                    f"options['pipeline']: cannot cut after stage {s}: {node.name!r} ("
                    f"{type(node_val(node)).__name__}, not a tensor) is used on both sides; choose other split_points"
                )
            names.append(node.name)
    return names


# -- Note [Stage memory under a schedule] ------------------------------------------------------
# A stage holds its weights, plus, per micro-batch still waiting for its backward, the
# activations it saved, plus the buffers of what it receives and sends. Under GPipe every stage
# holds all m micro-batches before the first backward; under 1F1B stage s (of S) holds at most
# min(S - s, m): the first stage the most, the last one. For inference nothing waits for a
# backward: one micro-batch's peak. Saved activations are estimated as the bytes of every op
# output in the stage (an upper bound: the partitioner saves fewer) at micro-batch size.


def _in_flight(s: int, n_stages: int, microbatches: int, schedule: str, training: bool) -> int:
    if not training:
        return 1
    return microbatches if schedule == "gpipe" else min(n_stages - s, microbatches)


def _segment_costs(gm, nodes, cut_positions, local, kinds):
    """Per segment between candidate cuts: weight bytes, activation bytes; per cut: bytes crossing."""
    bounds = [0, *cut_positions, len(nodes)]
    seg_of = {}
    for k in range(len(bounds) - 1):
        for n in nodes[bounds[k]:bounds[k + 1]]:
            seg_of[n] = k
    weights = [0] * (len(bounds) - 1)
    acts = [0] * (len(bounds) - 1)
    counted: set[tuple[int, str]] = set()
    for n in nodes:
        k = seg_of[n]
        if n not in local:
            acts[k] += node_tensor_bytes(n)
        for d in n.all_input_nodes:
            if d.op == "placeholder" and kinds[d.name].kind == "parameter" and (k, d.name) not in counted:
                counted.add((k, d.name))
                weights[k] += node_tensor_bytes(d)
    crossing = []
    for c in range(len(cut_positions)):
        total = 0
        for n in gm.graph.nodes:
            if n in local or n.op == "output" or (n.op == "placeholder" and kinds[n.name].kind != "tensor"):
                continue
            made = 0 if n.op == "placeholder" else seg_of[n]
            if made <= c and any(u.op == "output" or seg_of.get(u, 0) > c for u in n.users):
                total += node_tensor_bytes(n)
        crossing.append(total)
    return weights, acts, crossing


def _balanced_starts(gm, nodes, candidates, stages, local, kinds, training, microbatches, schedule):
    """Choose stages-1 of the candidate starts minimizing the largest stage estimate (exact DP)."""
    if stages == 1:
        return []
    positions = [p for p, _ in candidates]
    weights, acts, crossing = _segment_costs(gm, nodes, positions, local, kinds)
    n_seg = len(weights)

    def cost(s: int, a: int, b: int) -> float:  # stage s made of segments a..b-1
        held = _in_flight(s, stages, microbatches, schedule, training)
        cut_in = crossing[a - 1] if a > 0 else 0
        cut_out = crossing[b - 1] if b < n_seg else 0
        return sum(weights[a:b]) + (held * sum(acts[a:b]) + cut_in + cut_out) / microbatches

    import functools

    @functools.lru_cache(maxsize=None)
    def best(s: int, a: int) -> tuple[float, tuple[int, ...]]:
        if s == stages - 1:
            return cost(s, a, n_seg), ()
        options = []
        for b in range(a + 1, n_seg - (stages - 1 - s) + 1):
            rest, cuts = best(s + 1, b)
            options.append((max(cost(s, a, b), rest), (b, *cuts)))
        return min(options)

    _, cuts = best(0, 0)
    return [candidates[b - 1] for b in cuts]


def _stage_row(stage: StageGraph, n_stages: int, microbatches: int, schedule: str, training: bool) -> dict:
    for node in stage.gm.graph.nodes:
        if node.op == "placeholder" and node.name in stage.weights:
            node.meta[WEIGHT_TAG] = node.name
    estimate = estimate_memory(stage.gm)
    by_name = {n.name: n for n in stage.gm.graph.nodes}
    weight_bytes = sum(node_tensor_bytes(by_name[w]) for w in stage.weights)
    acts = sum(node_tensor_bytes(n) for n in stage.gm.graph.nodes if n.op in ("call_function", "call_method"))
    saved = acts if training else estimate.peak_activation_bytes
    held = _in_flight(stage.index, n_stages, microbatches, schedule, training)
    send = sum(node_tensor_bytes(by_name[o]) for o in stage.outputs) if stage.index < n_stages - 1 else 0
    recv = sum(node_tensor_bytes(by_name[i]) for i in stage.inputs) if stage.index > 0 else 0
    return {
        "stage": stage.index,
        "modules": f"[{stage.first_module}, {stage.last_module})",
        "weights": len(stage.weights),
        "weight_bytes": weight_bytes,
        "activation_bytes": saved // microbatches,
        "in_flight": held,
        "send_bytes": send // microbatches,
        "estimate_bytes": weight_bytes + (held * saved + send + recv) // microbatches,
    }
