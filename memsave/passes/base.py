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

from memsave.graph.inputs import WeightInfo
from memsave.graph.meta import PROVENANCE

if TYPE_CHECKING:
    from memsave.config import Config

STAGES = ("inference", "joint", "forward", "backward")
# node.meta key on a quantize node: the weight-cache key of the scales it uses, under which
# fold_weights caches the packed codes.
QPARAMS_KEY = "memsave_qparams_key"
# node.meta key on a get_attr node holding a tensor made from a user's weight by a pass (a
# pruned weight, a low-rank factor, sparse values): (the weight's name, a label such as "U").
# Later weight passes treat such constants as weights (quantize stores the factors in int4).
DERIVED_KEY = "memsave_derived"


@dataclass(frozen=True)
class PassResult:
    changed: bool
    notes: tuple[str, ...] = ()  # one line each, shown in the report (e.g. skipped layers, why)
    details: dict[str, Any] = field(default_factory=dict)  # per-pass facts (e.g. per-layer error)


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

    def weight_nodes(self, gm: fx.GraphModule) -> list[WeightNode]:
        """The graph's weights with real values: parameter/buffer placeholders, and constants
        a pass derived from them (DERIVED_KEY)."""
        found = []
        for node in gm.graph.nodes:
            if node.op == "placeholder" and node.name in self.weights:
                tensor = self.weight_tensor(node.name)
                if tensor is not None:
                    found.append(WeightNode(node, self.weights[node.name].name, None, tensor))
            elif node.op == "get_attr" and DERIVED_KEY in node.meta:
                name, part = node.meta[DERIVED_KEY]
                found.append(WeightNode(node, name, part, getattr(gm, node.target)))
        return found


@dataclass(frozen=True)
class WeightNode:
    node: fx.Node
    name: str  # the user's weight name (what include/exclude patterns match)
    part: str | None  # for derived weights, which part of it this is ("U", "values", "rows·V")
    tensor: torch.Tensor  # the real tensor (weight-cache key)

    @property
    def derived(self) -> bool:
        return self.part is not None

    @property
    def label(self) -> str:
        """For reports: the name, plus the part for derived weights ("...weight[U]")."""
        return self.name if self.part is None else f"{self.name}[{self.part}]"


def tag(node: fx.Node, pass_name: str) -> fx.Node:
    node.meta[PROVENANCE] = pass_name
    return node
