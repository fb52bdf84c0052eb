"""The pass pipeline: the whole order of memsave's steps, and the runner that observes them.

Read top to bottom, one Dynamo graph's trip is:

  run_dynamo_steps   on the Dynamo graph, before AOTAutograd: chunk capture (the LM-head loss,
                     attention and MLP rewrites that bring their own backward), then the
                     tensor-parallel split (so every later step sees this rank's shards)
  run_graph          an inference, forward or backward ATen graph: run_pipeline, then finish
  run_joint          a training joint graph: run_pipeline, the partition into forward and
                     backward (recompute), saved activations narrowed (precision), finish
  run_pipeline       every ATen pass, in order (each step says why it sits where it does)
  finish             kernel selection (codegen's choice per linear, recorded like a pass), the
                     report published, and the check that no graph reads a released weight

backend.py only wires these into AOTAutograd (and lowers what they return). `PassRunner` wraps
each step with what the report needs (node counts, weight bytes and estimated peak activation
bytes before/after, time) and, in debug mode, with the invariant check and the error against
the untransformed graph on the example input.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from memsave.codegen.kernels import select_kernels_pass
from memsave.codegen.lower import inductor_joint_graph_passes
from memsave.debug import DebugDump
from memsave.graph.inputs import InputInfo
from memsave.graph.invariants import GraphInvariantError, check_invariants, graph_signature
from memsave.memory.estimate import estimate_memory
from memsave.passes.base import PassContext, PassResult
from memsave.codegen.fuse import fuse_dequant_matmul
from memsave.passes.aten.chunk import chunk_sequences
from memsave.passes.aten.cleanup import eliminate_dead_code
from memsave.passes.aten.factorize import factorize_weights
from memsave.passes.aten.fold_weights import fold_weights
from memsave.passes.aten.mixed_precision import PRECISION_STAGES, cast_to_mixed_precision
from memsave.passes.aten.plan_memory import STAGES as PLAN_STAGES, plan_memory
from memsave.passes.aten.prune import prune_weights
from memsave.passes.aten.quantize import insert_qdq
from memsave.passes.aten.release_weights import release_weights
from memsave.report import ErrorStats, GraphReport, PassRecord, publish
from memsave.weights import WEIGHTS, is_released

Pass = Callable[[fx.GraphModule, Any, PassContext], PassResult]


# -- the Dynamo graph, before AOTAutograd ---------------------------------------------------


@dataclass
class DynamoSteps:
    """What the steps on the Dynamo graph did; their records lead the ATen graph's report."""

    capture: PassResult | None = None  # chunk capture
    kv_cache: PassResult | None = None  # options['kv_cache']: HF's static cache buffers held in fewer bits
    kv_attention: PassResult | None = None  # attention over memsave's quantized kv cache, fused
    split: Any = None  # passes.dynamo.shard_tensor.TensorParallelSplit
    plan: Any = None  # budget.planner.Plan, when options['budget'] chose the forms
    config: Any = None  # the config the rest of the compile uses (the plan's quantize merged in)
    plan_seconds: float = 0.0

    def wrap(self, compiled: Callable) -> Callable:
        """The compiled graph as the caller runs it (a split graph takes the full inputs)."""
        return self.split.wrap(compiled) if self.split is not None else compiled


def run_dynamo_steps(gm: fx.GraphModule, real_inputs: list[Any], inputs: Sequence[InputInfo], config) -> DynamoSteps:
    """The steps that rewrite the Dynamo graph, in order. `inputs`: what each graph input is
    (graph.inputs.describe_inputs)."""
    steps = DynamoSteps(config=config)
    training = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in real_inputs)
    if config.budget is not None and training:
        # A training step's budget bounds its peak (weights, gradients, saved activations, the
        # backward's working set): the recompute plan is chosen for it when the partitioner
        # runs; trainable weights keep their form, and quantize / prune / factorize options
        # (frozen weights) apply as given.
        steps.config = config = config.replace(recompute=training_recompute(config.recompute, config.budget), budget=None)
    if config.budget is not None:
        # First: the plan's forms are what every later step compresses.
        from memsave.budget.graph import plan_graph
        from memsave.config import FactorizeConfig, PruneConfig, QuantizeConfig

        started = time.perf_counter()
        pinned = {family: getattr(config, family) for family in ("quantize", "prune", "factorize")}
        steps.plan = plan_graph(gm, real_inputs, inputs, config.budget, pinned)
        steps.plan_seconds = time.perf_counter() - started
        chosen = steps.plan.options
        # budget=None: the plan is made; what is left is an ordinary config with its choices
        # (the plan's options hold the pinned layers too, each with the fields its options gave it)
        families = {"prune": PruneConfig, "factorize": FactorizeConfig, "quantize": QuantizeConfig}
        steps.config = config = config.replace(
            **{family: cls.parse(chosen[family]) if family in chosen else None for family, cls in families.items()},
            budget=None)
    from memsave.passes.dynamo.fuse_kv_attention import fuse_kv_attention, reads_a_cache

    if reads_a_cache(gm):  # memsave's quantized cache (kv_cache.py) fused; any other cache named
        started = time.perf_counter()
        steps.kv_attention = fuse_kv_attention(gm)
        steps.kv_attention.details["seconds"] = time.perf_counter() - started
    if config.chunk is not None and (training or not config.chunk.training_only):
        # Loss and attention rewrites that bring their own backward happen here, before
        # AOTAutograd traces forward and backward (passes/dynamo/chunk_capture.py).
        from memsave.passes.dynamo.chunk_capture import capture_chunk_patterns

        steps.capture = capture_chunk_patterns(gm, config.chunk, training=training)
    if config.tensor_parallel is not None:
        # Before AOTAutograd, so the backward and every later pass see this rank's shards.
        from memsave.passes.dynamo.shard_tensor import shard_for_tensor_parallel

        names = [i.weight.name if i.weight is not None and i.weight.kind == "parameter" else None for i in inputs]
        steps.split = shard_for_tensor_parallel(gm, real_inputs, names, config.tensor_parallel)
    return steps


def training_recompute(recompute, budget: int):
    """The recompute config of a training step under options['budget']: the default recompute
    (min-cut) gives way to the plan chosen for the step's peak; a recompute the user gave is
    kept and checked against it (see RecomputeConfig.step_peak)."""
    import dataclasses

    from memsave.config import RecomputeConfig
    from memsave.config.recipe import DEFAULT_RECIPE

    if recompute is None:
        return RecomputeConfig(policy="none", step_peak=budget)
    if recompute == RecomputeConfig.parse(DEFAULT_RECIPE["recompute"]):
        return RecomputeConfig(policy="budget", step_peak=budget)
    return dataclasses.replace(recompute, step_peak=budget)


def _record_dynamo_steps(runner: PassRunner, steps: DynamoSteps | None) -> None:
    """The split and the capture ran on the Dynamo graph; their effect is already in this graph,
    so "after" is this graph's estimate, and "before" adds back what they saved."""
    if steps is None:
        return
    if steps.plan is not None:
        plan = steps.plan
        runner.add_done("budget", changed=bool(plan.options), seconds=steps.plan_seconds, notes=tuple(str(plan).splitlines()),
                        details={"budget": plan.budget, "total_bytes": plan.total_bytes, "solver": plan.solver,
                                 "predicted_error": plan.predicted_error, "measure": plan.measure, "options": plan.options,
                                 "forms": {layer.name: layer.form for layer in plan.layers}})
    split = steps.split
    if split is not None:
        runner.add_done(
            "shard_tensor", changed=split.world > 1, seconds=split.seconds, notes=split.notes(),
            details={"world": split.world, "rank": split.rank, "column": split.column, "row": split.row,
                     "vocab": split.vocab, "split_bytes_before": split.bytes_before,
                     "split_bytes_after": split.bytes_after},
            weight_bytes_saved=split.bytes_before - split.bytes_after,
        )
    if steps.kv_cache is not None:
        result = steps.kv_cache
        runner.add_done("quantize_static_cache", changed=result.changed, seconds=result.details["seconds"],
                        notes=result.notes, details=result.details)
    if steps.kv_attention is not None:
        result = steps.kv_attention
        runner.add_done("fuse_kv_attention", changed=result.changed, seconds=result.details["seconds"],
                        notes=result.notes, details=result.details)
    if steps.capture is not None:
        # The bytes it saved are in its notes.
        result = steps.capture
        runner.add_done("chunk_capture", changed=result.changed, seconds=result.details["seconds"],
                        notes=result.notes, details=result.details)


# -- ATen graphs ------------------------------------------------------------------------------


def run_graph(runner: PassRunner, dynamo_steps: DynamoSteps | None = None) -> GraphReport:
    """An inference, forward or backward graph: every pass, then finish."""
    _record_dynamo_steps(runner, dynamo_steps)
    run_pipeline(runner)
    return finish(runner)


def run_joint(
    runner: PassRunner, joint_inputs: Any, *, num_fwd_outputs: int, dynamo_steps: DynamoSteps | None = None,
    **partition_kwargs: Any,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """A training joint graph: every pass on it (so forward and backward both see the casts and
    compressed weights), Inductor's joint-graph passes where it lowers, the partition into
    forward and backward by the recompute policy, the saved activations narrowed; then finish."""
    _record_dynamo_steps(runner, dynamo_steps)
    run_pipeline(runner)
    config = runner.ctx.config
    joint = runner.gm
    if config.codegen == "inductor":
        joint = inductor_joint_graph_passes(joint, _flat_tensors(joint_inputs))
    fw, bw = _partition(runner, joint, joint_inputs, num_fwd_outputs, partition_kwargs)
    if config.precision is not None and config.precision.saved is not None:
        _narrow_saved(runner, fw, bw, num_fwd_outputs)
    _step_in_backward(runner, joint, fw, bw, num_fwd_outputs)
    finish(runner)
    return fw, bw


def _partition(runner: PassRunner, joint: fx.GraphModule, joint_inputs: Any, num_fwd_outputs: int, kwargs: dict):
    from memsave.passes.joint.recompute import COMPARING_POLICIES, compare_policies, partition

    ctx = runner.ctx
    start = time.perf_counter()
    fw, bw, result = partition(
        joint, ctx.config.recompute, ctx, joint_inputs=joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs
    )
    seconds = time.perf_counter() - start
    # "Before" is the same schedule with nothing recomputed, so the line reads as what this
    # policy saved over saving everything.
    _, _, baseline = partition(joint, None, ctx, joint_inputs=joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
    if COMPARING_POLICIES.get():  # `memsave explain --train`: every policy on the same graph
        result.details["policies"] = compare_policies(joint, ctx, num_fwd_outputs=num_fwd_outputs, **kwargs)
    runner.add_record(
        PassRecord(
            name="recompute",
            changed=result.details["recomputed"] != [],
            nodes_before=len(joint.graph.nodes),
            nodes_after=len(fw.graph.nodes) + len(bw.graph.nodes),
            nodes_added=len(result.details["recomputed"]),
            nodes_removed=0,
            weight_bytes_before=baseline.details["weight_bytes"],
            weight_bytes_after=result.details["weight_bytes"],
            peak_activation_bytes_before=baseline.details["peak_activation_bytes"],
            peak_activation_bytes_after=result.details["peak_activation_bytes"],
            seconds=seconds,
            notes=result.notes,
            details=result.details,
        )
    )
    return fw, bw


def _narrow_saved(runner: PassRunner, fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int) -> None:
    """Saved activations in bf16/fp8 between forward and backward (precision's `saved`)."""
    from memsave.memory.saved_activations import simulated_peak
    from memsave.passes.aten.mixed_precision import narrow_saved_activations

    before = simulated_peak(fw, bw, num_fwd_outputs)
    start = time.perf_counter()
    result = narrow_saved_activations(fw, bw, num_fwd_outputs, runner.ctx.config.precision)
    after = simulated_peak(fw, bw, num_fwd_outputs)
    runner.add_record(
        PassRecord(
            name="narrow_saved", changed=result.changed, nodes_before=0, nodes_after=0, nodes_added=0,
            nodes_removed=0, weight_bytes_before=before["weight_bytes"], weight_bytes_after=after["weight_bytes"],
            peak_activation_bytes_before=before["peak"], peak_activation_bytes_after=after["peak"],
            seconds=time.perf_counter() - start, notes=result.notes, details=result.details,
        )
    )


def _step_in_backward(runner: PassRunner, joint: fx.GraphModule, fw: fx.GraphModule, bw: fx.GraphModule,
                      num_fwd_outputs: int) -> None:
    """memsave.optimizer_in_backward: each gradient stepped and freed inside the backward."""
    from memsave.memory.saved_activations import simulated_peak
    from memsave.optim.in_backward import is_held
    from memsave.passes.joint.step_in_backward import step_in_backward

    ctx = runner.ctx
    primals = [n for n in joint.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]
    values = [ctx.real_inputs.get(n.name) for n in primals]
    if not any(isinstance(v, torch.Tensor) and is_held(v) for v in values):
        return  # the common case: no in-backward optimizer, no estimate to make
    names = [ctx.weights[n.name].name if n.name in ctx.weights else n.name for n in primals]
    before = simulated_peak(fw, bw, num_fwd_outputs)
    start = time.perf_counter()
    result = step_in_backward(fw, bw, num_fwd_outputs, values, names, ctx.graph_id)
    if not result.changed and not result.notes:
        return
    after = simulated_peak(fw, bw, num_fwd_outputs)
    runner.add_record(
        PassRecord(
            name="step_in_backward", changed=result.changed, nodes_before=0, nodes_after=0,
            nodes_added=len(result.details.get("stepped", ())), nodes_removed=0,
            weight_bytes_before=before["weight_bytes"], weight_bytes_after=after["weight_bytes"],
            peak_activation_bytes_before=before["peak"], peak_activation_bytes_after=after["peak"],
            seconds=time.perf_counter() - start, notes=result.notes, details=result.details,
        )
    )


def finish(runner: PassRunner) -> GraphReport:
    """Codegen's kernel choice, recorded like a pass (what runs and, in debug mode, its error);
    the report published; and no graph that runs may read a released weight (weights.py)."""
    runner.run("select_kernels", select_kernels_pass, True)
    report = runner.finish()
    publish(report)
    for node in runner.gm.graph.nodes:
        value = runner.ctx.real_inputs.get(node.name) if node.op == "placeholder" else None
        if node.users and isinstance(value, torch.Tensor) and is_released(value):
            raise RuntimeError(
                f"{runner.report.title} reads weight {runner.ctx.weights[node.name].name!r} in full "
                f"precision (by {', '.join(u.name for u in node.users)}), but memsave released it after "
                "compressing it for another graph; compile with options={'quantize': {..., "
                "'free_weights': False}} to keep the originals"
            )
    return report


def run_pipeline(runner: PassRunner) -> None:
    """Every memsave pass over one graph, in order. Each step says why it sits where it does."""
    config = runner.ctx.config
    # Dead nodes first: every later count and estimate should describe the graph that runs.
    runner.run("cleanup", eliminate_dead_code, True)
    # Compress weights before anything else, so every later pass sizes the compressed graph.
    # Prune, then factorize, then quantize: the survivors and the factors get quantized.
    runner.run("prune", prune_weights, config.prune)
    runner.run("factorize", factorize_weights, config.factorize)
    runner.run("quantize", insert_qdq, config.quantize)
    # The weight side of quantize is known at compile time: store packed codes instead.
    runner.run("fold_weights", fold_weights, config.quantize)
    # Nothing reads the full-precision originals any more: free them.
    compressing = config.prune or config.factorize or config.quantize
    runner.run("release_weights", release_weights, config if compressing else None)
    # dequantize → matmul (and densify → matmul for sparse weights) becomes one linear op on
    # the stored form: no full weight is materialized, and codegen can pick a fast kernel for
    # it. Last, so it sees every dequantize.
    runner.run("fuse_dequant_matmul", fuse_dequant_matmul, config.quantize or config.prune)
    # The LM-head losses the capture step fused (run_dynamo_steps, before AOTAutograd) get their
    # chunk size here, where shapes and the estimator are at hand; after compression, so it
    # sizes the graph that runs.
    runner.run("chunk", chunk_sequences, config.chunk)
    # Recompute is the partition of training graphs (run_joint, after this). Tensor parallelism
    # split the Dynamo graph before AOTAutograd (run_dynamo_steps), so every pass here sees,
    # and compresses, this rank's shards.
    # Mixed precision after compression (a packed linear keeps its own compute dtype), on the
    # joint graph in training so the forward and backward both see the casts.
    runner.run("mixed_precision", cast_to_mixed_precision, config.precision, stages=PRECISION_STAGES)
    # Last: plan the buffers of the graph that runs (not the joint graph: it must stay functional).
    runner.run("plan_memory", plan_memory, config.plan_memory, stages=PLAN_STAGES)


class PassRunner:
    """Runs passes on one graph and records what each did.

    In debug mode it checks the invariants of docs/invariants.md after every pass and
    measures the outputs' error against the graph as it came in (computed once, before any
    pass, from the real example inputs when they are known).
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        ctx: PassContext,
        *,
        codegen: str = "",
        user_outputs: int | None = None,
    ):
        self.gm, self.ctx = gm, ctx
        self.report = GraphReport(
            ctx.graph_id, ctx.stage, codegen=codegen, weights={k: w.name for k, w in ctx.weights.items()}
        )
        self.dump = DebugDump(ctx.config.debug_dir, ctx.graph_id, ctx.stage)
        self.debug = ctx.config.debug
        self.user_outputs = user_outputs  # outputs the user sees (training forwards add saved ones)
        self._signature = graph_signature(gm)
        self._estimate = estimate_memory(gm)
        self._reference = self._run_outputs() if self.debug else None
        self.dump.graph("input", gm)

    @property
    def history(self) -> list[str]:
        return [r.name for r in self.report.records]

    def run(self, name: str, fn: Pass, config: Any, *, stages: tuple[str, ...] | None = None) -> PassResult | None:
        """Run one pass if its config is on and it applies to this graph's stage."""
        if config is None or (stages is not None and self.ctx.stage not in stages):
            return None
        gm = self.gm
        nodes_before = set(gm.graph.nodes)
        estimate_before = self._estimate
        start = time.perf_counter()
        try:
            result = fn(gm, config, self.ctx)
        except Exception as e:
            raise RuntimeError(
                f"memsave pass {name!r} failed on {self.report.title} "
                f"(passes run before it: {', '.join(self.history) or 'none'}): {type(e).__name__}: {e}"
            ) from e
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise TypeError(f"memsave pass {name!r} returned {type(result).__name__}, not a PassResult")
        nodes_after = set(gm.graph.nodes)
        self._estimate = estimate_memory(gm)
        error = None
        if self.debug:
            problems = check_invariants(gm, self._signature)
            if problems:
                raise GraphInvariantError(
                    f"pass {name!r} broke graph invariants on {self.report.title} "
                    f"(passes run before it: {', '.join(self.history) or 'none'}):\n  "
                    + "\n  ".join(problems)
                )
            error = self._error()
        record = PassRecord(
            name=name,
            changed=result.changed,
            nodes_before=len(nodes_before),
            nodes_after=len(nodes_after),
            nodes_added=len(nodes_after - nodes_before),
            nodes_removed=len(nodes_before - nodes_after),
            weight_bytes_before=estimate_before.weight_bytes,
            weight_bytes_after=self._estimate.weight_bytes,
            peak_activation_bytes_before=estimate_before.peak_activation_bytes,
            peak_activation_bytes_after=self._estimate.peak_activation_bytes,
            seconds=seconds,
            error=error,
            notes=result.notes,
            details=result.details,
        )
        self.report.records.append(record)
        self.dump.graph(name, gm)
        return result

    def add_record(self, record: PassRecord) -> None:
        """For steps that are not in-place graph rewrites (the training partition)."""
        self.report.records.append(record)

    def add_done(self, name: str, *, changed: bool, seconds: float, notes: list[str], details: dict,
                 weight_bytes_saved: int = 0) -> None:
        """The record of a step that ran on the Dynamo graph, before this graph existed: its
        effect is already here, so "after" is this graph's estimate and "before" adds back the
        weight bytes it saved."""
        estimate, nodes = estimate_memory(self.gm), len(self.gm.graph.nodes)
        self.add_record(
            PassRecord(
                name=name, changed=changed, nodes_before=nodes, nodes_after=nodes, nodes_added=0, nodes_removed=0,
                weight_bytes_before=estimate.weight_bytes + weight_bytes_saved, weight_bytes_after=estimate.weight_bytes,
                peak_activation_bytes_before=estimate.peak_activation_bytes,
                peak_activation_bytes_after=estimate.peak_activation_bytes,
                seconds=seconds, notes=notes, details=details,
            )
        )

    def finish(self) -> GraphReport:
        self.report.constants = [weakref.ref(t) for t in self.gm.buffers()]
        weights = [t for name in self.ctx.weights if (t := self.ctx.weight_tensor(name)) is not None]
        self.report.held_bytes = WEIGHTS.held_bytes(weights)
        self.dump.report(self.report)
        return self.report

    # -- error against the untransformed graph ---------------------------------------------

    def _run_outputs(self) -> list[torch.Tensor] | None:
        names = [n.name for n in self.gm.graph.nodes if n.op == "placeholder"]
        if not all(name in self.ctx.real_inputs for name in names):
            return None  # e.g. a backward graph: its saved activations exist only as fakes
        if any(isinstance(v, torch.Tensor) and is_released(v) for v in _read_inputs(self.gm, self.ctx.real_inputs)):
            return None  # a recompile after weights were released: the original graph cannot run
        mutated = _mutated_placeholders(self.gm)
        # Inputs the graph writes to (e.g. BatchNorm running stats) are cloned, so measuring
        # the error never changes the user's model; a fixed seed makes dropout comparable.
        # Compilation runs under AOTAutograd's fake mode; this run (and the clones) on real tensors.
        with unset_fake_temporarily(), torch.no_grad(), torch.random.fork_rng(devices=[]):
            args = [
                self.ctx.real_inputs[name].clone() if name in mutated else self.ctx.real_inputs[name]
                for name in names
            ]
            torch.manual_seed(0)
            outputs = self.gm(*args)
            outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
            if self.user_outputs is not None:
                outputs = outputs[: self.user_outputs]
            return [o.detach().clone() for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]

    def _error(self) -> ErrorStats | None:
        if self._reference is None:
            return None
        outputs = self._run_outputs()
        if outputs is None:
            return None
        with unset_fake_temporarily():
            return ErrorStats.between(self._reference, outputs)


def _mutated_placeholders(gm: fx.GraphModule) -> set[str]:
    """Placeholders some op in the graph writes to (schema arguments marked `Tensor(a!)`)."""
    mutated = set()
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None or not schema.is_mutable:
            continue
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                if isinstance(value, fx.Node) and value.op == "placeholder":
                    mutated.add(value.name)
    return mutated


def _read_inputs(gm: fx.GraphModule, real_inputs: dict[str, Any]) -> list[Any]:
    """Real values of the placeholders the graph actually reads."""
    return [real_inputs.get(n.name) for n in gm.graph.nodes if n.op == "placeholder" and n.users]


def _flat_tensors(value: Any) -> list[torch.Tensor]:
    flat = []
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, (list, tuple)):
            flat += _flat_tensors(item)
        elif isinstance(item, torch.Tensor):
            flat.append(item)
    return flat
