"""The `torch.compile` backend: Dynamo graph → AOTAutograd (ATen) → memsave passes → lowering.

Registered by entry point (pyproject: `torch_dynamo_backends: memsave`), so
`torch.compile(model, backend="memsave")` works without importing memsave first. Do not also
call `register_backend` here: torch then fails with a duplicate-name error.

Every Dynamo graph (one per graph break, one more per recompile) goes through AOTAutograd,
inference and training alike, so memsave's passes always see ATen graphs with shape/dtype
metadata, and a training graph never runs without AOTAutograd (which also keeps RNG state
right for dropout under recomputation). AOTAutograd calls back into this file:

  inference graph ──▶ _inference: pipeline ─▶ lower
  training graph  ──▶ _partition: pipeline on the joint graph ─▶ recompute pass (fw, bw)
                  ──▶ _forward / _backward: pipeline ─▶ lower (boxed: inputs freed as used)
"""

from __future__ import annotations

import importlib.util
import itertools
import time
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

import memsave.ops  # noqa: F401  (registers memsave's custom ops before any graph holds them)
from memsave.codegen import cpu
from memsave.codegen.native import kernels as native_kernels
from memsave.codegen.kernels import select_kernels_pass
from memsave.codegen.lower import inductor_joint_graph_passes, lower
from memsave.config import Config, OptionError
from memsave.config.recipe import set_compile_graph
from memsave.graph.meta import hint_int
from memsave.memory.estimate import WEIGHT_TAG, estimate_memory
from memsave.graph.inputs import InputInfo, describe_inputs
from memsave.passes.base import PassContext, WeightInfo
from memsave.pipeline import PassRunner, run_pipeline
from memsave.report import PassRecord, publish
from memsave.weights import is_released, remember_owners

_graph_ids = itertools.count()
cpu.register()  # ATen packed-weight kernels for quantized linears on CPU (bf16 activations)
native_kernels.register()  # memsave's C kernels: every stored format, fp32 activations, on CPU
if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    from memsave.codegen import triton as triton_kernels

    triton_kernels.register()  # Triton quantized-linear kernels (GEMV for decode, GEMM for prefill)


def memsave_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options=None, mode=None, **_: Any):
    """torch.compile(model, backend="memsave", options={...})."""
    if mode is not None:
        raise OptionError(
            f"backend='memsave' takes options=..., not mode={mode!r}; valid option keys: "
            + ", ".join(repr(k) for k in Config.__dataclass_fields__)
        )
    # torch pops some keys from the caller's dict; work on a copy.
    options = dict(options) if isinstance(options, dict) else options
    return compile_graph(gm, example_inputs, Config.from_options(options))


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], config: Config) -> Callable:
    if config.pipeline is not None:
        # Split first, at the Dynamo level: each rank then compiles only its own stage (with
        # this same function, pipeline off), so compression runs on its own weights only.
        from memsave.distributed.runtime import compile_pipeline

        return compile_pipeline(gm, example_inputs, config, compile_graph)
    _refuse_deferred(example_inputs)
    return GraphCompilation(gm, example_inputs, config).compile()


def _refuse_deferred(example_inputs: Sequence[Any]) -> None:
    from memsave.distributed.deferred import deferred_name, is_deferred

    missing = [deferred_name(v) for v in example_inputs if isinstance(v, torch.Tensor) and is_deferred(v)]
    if missing:
        raise OptionError(
            f"memsave: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} were built without storage "
            "(memsave.distributed.defer_weights), and only options['pipeline'] with 'weights' materializes "
            "them (each rank its own stage); load the weights into the model to compile it otherwise"
        )


class GraphCompilation:
    """One Dynamo graph's trip through memsave."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], config: Config):
        self.gm, self.config = gm, config
        self.graph_id = next(_graph_ids)
        self.inputs = describe_inputs(gm, example_inputs)
        remember_owners(gm, example_inputs)  # so a released weight's module can refuse eager calls
        self.num_user_outputs = len(_flat_outputs(gm))
        # Real example inputs are kept only while compiling (debug-mode error measurement and
        # passes that read weights); holding them longer would keep the user's tensors alive.
        self._real: list[Any] | None = list(example_inputs)
        self._forward_weights: dict[str, WeightInfo] = {}
        self._num_fwd_outputs: int | None = None
        self._capture = None  # the chunk capture step's result, recorded in the first report
        self._tp_split = None  # the tensor-parallel split's summary, likewise

    def compile(self) -> Callable:
        from torch._dynamo.backends.common import aot_autograd
        from torch._inductor.decomposition import select_decomp_table

        aot = aot_autograd(
            fw_compiler=self._forward,
            bw_compiler=self._backward,
            inference_compiler=self._inference,
            partition_fn=self._partition,
            decompositions=select_decomp_table,  # called lazily by aot_autograd
            keep_inference_input_mutations=True,
        )
        if self.config.chunk is not None:
            # Loss and attention rewrites that bring their own backward happen on the Dynamo
            # graph, before AOTAutograd traces forward and backward (passes/chunk_capture.py).
            from memsave.passes.chunk_capture import capture_chunk_patterns

            training = torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in self._real or ()
            )
            self._capture = capture_chunk_patterns(self.gm, self.config.chunk, training=training)
        wrap = lambda compiled: compiled  # noqa: E731
        if self.config.tensor_parallel is not None:
            # Before AOTAutograd, so the backward and every later pass see this rank's shards.
            from memsave.passes.shard_tensor import shard_for_tensor_parallel

            names = [i.weight.name if i.weight is not None and i.weight.kind == "parameter" else None for i in self.inputs]
            self._tp_split = shard_for_tensor_parallel(self.gm, self._real, names, self.config.tensor_parallel)
            wrap = self._tp_split.wrap
        try:
            return wrap(aot(self.gm, self._real))
        finally:
            self._real = None

    # -- AOTAutograd callbacks ------------------------------------------------------------

    def _inference(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        ctx = self._context(gm, "inference", positional=True)
        runner = PassRunner(gm, ctx, codegen=self.config.codegen)
        self._record_capture(runner)
        run_pipeline(runner)
        self._finish(runner)
        return lower(
            gm, example_inputs, codegen=self.config.codegen, stage="inference",
            static_input_idxs=_weight_indices(gm), report=runner.report,
        )

    def _partition(self, joint: fx.GraphModule, joint_inputs: Any, *, num_fwd_outputs: int, **kwargs: Any):
        from memsave.passes.recompute import COMPARING_POLICIES, compare_policies, partition

        ctx = self._context(joint, "joint", positional=True)
        runner = PassRunner(joint, ctx, codegen=self.config.codegen)
        self._record_capture(runner)
        run_pipeline(runner)
        if self.config.codegen == "inductor":
            joint = inductor_joint_graph_passes(joint, _flat_tensors(joint_inputs))
        start = time.perf_counter()
        fw, bw, result = partition(
            joint, self.config.recompute, ctx, joint_inputs=joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs
        )
        seconds = time.perf_counter() - start
        # "Before" is the same schedule with nothing recomputed, so the line reads as what
        # this policy saved over saving everything.
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
        if self.config.precision is not None and self.config.precision.saved is not None:
            self._narrow_saved(runner, fw, bw, num_fwd_outputs)
        self._finish(runner)
        self._num_fwd_outputs = num_fwd_outputs
        return fw, bw

    def _narrow_saved(self, runner: PassRunner, fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int) -> None:
        """Saved activations in bf16/fp8 between forward and backward (precision's `saved`)."""
        from memsave.passes.mixed_precision import narrow_saved_activations
        from memsave.passes.recompute_graph import simulated_peak

        before = simulated_peak(fw, bw, num_fwd_outputs)
        start = time.perf_counter()
        result = narrow_saved_activations(fw, bw, num_fwd_outputs, self.config.precision)
        after = simulated_peak(fw, bw, num_fwd_outputs)
        runner.add_record(
            PassRecord(
                name="narrow_saved", changed=result.changed, nodes_before=0, nodes_after=0, nodes_added=0,
                nodes_removed=0, weight_bytes_before=before["weight_bytes"], weight_bytes_after=after["weight_bytes"],
                peak_activation_bytes_before=before["peak"], peak_activation_bytes_after=after["peak"],
                seconds=time.perf_counter() - start, notes=result.notes, details=result.details,
            )
        )

    def _forward(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        ctx = self._context(gm, "forward", positional=True)
        self._forward_weights = dict(ctx.weights)
        runner = PassRunner(gm, ctx, codegen=self.config.codegen, user_outputs=self._num_fwd_outputs)
        run_pipeline(runner)
        self._finish(runner)
        return lower(
            gm, example_inputs, codegen=self.config.codegen, stage="forward",
            num_user_outputs=self.num_user_outputs, static_input_idxs=_weight_indices(gm),
            report=runner.report,
        )

    def _backward(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        ctx = self._context(gm, "backward", positional=False)
        runner = PassRunner(gm, ctx, codegen=self.config.codegen)
        run_pipeline(runner)
        self._finish(runner)
        return lower(gm, example_inputs, codegen=self.config.codegen, stage="backward", report=runner.report)

    # -- helpers --------------------------------------------------------------------------

    def _context(self, gm: fx.GraphModule, stage: str, *, positional: bool) -> PassContext:
        """Tag weight placeholders and collect real inputs by placeholder name.

        Inference, forward and joint graphs take the Dynamo graph's inputs first, in order
        (then tangents, for the joint); a backward graph reuses the forward's placeholder
        names for the weights it reads.
        """
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        weights: dict[str, WeightInfo] = {}
        real: dict[str, Any] = {}
        if positional and _same_inputs(placeholders, self.inputs, self._real):
            for node, info, value in zip(placeholders, self.inputs, self._real or [None] * len(self.inputs)):
                if info.weight is not None:
                    weights[node.name] = info.weight
                if isinstance(value, torch.SymInt):
                    # Dynamo passes sizes of dynamic dims as SymInts; the example's real size is
                    # the hint. Computing with the SymInt itself would specialize it.
                    real[node.name] = hint_int(value)
                elif value is not None and not _is_fake(value):
                    real[node.name] = value
        elif not positional:
            weights = {n.name: self._forward_weights[n.name] for n in placeholders if n.name in self._forward_weights}
        for node in placeholders:
            if node.name in weights:
                node.meta[WEIGHT_TAG] = weights[node.name].name
        return PassContext(self.config, stage, self.graph_id, weights, real)

    def _record_capture(self, runner: PassRunner) -> None:
        """The tensor-parallel split and the chunk capture step ran on the Dynamo graph; they
        show first in this graph's report."""
        split = self._tp_split
        if split is not None:
            estimate, nodes = estimate_memory(runner.gm), len(runner.gm.graph.nodes)
            runner.add_record(
                PassRecord(
                    name="shard_tensor", changed=split.world > 1, nodes_before=nodes, nodes_after=nodes,
                    nodes_added=0, nodes_removed=0,
                    # Its effect is already in this graph: "before" adds back what the shards saved.
                    weight_bytes_before=estimate.weight_bytes + split.bytes_before - split.bytes_after,
                    weight_bytes_after=estimate.weight_bytes,
                    peak_activation_bytes_before=estimate.peak_activation_bytes,
                    peak_activation_bytes_after=estimate.peak_activation_bytes,
                    seconds=split.seconds, notes=split.notes(),
                    details={"world": split.world, "rank": split.rank, "column": split.column, "row": split.row,
                             "vocab": split.vocab, "split_bytes_before": split.bytes_before,
                             "split_bytes_after": split.bytes_after},
                )
            )
        if self._capture is not None:
            # Its effect is already in this graph: before and after are this graph's estimate
            # (the bytes it saved are in the notes).
            result, estimate = self._capture, estimate_memory(runner.gm)
            nodes = len(runner.gm.graph.nodes)
            runner.add_record(
                PassRecord(
                    name="chunk_capture", changed=result.changed, nodes_before=nodes, nodes_after=nodes,
                    nodes_added=0, nodes_removed=0, weight_bytes_before=estimate.weight_bytes,
                    weight_bytes_after=estimate.weight_bytes,
                    peak_activation_bytes_before=estimate.peak_activation_bytes,
                    peak_activation_bytes_after=estimate.peak_activation_bytes,
                    seconds=result.details["seconds"], notes=result.notes, details=result.details,
                )
            )

    def _finish(self, runner: PassRunner) -> None:
        # Codegen's kernel choice, recorded like a pass: what runs, and (debug) its error.
        runner.run("select_kernels", select_kernels_pass, True)
        publish(runner.finish())
        # A released weight must not be read by any graph that runs (see weights.py).
        for node in runner.gm.graph.nodes:
            value = runner.ctx.real_inputs.get(node.name) if node.op == "placeholder" else None
            if node.users and isinstance(value, torch.Tensor) and is_released(value):
                raise RuntimeError(
                    f"{runner.report.title} reads weight {runner.ctx.weights[node.name].name!r} in full "
                    f"precision (by {', '.join(u.name for u in node.users)}), but memsave released it after "
                    "compressing it for another graph; compile with options={'quantize': {..., "
                    "'free_weights': False}} to keep the originals"
                )


def _same_inputs(placeholders: list[fx.Node], inputs: list[InputInfo], real: list[Any] | None) -> bool:
    if len(placeholders) < len(inputs):
        return False
    if real is None:
        return True
    for node, value in zip(placeholders, real):
        val = node.meta.get("val")
        if isinstance(value, torch.Tensor) != isinstance(val, torch.Tensor):
            return False
        if isinstance(value, torch.Tensor) and (value.dtype != val.dtype or value.dim() != val.dim()):
            return False
    return True


def _is_fake(value: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(value, FakeTensor)


def _weight_indices(gm: fx.GraphModule) -> list[int]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, n in enumerate(placeholders) if n.meta.get(WEIGHT_TAG)]


def _flat_outputs(gm: fx.GraphModule) -> list:
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    out = output.args[0]
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _flat_tensors(value: Any) -> list[torch.Tensor]:
    flat = []
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, (list, tuple)):
            flat += _flat_tensors(item)
        elif isinstance(item, torch.Tensor):
            flat.append(item)
    return flat


set_compile_graph(compile_graph)  # memsave.Config(...) used as a backend compiles through here
