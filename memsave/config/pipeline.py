"""pipeline: the graph cut into stages run by a pipeline schedule."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from memsave.config.base import FamilyConfig, OptionError


PIPELINE_SCHEDULES = ("gpipe", "1f1b")


def _parse_pipeline_name(name: str) -> dict[str, Any] | None:
    """`gpipe`, `1f1b`, `1f1b-2x8` (2 stages, 8 micro-batches) → PipelineConfig fields."""
    m = re.fullmatch(r"(gpipe|1f1b)(?:-(\d+)x(\d+))?", name)
    if m is None:
        return None
    fields_: dict[str, Any] = {"schedule": m.group(1)}
    if m.group(2) is not None:
        fields_.update(stages=int(m.group(2)), microbatches=int(m.group(3)))
    return fields_


@dataclass(frozen=True)
class PipelineConfig(FamilyConfig):
    """Pipeline parallelism: the graph is cut into stages, one per rank of the pipeline group.

    stages: number of stages (default: the size of the pipeline process group at compile time;
    it must equal that size). split_points: module names where stages 2..S begin (e.g.
    ["layers.2"]); leave out to cut automatically at repeated blocks, balancing each stage's
    estimated memory (weights + activations in flight under the schedule + bytes crossing its
    cuts). microbatches: micro-batches per step (default: stages; the batch must divide by it;
    1f1b needs at least as many as stages). schedule: "gpipe" or "1f1b".
    broadcast_outputs: every rank returns the last stage's output (False: non-last ranks return
    zeros of the right shape). compile_stages: run memsave's passes on each stage's graph.
    group: the torch.distributed process group whose ranks hold the stages, in rank order (None:
    the pipeline group of memsave.distributed.init_mesh, else the default group).
    weights: where this rank reads its stage's weights when the model was built without them
    (memsave.distributed.defer_weights): a file from memsave.distributed.save_weights (or any
    torch.save'd / .safetensors name -> tensor file), a name -> tensor mapping, or a callable
    name -> tensor. Only this rank's stage is read.
    """

    family: ClassVar[str] = "pipeline"
    name_pattern: ClassVar[str] = "'<gpipe/1f1b>[-<stages>x<microbatches>]'"
    name_parser: ClassVar = staticmethod(_parse_pipeline_name)
    name_example: ClassVar[str] = "1f1b-2x4"
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {}

    stages: int | None = None
    microbatches: int | None = None
    schedule: str = "1f1b"
    split_points: tuple[str, ...] | None = None
    broadcast_outputs: bool = True
    compile_stages: bool = True
    group: Any = None
    weights: Any = None

    def __post_init__(self):
        self._check_choice("schedule", self.schedule, PIPELINE_SCHEDULES)
        if not (self.weights is None or isinstance(self.weights, (str, os.PathLike, Mapping)) or callable(self.weights)):
            raise OptionError(
                "options['pipeline']['weights']: expected a file path, a name -> tensor mapping or a callable "
                f"name -> tensor, got {type(self.weights).__name__}"
            )
        if self.group is not None and not hasattr(self.group, "group_name"):
            raise OptionError(
                f"options['pipeline']['group']: expected a torch.distributed ProcessGroup or None "
                f"(the mesh's pipeline group, else the default group), got {type(self.group).__name__}"
            )
        for name in ("broadcast_outputs", "compile_stages"):
            self._check_choice(name, getattr(self, name), (True, False))
        for name in ("stages", "microbatches"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise OptionError(f"options['pipeline'][{name!r}]: {value!r} is not a positive integer")
        if self.split_points is not None:
            points = (self.split_points,) if isinstance(self.split_points, str) else tuple(self.split_points)
            if not points or not all(isinstance(p, str) and p for p in points) or len(set(points)) != len(points):
                raise OptionError(
                    f"options['pipeline']['split_points']: {self.split_points!r} must be distinct module names "
                    "where stages 2..S begin, e.g. ['layers.2']"
                )
            object.__setattr__(self, "split_points", points)
            if self.stages is not None and len(points) != self.stages - 1:
                raise OptionError(
                    f"options['pipeline']: {len(points)} split_points make {len(points) + 1} stages, "
                    f"but stages={self.stages}"
                )
        if self.stages is not None:
            self.check_microbatches(self.stages)

    def check_microbatches(self, stages: int) -> int:
        """The micro-batch count for `stages` stages, or an OptionError saying why not."""
        microbatches = self.microbatches or stages
        if self.schedule == "1f1b" and microbatches < stages:
            raise OptionError(
                f"options['pipeline']: schedule '1f1b' needs microbatches >= stages, got "
                f"{microbatches} < {stages}; use more micro-batches or schedule 'gpipe'"
            )
        return microbatches

    def describe(self) -> str:
        stages = self.stages or "world"
        return f"{self.schedule} {stages} stages x {self.microbatches or 'stages'} micro-batches"
