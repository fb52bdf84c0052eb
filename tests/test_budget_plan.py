"""memsave.plan: byte budgets, the knapsack, per-layer sensitivity, and plans that compile."""

import itertools
import json
import random

import pytest
import torch
from helpers import assert_compiled_as_planned
from torch import nn

import memsave
from memsave.budget import knapsack
from memsave.budget.candidates import FORMS_BY_NAME, reconstructed, stored_bytes
from memsave.budget.planner import OutputChange, error_measure
from memsave.budget.sensitivity import relative_output_noise
from memsave.config.units import parse_bytes


def test_budgets_are_read_as_people_write_them():
    assert parse_bytes("24MiB") == 24 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("800 kb") == 800_000
    assert parse_bytes(4096) == 4096
    for bad in ("24 parsecs", "-3MiB", 0, "", True, None):
        with pytest.raises(ValueError, match="budget"):
            parse_bytes(bad)


def _brute_force(costs, sizes, capacity):
    best = None
    for picked in itertools.product(*[range(len(s)) for s in sizes]):
        size = sum(sizes[i][o] for i, o in enumerate(picked))
        cost = sum(costs[i][o] for i, o in enumerate(picked))
        if size <= capacity and (best is None or cost < best[0] - 1e-12):
            best = (cost, picked)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_knapsack_is_exact_and_the_heuristic_is_feasible(seed):
    rng = random.Random(seed)
    layers = rng.randint(2, 5)
    sizes = [[rng.randint(1, 40) * 2**20 for _ in range(rng.randint(1, 4))] for _ in range(layers)]
    costs = [[rng.random() for _ in s] for s in sizes]
    capacity = rng.randint(sum(min(s) for s in sizes), sum(max(s) for s in sizes))
    expected = _brute_force(costs, sizes, capacity)
    picked, solver = knapsack.choose(costs, sizes, capacity)
    assert solver == "highs"
    assert sum(costs[i][o] for i, o in enumerate(picked)) == pytest.approx(expected[0], abs=1e-9)
    greedy = knapsack._greedy(costs, sizes, capacity)
    assert sum(sizes[i][o] for i, o in enumerate(greedy)) <= capacity
    assert sum(costs[i][o] for i, o in enumerate(greedy)) >= expected[0] - 1e-9


def test_knapsack_names_the_smallest_plan_when_nothing_fits():
    with pytest.raises(knapsack.BudgetError, match="smallest plan needs 30 bytes") as info:
        knapsack.choose([[0.0, 1.0], [0.0, 1.0]], [[20, 10], [40, 20]], 29)
    assert info.value.smallest_bytes == 30


def test_output_noise_weighs_the_input_channels_that_carry_signal():
    w = torch.randn(8, 4)
    approx = w.clone()
    approx[:, 3] += 0.1  # an error only in input channel 3
    quiet = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1e-4]))  # channel 3 barely used
    loud = torch.diag(torch.tensor([1e-4, 1e-4, 1e-4, 1.0]))
    assert relative_output_noise(w, approx, quiet) < 1e-3 * relative_output_noise(w, approx, loud)
    assert relative_output_noise(w, w, loud) == 0.0
    # Identity moment: the weight's own relative error.
    expected = (approx - w).pow(2).sum() / w.pow(2).sum()
    assert relative_output_noise(w, approx, None) == pytest.approx(expected.item(), rel=1e-6)


def test_logits_are_judged_by_their_distribution_and_other_outputs_by_their_size():
    logits = torch.randn(2, 5, 64)
    # "auto": logits when the last dimension is a vocabulary (an embedding table's rows)
    assert error_measure("auto", logits, [64]) == "kl"
    assert error_measure("auto", logits, [30, 100]) == "relative"
    assert error_measure("relative", logits, [64]) == "relative"
    for bad in ("cosine", "noise"):  # "noise" names a plan made without a model run, not a choice
        with pytest.raises(ValueError, match="valid choices: 'auto', 'kl', 'relative'"):
            error_measure(bad, logits, [64])
    kl, relative = OutputChange(logits, "kl"), OutputChange(logits, "relative")
    # Moving every logit of a position alike changes no probability: no KL, a large relative change.
    shifted = logits + torch.randn(2, 5, 1)
    assert kl(shifted) < 1e-6 and relative(shifted) > 0.1
    # A real change: KL(p || q) as torch computes it, per position, averaged.
    other = logits + 0.3 * torch.randn(2, 5, 64)
    expected = torch.nn.functional.kl_div(other.log_softmax(-1), logits.log_softmax(-1), log_target=True,
                                          reduction="none").sum(-1).mean()
    assert kl(other) == pytest.approx(expected.item(), rel=1e-5)
    assert relative(other) == pytest.approx(((other - logits).pow(2).sum() / logits.pow(2).sum()).item(), rel=1e-6)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 128)
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 128)
        self.head = nn.Linear(128, 64, bias=False)

    def forward(self, ids):
        return self.head(self.down(torch.relu(self.up(self.embed(ids)))))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 64, (4, 16), generator=g),) for _ in range(3)]


@pytest.mark.parametrize("share", [0.45, 0.2])
def test_a_plan_fits_its_budget_and_compiles_to_exactly_its_choices(share):
    model = TwoLayers().eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    dense = sum(p.numel() * 4 for p in model.parameters())
    budget = int(share * dense) + memsave.budget.planner.working_bytes(model, (ids,))
    plan = memsave.plan(model, ids, budget=budget, calibration=_batches())
    assert plan.calibrated and plan.solver == "highs"
    assert plan.total_bytes <= budget and plan.weight_bytes < share * dense
    if share == 0.2:  # this tight, the embedding table is compressed too
        assert plan.layers[0].form != "dense" and plan.options["quantize"]["embeddings"] is True
    assert [layer.name for layer in plan.layers] == ["embed.weight", "up.weight", "down.weight", "head.weight"]
    assert [layer.embedding for layer in plan.layers] == [True, False, False, False]
    # Each layer's error is that form's, as the candidates scored it, and the bytes its formula.
    weights = dict(model.named_parameters())
    for layer in plan.layers:
        assert layer.candidates[layer.form] == (layer.bytes, layer.error)
        assert layer.bytes == stored_bytes(*layer.shape, 4, layer.settings)
        assert layer.settings == FORMS_BY_NAME[layer.form].for_weight(weights[layer.name], embedding=layer.embedding)
    assert any(layer.form != "dense" for layer in plan.layers)

    # The options are plain JSON and compile to exactly the planned forms and bytes.
    with torch.no_grad():
        expected = model(ids)  # before compiling: the compile releases the quantized originals
    options = json.loads(json.dumps(plan.options))
    with memsave.collect() as reports:
        compiled = torch.compile(model, backend="memsave", options={**options, "codegen": "fx"})
        with torch.no_grad():
            out = compiled(ids)
    assert_compiled_as_planned(plan, reports, weights)
    records = [r for report in reports for r in report.records if r.name == "quantize"]
    quantized = dict(q.split(": ", 1) for r in records for q in r.details["quantized"])
    assert quantized == {layer.name: FORMS_BY_NAME[layer.form].scheme().describe()
                         for layer in plan.layers if layer.form != "dense"}
    # The predicted error is the model output's change, summed over layers from each layer's
    # measured gain: the compiled model's measured change is that, within a factor of 3. The
    # output is logits over the embedding table's 64 rows, so the change is their KL divergence.
    assert plan.measure == "kl"
    noise = OutputChange(expected, plan.measure)(out)
    assert plan.predicted_error / 3 < noise < 3 * plan.predicted_error, (noise, plan.predicted_error)
    assert all(layer.gain > 0 for layer in plan.layers)
    torch._dynamo.reset()


def test_a_tighter_budget_never_predicts_less_error():
    model = TwoLayers().eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    working = memsave.budget.planner.working_bytes(model, (ids,))
    dense = sum(p.numel() * 4 for p in model.parameters())
    errors = [memsave.plan(model, ids, budget=int(f * dense) + working).predicted_error for f in (0.9, 0.5, 0.3, 0.2)]
    assert errors == sorted(errors) and errors[0] < errors[-1]


def test_a_budget_that_cannot_be_met_names_the_smallest_plan():
    model = TwoLayers().eval()
    ids = torch.randint(0, 64, (2, 16))
    with pytest.raises(memsave.BudgetError, match="smallest plan memsave found needs") as info:
        memsave.plan(model, ids, budget="10KiB")
    assert info.value.smallest_bytes > 10 * 1024


def test_weights_shared_with_an_embedding_are_not_planned():
    model = TwoLayers().eval()
    model.head.weight = model.embed.weight  # tied (64 x 128 both)
    plan = memsave.plan(model, torch.randint(0, 64, (1, 8)), budget="1GiB")
    assert [layer.name for layer in plan.layers] == ["up.weight", "down.weight"]


def test_reconstruction_is_what_the_quantize_pass_stores():
    w = nn.Parameter(torch.randn(32, 128))
    for name in ("int8", "int4-g32", "int2-g32"):
        approx = reconstructed(w, FORMS_BY_NAME[name])
        assert approx.shape == w.shape and not torch.equal(approx, w)
        assert relative_output_noise(w, approx, None) < {"int8": 1e-4, "int4-g32": 2e-2, "int2-g32": 0.3}[name]


def test_the_budget_option_plans_and_compiles_in_one_call():
    model = TwoLayers().eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    memsave.calibrate(model, _batches(), progress=False)
    with torch.no_grad():
        expected = model(ids)
    dense = sum(p.numel() * 4 for p in model.parameters())
    budget = int(0.45 * dense) + memsave.budget.planner.working_bytes(model, (ids,))
    reference = memsave.plan(model, ids, budget=budget)  # what the option must choose too
    weights = dict(model.named_parameters())
    with memsave.collect() as reports:
        compiled = torch.compile(model, backend="memsave", options={"budget": budget, "codegen": "fx"})
        with torch.no_grad():
            out = compiled(ids)
    records = {r.name: r for report in reports for r in report.records}
    assert records["budget"].details["forms"] == {layer.name: layer.form for layer in reference.layers}
    assert_compiled_as_planned(reference, reports, weights)
    assert records["budget"].details["total_bytes"] <= budget
    assert "memsave plan" in records["budget"].notes[0]
    quantized = dict(q.split(": ", 1) for q in records["quantize"].details["quantized"])
    assert set(quantized) == {layer.name for layer in reference.layers if layer.form != "dense"}
    assert records["budget"].details["measure"] == reference.measure == "kl"
    assert OutputChange(expected, reference.measure)(out) < 20 * max(reference.predicted_error, 1e-6)
    torch._dynamo.reset()


def test_the_budget_option_refuses_what_it_is_not():
    with pytest.raises(ValueError, match="options\\['budget'\\]"):
        memsave.Config.from_options({"budget": "lots"})


class WithIdleParts(TwoLayers):
    def __init__(self):
        super().__init__()
        self.never = nn.Linear(128, 512)  # never called
        self.ignored = nn.Linear(128, 512)  # called, its output thrown away (as MiniLM's pooler)

    def forward(self, ids):
        h = self.embed(ids)
        self.ignored(h)
        return self.head(self.down(torch.relu(self.up(h))))


def test_weights_that_do_not_reach_the_output_are_not_planned():
    """The compiled graph drops them, so compressing them would save nothing: the plan counts
    them at their size (MiniLM's pooler: 0.55 MiB the plan had counted as 2-bit)."""
    model = WithIdleParts().eval()
    ids = torch.randint(0, 64, (2, 16))
    plan = memsave.plan(model, ids, budget="1GiB")
    names = [layer.name for layer in plan.layers]
    assert "never.weight" not in names and "ignored.weight" not in names and "up.weight" in names
    assert plan.fixed_bytes >= 2 * 128 * 512 * 4
