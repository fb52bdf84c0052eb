"""Megatron's conjugate operators for tensor parallelism, as custom ops with autograd.

    tp_copy(x)    forward: identity          backward: all-reduce(grad)   (before a column-parallel linear)
    tp_gather(x)  forward: all-gather(x)     backward: own block of grad  (after a column-parallel linear
                                                                          whose output must be whole: the LM head)
    tp_reduce(x)  forward: all-reduce(x)     backward: identity           (after a row-parallel linear)

A column-parallel linear reads the same (replicated) input on every rank, and each rank's
input gradient is only its shard's part of the sum: `tp_copy` sums them. A row-parallel linear
gives each rank a partial sum of the output: `tp_reduce` completes it, and the gradient of a
sum is the same on every rank, so its backward passes it through.

They are opaque custom ops (torch.library.custom_op + register_fake + register_autograd), so
AOTAutograd traces them as single nodes in the forward and puts `tp_all_reduce` into the
backward, and Inductor calls them as extern kernels. The process group travels as its name (a
custom op cannot take a ProcessGroup); `group_name` resolves it on every call. A collective
must run on every rank of the group in the same order: the graphs are identical across ranks
(the same model and options compile the same way), so they do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def resolve_group(group_name: str) -> dist.ProcessGroup:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


@torch.library.custom_op("memsave::tp_all_reduce", mutates_args=())
def tp_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum of `x` over the ranks of the group (a new tensor; `x` is left alone)."""
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=resolve_group(group_name))
    return out


@tp_all_reduce.register_fake
def _(x, group_name):
    return torch.empty_like(x)


@torch.library.custom_op("memsave::tp_copy", mutates_args=())
def tp_copy(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Identity forward; the backward all-reduces the gradient (Megatron's copy_to_tp)."""
    return x.clone()  # a custom op's output may not alias its input


@tp_copy.register_fake
def _(x, group_name):
    return torch.empty_like(x)


def _tp_copy_setup(ctx, inputs, output):
    ctx.group_name = inputs[1]


def _tp_copy_backward(ctx, grad):
    return torch.ops.memsave.tp_all_reduce(grad, ctx.group_name), None


tp_copy.register_autograd(_tp_copy_backward, setup_context=_tp_copy_setup)


@torch.library.custom_op("memsave::tp_reduce", mutates_args=())
def tp_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """All-reduce forward; identity backward (Megatron's reduce_from_tp)."""
    return tp_all_reduce(x, group_name)


@tp_reduce.register_fake
def _(x, group_name):
    return torch.empty_like(x)


def _tp_reduce_backward(ctx, grad):
    return grad, None


tp_reduce.register_autograd(_tp_reduce_backward, setup_context=lambda ctx, inputs, output: None)


@torch.library.custom_op("memsave::tp_gather", mutates_args=())
def tp_gather(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """(..., F/N) blocks of every rank → (..., F), concatenated in rank order on the last dim;
    the backward keeps this rank's block of the gradient (Megatron's gather_from_tp)."""
    group = resolve_group(group_name)
    blocks = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(blocks, x.contiguous(), group=group)
    return torch.cat(blocks, dim=-1)


@tp_gather.register_fake
def _(x, group_name):
    world = dist.get_world_size(resolve_group(group_name))
    return x.new_empty((*x.shape[:-1], x.shape[-1] * world))


def _tp_gather_setup(ctx, inputs, output):
    ctx.group_name, ctx.size = inputs[1], inputs[0].shape[-1]


def _tp_gather_backward(ctx, grad):
    rank = dist.get_rank(resolve_group(ctx.group_name))
    return grad.narrow(-1, rank * ctx.size, ctx.size).contiguous(), None


tp_gather.register_autograd(_tp_gather_backward, setup_context=_tp_gather_setup)
