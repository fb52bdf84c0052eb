"""Running a pipelined graph: this rank's stage inside torch.distributed.pipelining.

`compile_pipeline` is what the backend returns for options={"pipeline": ...}: it splits the
Dynamo graph (passes/dynamo/shard_pipeline.py), frees every weight this rank's stage does not read,
and returns a `PipelineRuntime`, the callable Dynamo runs in place of the graph.

A call runs one schedule step over the whole batch (`Schedule1F1B` / `ScheduleGPipe` over a
`PipelineStage` built by hand from the stage graph: the `torch.export` front end fails on HF
RoPE models). Inference returns the last stage's output on every rank (broadcast over the
pipeline group). Training goes through `train_step` (see training.py): the schedule runs the
backward itself, interleaved with the forwards, so a plain `loss.backward()` after the call
could not be 1F1B.

Stages are built per batch size (their micro-batch shapes differ) and each stage's graph is
compiled by memsave's normal pipeline on its first real micro-batch (compression passes run
on this rank's weights only), once per distinct signature. With options['tensor_parallel'] that
compile also splits the stage's linears across the tensor-parallel group (the ranks holding the
same stage: the mesh's tp group or the option's `group`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from memsave.config import Config, OptionError
from memsave.distributed.deferred import WeightSource, deferred_name, is_deferred, materialize
from memsave.distributed.mesh import pipeline_group
from memsave.passes.dynamo.shard_pipeline import GraphInput, PipelinePlan, StageGraph, fold_lifted_scalars, split_graph
from memsave.passes.dynamo.shard_tensor import shard_of
from memsave.weights import is_released, release


@dataclass
class TrainRequest:
    """Set by train_step around the compiled call: what the schedule needs for a backward."""

    target: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    losses: list | None = None


TRAIN_REQUEST: contextvars.ContextVar[TrainRequest | None] = contextvars.ContextVar("memsave_train", default=None)
_LAST_RUNTIME: list["PipelineRuntime"] = []
_CUTS: dict[frozenset, tuple[str, ...]] = {}  # parameter names → where the first plan cut


def compile_pipeline(
    gm: fx.GraphModule, example_inputs: Sequence[Any], config: Config, compile_stage: Callable
) -> "PipelineRuntime":
    """`compile_stage(gm, example_inputs, config)` compiles one stage's graph (the backend's
    compile_graph, handed down: this module sits below the backend)."""
    from memsave.graph.inputs import describe_inputs

    group, ranks = pipeline_group(config.pipeline.group)
    if config.tensor_parallel is not None:
        config = config.replace(tensor_parallel=_tensor_parallel_beside(config, ranks))
    size = len(ranks)
    stages = config.pipeline.stages or size
    if stages != size:
        raise OptionError(
            f"options['pipeline']['stages']: {stages} stages need {stages} ranks in the pipeline group "
            f"(one stage per rank), but it has {size}"
        )
    inputs = _graph_inputs(gm, example_inputs, describe_inputs(gm, example_inputs))
    training = torch.is_grad_enabled() and any(
        isinstance(v, torch.Tensor) and v.requires_grad for v in example_inputs
    )
    fold_lifted_scalars(gm, inputs, example_inputs)
    # A later compile of the same model (no_grad then training, a new batch size under a
    # static batch) must cut where the first did: this rank already freed the other stages'
    # weights. So the first plan's cuts are kept per set of parameters.
    model_key = frozenset(i.weight for i in inputs if i.kind == "parameter")
    pipeline_config = config.pipeline
    if pipeline_config.split_points is None and model_key in _CUTS:
        pipeline_config = dataclasses.replace(pipeline_config, split_points=_CUTS[model_key])
    plan = split_graph(gm, inputs, pipeline_config, stages, training=training)
    _CUTS.setdefault(model_key, tuple(stage.first_module for stage in plan.stages[1:]))
    runtime = PipelineRuntime(plan, inputs, example_inputs, config, group, ranks, compile_stage)
    _LAST_RUNTIME[:] = [runtime]
    return runtime


def _tensor_parallel_beside(config: Config, pipeline_ranks: tuple[int, ...]):
    """options['tensor_parallel'] inside a pipeline: each stage's compile splits its weights
    across the tensor-parallel group, which must cross the pipeline group at this rank only
    (its ranks hold the other shards of this same stage)."""
    from memsave.distributed.mesh import current_mesh

    tp = config.tensor_parallel
    if not config.pipeline.compile_stages:
        raise OptionError(
            "options['tensor_parallel'] with options['pipeline']: the split happens when each stage is "
            "compiled; set options['pipeline']['compile_stages'] to True (the default)"
        )
    group = tp.group
    if group is None:
        mesh = current_mesh()
        if mesh is None:
            raise OptionError(
                "options['tensor_parallel'] with options['pipeline']: give options['tensor_parallel']['group'] "
                "(the ranks holding the other shards of this rank's stage), or build the groups with "
                "memsave.distributed.init_mesh(pp_size, tp_size)"
            )
        group = mesh.tp_group
    tp_ranks = set(dist.get_process_group_ranks(group))
    shared = tp_ranks & set(pipeline_ranks)
    if shared != {dist.get_rank()}:
        raise OptionError(
            f"options['tensor_parallel']['group'] (ranks {sorted(tp_ranks)}) and the pipeline group "
            f"(ranks {list(pipeline_ranks)}) must share only this rank ({dist.get_rank()}): a stage's "
            "shards live on ranks of the same stage"
        )
    return dataclasses.replace(tp, group=group)


def last_runtime() -> "PipelineRuntime | None":
    """The runtime of the most recent pipelined compile on this rank (for reports and tests)."""
    return _LAST_RUNTIME[0] if _LAST_RUNTIME else None


def _graph_inputs(gm, example_inputs, infos) -> list[GraphInput]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensor_by_source = {
        info.source: node.name
        for node, info, value in zip(placeholders, infos, example_inputs)
        if info.weight is None and isinstance(value, torch.Tensor) and re.fullmatch(r"L\['[^']+'\]", info.source)
    }
    result = []
    for node, info, value in zip(placeholders, infos, example_inputs):
        if info.weight is not None:
            result.append(GraphInput(node.name, info.weight.kind, info.weight.name))
        elif isinstance(value, torch.Tensor) and re.fullmatch(r"L\['[^']+'\]", info.source):
            result.append(GraphInput(node.name, "tensor"))
        elif isinstance(value, torch.Tensor):
            # Not an argument of the call: a module attribute Dynamo lifted (under dynamic=True a
            # float such as Embedding.norm_type becomes a 0-d tensor). Given to each stage as is.
            result.append(GraphInput(node.name, "constant"))
        else:
            m = re.fullmatch(r"(.*)\.size\(\)\[(\d+)\]", info.source)
            size_of = (tensor_by_source[m.group(1)], int(m.group(2))) if m and m.group(1) in tensor_by_source else None
            result.append(GraphInput(node.name, "scalar", size_of=size_of))
    return result


class StageModule(nn.Module):
    """One stage as an nn.Module for PipelineStage: forward(*activations) -> tuple of tensors.

    Registers the model's own Parameter objects (not copies), so the schedule's backward
    accumulates into the user's `param.grad` and its gradient scaling finds them.
    """

    def __init__(self, stage: StageGraph, weights: list[torch.Tensor], config: Config, compile_stage: Callable):
        super().__init__()
        self.stage, self.config, self.compile_stage = stage, config, compile_stage
        self.params = nn.ParameterList([w for w in weights if isinstance(w, nn.Parameter)])
        self.weights = weights
        self.scalars: list[int] = []  # this micro-batch's SymInt values, set before each step
        self._compiled: dict[tuple, Callable] = {}

    def forward(self, *activations: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = [*self.weights, *self.scalars, *activations]
        if not self.config.pipeline.compile_stages:
            return tuple(self.stage.gm(*args))
        key = (torch.is_grad_enabled(), tuple(self.scalars)) + tuple(
            (tuple(a.shape), a.dtype, a.requires_grad) for a in activations
        )
        if key not in self._compiled:
            # This micro-batch's sizes are baked into the graph (one compile per signature),
            # so the compiled graph's inputs are tensors only, as memsave's passes expect.
            gm = _specialize(self.stage.gm, dict(zip(self.stage.scalars, self.scalars)))
            self._compiled[key] = self.compile_stage(gm, [*self.weights, *activations], self.config.replace(pipeline=None))
            # Tensor parallelism (options['tensor_parallel']) split some weights in that compile:
            # their shards get the gradients, and the schedule scales those of registered
            # parameters only.
            known = {id(p) for p in self.params}
            for w in self.weights:
                shard = shard_of(w)
                if shard is not None and id(shard) not in known:
                    self.params.append(shard)
                    known.add(id(shard))
        return tuple(self._compiled[key](*self.weights, *activations))


class PipelineRuntime:
    """The callable for Dynamo: one schedule step per call, on this rank's stage."""

    def __init__(self, plan: PipelinePlan, inputs: list[GraphInput], example_inputs, config: Config,
                 group: dist.ProcessGroup, ranks: tuple[int, ...], compile_stage: Callable):
        self.plan, self.inputs, self.config, self.compile_stage = plan, inputs, config, compile_stage
        self.group, self.ranks = group, ranks
        self.stage_index = ranks.index(dist.get_rank())
        self.stage = plan.stages[self.stage_index]
        self.n_stages = len(plan.stages)
        self._position = {i.name: k for k, i in enumerate(inputs)}
        # Weights of other stages are freed here (storage resized to 0, shapes kept so that
        # Dynamo's guards still pass); this rank's stage keeps its own.
        mine = set(self.stage.weights)
        self.materialized_bytes = self._materialize(inputs, example_inputs, mine)
        # A weight that tensor parallelism split was released too, but its shard stands in for it.
        lost = [i.weight for i, v in zip(inputs, example_inputs) if i.name in mine and isinstance(v, torch.Tensor)
                and is_released(v) and shard_of(v) is None]
        if lost:
            raise RuntimeError(
                f"memsave pipeline: stage {self.stage_index} needs {', '.join(lost[:3])}{' ...' if len(lost) > 3 else ''}, "
                "which this rank already freed (an earlier pipelined compile of this model gave it to another "
                "stage, or compression released it); compile the model with the same split on every call"
            )
        self.released_bytes = 0
        for info, value in zip(inputs, example_inputs):
            if info.kind in ("parameter", "buffer") and info.name not in mine and not is_released(value):
                self.released_bytes += release(value, f"{info.weight} (pipeline stage of another rank)")
        self.kept_bytes = sum(
            example_inputs[self._position[w]].untyped_storage().nbytes() for w in self.stage.weights
        )
        # Weights read by more than one stage (an embedding tied to the LM head): each holder
        # computes its own part of the gradient, and the parts are summed after the step.
        uses = Counter(w for stage in plan.stages for w in stage.weights)
        self.tied = [i.name for i in inputs if i.kind == "parameter" and uses[i.name] > 1]
        self._stages: dict[tuple, tuple[Any, StageModule]] = {}
        self._schedules: dict[tuple, Any] = {}
        self._output_metas: dict[tuple, tuple] = {}

    def _materialize(self, inputs, example_inputs, mine) -> int:
        """Read this stage's weights that were built without storage (defer_weights) from
        options['pipeline']['weights']; the other stages' are never allocated here."""
        deferred = [(i, v) for i, v in zip(inputs, example_inputs)
                    if i.name in mine and isinstance(v, torch.Tensor) and is_deferred(v)]
        if not deferred:
            return 0
        spec = self.config.pipeline.weights
        if spec is None:
            names = ", ".join(deferred_name(v) for _, v in deferred[:3])
            raise OptionError(
                f"options['pipeline']['weights']: stage {self.stage_index} needs {names}"
                f"{' ...' if len(deferred) > 3 else ''}, built without storage (memsave.distributed.defer_weights); "
                "give a file from memsave.distributed.save_weights, a name -> tensor mapping or a callable"
            )
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        source = WeightSource(spec)
        try:
            # torch.load gives meta tensors while it detects a fake mode, and Dynamo's tracing
            # context carries one: load outside both.
            with unset_fake_temporarily(), torch._guards.tracing(None):
                return sum(materialize(v, deferred_name(v), source) for _, v in deferred)
        finally:
            source.close()

    # -- one call -------------------------------------------------------------------------

    def __call__(self, *args: Any) -> tuple[torch.Tensor, ...]:
        user = [(i, a) for i, a in zip(self.inputs, args) if i.kind == "tensor"]
        batch, microbatches = self._check_batch(user)
        micro_shapes = {i.name: (batch // microbatches, *a.shape[1:]) for i, a in user}
        scalars = []
        for name in self.stage.scalars:
            info = self.inputs[self._position[name]]
            value = int(args[self._position[name]])
            if info.size_of is not None:
                value = micro_shapes[info.size_of[0]][info.size_of[1]]
            scalars.append(value)
        request = TRAIN_REQUEST.get()
        key = (request is not None, batch, tuple((tuple(a.shape), a.dtype) for _, a in user), tuple(scalars))
        pipe_stage, module = self._stage_for(key, args, micro_shapes, scalars, training=request is not None)
        module.scalars = scalars
        schedule = self._schedule_for(key, pipe_stage, request)
        first = self.stage_index == 0
        step_args = [a for _, a in user] if first else []
        if request is None:
            with torch.no_grad():
                out = schedule.eval(*step_args)
        else:
            last = self.stage_index == self.n_stages - 1
            before = self._tied_grads(args)
            # After its backward the schedule divides each gradient of the stage by the number of
            # micro-batches (torch's scale_grads), including what earlier steps accumulated there:
            # those are multiplied first, so gradient accumulation over steps adds up right.
            for p in module.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.plan.microbatches)
            out = schedule.step(*step_args, target=request.target if last else None, losses=request.losses)
            self._sum_tied_grads(args, before)
        return self._share_outputs(out, key)

    def _tied_grads(self, args) -> list[torch.Tensor | None]:
        if self.tied and self.config.tensor_parallel is not None:
            raise OptionError(
                f"options['pipeline'] with options['tensor_parallel']: training a weight that several stages "
                f"read ({', '.join(self.inputs[self._position[n]].weight for n in self.tied)}: tied weights) is "
                "not supported; untie them or train without tensor_parallel"
            )
        return [None if args[self._position[n]].grad is None else args[self._position[n]].grad.clone()
                for n in self.tied]

    def _sum_tied_grads(self, args, before) -> None:
        """Add up the parts of a tied weight's gradient over the stages that read it. Only this
        step's part is summed, so gradients accumulated over earlier steps are not counted twice."""
        mine = set(self.stage.weights)
        for name, old in zip(self.tied, before):
            weight = args[self._position[name]]
            holder = name in mine
            part = torch.zeros(weight.shape, dtype=weight.dtype)
            if holder and weight.grad is not None:
                part = weight.grad - old if old is not None else weight.grad.clone()
            dist.all_reduce(part, group=self.group)
            if holder:
                weight.grad = part if old is None else old + part

    def _check_batch(self, user) -> tuple[int, int]:
        microbatches = self.plan.microbatches
        if not user:
            raise OptionError("options['pipeline']: the model has no tensor input to split into micro-batches")
        batch = user[0][1].shape[0]
        for info, a in user:
            if a.dim() == 0 or a.shape[0] != batch:
                raise OptionError(
                    f"options['pipeline']: every tensor input is split along dim 0 into micro-batches, but "
                    f"{info.name} has shape {tuple(a.shape)} while the batch is {batch}"
                )
        if batch % microbatches:
            raise OptionError(
                f"options['pipeline']: batch {batch} does not divide into {microbatches} micro-batches; "
                f"use a batch that is a multiple of {microbatches} or another 'microbatches'"
            )
        return batch, microbatches

    # -- stages and schedules, per batch signature ----------------------------------------

    def _stage_for(self, key, args, micro_shapes, scalars, *, training: bool):
        from torch.distributed.pipelining import PipelineStage

        if key in self._stages:
            return self._stages[key]
        ins, outs = self._stage_shapes(args, micro_shapes, key, training)
        weights = [args[self._position[w]] for w in self.stage.weights]
        module = StageModule(self.stage, weights, self.config, self.compile_stage)
        pipe_stage = PipelineStage(
            module, self.stage_index, self.n_stages, torch.device("cpu"),
            input_args=ins, output_args=outs, group=self.group,
        )
        self._stages[key] = (pipe_stage, module)
        return self._stages[key]

    def _stage_shapes(self, args, micro_shapes, key, training: bool):
        """Every stage's inputs and outputs at micro-batch size, by running the stage graphs on
        fake tensors (no weights needed: other stages' weights are freed here)."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(), torch.no_grad():
            acts = [torch.empty(micro_shapes[i.name], dtype=args[self._position[i.name]].dtype)
                    for i in self.inputs if i.kind == "tensor"]
            ins = outs = None
            for stage in self.plan.stages:
                weights = [self._fake_weight(args[self._position[w]], self.inputs[self._position[w]].kind)
                           for w in stage.weights]
                scalars = []
                for name in stage.scalars:
                    info = self.inputs[self._position[name]]
                    value = int(args[self._position[name]])
                    scalars.append(micro_shapes[info.size_of[0]][info.size_of[1]] if info.size_of else value)
                result = tuple(stage.gm(*weights, *scalars, *acts))
                if stage.index == self.stage_index:
                    # In training, float activations carry gradients both ways: PipelineStage
                    # plans its gradient buffers from requires_grad in these examples.
                    ins = _to_meta(acts, training and stage.index > 0)
                    outs = _to_meta(result, training)
                acts = list(result)
        self._output_metas[key] = _to_meta(acts)
        return ins, outs

    @staticmethod
    def _fake_weight(value: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "constant" and value.numel() == 1:
            # A lifted module float (e.g. Embedding.norm_type) that an op reads with .item():
            # made inside the fake mode from its value, the fake tensor keeps it as a constant.
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                number = value.item()
            return torch.tensor(number, dtype=value.dtype).reshape(value.shape)
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype)

    def _schedule_for(self, key, pipe_stage, request: TrainRequest | None):
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

        loss_fn = request.loss_fn if request is not None else None
        skey = (key, loss_fn)
        if skey not in self._schedules:
            cls = Schedule1F1B if self.plan.schedule == "1f1b" else ScheduleGPipe
            self._schedules[skey] = cls(pipe_stage, self.plan.microbatches, loss_fn=_on_model_output(loss_fn))
        return self._schedules[skey]

    def _share_outputs(self, out, key) -> tuple[torch.Tensor, ...]:
        """The last stage's merged output, on every rank of the pipeline group."""
        metas = self._output_metas[key]
        microbatches = self.plan.microbatches
        last = self.stage_index == self.n_stages - 1
        if last:
            result = tuple(out) if isinstance(out, (tuple, list)) else (out,)
            result = tuple(t.detach() if TRAIN_REQUEST.get() is None else t for t in result)
        else:
            result = tuple(torch.zeros((m.shape[0] * microbatches, *m.shape[1:]), dtype=m.dtype) for m in metas)
        if self.config.pipeline.broadcast_outputs:
            for t in result:
                buf = t.detach() if last else t
                dist.broadcast(buf, src=self.ranks[-1], group=self.group)
        return result

    def describe(self) -> str:
        return self.plan.describe()


def _specialize(gm: fx.GraphModule, values: dict[str, int]) -> fx.GraphModule:
    """A copy of `gm` with the named scalar placeholders replaced by their values."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))  # node meta is shared, not deep-copied
    gm = fx.GraphModule(gm, graph, gm.__class__.__name__)
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and node.name in values:
            node.replace_all_uses_with(values[node.name])
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def _on_model_output(loss_fn):
    """The stage returns a tuple; a model returning one tensor gives the loss that tensor."""
    if loss_fn is None:
        return None

    def loss(output, target):
        if isinstance(output, (tuple, list)) and len(output) == 1:
            output = output[0]
        return loss_fn(output, target)

    return loss


def _to_meta(values, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    return tuple(
        torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta").requires_grad_(
            requires_grad and v.is_floating_point()
        )
        for v in values
    )
