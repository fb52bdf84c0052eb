"""The `torch.compile` backend: Dynamo graph → AOTAutograd (ATen) → memsave passes → lowering.

Registered by entry point (pyproject: `torch_dynamo_backends: memsave`), so
`torch.compile(model, backend="memsave")` works without importing memsave first. Do not also
call `register_backend` here: torch then fails with a duplicate-name error.

Every Dynamo graph (one per graph break, one more per recompile) goes through AOTAutograd,
inference and training alike, so memsave's passes always see ATen graphs with shape/dtype
metadata, and a training graph never runs without AOTAutograd (which also keeps RNG state
right for dropout under recomputation). AOTAutograd calls back into this file:

  Dynamo graph    ──▶ pipeline.run_dynamo_steps (chunk capture, tensor-parallel split)
  inference graph ──▶ _inference: pipeline.run_graph ─▶ lower
  training graph  ──▶ _partition: pipeline.run_joint (passes, recompute partition) ─▶ (fw, bw)
                  ──▶ _forward / _backward: pipeline.run_graph ─▶ lower (boxed: inputs freed as used)

The order of every step is pipeline.py's; this file is the wiring.
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
from memsave.codegen.lower import lower
from memsave.config import Config, OptionError
from memsave.config.recipe import set_compile_graph
from memsave.graph.meta import hint_int
from memsave.memory.estimate import WEIGHT_TAG
from memsave.graph.inputs import InputInfo, describe_inputs
from memsave.passes.base import PassContext, WeightInfo
from memsave.pipeline import DynamoSteps, PassRunner, run_dynamo_steps, run_graph, run_joint
from memsave.weights import remember_owners

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
        self._dynamo_steps: DynamoSteps | None = None  # recorded in the first ATen graph's report

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
        cache = self._quantize_static_cache()
        self._dynamo_steps = run_dynamo_steps(self.gm, self._real, self.inputs, self.config)
        self._dynamo_steps.kv_cache = cache.result if cache is not None else None
        self.config = self._dynamo_steps.config  # a budget's plan chose the forms
        try:
            compiled = self._dynamo_steps.wrap(aot(self.gm, self._real))
            return cache.wrap(compiled) if cache is not None else compiled
        finally:
            self._real = None

    def _quantize_static_cache(self):
        """options['kv_cache']: HF's static cache buffers in the graph take the layout (first: the
        graph's inputs and outputs change, so what describes them is made again)."""
        if self.config.kv_cache is None:
            return None
        from memsave.passes.dynamo.quantize_static_cache import quantize_static_cache

        started = time.perf_counter()
        cache = quantize_static_cache(self.gm, self._real, self.config.kv_cache)
        cache.result.details["seconds"] = time.perf_counter() - started
        self.gm, self._real = cache.gm, cache.real_inputs
        self.inputs = describe_inputs(self.gm, self._real)
        self.num_user_outputs = len(_flat_outputs(self.gm))
        return cache

    # -- AOTAutograd callbacks ------------------------------------------------------------

    def _inference(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        ctx = self._context(gm, "inference", positional=True)
        runner = PassRunner(gm, ctx, codegen=self.config.codegen)
        report = run_graph(runner, self._dynamo_steps)
        return lower(
            gm, example_inputs, codegen=self.config.codegen, stage="inference",
            static_input_idxs=_weight_indices(gm), report=report,
        )

    def _partition(self, joint: fx.GraphModule, joint_inputs: Any, *, num_fwd_outputs: int, **kwargs: Any):
        ctx = self._context(joint, "joint", positional=True)
        runner = PassRunner(joint, ctx, codegen=self.config.codegen)
        fw, bw = run_joint(runner, joint_inputs, num_fwd_outputs=num_fwd_outputs, dynamo_steps=self._dynamo_steps, **kwargs)
        self._num_fwd_outputs = num_fwd_outputs
        return fw, bw

    def _forward(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        ctx = self._context(gm, "forward", positional=True)
        self._forward_weights = dict(ctx.weights)
        runner = PassRunner(gm, ctx, codegen=self.config.codegen, user_outputs=self._num_fwd_outputs)
        report = run_graph(runner)
        return lower(
            gm, example_inputs, codegen=self.config.codegen, stage="forward",
            num_user_outputs=self.num_user_outputs, static_input_idxs=_weight_indices(gm),
            report=report,
        )

    def _backward(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        ctx = self._context(gm, "backward", positional=False)
        runner = PassRunner(gm, ctx, codegen=self.config.codegen)
        report = run_graph(runner)
        return lower(gm, example_inputs, codegen=self.config.codegen, stage="backward", report=report)

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


set_compile_graph(compile_graph)  # memsave.Config(...) used as a backend compiles through here
