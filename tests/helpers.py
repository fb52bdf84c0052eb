"""Shared test helpers: ATen graphs as memsave's passes see them."""

from __future__ import annotations

import torch
import torch.fx as fx

from memsave.config import Config
from memsave.passes.base import PassContext


def aten_inference_graph(model: torch.nn.Module, *inputs) -> tuple[fx.GraphModule, list]:
    """The ATen inference graph AOTAutograd hands memsave, and the real inputs in its order."""
    from torch._dynamo.backends.common import aot_autograd

    captured = {}

    def backend(gm, example_inputs):
        captured["inputs"] = list(example_inputs)

        def inference(aten_gm, _):
            captured["gm"] = aten_gm
            return aten_gm

        return aot_autograd(fw_compiler=inference)(gm, example_inputs)

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    return captured["gm"], captured["inputs"]


def context_for(gm: fx.GraphModule, real_inputs: list, **config) -> PassContext:
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return PassContext(Config(debug=True, **config), "inference", 0, {}, dict(zip(names, real_inputs)))


def compile_and_run(model, *inputs, **options):
    """torch.compile with memsave (plain FX codegen), one no-grad call; the reports it made."""
    import memsave

    compiled = torch.compile(model, backend="memsave", options={"codegen": "fx", **options})
    with memsave.collect() as reports, torch.no_grad():
        out = compiled(*inputs)
    return compiled, out, reports


class LoweredGraphs:
    """Catch the ATen graphs memsave lowers, by stage (to look at what actually runs)."""

    def __init__(self, monkeypatch):
        import copy

        import memsave.backend as backend

        self.graphs: dict = {}
        original = backend.lower

        def lower(gm, example_inputs, **kwargs):
            self.graphs[kwargs.get("stage")] = copy.deepcopy(gm)
            return original(gm, example_inputs, **kwargs)

        monkeypatch.setattr(backend, "lower", lower)

    def targets(self, stage):
        return [n.target for n in self.graphs[stage].graph.nodes if n.op == "call_function"]

    def count(self, stage, target):
        return sum(n.target is target for n in self.graphs[stage].graph.nodes)

    def shapes(self, stage):
        return [tuple(v.shape) for n in self.graphs[stage].graph.nodes
                if isinstance(v := n.meta.get("val"), torch.Tensor)]

    def most_rows_over(self, stage, vocab):
        """The most rows any tensor with a vocab-sized dim has (weights have `hidden` rows,
        full logits have `tokens`)."""
        return max(
            v.numel() // vocab for n in self.graphs[stage].graph.nodes
            if n.op in ("placeholder", "call_function") and isinstance(v := n.meta.get("val"), torch.Tensor) and vocab in v.shape
        )

