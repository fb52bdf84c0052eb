"""Check a pipeline plan in this process, before any rank is started.

`check_pipeline(model, example_inputs, options, nproc)` traces the model with Dynamo here
(single process, no process group), splits the graph for `nproc` stages exactly as each rank
will, and checks the batch against the micro-batch count. Bad input (more stages than blocks
to cut at, an unknown split point, a batch that does not divide) raises OptionError here, so
`memsave demo --nproc N` and user launchers fail before spawning anything.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from memsave.config import Config, OptionError
from memsave.passes.dynamo.shard_pipeline import PipelinePlan, fold_lifted_scalars, split_graph


def check_pipeline(model: torch.nn.Module, example_inputs: Sequence[Any], options: dict, nproc: int) -> PipelinePlan:
    """The plan every rank would make for `nproc` stages, or an OptionError saying why not."""
    config = Config.from_options(options)
    if config.pipeline is None:
        raise OptionError("check_pipeline: options has no 'pipeline' entry")
    stages = config.pipeline.stages or nproc
    if stages != nproc:
        raise OptionError(
            f"options['pipeline']['stages']: {stages} stages need {stages} ranks (one stage per rank), "
            f"but {nproc} were asked for"
        )
    plans: list[PipelinePlan] = []

    def capture(gm, inputs):
        from memsave.graph.inputs import describe_inputs
        from memsave.distributed.runtime import _graph_inputs

        described = _graph_inputs(gm, inputs, describe_inputs(gm, inputs))
        fold_lifted_scalars(gm, described, inputs)
        plans.append(split_graph(gm, described, config.pipeline, stages, training=False))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=True, fullgraph=True)(*example_inputs)
    torch._dynamo.reset()
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    microbatches = config.pipeline.check_microbatches(stages)
    if not tensors or tensors[0].dim() == 0 or tensors[0].shape[0] % microbatches:
        batch = tensors[0].shape[0] if tensors and tensors[0].dim() else None
        raise OptionError(
            f"options['pipeline']: batch {batch} does not divide into {microbatches} micro-batches; "
            f"use a batch that is a multiple of {microbatches} or another 'microbatches'"
        )
    return plans[0]
