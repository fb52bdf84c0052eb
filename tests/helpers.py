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



def assert_compiled_as_planned(plan, reports, weights: dict) -> None:
    """Each planned layer got exactly its form in the compile that `reports` describe: pruned
    with its structure and method, factorized at its rank, quantized (the weight, its kept
    values, or both factors) with its bits, and memsave holds exactly the plan's bytes for it
    (WeightCache.held_bytes of `weights[name]`: what is left of the original + its stored forms)."""
    from memsave.config import PruneConfig
    from memsave.weights import WEIGHTS

    records = {r.name: r for report in reports for r in report.records}
    pruned = records["prune"].details["layers"] if "prune" in records else {}
    factored = records["factorize"].details["layers"] if "factorize" in records else {}
    quantized = dict(q.split(": ", 1) for q in records["quantize"].details["quantized"]) if "quantize" in records else {}
    for layer in plan.layers:
        settings, name = layer.settings, layer.name
        if "prune" in settings:
            assert pruned[name]["describe"] == PruneConfig(**settings["prune"]).describe(), name
            assert pruned[name]["stored"] != "dense" and pruned[name]["bytes_after"] < pruned[name]["bytes_before"], name
        else:
            assert name not in pruned, name
        if "factorize" in settings:
            assert (factored[name]["rank"], factored[name]["method"]) == (settings["factorize"]["rank"],
                                                                          settings["factorize"]["method"]), name
        else:
            assert name not in factored, name
        parts = ["[values]"] if "prune" in settings else ["[U]", "[V]"] if "factorize" in settings else [""]
        expected = {name + part for part in parts} if "quantize" in settings else set()
        assert {label for label in quantized if label.split("[")[0] == name} == expected, name
        for label in expected:
            assert quantized[label].startswith(f"int{settings['quantize']['bits']} "), (label, quantized[label])
        assert WEIGHTS.held_bytes([weights[name]]) == layer.bytes, (name, layer.form)
