"""Tensor parallelism: split linears and attention heads across ranks (Megatron's pairing).

    torchrun --nproc-per-node 2 script.py
    compiled = torch.compile(model, backend="memsave", options={"tensor_parallel": "auto"})
    loss = compiled(x).sum(); loss.backward()
    optimizer = torch.optim.AdamW(memsave.sharded_parameters(model))   # after the first call

This pass runs on the torch-level graph Dynamo captures, before AOTAutograd (backend.py), so
AOTAutograd derives the backward of the sharded graph and every later memsave pass
(quantize, prune, recompute) sees only this rank's shards. Before / after on a SwiGLU MLP:

    g = linear(x, W_gate)                      g = linear(tp_copy(x), W_gate[rank rows])
    u = linear(x, W_up)                        u = linear(tp_copy(x), W_up[rank rows])
    y = linear(silu(g) * u, W_down)            y = tp_reduce(linear(silu(g) * u, W_down[:, rank cols]))

and in attention, view(q, B, T, H, D) becomes view(q, B, T, H/N, D) (see shard_tensor_plan.py
for how the regions are found). `tp_copy` / `tp_reduce` (memsave/ops/collectives.py) are
identity / all-reduce forward and all-reduce / identity backward.

Note [Shards instead of weights]: the graph keeps its weight placeholders; this rank's shard
(a new nn.Parameter) takes the weight's place in the example inputs and, at run time, in the
arguments the compiled function receives (`wrap`). So AOTAutograd computes the shard's
gradient into `shard.grad`, later passes find the shard as "the weight" under its usual name,
and the full weight is released (storage resized to 0, memsave/weights.py): a rank holds only
its shards. The shards live in a registry keyed by the full weight, so recompiles and graph
breaks reuse them, and `sharded_parameters(model)` hands them to an optimizer.
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

import memsave.ops.collectives  # noqa: F401  (registers memsave::tp_copy / tp_reduce / tp_gather)
from memsave.config import OptionError
from memsave.config.base import name_matches
from memsave.passes.dynamo.shard_tensor_plan import ShardPlan, plan_sharding
from memsave.report import fmt_bytes
from memsave.weights import is_released, release


class TensorParallelError(OptionError):
    """A model that cannot be split across the requested number of ranks (sizes that do not
    divide), or tensor parallelism asked for without torch.distributed."""


@dataclass
class Shard:
    param: torch.nn.Parameter  # this rank's block of the weight
    dim: int  # 0: rows (column-parallel), 1: columns (row-parallel)
    rank: int
    world: int
    name: str


_SHARDS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # full weight -> Shard


@dataclass
class TensorParallelSplit:
    """What the split did on this rank: the wrapper for the compiled function (it swaps the
    shards in at run time) and the numbers for the report."""

    wrap: Callable
    world: int
    rank: int
    column: int = 0  # linears split by output features
    row: int = 0  # linears split by input features
    vocab: int = 0  # embedding / LM-head weights split by vocabulary
    bytes_before: int = 0  # parameter bytes of the weights split, whole
    bytes_after: int = 0  # this rank's shards of them
    seconds: float = 0.0

    def notes(self) -> tuple[str, ...]:
        if self.world == 1:
            return ("tensor parallel group of 1 rank: nothing split",)
        return (
            f"rank {self.rank} of {self.world}: {self.column} linears split by columns, {self.row} by rows, "
            f"{self.vocab} vocabulary weights; split weights {fmt_bytes(self.bytes_before)} -> "
            f"{fmt_bytes(self.bytes_after)} on this rank",
        )


def shard_for_tensor_parallel(gm: fx.GraphModule, example_inputs: list, names: Sequence[str | None], config) -> TensorParallelSplit:
    """Rewrite `gm` in place for this rank and put shards into `example_inputs` (a list, changed
    in place). `names[i]` is the parameter name of input i (None for other inputs)."""
    start = time.perf_counter()
    group = _group(config)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world == 1:
        return TensorParallelSplit(lambda compiled: compiled, world, rank)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = {node: i for i, node in enumerate(placeholders)}

    shardable = _shardable({node: names[i] for node, i in index.items() if names[i] is not None}, config)
    plan = plan_sharding(gm, world, shardable)
    if plan.problems:
        raise TensorParallelError(_problems_message(plan, world))
    group_name = group.group_name
    substitutions: dict[int, torch.nn.Parameter] = {}
    bytes_before = 0

    def shard_input(node: fx.Node, dim: int) -> None:
        nonlocal bytes_before
        i = index[node]
        bytes_before += example_inputs[i].numel() * example_inputs[i].element_size()
        entry = _shard(example_inputs[i], dim, rank, world, names[i], free=config.free_weights)
        substitutions[i] = example_inputs[i] = entry.param
        _static_shapes(entry.param, node)

    for linear, weight in plan.producers.items():
        shard_input(weight, 0)
        bias = _bias(linear)
        if bias is not None:
            shard_input(bias, 0)
    for linear, weight in plan.consumers.items():
        shard_input(weight, 1)
    gathered, embeddings = _vocab_parallel(gm, plan, shardable, world) if config.vocab_parallel else ({}, {})
    for weight in (*gathered.values(), *embeddings.values()):
        shard_input(weight, 0)
    _rewrite(gm, plan, group_name)
    _rewrite_vocab_parallel(gm, gathered, embeddings, group_name, rank)
    return TensorParallelSplit(
        lambda compiled: _wrap(compiled, substitutions), world, rank,
        column=len(plan.producers), row=len(plan.consumers), vocab=len(gathered) + len(embeddings),
        bytes_before=bytes_before,
        bytes_after=sum(p.numel() * p.element_size() for p in substitutions.values()),
        seconds=time.perf_counter() - start,
    )


def _shardable(names: dict[fx.Node, str], config) -> Callable:
    """`shardable(linear, weight)` for plan_sharding: why a linear must stay whole, or None."""

    def shardable(linear: fx.Node, weight) -> str | None:
        for part in (weight, _bias(linear)):
            if part is None:
                continue
            if part not in names:
                return f"{linear.name}: its weight is not a parameter of the model"
            if len(part.users) != 1:
                return f"{names[part]} is also used elsewhere (e.g. tied to an embedding)"
        name = names[weight]
        if not any(name_matches(name, p) for p in config.include) or any(name_matches(name, p) for p in config.exclude):
            return f"{name}: left out by the include/exclude options"
        return None

    return shardable


def _group(config) -> dist.ProcessGroup:
    if not (dist.is_available() and dist.is_initialized()):
        raise TensorParallelError(
            "options['tensor_parallel'] needs torch.distributed: run the script with "
            "`torchrun --nproc-per-node N script.py` and call torch.distributed.init_process_group() first"
        )
    return config.group if config.group is not None else dist.group.WORLD


def _bias(linear: fx.Node):
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    return bias if isinstance(bias, fx.Node) else None


def _shard(full: torch.Tensor, dim: int, rank: int, world: int, name: str, *, free: bool) -> Shard:
    entry = _SHARDS.get(full)
    if entry is not None:
        if (entry.dim, entry.rank, entry.world) != (dim, rank, world):
            raise TensorParallelError(
                f"{name} was already split as block {entry.rank}/{entry.world} along dim {entry.dim}; "
                f"a second compile asks for block {rank}/{world} along dim {dim}"
            )
        return entry
    if is_released(full):
        raise TensorParallelError(f"{name} was released by memsave before it could be split; compile the model once")
    size = full.shape[dim] // world
    with torch.no_grad():
        block = full.detach().narrow(dim, rank * size, size).clone()  # (out/N, in) or (out, in/N)
    entry = Shard(torch.nn.Parameter(block, requires_grad=full.requires_grad), dim, rank, world, name)
    _SHARDS[full] = entry
    if free and full.untyped_storage().resizable():
        release(full, name)
    return entry


def _static_shapes(shard: torch.Tensor, placeholder: fx.Node) -> None:
    """Tell AOTAutograd the shard's sizes are constants, like the weight's. A tensor Dynamo did
    not fakify itself gets symbolic sizes in a recompile with dynamic shapes, and passes that
    size weights (quantize) need numbers."""
    from torch._guards import TracingContext
    from torch._dynamo.source import LocalSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatefulSymbolicContext

    tracing = TracingContext.try_get()
    if tracing is None:
        return
    grapharg = placeholder.meta.get("grapharg")
    source = grapharg.source if grapharg is not None and grapharg.source is not None else LocalSource(placeholder.name)
    tracing.tensor_to_context[shard] = StatefulSymbolicContext(
        dynamic_sizes=[DimDynamic.STATIC] * shard.dim(), constraint_sizes=[None] * shard.dim(), tensor_source=source
    )


def _rewrite(gm: fx.GraphModule, plan: ShardPlan, group_name: str) -> None:
    graph = gm.graph
    copies: dict[fx.Node, fx.Node] = {}

    def copy_of(value: fx.Node, user: fx.Node) -> fx.Node:
        # The gradient of a replicated input to a rank's shard is partial: tp_copy sums it.
        # Made before its first user (nodes are visited in order), shared by the later ones.
        if value not in copies:
            with graph.inserting_before(user):
                copies[value] = graph.call_function(torch.ops.memsave.tp_copy.default, (value, group_name))
        return copies[value]

    region = set(plan.region())
    for node in list(graph.nodes):
        if node not in region:
            continue
        for arg in node.all_input_nodes:
            if plan.states.get(arg) is None and _needs_grad(arg) and not (node in plan.producers and arg is not node.args[0]):
                node.replace_input_with(arg, copy_of(arg, node))
    for linear in plan.consumers:
        bias = _bias(linear)
        linear.args = (linear.args[0], linear.args[1], None)
        linear.kwargs = {k: v for k, v in linear.kwargs.items() if k != "bias"}
        with graph.inserting_after(linear):
            total = graph.call_function(torch.ops.memsave.tp_reduce.default, (linear, group_name))
        out = total
        if bias is not None:  # added once, after the sum: each rank adding it would count it N times
            with graph.inserting_after(total):
                out = graph.call_function(operator.add, (total, bias))
        linear.replace_all_uses_with(out, delete_user_cb=lambda user: user is not total)
    for node, path, size in plan.resizes:
        node.args = _set_at(node.args, path, size)
    graph.lint()
    gm.recompile()


def _vocab_parallel(gm: fx.GraphModule, plan: ShardPlan, shardable, world: int):
    """Linears kept whole only because their outputs cannot stay split (the LM head: a graph
    output) and embeddings, whose rows divide by the world size: both split by rows."""
    gathered = {
        linear: linear.args[1]
        for linear in plan.replicated
        if shardable(linear, linear.args[1]) is None and _bias(linear) is None
        and shape_of(linear.args[1])[0] % world == 0
    }
    embeddings = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.nn.functional.embedding:
            continue
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        options = list(node.args[2:]) + [node.kwargs.get(k) for k in ("padding_idx", "max_norm", "scale_grad_by_freq", "sparse")]
        plain = all(o is None or o is False or o == 2.0 for o in options)  # norm_type 2.0 matters only with max_norm
        if not plain or not isinstance(weight, fx.Node) or len(weight.users) != 1:
            continue  # padding_idx / max_norm / sparse, or a tied weight: kept whole
        if weight.op == "placeholder" and shape_of(weight)[0] % world == 0:
            embeddings[node] = weight
    return gathered, embeddings


def shape_of(node: fx.Node) -> tuple:
    return tuple(node.meta["example_value"].shape)


def _rewrite_vocab_parallel(gm: fx.GraphModule, gathered: dict, embeddings: dict, group_name: str, rank: int) -> None:
    """linear(x, W) → tp_gather(linear(tp_copy(x), W[rank rows]));
    embedding(ids, W) → tp_reduce(embedding(ids - start, W[rank rows]), zero where ids fall
    outside this rank's rows)."""
    graph = gm.graph
    for linear in gathered:
        with graph.inserting_before(linear):
            if _needs_grad(linear.args[0]):
                linear.args = (graph.call_function(torch.ops.memsave.tp_copy.default, (linear.args[0], group_name)), *linear.args[1:])
        with graph.inserting_after(linear):
            whole = graph.call_function(torch.ops.memsave.tp_gather.default, (linear, group_name))
        linear.replace_all_uses_with(whole, delete_user_cb=lambda user: user is not whole)
    for embed, weight in embeddings.items():
        rows = shape_of(weight)[0] // _world_size(group_name)
        ids = embed.args[0]
        with graph.inserting_before(embed):
            shifted = graph.call_function(operator.sub, (ids, rank * rows))  # (B, T)
            below = graph.call_function(operator.lt, (shifted, 0))
            above = graph.call_function(operator.ge, (shifted, rows))
            outside = graph.call_function(operator.or_, (below, above))  # (B, T) bool
            local = graph.call_method("masked_fill", (shifted, outside, 0))
            mask = graph.call_method("unsqueeze", (outside, -1))  # (B, T, 1)
        embed.args = (local, weight)
        with graph.inserting_after(embed):
            zeroed = graph.call_method("masked_fill", (embed, mask, 0.0))  # rows of other ranks: 0
        with graph.inserting_after(zeroed):
            total = graph.call_function(torch.ops.memsave.tp_reduce.default, (zeroed, group_name))
        embed.replace_all_uses_with(total, delete_user_cb=lambda user: user is not zeroed)
    graph.lint()
    gm.recompile()


def _world_size(group_name: str) -> int:
    from memsave.ops.collectives import resolve_group

    return dist.get_world_size(resolve_group(group_name))


def _needs_grad(node: fx.Node) -> bool:
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad


def _set_at(args: tuple, path: tuple, value: Any) -> tuple:
    items = list(args)
    if len(path) == 1:
        items[path[0]] = value
    else:
        items[path[0]] = type(items[path[0]])(_set_at(tuple(items[path[0]]), path[1:], value))
    return tuple(items)


def _wrap(compiled: Callable, substitutions: dict[int, torch.nn.Parameter]) -> Callable:
    """The compiled function, called with this rank's shards in place of the full weights."""
    items = sorted(substitutions.items())

    def run(*args):
        args = list(args)
        for i, shard in items:
            args[i] = shard
        return compiled(*args)

    return run


def _problems_message(plan: ShardPlan, world: int) -> str:
    return (
        f"options['tensor_parallel']: the model cannot be split across {world} ranks:\n  "
        + "\n  ".join(dict.fromkeys(plan.problems))
        + f"\nuse a number of ranks that divides these sizes, or exclude the layers (options "
        "{'tensor_parallel': {'exclude': [...]}})"
    )


# -- For users: the shards, their bytes, and a check before spawning ----------------------


def named_sharded_parameters(module: torch.nn.Module):
    """(name, parameter) for an optimizer on this rank: the shard where memsave split a weight,
    the parameter itself where it is replicated (norms, embeddings, the LM head). Available
    after the compiled model's first call (compilation is lazy)."""
    for name, param in module.named_parameters():
        entry = _SHARDS.get(param)
        yield name, entry.param if entry is not None else param


def shard_of(weight: torch.Tensor) -> torch.nn.Parameter | None:
    """This rank's shard of `weight`, or None where memsave did not split it."""
    entry = _SHARDS.get(weight)
    return entry.param if entry is not None else None


def sharded_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for _, p in named_sharded_parameters(module)]


def tp_parameter_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Parameter bytes this rank holds, measured from the storages: `sharded` (its shards),
    `replicated` (weights kept whole on every rank), `full_of_sharded` (what the split weights
    take unsplit), `held` (sharded + replicated)."""
    sharded = replicated = full_of_sharded = 0
    seen: set[int] = set()
    for param in module.parameters():
        entry = _SHARDS.get(param)
        if entry is not None:
            sharded += entry.param.untyped_storage().nbytes()
            full_of_sharded += param.numel() * param.element_size()
        elif id(param.untyped_storage()) not in seen:
            replicated += param.untyped_storage().nbytes()
        seen.add(id(param.untyped_storage()))
    return {"sharded": sharded, "replicated": replicated, "full_of_sharded": full_of_sharded, "held": sharded + replicated}


def check_tensor_parallel(model: torch.nn.Module, *example_inputs: Any, world_size: int, **options: Any) -> dict:
    """Before starting any process: can `model` be split across `world_size` ranks? Captures
    the graph once on this process (no process group needed) and runs the same analysis as
    the backend. Raises TensorParallelError naming each size that does not divide; returns
    {"column_parallel": [...], "row_parallel": [...], "replicated": {weight: why}}."""
    from memsave.graph.inputs import describe_inputs
    from memsave.config import TensorParallelConfig

    config = TensorParallelConfig.parse(options or "auto")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise TensorParallelError(f"world_size must be a positive int, got {world_size!r}")
    summary: dict[str, Any] = {"column_parallel": [], "row_parallel": [], "replicated": {}}

    def analyze(gm: fx.GraphModule, inputs):
        names = [info.weight.name if info.weight and info.weight.kind == "parameter" else None for info in describe_inputs(gm, inputs)]
        placeholders = {n: names[i] for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        shardable = _shardable({n: name for n, name in placeholders.items() if name is not None}, config)
        plan = plan_sharding(gm, world_size, shardable)
        if plan.problems:
            raise TensorParallelError(_problems_message(plan, world_size))
        summary["column_parallel"] += [placeholders[w] for w in plan.producers.values()]
        summary["row_parallel"] += [placeholders[w] for w in plan.consumers.values()]
        summary["replicated"].update({placeholders.get(n.args[1], n.name): why for n, why in plan.replicated.items()})
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=analyze)(*example_inputs)
    return summary
