"""Training a pipelined model: `train_step(compiled, *inputs, target=..., loss_fn=...)`.

Under a pipeline schedule the backward is part of the step (1F1B interleaves the micro-batches'
forwards and backwards), so the compiled call cannot return a loss for the user to call
`.backward()` on. `train_step` runs the call with a request the runtime reads: the schedule
computes `loss_fn(output_microbatch, target_microbatch)` on the last stage, runs the backward
through every stage, and leaves each rank's gradients in its own stage's `param.grad`
(averaged over micro-batches, so a mean-reduced loss gives the full batch's gradients). Every
rank gets the mean loss back. Then step the optimizer as usual on every rank; parameters of
other stages have no gradient there and are skipped by torch's optimizers.

    compiled = torch.compile(model, backend="memsave", dynamic=True, options={"pipeline": "1f1b"})
    loss = memsave.distributed.train_step(compiled, input_ids, target=labels, loss_fn=my_loss)
    optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from memsave.distributed.runtime import TRAIN_REQUEST, TrainRequest, last_runtime


def train_step(
    compiled: Callable,
    *inputs: torch.Tensor,
    target: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """One forward + backward through the pipeline; returns the mean loss on every rank.

    `loss_fn` must be the same object on every call (schedules are cached by it) and return
    the mean loss of one micro-batch.
    """
    if not torch.is_grad_enabled():
        raise RuntimeError("memsave.distributed.train_step: called under torch.no_grad(); gradients are needed")
    losses: list = []
    token = TRAIN_REQUEST.set(TrainRequest(target, loss_fn, losses))
    try:
        compiled(*inputs)
    finally:
        TRAIN_REQUEST.reset(token)
    runtime = last_runtime()
    if runtime is None:
        raise RuntimeError(
            "memsave.distributed.train_step: the compiled call did not run a pipeline; compile with "
            "options={'pipeline': ...}"
        )
    is_last = runtime.stage_index == runtime.n_stages - 1
    loss = torch.stack([l.detach() for l in losses]).mean() if is_last else torch.zeros(())
    dist.broadcast(loss, src=runtime.ranks[-1], group=runtime.group)
    return loss
