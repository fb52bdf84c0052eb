"""memsave's recompute policies (passes/joint/recompute*.py): exact gradients, the budget, the
report, the solvers, and the option forms.

Most tests partition one captured joint graph per model with every policy and run the two
graphs directly (fast: one trace per model); one goes through torch.compile end to end."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.fx as fx

import memsave
from memsave.config import Config, RecomputeConfig
from memsave.models import build_decoder, build_hf_gpt2, decoder_inputs, hf_inputs
from memsave.passes.joint.recompute import copy_joint, partition
from memsave.passes.joint.recompute_graph import JointGraph
from memsave.passes.joint.recompute_plan import minimum_plan, no_recompute_plan, solve_greedy, solve_ilp

POLICIES = {
    "none": RecomputeConfig("none"),
    "min-cut": RecomputeConfig("min-cut"),
    "budget-100": RecomputeConfig(budget=1.0),
    "budget-50": RecomputeConfig(budget=0.5),
    "budget-25": RecomputeConfig(budget=0.25),
    "budget-min": RecomputeConfig(budget="min"),
    "selective": RecomputeConfig("selective"),
    "sqrt": RecomputeConfig("sqrt"),
}
MEMSAVE_POLICIES = [p for p in POLICIES if p not in ("none", "min-cut")]


def _build(name: str, dropout: float):
    if name == "decoder":
        model = build_decoder("tiny", dropout=dropout)
        return model.train(), decoder_inputs(model, batch=2, seq=16)
    model = build_hf_gpt2()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    return model.train(), hf_inputs(model, batch=2, seq=16)


def _boxed(gm: fx.GraphModule, _):
    from functorch.compile import make_boxed_func

    return make_boxed_func(gm)


_copy = copy_joint  # partitioners rewrite or tag the graph they get: each test takes a copy


@functools.lru_cache(maxsize=None)
def captured(name: str, dropout: float):
    """The joint graph AOTAutograd hands a partition function, its real inputs, and eager's
    gradients for the same tangent and seed. fallback_random keeps dropout as the op eager
    runs, so the compiled graphs draw the same mask as eager."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import default_partition
    from torch._inductor.decomposition import select_decomp_table

    model, inputs = _build(name, dropout)
    cap = {}

    def backend(gm, example_inputs):
        cap["primals"] = list(example_inputs)

        def capture(joint, joint_inputs, **kwargs):
            cap["joint"], cap["kwargs"] = _copy(joint), kwargs
            return default_partition(joint, joint_inputs, **kwargs)

        return aot_autograd(
            fw_compiler=_boxed, bw_compiler=_boxed, partition_fn=capture,
            decompositions=select_decomp_table,
        )(gm, example_inputs)

    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    with torch.no_grad():
        shape = model(*inputs).shape
    tangent = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    (model(*inputs) * tangent).sum().backward()
    eager = [p.grad.clone() if isinstance(p, torch.nn.Parameter) and p.grad is not None else None for p in cap["primals"]]
    return cap, tangent, eager


def captured_mlp(blocks: int):
    """The joint graph of a Sequential of Linear+GELU blocks (no module names to go by but
    the Sequential's indices)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import default_partition

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU()) for _ in range(blocks)])
    cap = {}

    def backend(gm, example_inputs):
        cap["primals"] = list(example_inputs)

        def capture(joint, joint_inputs, **kwargs):
            cap["joint"], cap["kwargs"] = _copy(joint), kwargs
            return default_partition(joint, joint_inputs, **kwargs)

        return aot_autograd(fw_compiler=_boxed, bw_compiler=_boxed, partition_fn=capture)(gm, example_inputs)

    torch.compile(model, backend=backend)(torch.randn(8, 32, requires_grad=True)).sum().backward()
    return cap


@functools.lru_cache(maxsize=None)
def partitioned(name: str, dropout: float, policy: str):
    """(result details and notes, gradients, fw, bw) of one policy on one captured joint."""
    cap, tangent, _ = captured(name, dropout)
    fw, bw, result = partition(_copy(cap["joint"]), POLICIES[policy], None, joint_inputs=None, **cap["kwargs"])
    torch.manual_seed(0)
    grads = run(fw, bw, cap["primals"], tangent, cap["kwargs"]["num_fwd_outputs"])
    return result, grads, fw, bw


def run(fw: fx.GraphModule, bw: fx.GraphModule, primals: list, tangent: torch.Tensor, num_fwd_outputs: int) -> list:
    """Forward, then backward, as AOTAutograd's runtime would: saved values by name."""
    outputs = fw(*primals)
    output = next(n for n in reversed(fw.graph.nodes) if n.op == "output")
    env = {a.name: v for a, v in zip(output.args[0], outputs) if isinstance(a, fx.Node)}
    args = [tangent if p.name.startswith("tangents") else env[p.name] for p in bw.graph.find_nodes(op="placeholder")]
    return list(bw(*args))


def _is_random(node: fx.Node) -> bool:
    return node.op == "call_function" and torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())


# -- exact gradients --------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("model", ["decoder", "hf-gpt2"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_gradients_match_eager(model, dropout, policy):
    _, _, eager = captured(model, dropout)
    _, reference, _, _ = partitioned(model, dropout, "none")
    _, grads, _, bw = partitioned(model, dropout, policy)
    compared = 0
    for index, (grad, ref, expected) in enumerate(zip(grads, reference, eager)):
        if expected is None:
            continue
        # Recomputation reruns the same ops on the same values: bit for bit what saving gives.
        assert torch.equal(grad, ref), f"{policy}: gradient {index} differs from saving everything"
        # And eager's, to fp32 rounding of the compiled decompositions (relative to the scale).
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
        compared += 1
    assert compared == sum(isinstance(p, torch.nn.Parameter) for p in captured(model, dropout)[0]["primals"])
    # A random op recomputed in the backward would draw a different mask.
    if policy in MEMSAVE_POLICIES:
        assert not [n.name for n in bw.graph.nodes if _is_random(n)]


# -- the budget and what each policy saves ---------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("model", ["decoder", "hf-gpt2"])
@pytest.mark.parametrize("policy, fraction", [("budget-50", 0.5), ("budget-25", 0.25)])
def test_budget_is_honoured(model, dropout, policy, fraction):
    result, _, _, _ = partitioned(model, dropout, policy)
    details = result.details
    assert details["budget_met"]
    # A fraction of what AOTAutograd's default min-cut saves, as PyTorch's own budget means it.
    assert details["budget_bytes"] == int(fraction * details["reference_saved_bytes"])
    assert 0 < details["saved_bytes"] <= details["budget_bytes"]
    assert details["extra_flops"] > 0 and details["recomputed"]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("model", ["decoder", "hf-gpt2"])
def test_saved_bytes_shrink_with_the_budget(model, dropout):
    results = {p: partitioned(model, dropout, p)[0].details for p in POLICIES}
    saved = {p: d["saved_bytes"] for p, d in results.items()}
    # Budget 1.0 is min-cut's own saved bytes: at most that, for no more recompute than needed.
    assert results["budget-100"]["reference_saved_bytes"] == saved["min-cut"]
    assert saved["budget-100"] <= saved["min-cut"] <= saved["none"]
    assert saved["none"] >= saved["budget-50"] >= saved["budget-25"]
    assert saved["selective"] < saved["none"]


@pytest.mark.parametrize("model", ["decoder", "hf-gpt2"])
@pytest.mark.parametrize("policy", ["budget-100", "budget-50", "budget-min"])
def test_budget_plans_are_never_above_min_cut_by_the_estimate(model, policy):
    details = partitioned(model, 0.2, policy)[0].details
    (min_cut,) = [c for c in details["candidates"] if c["source"] == "min-cut"]
    (chosen,) = [c for c in details["candidates"] if c["chosen"]]
    assert min_cut["saved_bytes"] == details["reference_saved_bytes"]
    if details["budget_bytes"] is None or min_cut["saved_bytes"] <= details["budget_bytes"]:
        assert min_cut["simulated_peak"] is not None  # ranked beside memsave's own plans
        assert chosen["simulated_peak"] <= min_cut["simulated_peak"]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("model", ["decoder", "hf-gpt2"])
def test_budget_min_has_the_lowest_simulated_peak(model, dropout):
    peaks = {p: partitioned(model, dropout, p)[0].details["peak_activation_bytes"] for p in POLICIES}
    assert peaks["budget-min"] == min(peaks.values())
    details = partitioned(model, dropout, "budget-min")[0].details
    assert details["budget_bytes"] is None and details["budget_met"]
    tried = {c["source"].split(" ")[0] for c in details["candidates"]}
    assert {"segments", "ilp", "selective"} <= tried
    (chosen,) = [c for c in details["candidates"] if c["chosen"]]
    assert chosen["simulated_peak"] == min(c["simulated_peak"] for c in details["candidates"])


def test_unmet_budget_is_reported_with_the_fewest_bytes():
    cap, _, _ = captured("decoder", 0.2)
    fw, bw, result = partition(
        _copy(cap["joint"]), RecomputeConfig(budget=1024), None, joint_inputs=None, **cap["kwargs"]
    )
    details = result.details
    assert not details["budget_met"] and details["budget_bytes"] == 1024
    jg = JointGraph(_copy(cap["joint"]), **cap["kwargs"])
    assert details["saved_bytes"] == minimum_plan(jg, use_ilp=True).saved_bytes > 1024
    assert "budget NOT met" in result.notes[0]


def test_report_says_what_is_saved_and_recomputed():
    result, _, fw, bw = partitioned("decoder", 0.0, "budget-50")
    details = result.details
    for key in ("policy", "saved", "saved_bytes", "recomputed", "extra_flops", "budget_bytes", "plan", "candidates"):
        assert key in details, key
    assert details["policy"] == "budget" and details["plan"].startswith(("ilp", "greedy"))
    names = {n.name for n in fw.graph.nodes}
    for name, desc, nbytes in details["saved"]:
        assert name in names and desc.startswith(("float32[", "int64[", "bool[")) and nbytes >= 0
    bw_names = {n.name for n in bw.graph.nodes}
    assert set(details["recomputed"]) <= bw_names & names
    note = result.notes[0]
    assert note.startswith("policy budget:") and "budget (budget 50%)" in note and "MFLOP extra" in note
    # Plans are ranked by simulated peak: the chosen one has the lowest peak it computed.
    peaks = [c["simulated_peak"] for c in details["candidates"] if c["simulated_peak"] is not None]
    (chosen,) = [c for c in details["candidates"] if c["chosen"]]
    assert chosen["simulated_peak"] == min(peaks) == details["peak_activation_bytes"]


def test_sqrt_saves_only_segment_boundaries():
    # 9 blocks → 3 segments: the forward saves the two activations crossing segment
    # boundaries (blocks 3 and 6 start), and the backward recomputes everything else.
    cap = captured_mlp(9)
    fw, bw, result = partition(_copy(cap["joint"]), RecomputeConfig("sqrt"), None, joint_inputs=None, **cap["kwargs"])
    assert result.details["plan"] == "sqrt (3 segments of 9 blocks)"
    activations = [(desc, nbytes) for name, desc, nbytes in result.details["saved"] if not name.startswith("primals")]
    assert activations == [("float32[8, 32]", 8 * 32 * 4)] * 2
    assert result.details["saved_bytes"] == 2 * 8 * 32 * 4
    x = cap["primals"]
    tangent = torch.ones(8, 32)
    reference = partition(_copy(cap["joint"]), RecomputeConfig("none"), None, joint_inputs=None, **cap["kwargs"])
    expected = run(*reference[:2], x, tangent, 1)
    assert all(g is None or torch.equal(g, r) for g, r in zip(run(fw, bw, x, tangent, 1), expected))


# -- the solvers ------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.1])
def test_ilp_is_no_worse_than_the_greedy_heuristic(fraction):
    cap, _, _ = captured("decoder", 0.2)
    jg = JointGraph(_copy(cap["joint"]), **cap["kwargs"])
    budget = int(fraction * no_recompute_plan(jg).saved_bytes)
    exact, greedy = solve_ilp(jg, budget), solve_greedy(jg, budget)
    for plan in (exact, greedy):
        jg.check(plan)
        assert plan.saved_bytes <= budget
    assert exact.cost <= greedy.cost * (1 + 1e-9)


def test_ilp_and_greedy_agree_on_a_small_graph():
    cap = captured_mlp(3)
    jg = JointGraph(cap["joint"], **cap["kwargs"])
    full = no_recompute_plan(jg).saved_bytes
    for budget in (full, full // 2, 0):
        exact, greedy = solve_ilp(jg, budget), solve_greedy(jg, budget)
        assert exact.saved_bytes <= budget or budget == 0
        assert math.isclose(exact.cost, greedy.cost) and exact.saved_bytes == greedy.saved_bytes


# -- end to end -------------------------------------------------------------------------


def _train_step(model, fn, inputs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = fn(*inputs).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_torch_compile_trains_under_a_budget_with_dropout():
    # Through the backend (debug mode from conftest: invariants checked on the fw and bw graphs).
    model, inputs = _build("decoder", 0.2)
    eager_loss, eager = _train_step(model, model, inputs)
    compiled = torch.compile(model, backend="memsave", options={"recompute": {"budget": 0.5}, "codegen": "fx"})
    with torch._inductor.config.patch(fallback_random=True), memsave.collect() as reports:
        loss, grads = _train_step(model, compiled, inputs)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-7)
    for name, grad in eager.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()), msg=lambda m: f"{name}: {m}")
    (record,) = [rec for r in reports if r.stage == "joint" for rec in r.records if rec.name == "recompute"]
    assert record.details["policy"] == "budget" and record.details["recomputed"]
    assert record.details["saved_bytes"] <= record.details["budget_bytes"]
    assert record.peak_activation_bytes_after <= record.peak_activation_bytes_before


def test_explain_train_compares_policies_and_lists_what_is_saved():
    from memsave.passes.joint.recompute import COMPARED_POLICIES

    model, inputs = _build("decoder", 0.0)
    report = memsave.explain(model, *inputs, train=True, codegen="fx", recompute={"budget": 0.25})
    (record,) = [rec for g in report.graphs if g.stage == "joint" for rec in g.records if rec.name == "recompute"]
    rows = {row["policy"]: row for row in record.details["policies"]}
    assert list(rows) == [name for name, _ in COMPARED_POLICIES]
    # The compared run of the chosen policy is the run that was compiled.
    assert rows["budget 25%"]["saved_bytes"] == record.details["saved_bytes"]
    assert rows["budget 25%"]["extra_flops"] == record.details["extra_flops"]
    assert rows["none"]["extra_flops"] == 0 and rows["none"]["recomputed_ops"] == 0
    assert rows["sqrt"]["saved_bytes"] <= rows["none"]["saved_bytes"]
    # Activations and inputs are listed apart: weights are alive anyway.
    assert record.details["saved"] and all(not name.startswith("primals") for name, _, _ in record.details["saved"])
    assert any(name.startswith("primals") for name, _, _ in record.details["saved_inputs"])
    text = str(report)
    for name, _ in COMPARED_POLICIES:
        assert f"| {name} |" in text
    largest = max(record.details["saved"], key=lambda item: item[2])[0]
    assert f"  {largest} " in text and "recomputed in backward:" in text


# -- options ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ({"budget": 0.5}, RecomputeConfig("budget", 0.5)),
        ({"budget": "min"}, RecomputeConfig("budget", "min")),
        ({"budget": 1 << 20}, RecomputeConfig("budget", 1 << 20)),
        ({"policy": "budget"}, RecomputeConfig("budget", 0.5)),
        ("budget", RecomputeConfig("budget", 0.5)),
        ("budget-25", RecomputeConfig("budget", 0.25)),
        ("Budget-Min", RecomputeConfig("budget", "min")),
        ("sqrt", RecomputeConfig("sqrt")),
        ("selective", RecomputeConfig("selective")),
        ({"policy": "min-cut"}, RecomputeConfig()),
    ],
)
def test_recompute_option_forms(value, expected):
    assert Config.from_options({"recompute": value}).recompute == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ({"budget": 0.0}, r"\['budget'\]: invalid value 0.0; valid choices: a fraction in \(0, 1\]"),
        ({"budget": 1.5}, r"\['budget'\]: invalid value 1.5"),
        ({"budget": 1}, r"\['budget'\]: invalid value 1; .*an int, at least 1024"),
        ({"budget": True}, r"\['budget'\]: invalid value True"),
        ({"budget": "max"}, r"\['budget'\]: invalid value 'max'.*or 'min'"),
        ({"policy": "sqrt", "budget": 0.5}, r"\['budget'\]: a budget applies to policy 'budget' only, not 'sqrt'"),
        ({"policy": "checkpoint"}, r"\['policy'\]: invalid value 'checkpoint'; valid choices: 'none', 'min-cut', 'budget', 'sqrt', 'selective'"),
        ("budget-150", r"\['budget'\]: invalid value 1.5"),
        ("budgets", r"options\['recompute'\]: unknown value 'budgets'; valid choices: 'none', 'min-cut', 'sqrt', 'selective', names of the form 'budget\[-<percent>\]'"),
        ({"fraction": 0.5}, r"unknown key 'fraction'; valid keys: 'budget', 'policy'"),
    ],
)
def test_bad_recompute_options_say_what_is_valid(value, message):
    with pytest.raises(ValueError, match=message):
        Config.from_options({"recompute": value})
