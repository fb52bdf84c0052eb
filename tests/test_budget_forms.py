"""memsave.plan's prune and low-rank forms: their bytes are what the compile holds, their
predicted noise is the compiled layer's, and a plan picks them where they are the best use of
the bytes."""

import json

import pytest
import torch
from helpers import assert_compiled_as_planned
from torch import nn

import memsave
from memsave.budget.candidates import (
    FORMS,
    FORMS_BY_NAME,
    Form,
    reconstructed,
    stored_bytes,
)
from memsave.budget.planner import LayerPlan, OutputChange, Plan, working_bytes
from memsave.budget.sensitivity import input_moment, relative_output_noise

NEW_FORMS = [f for f in FORMS if f.structure is not None or f.share is not None]


class Parallel(nn.Module):
    """One bias-free linear per form, all reading the same input: each output is one layer's."""

    def __init__(self, count: int, n: int = 64, k: int = 256):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(k, n, bias=False) for _ in range(count))

    def forward(self, x):
        return tuple(layer(x) for layer in self.layers)


def _inputs(k: int = 256):
    # Input channels of very different scales: Wanda's scores and SVD-LLM's whitening differ
    # from plain magnitude and SVD only then.
    g = torch.Generator().manual_seed(1)
    scale = torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)]
    return [torch.randn(32, k, generator=g) * scale for _ in range(3)]


@pytest.mark.parametrize("calibrated", [True, False], ids=["wanda+svd-llm", "magnitude+svd"])
def test_each_form_holds_its_bytes_and_computes_its_predicted_noise(calibrated):
    """Every prune and low-rank form, on one layer each, compiled from the plan's options: the
    bytes memsave holds are the form's count, and the layer's measured relative output noise on
    the calibration inputs is the one the planner predicts from the Gram matrix (the same
    inputs, so equal up to float rounding)."""
    model = Parallel(len(NEW_FORMS)).eval()
    batches = _inputs()
    if calibrated:
        memsave.calibrate(model, [(x,) for x in batches], progress=False, hessian=True)
    weights = {f"layers.{i}.weight": layer.weight for i, layer in enumerate(model.layers)}
    x = torch.cat(batches)
    # The planner's Gram matrix where calibrated; without, the inputs' own (the planner would
    # score the weight's error then, which no output measures).
    gram = (x.t() @ x / x.shape[0]).double() if not calibrated else None
    layers, predicted = [], {}
    for (name, w), form in zip(weights.items(), NEW_FORMS):
        settings = form.for_weight(w)
        assert settings is not None, form.name
        method = {"prune": "wanda" if calibrated else "magnitude", "factorize": "svd-llm" if calibrated else "svd"}
        assert all(settings[f]["method"] == method[f] for f in settings if f in method)
        size = stored_bytes(*w.shape, 4, settings)
        moment = input_moment(w) if calibrated else gram
        predicted[name] = relative_output_noise(w, reconstructed(w, settings, name), moment)
        layers.append(LayerPlan(name, tuple(w.shape), form.name, size, predicted[name], settings=settings))
    plan = Plan(10**9, tuple(layers), 0, 0, "test", calibrated)
    options = json.loads(json.dumps(plan.options))
    # Products in fp32: on a CPU prefill codegen may otherwise pick bf16 kernels (a separate,
    # reported error, not the stored form's; the plan scores the form).
    options["quantize"]["compute_dtype"] = "float32"
    with torch.no_grad():
        expected = model(x)
    with memsave.collect() as reports:
        compiled = torch.compile(model, backend="memsave", options={**options, "codegen": "fx"})
        with torch.no_grad():
            out = compiled(x)
    assert_compiled_as_planned(plan, reports, weights)
    for layer, y, y_hat in zip(plan.layers, expected, out):
        measured = ((y_hat - y).pow(2).sum() / y.pow(2).sum()).item()
        assert measured == pytest.approx(predicted[layer.name], rel=1e-3), layer.form
        assert 1e-7 < measured < 1, layer.form  # lossy, and not everything lost


def test_prune_and_low_rank_forms_are_for_linears_whose_storage_they_shrink():
    sparse, two_four, low_rank = (FORMS_BY_NAME[n] for n in ("sparse-50", "2:4+int8", "lowrank-1/32+int8"))
    for form in (sparse, two_four, low_rank):
        assert form.settings(64, 256, embedding=True) is None  # embedding tables: quantized forms only
    assert two_four.settings(64, 258) is None  # 2:4 needs K divisible by 4
    # Unstructured storage only where values + a bit per weight take less than dense (the prune
    # pass keeps the others dense): 90 % of 1-byte weights plus the bitmask do not.
    light = Form("sparse-10", structure="unstructured", sparsity=0.1)
    assert light.settings(64, 256, 4) is not None and light.settings(64, 256, 1) is None
    assert low_rank.settings(8, 8) is None and low_rank.settings(256, 256)["factorize"]["rank"] == 4
    # Bytes: int8 values and an fp16 scale per row + 2-bit positions; U (256, 4) and V (4, 256)
    # in int8 with an fp16 scale per row, U's rows of 4 codes padded to 8 (codes pack 8 at a time).
    assert stored_bytes(64, 256, 4, two_four.settings(64, 256)) == 64 * (128 + 2) + 64 * 32
    assert stored_bytes(256, 256, 4, low_rank.settings(256, 256)) == 256 * (8 + 2) + 4 * (256 + 2)


class Structured(nn.Module):
    """Four 256x256 layers on one input, each a kind of weight one form stores best: exactly
    rank 4, exactly 2:4 sparse, 90% zeros (26 weights kept per row), and dense."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.low_rank, self.two_four, self.sparse, self.dense = (nn.Linear(256, 256, bias=False) for _ in range(4))
        with torch.no_grad():
            self.low_rank.weight.copy_(torch.randn(256, 4) @ torch.randn(4, 256) / 32)
            groups = self.two_four.weight.view(256, 64, 4)
            groups[..., 1::2] = 0  # positions 1 and 3 of every 4
            drop = torch.rand(256, 256).argsort(dim=1)[:, 26:]
            self.sparse.weight.scatter_(1, drop, 0.0)

    def forward(self, x):
        return self.low_rank(x) + self.two_four(x) + self.sparse(x) + self.dense(x)


def test_a_plan_picks_low_rank_and_pruning_where_they_store_a_layer_best_and_compiles_to_them():
    model = Structured().eval()
    batches = [(x,) for x in _inputs()]
    x = batches[0][0][:8]
    dense = 4 * 256 * 256 * 4
    budget = int(0.15 * dense) + working_bytes(model, (x,))
    plan = memsave.plan(model, x, budget=budget, calibration=batches)
    forms = {layer.name.split(".")[0]: layer.form for layer in plan.layers}
    # Stored exactly in a few KiB: the factors of rank 4 (fp32 or int8), where int2 of the
    # weight would take 24 KiB and lose 4% of the output.
    assert forms["low_rank"] in ("lowrank-1/32", "lowrank-1/32+int8"), forms
    # Its kept values only (none of the zeros), quantized or not; the zeros cost nothing.
    assert forms["two_four"].startswith("2:4"), forms
    # Values + bitmask: 13.5 % of dense and exact, where int4 g128 takes as much and is not.
    assert forms["sparse"] == "sparse-90", forms
    assert plan.total_bytes <= budget

    # The options round-trip through JSON and compile to exactly those forms and bytes.
    with torch.no_grad():
        expected = model(x)
    options = json.loads(json.dumps(plan.options))
    assert "prune" in options and "factorize" in options
    weights = {f"{n}.weight": m.weight for n, m in model.named_children()}
    with memsave.collect() as reports:
        compiled = torch.compile(model, backend="memsave", options={**options, "codegen": "fx"})
        with torch.no_grad():
            out = compiled(x)
    assert_compiled_as_planned(plan, reports, weights)
    assert plan.measure == "relative"  # not logits: no embedding table's rows in the output
    noise = OutputChange(expected, plan.measure)(out)
    assert plan.predicted_error / 3 < noise < 3 * plan.predicted_error, (noise, plan.predicted_error)


def test_the_budget_option_compiles_prune_and_low_rank_choices():
    model = Structured().eval()
    batches = [(x,) for x in _inputs()]
    x = batches[0][0][:8]
    memsave.calibrate(model, batches, progress=False)
    budget = int(0.15 * 4 * 256 * 256 * 4) + working_bytes(model, (x,))
    reference = memsave.plan(model, x, budget=budget)  # what the option must choose too
    weights = {f"{n}.weight": m.weight for n, m in model.named_children()}
    with memsave.collect() as reports:
        compiled = torch.compile(model, backend="memsave", options={"budget": budget, "codegen": "fx"})
        with torch.no_grad():
            compiled(x)
    records = {r.name: r for report in reports for r in report.records}
    assert records["budget"].details["forms"] == {layer.name: layer.form for layer in reference.layers}
    assert records["prune"].changed and records["factorize"].changed
    assert_compiled_as_planned(reference, reports, weights)
