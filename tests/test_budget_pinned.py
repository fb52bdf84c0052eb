"""Choices pinned beside a budget: the weights the user's quantize / prune / factorize options
name keep what those give them; the planner chooses for the rest, within what is left."""

import json

import pytest
import torch
from helpers import assert_compiled_as_planned
from test_budget_plan import TwoLayers, _batches

import memsave
from memsave.budget.candidates import stored_bytes
from memsave.budget.planner import working_bytes


def _setup(share=0.3):
    model = TwoLayers().eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    dense = sum(p.numel() * 4 for p in model.parameters())
    return model, ids, int(share * dense) + working_bytes(model, (ids,))


# A choice the planner would not make at this budget (int2 costs the head far more error than
# the bytes it saves are worth), with a family field that is not per layer.
HEAD_INT2 = {"quantize": {"include": ["head.weight"], "bits": 2, "group_size": 32, "symmetric": False,
                          "compute_dtype": "bfloat16"}}
HEAD_SETTINGS = {"quantize": {"bits": 2, "group_size": 32, "symmetric": False, "method": "rtn"}}


def test_a_pinned_layer_keeps_its_form_and_the_plan_fits_the_rest_around_it():
    model, ids, budget = _setup()
    plan = memsave.plan(model, ids, budget=budget, calibration=_batches(), options=HEAD_INT2)
    layers = {layer.name: layer for layer in plan.layers}
    head = layers["head.weight"]
    assert head.pinned and not any(layer.pinned for name, layer in layers.items() if name != "head.weight")
    assert head.settings == HEAD_SETTINGS
    assert head.form == "pinned int2-g32-asym-rtn" and list(head.candidates) == [head.form]  # its only choice
    assert head.bytes == stored_bytes(64, 128, 4, head.settings) and head.error > 0
    assert plan.total_bytes <= budget
    # Unpinned, the planner compresses the head differently at this budget: the pin changed the plan.
    free = {layer.name: layer for layer in memsave.plan(model, ids, budget=budget).layers}
    assert free["head.weight"].settings != head.settings
    # plan.options holds both, and the pinned family's other fields (compute_dtype) stay.
    options = json.loads(json.dumps(plan.options))
    assert options["quantize"]["overrides"]["head.weight"] == head.settings["quantize"]
    assert options["quantize"]["compute_dtype"] == "bfloat16"
    weights = dict(model.named_parameters())
    with memsave.collect() as reports:
        compiled = torch.compile(model, backend="memsave", options={**options, "codegen": "fx"})
        with torch.no_grad():
            compiled(ids)
    assert_compiled_as_planned(plan, reports, weights)
    torch._dynamo.reset()


def test_the_budget_option_takes_pinned_options_beside_it():
    model, ids, budget = _setup()
    memsave.calibrate(model, _batches(), progress=False, hessian=True)
    expected = memsave.plan(model, ids, budget=budget, options=HEAD_INT2)
    weights = dict(model.named_parameters())
    with memsave.collect() as reports:
        compiled = torch.compile(model, backend="memsave", options={"budget": budget, **HEAD_INT2, "codegen": "fx"})
        with torch.no_grad():
            compiled(ids)
    records = {r.name: r for report in reports for r in report.records}
    assert records["budget"].details["forms"] == {layer.name: layer.form for layer in expected.layers}
    assert records["budget"].details["forms"]["head.weight"] == "pinned int2-g32-asym-rtn"
    assert_compiled_as_planned(expected, reports, weights)
    assert records["budget"].details["total_bytes"] <= budget
    torch._dynamo.reset()


def test_excluded_layers_are_pinned_dense_and_a_pin_for_every_layer_is_a_check():
    model, ids, budget = _setup(0.9)
    # include "*": every weight is named, so nothing is left to plan; exclude pins "up" dense.
    options = {"quantize": {"bits": 4, "group_size": 32, "symmetric": False, "method": "rtn", "exclude": ["up.weight"]}}
    plan = memsave.plan(model, ids, budget=budget, options=options)
    forms = {layer.name: layer.form for layer in plan.layers}
    assert all(layer.pinned for layer in plan.layers)
    assert forms == {"embed.weight": "pinned dense", "up.weight": "pinned dense",
                     "down.weight": "pinned int4-g32-asym-rtn", "head.weight": "pinned int4-g32-asym-rtn"}
    # A budget those pins do not fit is an error that names the smallest plan.
    with pytest.raises(memsave.BudgetError, match="smallest plan memsave found needs .* the 4 pinned ones as pinned"):
        memsave.plan(model, ids, budget=int(0.9 * plan.total_bytes), options=options)


def test_pinned_prune_and_factorize_are_counted_as_the_passes_store_them():
    model, ids, budget = _setup(0.4)
    options = {"prune": {"structure": "2:4", "include": ["down.weight"]},
               "factorize": {"method": "svd", "rank": 8, "include": ["up.weight"]}}
    plan = memsave.plan(model, ids, budget=budget, options=options)
    layers = {layer.name: layer for layer in plan.layers}
    assert layers["down.weight"].settings["prune"] == {"structure": "2:4", "method": "magnitude"}
    assert layers["up.weight"].settings["factorize"] == {"method": "svd", "rank": 8}
    weights = dict(model.named_parameters())
    with memsave.collect() as reports:
        compiled = torch.compile(model, backend="memsave", options={**plan.options, "codegen": "fx"})
        with torch.no_grad():
            compiled(ids)
    assert_compiled_as_planned(plan, reports, weights)
    torch._dynamo.reset()


@pytest.mark.parametrize("options, message", [
    ({"quantize": "log4"}, "pinned quantization beside a budget: affine"),
    ({"quantize": "int4-awq"}, "pinned quantization beside a budget: affine"),
    ({"prune": "structured-50"}, "pinned pruning beside a budget: '2:4', '4:8' or 'unstructured'"),
    ({"factorize": {"energy": 0.9, "reduction": None}}, "pinned factorization beside a budget: a 'rank'"),
    ({"factorize": {"rank": 500}}, "larger than its"),
    ({"prune": "2:4", "factorize": "svd-50"}, "pruned and factorized"),
])
def test_pins_the_planner_cannot_count_are_refused_by_name(options, message):
    model, ids, budget = _setup()
    with pytest.raises(ValueError, match=message):
        memsave.plan(model, ids, budget=budget, options=options)
