"""options={"budget": ...}: memsave.plan on a Dynamo graph, before AOTAutograd (a step of
pipeline.run_dynamo_steps). The graph's linear weights are the planned layers, its other weight
inputs count at their size, and one eager run of the graph on the example inputs measures the
call's working memory; the plan's quantize options then replace the config's for the rest of
the compile, and its table is the "budget" record of the report.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from memsave.budget.planner import Plan, output_tensor, plan_layers, relative_change
from memsave.graph.inputs import InputInfo
from memsave.memory.track import MemoryTracker

LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)
EMBEDDINGS = (torch.nn.functional.embedding,)


def graph_weights(gm: fx.GraphModule, real_inputs: Sequence[Any], inputs: Sequence[InputInfo],
                  tables: set[str]) -> dict[str, torch.Tensor]:
    """name -> weight of the parameters that only one linear or embedding call reads (as its
    weight); the embeddings' names are added to `tables`."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = {}
    for index, (node, info) in enumerate(zip(placeholders, inputs)):
        w = real_inputs[index]
        if info.weight is None or info.weight.kind != "parameter" or not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].target in LINEARS + EMBEDDINGS and len(users[0].args) > 1 \
                and users[0].args[1] is node:
            found[info.weight.name] = w
            if users[0].target in EMBEDDINGS:
                tables.add(info.weight.name)
    return found


def plan_graph(gm: fx.GraphModule, real_inputs: Sequence[Any], inputs: Sequence[InputInfo], limit: int) -> Plan:
    tables: set[str] = set()
    layers = graph_weights(gm, real_inputs, inputs, tables)
    planned = {id(w) for w in layers.values()}
    seen, fixed = set(), 0
    for info, value in zip(inputs, real_inputs):
        if info.weight is None or not isinstance(value, torch.Tensor) or id(value) in planned:
            continue
        ptr = value.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            fixed += value.untyped_storage().nbytes()
    with torch.no_grad(), MemoryTracker("cpu") as tracker:
        reference = output_tensor(gm(*real_inputs)).float()
    index = {id(value): i for i, value in enumerate(real_inputs)}

    def effect(name: str, approx: torch.Tensor) -> float:
        args = list(real_inputs)
        args[index[id(layers[name])]] = approx.to(layers[name].dtype)
        with torch.no_grad():
            return relative_change(output_tensor(gm(*args)), reference)

    return plan_layers(layers, fixed, tracker.stats.peak_bytes, limit, embeddings=frozenset(tables), effect=effect)
