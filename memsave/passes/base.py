"""The contract every pass follows.

A pass is a plain function

    def some_pass(gm: fx.GraphModule, config: SomeConfig, ctx: PassContext) -> PassResult

that rewrites `gm` in place (or leaves it) and says whether it changed it. It tags the nodes
it makes with `node.meta["memsave_pass"] = <pass name>` (provenance, shown in debug dumps)
and gives every new node `meta["val"]`. Node counts, bytes before/after and the error are
measured around it by the pipeline, so a pass does not compute them itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from memsave.graph.meta import PROVENANCE

if TYPE_CHECKING:
    from memsave.config import Config

STAGES = ("inference", "joint", "forward", "backward")
# node.meta key on a quantize node: the weight-cache key of the scales it uses, under which
# fold_weights caches the packed codes.
QPARAMS_KEY = "memsave_qparams_key"


@dataclass(frozen=True)
class PassResult:
    changed: bool
    notes: tuple[str, ...] = ()  # one line each, shown in the report (e.g. skipped layers, why)
    details: dict[str, Any] = field(default_factory=dict)  # per-pass facts (e.g. per-layer error)


@dataclass(frozen=True)
class WeightInfo:
    """A graph input that holds a parameter or buffer of the user's model."""

    name: str  # dotted module path, e.g. "layers.0.mlp.up_proj.weight"
    kind: str  # "parameter" | "buffer"
    index: int  # position among the Dynamo graph's inputs


@dataclass
class PassContext:
    """What a pass may know besides the graph: where it runs and the real weights."""

    config: Config
    stage: str  # one of STAGES
    graph_id: int
    # placeholder name -> weight info, for placeholders that hold parameters/buffers.
    weights: dict[str, WeightInfo]
    # placeholder name -> the real tensor of that input on the first compile (None when the
    # compile only has fake values, e.g. a backward graph's saved activations).
    real_inputs: dict[str, Any] = field(default_factory=dict)

    def weight_tensor(self, placeholder: str) -> torch.Tensor | None:
        value = self.real_inputs.get(placeholder)
        return value if isinstance(value, torch.Tensor) else None


def tag(node: fx.Node, pass_name: str) -> fx.Node:
    node.meta[PROVENANCE] = pass_name
    return node
