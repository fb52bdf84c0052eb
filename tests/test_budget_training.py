"""options={"budget": ...} on a training step: the step's measured peak (weights, gradients,
saved activations, the backward's working set) within the budget, by the recompute plan with
the least recompute cost that fits; a budget nothing fits is a BudgetError naming the lowest
peak found; a recompute option the user gave is checked against the budget, not replaced."""

import re

import pytest
import torch

import memsave
from memsave.config import RecomputeConfig
from memsave.config.base import OptionError
from memsave.memory.track import MemoryTracker
from memsave.models import build_decoder


def _model_and_batch():
    # Attention scores (4 x 4 heads x 128 x 128, 1 MiB a layer) dominate the activations: what
    # recompute can save.
    model = build_decoder("tiny", n_layers=4).train()
    ids = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0))
    return model, ids


def _step(model, fn, ids) -> int:
    """The step's peak: the weights + the live bytes the forward and backward add (grads start as None)."""
    for p in model.parameters():
        p.grad = None
    with MemoryTracker("cpu") as tracker:
        fn(ids, ids).backward()
    return sum(p.numel() * p.element_size() for p in model.parameters()) + tracker.stats.peak_bytes


def _recompute_record(reports):
    return next(r for report in reports for r in report.records if r.name == "recompute")


@pytest.mark.parametrize("codegen", ["fx", "inductor"])
def test_a_training_budget_bounds_the_measured_step_peak(codegen):
    model, ids = _model_and_batch()
    eager = _step(model, model, ids)
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    extra = []
    # Inductor at one tight budget only (its compiles dominate the suite's time; at 50 % its
    # fused backward peaked 2.2 largest tensors above the simulation: the margin's case); fx at
    # both, which also shows a tighter budget recomputing more.
    shares = (0.9, 0.6) if codegen == "fx" else (0.5,)
    for share in shares:
        budget = int(share * eager)
        torch._dynamo.reset()
        with memsave.collect() as reports:
            compiled = torch.compile(model, backend="memsave", options={"budget": budget, "codegen": codegen})
            _step(model, compiled, ids)  # compiles
        measured = _step(model, compiled, ids)
        assert measured <= budget, (share, measured, budget)
        details = _recompute_record(reports).details
        assert details["step_peak_budget"] == budget and details["budget_met"]
        assert details["step_peak_bytes"] <= budget  # the simulation's figure, margin aside
        if codegen == "fx":  # run op by op, the step peaks where the simulation says (op temporaries
            # included: prims.fma's product was one 1 MiB attention-score tensor it missed)
            assert abs(measured - details["step_peak_bytes"]) <= 2**18, (share, measured, details["step_peak_bytes"])
        extra.append(details["extra_flops"])
        for name, p in model.named_parameters():  # recompute changes what is saved, not the gradients
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    if codegen == "fx":
        assert extra == sorted(extra) and extra[-1] > extra[0]  # tighter budgets recompute more
    torch._dynamo.reset()


def test_a_training_budget_nothing_fits_names_the_lowest_peak():
    model, ids = _model_and_batch()
    budget = int(0.15 * _step(model, model, ids))
    compiled = torch.compile(model, backend="memsave", options={"budget": budget, "codegen": "fx"})
    with pytest.raises(memsave.BudgetError, match="cannot be met by this training step: the lowest peak memsave found") as info:
        _step(model, compiled, ids)
    assert info.value.smallest_bytes > budget
    torch._dynamo.reset()


def test_a_training_budget_chunks_the_loss_and_attention_unless_chunk_is_pinned():
    # The loss over chunks and attention as SDPA (exact rewrites) lower the peak the recompute
    # plan starts from: 45 % of eager's peak is met with them and refused without them.
    model, ids = _model_and_batch()
    eager = _step(model, model, ids)
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    budget = int(0.45 * eager)
    with memsave.collect() as reports:
        compiled = torch.compile(model, backend="memsave", options={"budget": budget, "codegen": "fx"})
        _step(model, compiled, ids)
    assert _step(model, compiled, ids) <= budget
    capture = next(r for report in reports for r in report.records if r.name == "chunk_capture")
    assert capture.changed
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    torch._dynamo.reset()
    pinned = torch.compile(model, backend="memsave", options={"budget": budget, "chunk": "none", "codegen": "fx"})
    with pytest.raises(memsave.BudgetError, match="cannot be met by this training step"):
        _step(model, pinned, ids)
    torch._dynamo.reset()
    # An inference graph under a budget is left to the planner: no capture.
    with memsave.collect() as reports, torch.no_grad():
        torch.compile(model.eval(), backend="memsave", options={"budget": "64MiB", "codegen": "fx"})(ids)
    assert not any(r.name == "chunk_capture" for report in reports for r in report.records)
    torch._dynamo.reset()


def test_a_recompute_option_beside_a_training_budget_is_checked_not_replaced():
    model, ids = _model_and_batch()
    eager = _step(model, model, ids)
    with memsave.collect() as reports:
        compiled = torch.compile(model, backend="memsave",
                                 options={"budget": eager, "recompute": "selective", "codegen": "fx"})
        _step(model, compiled, ids)
    assert _recompute_record(reports).details["policy"] == "selective"
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memsave",
                             options={"budget": int(0.4 * eager), "recompute": "selective", "codegen": "fx"})
    with pytest.raises(memsave.BudgetError, match="cannot be met with options\\['recompute'\\] 'selective'"):
        _step(model, compiled, ids)
    torch._dynamo.reset()


def test_step_peak_is_a_byte_count():
    assert RecomputeConfig(step_peak=2**20).fits_step_peak
    assert not RecomputeConfig(policy="sqrt", step_peak=2**20).fits_step_peak
    assert not RecomputeConfig(budget=0.5, step_peak=2**20).fits_step_peak
    for bad in (100, 1.5, "1MiB", True):
        with pytest.raises(OptionError, match="step_peak"):
            RecomputeConfig(step_peak=bad)


def test_a_training_budget_counts_gradients_stepped_in_the_backward_as_freed():
    """With memsave.optimizer_in_backward, each gradient is stepped and freed inside the backward:
    a budget below the weights + all the gradients is met, where without it nothing fits."""
    model = build_decoder("tiny", n_layers=4, hidden=256, n_heads=4, n_kv_heads=2, intermediate=688).train()
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = int(1.6 * weights)  # below weights + gradients (2x the weights)
    compiled = torch.compile(model, backend="memsave", options={"budget": budget, "codegen": "fx"})
    # The refusal says what stepping in the backward would reach: within this budget.
    with pytest.raises(memsave.BudgetError, match="lowest peak memsave found") as refused:
        _step(model, compiled, ids)
    assert re.search(r"with memsave.optimizer_in_backward holding the \d+ trainable parameters .* the lowest peak would "
                     r"be .*: within this budget", str(refused.value)), str(refused.value)
    torch._dynamo.reset()
    handle = memsave.optimizer_in_backward(model, torch.optim.SGD, lr=1e-3)
    try:
        with memsave.collect() as reports:
            compiled = torch.compile(model, backend="memsave", options={"budget": budget, "codegen": "fx"})
            _step(model, compiled, ids)
        measured = _step(model, compiled, ids)
        assert measured <= budget, (measured, budget)
        assert _recompute_record(reports).details["step_peak_bytes"] < 2 * weights
        assert all(p.grad is None for p in model.parameters())  # stepped and freed inside the backward
    finally:
        handle.remove()
        torch._dynamo.reset()


def test_the_optimizer_steps_temporaries_are_counted_where_it_steps_in_the_backward():
    """AdamW's step allocates two parameter-sized temporaries (sqrt(v), its quotient), measured
    when optimizer_in_backward builds it; the plan adds them where each gradient is stepped, so
    run as FX code the step peaks where the plan says."""
    model = build_decoder("tiny", n_layers=4, hidden=256, n_heads=4, n_kv_heads=2, intermediate=688).train()
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    handle = memsave.optimizer_in_backward(model, torch.optim.AdamW, lr=1e-3)
    try:
        assert handle.step_workspace_note is None and handle.step_workspace_ratio == pytest.approx(2.0, abs=0.05)
        budget = int(1.6 * weights)
        with memsave.collect() as reports:
            compiled = torch.compile(model, backend="memsave", options={"budget": budget, "codegen": "fx"})
            _step(model, compiled, ids)  # compiles; AdamW's state is made here, outside the next step
        measured = _step(model, compiled, ids)
        planned = _recompute_record(reports).details["step_peak_bytes"]
        assert measured <= budget, (measured, budget)
        largest = max(p.numel() * p.element_size() for p in model.parameters())
        assert abs(measured - planned) <= largest // 4, (measured, planned, largest)
    finally:
        handle.remove()
        torch._dynamo.reset()


def test_an_hf_model_returning_logits_beside_its_loss_peaks_where_the_plan_says():
    """HF's causal LMs return the logits beside the loss: autograd materializes a zero gradient
    for them when the backward starts, one logits-sized tensor the plan counts (it missed it
    before: the step measured exactly that much above the simulation)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(0, 2048, (2, 128), generator=torch.Generator().manual_seed(0))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    def step(fn) -> int:
        model.zero_grad(set_to_none=True)
        with MemoryTracker("cpu") as tracker:
            fn(input_ids=ids, labels=ids).loss.backward()
        return weights + tracker.stats.peak_bytes

    budget = step(model)  # eager's peak: the logits (2 MiB) dominate this small model
    with memsave.collect() as reports:
        compiled = torch.compile(model, backend="memsave", options={"budget": budget, "codegen": "fx"})
        step(compiled)
    measured = step(compiled)
    planned = _recompute_record(reports).details["step_peak_bytes"]
    assert measured <= budget, (measured, budget)
    assert abs(measured - planned) <= 2**18, (measured, planned)  # the logits' gradient: 2 MiB here
    torch._dynamo.reset()
