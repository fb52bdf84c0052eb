"""The rank grid: pipeline stages × tensor-parallel shards.

Ranks are laid out as `rank = pp_rank * tp_size + tp_rank`: the tp_size ranks of one pipeline
stage are neighbours (on a multi-GPU node they share the fastest links, which tensor parallel
needs most: it all-reduces every layer, while pipeline parallel sends one activation per
micro-batch). On 4 ranks with pp_size=2, tp_size=2:

    pp_rank 0: ranks 0, 1  (tp group {0, 1})     pipeline groups: {0, 2} and {1, 3}
    pp_rank 1: ranks 2, 3  (tp group {2, 3})

`init_mesh` must be called on every rank, in the same order (`new_group` is collective). The
pipeline pass finds the current mesh with `current_mesh()`; without one it uses the whole
world as one pipeline group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from memsave.config import OptionError


@dataclass(frozen=True)
class Mesh:
    pp_size: int
    tp_size: int
    rank: int
    pp_group: dist.ProcessGroup  # the ranks holding the other stages of this rank's shard
    tp_group: dist.ProcessGroup  # the ranks holding the other shards of this rank's stage
    pp_ranks: tuple[int, ...]  # global ranks of pp_group, stage order
    tp_ranks: tuple[int, ...]

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size


def mesh_ranks(pp_size: int, tp_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(pipeline groups, tensor-parallel groups) as lists of global ranks. Pure: testable anywhere."""
    for name, value in (("pp_size", pp_size), ("tp_size", tp_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"memsave.distributed mesh: {name} must be a positive integer, got {value!r}")
    pp_groups = [[p * tp_size + t for p in range(pp_size)] for t in range(tp_size)]
    tp_groups = [[p * tp_size + t for t in range(tp_size)] for p in range(pp_size)]
    return pp_groups, tp_groups


_CURRENT: Mesh | None = None


def init_mesh(pp_size: int, tp_size: int = 1) -> Mesh:
    """Build the pipeline and tensor-parallel groups on an initialized default process group."""
    global _CURRENT
    if not dist.is_initialized():
        raise RuntimeError("memsave.distributed.init_mesh: call torch.distributed.init_process_group first")
    world = dist.get_world_size()
    if pp_size * tp_size != world:
        raise OptionError(
            f"memsave.distributed.init_mesh: pp_size {pp_size} x tp_size {tp_size} = {pp_size * tp_size} "
            f"ranks, but the world has {world}"
        )
    rank = dist.get_rank()
    pp_groups, tp_groups = mesh_ranks(pp_size, tp_size)
    mine_pp = mine_tp = None
    # Every rank creates every group, in the same order: new_group is a collective call.
    for ranks in pp_groups:
        group = dist.new_group(ranks) if len(ranks) < world else dist.group.WORLD
        if rank in ranks:
            mine_pp = (group, tuple(ranks))
    for ranks in tp_groups:
        group = dist.new_group(ranks) if len(ranks) < world else dist.group.WORLD
        if rank in ranks:
            mine_tp = (group, tuple(ranks))
    _CURRENT = Mesh(pp_size, tp_size, rank, mine_pp[0], mine_tp[0], mine_pp[1], mine_tp[1])
    return _CURRENT


def current_mesh() -> Mesh | None:
    return _CURRENT


def clear_mesh() -> None:
    global _CURRENT
    _CURRENT = None


def pipeline_group(group: dist.ProcessGroup | None = None) -> tuple[dist.ProcessGroup, tuple[int, ...]]:
    """The pipeline group of this rank and its ranks in stage order: `group` where given (its
    ranks in order), else the mesh's, else the world."""
    if not dist.is_initialized():
        raise OptionError(
            "options['pipeline']: torch.distributed is not initialized; launch with torchrun "
            "(torchrun --nproc-per-node N script.py) and call torch.distributed.init_process_group, "
            "or use memsave.distributed.launch"
        )
    if group is not None:
        ranks = tuple(sorted(dist.get_process_group_ranks(group)))
        if dist.get_rank() not in ranks:
            raise OptionError(f"options['pipeline']['group']: this rank ({dist.get_rank()}) is not in it (ranks {ranks})")
        return group, ranks
    if _CURRENT is not None:
        return _CURRENT.pp_group, _CURRENT.pp_ranks
    return dist.group.WORLD, tuple(range(dist.get_world_size()))
