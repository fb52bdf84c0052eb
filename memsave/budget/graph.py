"""options={"budget": ...}: memsave.plan on a Dynamo graph, before AOTAutograd (a step of
pipeline.run_dynamo_steps). The graph's linear weights are the planned layers, its other weight
inputs count at their size, and one eager run of the graph on the example inputs measures the
call's working memory; the plan's prune, factorize and quantize options then replace the
config's for the rest of the compile, and its table is the "budget" record of the report.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from memsave.budget.planner import (
    OutputChange,
    Plan,
    error_measure,
    kernel_allowance,
    measured_call,
    output_tensor,
    plan_layers,
    storage_bytes,
)
from memsave.graph.inputs import InputInfo

LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)
EMBEDDINGS = (torch.nn.functional.embedding,)


def graph_weights(gm: fx.GraphModule, real_inputs: Sequence[Any],
                  inputs: Sequence[InputInfo]) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """(name -> weight, the embedding tables' names) of the parameters that only one linear or
    embedding call reads (as its weight)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found, tables = {}, set()
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
    return found, frozenset(tables)


def _linear_rows(gm: fx.GraphModule) -> int:
    """The most activation rows a linear of the graph multiplies (Dynamo's example values)."""
    most = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LINEARS and node.args:
            x = getattr(node.args[0], "meta", {}).get("example_value")
            if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1]:
                most = max(most, int(x.numel()) // int(x.shape[-1]))
    return most


def plan_graph(gm: fx.GraphModule, real_inputs: Sequence[Any], inputs: Sequence[InputInfo], limit: int,
               pinned: dict[str, Any] | None = None) -> Plan:
    layers, tables = graph_weights(gm, real_inputs, inputs)
    weights = [value for info, value in zip(inputs, real_inputs) if info.weight is not None]
    fixed = storage_bytes(weights, {id(w) for w in layers.values()})
    reference, working = measured_call(gm, real_inputs)
    working += kernel_allowance(_linear_rows(gm), layers, tables)
    index = {id(value): i for i, value in enumerate(real_inputs)}
    change = OutputChange(reference, error_measure("auto", reference, _vocabularies(gm, real_inputs)))

    def effect(name: str, approx: torch.Tensor) -> float:
        args = list(real_inputs)
        args[index[id(layers[name])]] = approx.to(layers[name].dtype)
        with torch.no_grad():
            return change(output_tensor(gm(*args)))

    return plan_layers(layers, fixed, working, limit, embeddings=tables, effect=effect, measure=change.measure,
                       pinned=pinned)


def _vocabularies(gm: fx.GraphModule, real_inputs: Sequence[Any]) -> list[int]:
    """The row counts of the tables the graph's embedding lookups read (tied ones included):
    what memsave.plan's "auto" error measure compares the output's last dimension with."""
    placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    rows = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in EMBEDDINGS and len(node.args) > 1 and node.args[1] in placeholders:
            table = real_inputs[placeholders[node.args[1]]]
            if isinstance(table, torch.Tensor) and table.dim() == 2:
                rows.append(int(table.shape[0]))
    return rows
