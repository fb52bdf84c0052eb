"""plan_memory (passes/aten/plan_memory.py, memory/liveness.py): exact results, a lower measured
peak, planned >= lower bound, the in-place and layout rules, and the option forms."""

from __future__ import annotations

import pytest
import torch

import memsave
from memsave.config import Config, OptionError, PlanMemoryConfig
from memsave.memory.liveness import Buffer, _greedy_by_size, plan_buffers
from memsave.memory.track import MemoryTracker
from memsave.models import build_decoder, decoder_inputs
from memsave.passes.aten.plan_memory import drop_needless_layout_ops, out_variant, plan_memory, reuse_dying_inputs
from tests.helpers import aten_inference_graph, context_for

aten = torch.ops.aten


def _record(reports, name: str, stage: str = "inference"):
    found = [r for report in reports if report.stage == stage for r in report.records if r.name == name]
    assert found, f"no {name!r} record for stage {stage!r}"
    return found[0]


def _compiled(model, plan: bool, codegen: str = "fx", **options):
    opts = {"codegen": codegen, "recompute": "none", **options}
    if plan:
        opts["plan_memory"] = "on"
    return torch.compile(model, backend="memsave", options=opts)


@pytest.fixture(scope="module")
def decoder():
    model = build_decoder("tiny")
    (x,) = decoder_inputs(model, batch=2, seq=32)
    return model, x


# -- exactness and measured peak -------------------------------------------------------------


def test_inference_exact_and_lower_measured_peak(decoder):
    model, x = decoder
    with torch.no_grad():
        plain = _compiled(model, plan=False)
        expected = plain(x)
        planned = _compiled(model, plan=True)
        with memsave.collect() as reports:
            out = planned(x)
        # Measure the compiled calls themselves (both are compiled now).
        with MemoryTracker("cpu") as before:
            plain(x)
        with MemoryTracker("cpu") as after:
            planned(x)
    assert torch.equal(out, expected)  # plan_memory changes where values live, never their bits
    record = _record(reports, "plan_memory")
    d = record.details
    assert d["inplace"] and d["layout_removed"]  # the decoder has both (eval dropout is a clone)
    assert record.error is not None and record.error.max_abs == 0.0
    assert after.stats.peak_bytes < before.stats.peak_bytes
    assert d["planned_peak_bytes"] >= d["lower_bound_bytes"] > 0
    # The lowered code frees like the plan says: measured within the ops' own temporaries of
    # the lower bound, and the pass's own measurement agrees with the compiled call's.
    assert d["measured_peak_bytes"] == after.stats.peak_bytes
    assert d["measured_peak_bytes"] < d["measured_peak_before_bytes"]


def test_training_gradients_exact(decoder):
    model, _ = decoder
    model = build_decoder("tiny").train()
    x, labels = decoder_inputs(model, batch=2, seq=16, labels=True)
    grads = []
    for plan in (False, True):
        torch._dynamo.reset()
        model.zero_grad()
        with memsave.collect() as reports:
            loss = _compiled(model, plan=plan)(x, labels)
            loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    backward = _record(reports, "plan_memory", "backward").details
    forward = _record(reports, "plan_memory", "forward").details
    # The backward's saved activations are buffers that die at their last use.
    assert backward["lower_bound_bytes"] > 0 and backward["planned_peak_bytes"] >= backward["lower_bound_bytes"]
    assert backward["inplace"] and forward["planned_peak_bytes"] >= forward["lower_bound_bytes"]


def test_inductor_codegen_only_reports(decoder):
    model, x = decoder
    with torch.no_grad(), memsave.collect() as reports:
        out = _compiled(model, plan=True, codegen="inductor")(x)
        expected = model(x)
    d = _record(reports, "plan_memory").details
    assert d["inplace"] == [] and d["codegen"] == "inductor"
    assert d["planned_peak_bytes"] >= d["lower_bound_bytes"] > 0
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# -- the planner -----------------------------------------------------------------------------


def test_greedy_by_size_is_valid_and_tight_on_a_chain():
    # a -> b -> c, each alive for two steps: two buffers at once, so the arena is two buffers.
    buffers = [Buffer("a", 128, 0, 1), Buffer("b", 128, 1, 2), Buffer("c", 128, 2, 3)]
    assert _greedy_by_size(buffers) == 256
    assert buffers[0].offset == buffers[2].offset != buffers[1].offset  # c reuses a's space


def test_greedy_by_size_never_overlaps_live_buffers():
    gen = torch.Generator().manual_seed(0)
    buffers = []
    for i in range(60):
        start = int(torch.randint(0, 40, (), generator=gen))
        length = int(torch.randint(0, 10, (), generator=gen))
        size = int(torch.randint(1, 5000, (), generator=gen))
        buffers.append(Buffer(f"b{i}", size, start, start + length))
    arena = _greedy_by_size(buffers)
    lower = max(sum(b.nbytes for b in buffers if b.start <= t <= b.end) for t in range(60))
    assert arena >= lower
    for a in buffers:
        assert a.offset + a.aligned <= arena
        for b in buffers:
            live_together = a is not b and a.start <= b.end and b.start <= a.end
            if live_together:
                assert a.offset + a.aligned <= b.offset or b.offset + b.aligned <= a.offset


def test_lower_bound_of_a_known_graph():
    # (8, 16) float32 = 512 bytes each. mm → relu → (mm + relu) : at the add, three are alive.
    class M(torch.nn.Module):
        def forward(self, x, w):
            a = x @ w  # 512 B
            b = torch.relu(a)  # 512 B, a still needed below
            return (a + b).sum()

    gm, _ = aten_inference_graph(M(), torch.randn(8, 16), torch.randn(16, 16))
    plan = plan_buffers(gm)
    assert plan.lower_bound_bytes == 3 * 512  # at the add: a, b and its result
    assert plan.planned_peak_bytes >= plan.lower_bound_bytes


# -- in-place rules --------------------------------------------------------------------------


def _inplace_names(model, *inputs):
    gm, real = aten_inference_graph(model, *inputs)
    with torch.no_grad():
        expected = gm(*real)
    names = reuse_dying_inputs(gm)
    gm.recompile()
    with torch.no_grad():
        out = gm(*real)
    for a, b in zip(expected if isinstance(expected, (list, tuple)) else [expected], out if isinstance(out, (list, tuple)) else [out]):
        assert torch.equal(a, b)
    return gm, names


def test_inplace_only_into_a_dying_graph_owned_buffer():
    class M(torch.nn.Module):
        def forward(self, x):
            a = x * 2  # x is the user's: never written
            b = a + 1  # a dies here: b may reuse it
            c = b.exp()  # b is read again by sum below, so exp may not write into b
            return c * b.sum()

    gm, names = _inplace_names(M(), torch.randn(4, 8))
    targets = {n.name: n for n in gm.graph.nodes}
    assert "add" in names  # a + 1 writes into a
    assert targets["add"].kwargs["out"].name == "mul"
    assert all(n.kwargs.get("out") is None or n.kwargs["out"].op != "placeholder" for n in gm.graph.nodes)
    assert "exp" not in names  # b is still read by sum after exp


def test_no_inplace_through_a_different_view_or_into_an_output():
    class Transposed(torch.nn.Module):
        def forward(self, x):
            a = x * 2  # (4, 4)
            return a + a.t()  # a dies here, but a.t() reads it in another order

    class Returned(torch.nn.Module):
        def forward(self, x):
            a = x * 2
            return a, a + 1  # a is an output: its buffer is the caller's afterwards

    assert "add" not in _inplace_names(Transposed(), torch.randn(4, 4))[1]
    assert "add" not in _inplace_names(Returned(), torch.randn(4, 4))[1]


def test_out_variant_lookup():
    assert out_variant(aten.mul.Tensor) is aten.mul.out
    assert out_variant(aten.add.Tensor) is aten.add.out
    assert out_variant(aten.mul.Scalar) is aten.mul.Scalar_out
    assert out_variant(aten.silu.default) is aten.silu.out


# -- layout copies ---------------------------------------------------------------------------


def test_needless_copies_dropped_and_needed_ones_kept():
    class M(torch.nn.Module):
        def forward(self, x, w):
            h = (x @ w).clone()  # needless: an intermediate, same layout
            k = x.clone()  # a copy of the user's input: kept (aliasing)
            p = (h * 2).permute(1, 0).permute(1, 0) + k  # folds to identity
            return p.t().contiguous()  # a real layout change: kept

    gm, real = aten_inference_graph(M(), torch.randn(4, 8), torch.randn(8, 8))
    with torch.no_grad():
        expected = gm(*real)
    removed = drop_needless_layout_ops(gm)
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(aten.clone.default) == 2  # x.clone() and the final contiguous
    assert aten.permute.default not in targets
    assert len(removed) == 2  # the first clone, and the permute pair (one node after folding)
    with torch.no_grad():
        assert torch.equal(gm(*real)[0], expected[0])


# -- options ---------------------------------------------------------------------------------


def test_options():
    assert Config(plan_memory="on").plan_memory == PlanMemoryConfig()
    assert Config(plan_memory="report").plan_memory == PlanMemoryConfig(inplace=False, layout=False)
    assert Config(plan_memory={"measure": True}).plan_memory.measure is True
    with pytest.raises(OptionError, match="'inplace'.*True, False"):
        Config(plan_memory={"inplace": "yes"})
    with pytest.raises(OptionError, match="unknown key 'arena'.*'inplace'"):
        Config(plan_memory={"arena": True})
    with pytest.raises(OptionError, match="unknown value 'fast'.*'on', 'report'"):
        Config(plan_memory="fast")


def test_pass_directly_reports_without_real_inputs():
    model = build_decoder("tiny")
    gm, real = aten_inference_graph(model, *decoder_inputs(model, batch=1, seq=8))
    ctx = context_for(gm, [], codegen="fx", plan_memory="on")
    result = plan_memory(gm, PlanMemoryConfig(), ctx)
    assert result.changed and result.details["measured_peak_bytes"] is None
