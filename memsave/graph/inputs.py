"""What a Dynamo graph's inputs are: parameters and buffers of the user's model (by their
module path) or real inputs.

Dynamo passes parameters and buffers as graph inputs; where each came from is in the
placeholder's `grapharg.source` (`L['self']._modules['fc']._parameters['weight']`). The backend,
the tensor-parallel split and the pipeline runtime all name weights this way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx


@dataclass(frozen=True)
class WeightInfo:
    """A graph input that holds a parameter or buffer of the user's model."""

    name: str  # dotted module path, e.g. "layers.0.mlp.up_proj.weight"
    kind: str  # "parameter" | "buffer"
    index: int  # position among the Dynamo graph's inputs


@dataclass(frozen=True)
class InputInfo:
    source: str  # Dynamo's name for where the input came from, e.g. L['self']._modules['fc']...
    weight: WeightInfo | None


def describe_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[InputInfo]:
    """Name each Dynamo graph input and say whether it is a parameter or buffer of the model."""
    infos = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, (node, value) in enumerate(zip(placeholders, example_inputs)):
        grapharg = node.meta.get("grapharg")
        source = grapharg.source.name if grapharg is not None and grapharg.source is not None else node.name
        source = source() if callable(source) else str(source)
        weight = None
        if "._parameters[" in source or isinstance(value, torch.nn.Parameter):
            weight = WeightInfo(module_path(source), "parameter", index)
        elif "._buffers[" in source:
            weight = WeightInfo(module_path(source), "buffer", index)
        infos.append(InputInfo(source, weight))
    return infos


def module_path(source: str) -> str:
    """`L['self']._modules['layers']._modules['0']._parameters['weight']` → `layers.0.weight`."""
    parts = re.findall(r"\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)", source)
    names = [a or b for a, b in parts]
    # Drop the frame-local root (L['self'] / L['model'] / G['...']) and the container names.
    names = [n for n in names[1:] if n not in ("_modules", "_parameters", "_buffers")]
    return ".".join(names) or source
