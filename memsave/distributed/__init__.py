"""memsave on several processes: pipeline stages on torch.distributed (gloo on CPUs, NCCL on GPUs).

    launch(fn, nprocs, args)          spawn ranks with a process group; one rank's error ends all
    init_mesh(pp_size, tp_size)       pipeline × tensor-parallel groups (rank = pp_rank*tp_size + tp_rank)
    train_step(compiled, *x, target=, loss_fn=)   a pipelined training step (schedule runs the backward)
    last_runtime()                    this rank's pipeline runtime: .plan.describe(), .stage_index
    defer_weights(meta_model)         storage-less weights: each rank reads only its stage's, from
    save_weights(model, path)           options["pipeline"]["weights"] (a save_weights file, ...)

The pipeline itself is the backend option `options={"pipeline": {...}}` (memsave.config
PipelineConfig); see runtime.py for how a call runs and passes/dynamo/shard_pipeline.py for the split.
"""

from memsave.distributed.deferred import defer_weights, save_weights
from memsave.distributed.launch import RankFailed, free_port, launch
from memsave.distributed.mesh import Mesh, clear_mesh, current_mesh, init_mesh, mesh_ranks
from memsave.distributed.runtime import last_runtime
from memsave.distributed.training import train_step

__all__ = [
    "RankFailed", "free_port", "launch",
    "Mesh", "clear_mesh", "current_mesh", "init_mesh", "mesh_ranks",
    "last_runtime", "train_step", "defer_weights", "save_weights",
]
