"""The pass pipeline: one ordered function, and the runner that observes every pass.

`run_pipeline` is the whole order of memsave's passes over one ATen graph; read it top to
bottom. `PassRunner` wraps each pass call with what the report needs (node counts, weight
bytes and estimated peak activation bytes before/after, time) and, in debug mode, with the
invariant check and the error against the untransformed graph on the example input.
"""

from __future__ import annotations

import time
import weakref
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from memsave.debug import DebugDump
from memsave.graph.invariants import GraphInvariantError, check_invariants, graph_signature
from memsave.memory.estimate import estimate_memory
from memsave.passes.base import PassContext, PassResult
from memsave.codegen.fuse import fuse_dequant_matmul
from memsave.passes.chunk import chunk_sequences
from memsave.passes.cleanup import eliminate_dead_code
from memsave.passes.factorize import factorize_weights
from memsave.passes.fold_weights import fold_weights
from memsave.passes.mixed_precision import PRECISION_STAGES, cast_to_mixed_precision
from memsave.passes.plan_memory import STAGES as PLAN_STAGES, plan_memory
from memsave.passes.prune import prune_weights
from memsave.passes.quantize import insert_qdq
from memsave.passes.release_weights import release_weights
from memsave.report import ErrorStats, GraphReport, PassRecord
from memsave.weights import WEIGHTS, is_released

Pass = Callable[[fx.GraphModule, Any, PassContext], PassResult]


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
    # The LM-head losses the capture step fused (backend.py, before AOTAutograd) get their
    # chunk size here, where shapes and the estimator are at hand; after compression, so it
    # sizes the graph that runs.
    runner.run("chunk", chunk_sequences, config.chunk)
    # Recompute is the partition function of training graphs (backend.py). Tensor parallelism
    # splits the Dynamo graph before AOTAutograd (passes/shard_tensor.py), so every pass here
    # sees, and compresses, this rank's shards.
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
        args = [
            self.ctx.real_inputs[name].clone() if name in mutated else self.ctx.real_inputs[name]
            for name in names
        ]
        # Compilation runs under AOTAutograd's fake mode; this run is on real tensors.
        with unset_fake_temporarily(), torch.no_grad(), torch.random.fork_rng(devices=[]):
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
