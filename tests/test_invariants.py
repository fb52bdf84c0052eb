"""Each invariant of docs/invariants.md has a deliberately broken pass here that must be caught,
with the error naming the pass and the passes that ran before it."""

import pytest
import torch

from helpers import aten_inference_graph, context_for
from memsave.graph.invariants import GraphInvariantError
from memsave.models import build_mlp
from memsave.passes.base import PassResult
from memsave.passes.aten.cleanup import eliminate_dead_code
from memsave.pipeline import PassRunner

aten = torch.ops.aten


@pytest.fixture
def runner():
    model = build_mlp(sizes=(16, 32, 8), activation="relu")
    gm, inputs = aten_inference_graph(model, torch.randn(4, 16))
    runner = PassRunner(gm, context_for(gm, inputs))
    runner.run("cleanup", eliminate_dead_code, True)
    return runner


def first(gm, target):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def output_node(gm):
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def run_broken(runner, name, fn, match):
    with pytest.raises(GraphInvariantError) as info:
        runner.run(name, lambda gm, cfg, ctx: (fn(gm), PassResult(True))[1], True)
    message = str(info.value)
    assert f"pass {name!r} broke graph invariants" in message
    assert "passes run before it: cleanup" in message
    assert match in message, message


def test_a_correct_pass_passes(runner):
    def swap_relu_for_clamp(gm):
        relu = first(gm, aten.relu.default)
        with gm.graph.inserting_after(relu):
            clamp = gm.graph.call_function(aten.clamp_min.default, (relu.args[0], 0.0))
        clamp.meta["val"] = relu.meta["val"]
        relu.replace_all_uses_with(clamp)
        gm.graph.erase_node(relu)

    runner.run("swap", lambda gm, cfg, ctx: (swap_relu_for_clamp(gm), PassResult(True))[1], True)
    record = runner.report.records[-1]
    assert record.name == "swap" and record.nodes_added == 1 and record.nodes_removed == 1
    assert record.error.short() == "exact"


def test_I1_malformed_graph(runner):
    def use_before_definition(gm):
        relu = first(gm, aten.relu.default)
        placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
        placeholder.prepend(relu)  # relu now runs before its input exists

    run_broken(runner, "reorder", use_before_definition, "I1 graph is malformed")


def test_I2_node_without_metadata(runner):
    def forget_meta(gm):
        relu = first(gm, aten.relu.default)
        with gm.graph.inserting_after(relu):
            neg = gm.graph.call_function(aten.neg.default, (relu,), name="neg")
        with gm.graph.inserting_after(neg):
            back = gm.graph.call_function(aten.neg.default, (neg,))
        back.meta["val"] = relu.meta["val"]  # ... but not neg's
        relu.replace_all_uses_with(back, delete_user_cb=lambda u: u is not neg)

    run_broken(runner, "forgetful", forget_meta, "I2 node 'neg' (call_function aten.neg.default) has no meta['val']")


def test_I3_python_callable_in_graph(runner):
    def python_call(gm):
        relu = first(gm, aten.relu.default)
        relu.target = torch.relu  # a torch-level function, not an ATen op

    run_broken(runner, "pythonic", python_call, "I3 node 'relu' calls")


def test_I4_stale_metadata(runner):
    def stale(gm):
        relu = first(gm, aten.relu.default)
        relu.target = aten.sum.default  # a scalar now, but meta still says (4, 32)

    run_broken(runner, "stale", stale, "I4 node 'relu' meta says float32[4, 32] but aten.sum.default gives float32[]")


def test_I5_output_dtype_changed(runner):
    def to_half(gm):
        out = output_node(gm)
        value = out.args[0][0]
        with gm.graph.inserting_before(out):
            half = gm.graph.call_function(aten._to_copy.default, (value,), {"dtype": torch.float16})
        half.meta["val"] = value.meta["val"].to(torch.float16)
        out.args = ((half,),)

    run_broken(runner, "narrow", to_half, "I5 output 0 changed from float32[4, 8] to float16[4, 8]")


def test_I5_inputs_changed(runner):
    def extra_input(gm):
        last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        with gm.graph.inserting_after(last):
            extra = gm.graph.placeholder("extra")
        extra.meta["val"] = last.meta["val"]

    run_broken(runner, "extra", extra_input, "I5 graph inputs changed")


def test_I5_output_count_changed(runner):
    def more_outputs(gm):
        out = output_node(gm)
        out.args = (tuple(out.args[0]) * 2,)

    run_broken(runner, "twice", more_outputs, "I5 number of outputs changed: 1 -> 2")


def test_I6_output_aliases_an_input():
    def identityish(x, w):
        return (x @ w,)

    from torch.fx.experimental.proxy_tensor import make_fx

    x, w = torch.randn(4, 4), torch.randn(4, 4)
    gm = make_fx(identityish, tracing_mode="fake")(x, w)
    runner = PassRunner(gm, context_for(gm, [x, w]))

    def alias_input(gm):
        out = output_node(gm)
        x_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
        with gm.graph.inserting_before(out):
            view = gm.graph.call_function(aten.view.default, (x_node, [4, 4]))
        view.meta["val"] = x_node.meta["val"].view(4, 4)
        out.args = ((view,),)

    with pytest.raises(GraphInvariantError, match=r"(?s)passes run before it: none.*I6 output 0 now aliases graph input 'x_1'"):
        runner.run("aliasing", lambda gm, cfg, ctx: (alias_input(gm), PassResult(True))[1], True)


def test_a_pass_that_raises_is_named(runner):
    def boom(gm, cfg, ctx):
        raise KeyError("weights")

    with pytest.raises(RuntimeError, match=r"memsave pass 'boom' failed on graph 0 \(inference\) \(passes run before it: cleanup\): KeyError"):
        runner.run("boom", boom, True)


def test_broken_pass_is_caught_through_torch_compile(monkeypatch):
    import memsave.pipeline

    real_pipeline = memsave.pipeline.run_pipeline

    def pipeline_with_a_broken_pass(runner):
        real_pipeline(runner)

        def break_output(gm, cfg, ctx):
            out = output_node(gm)
            out.args = (tuple(out.args[0]) * 2,)
            return PassResult(True)

        runner.run("broken", break_output, True)

    monkeypatch.setattr(memsave.pipeline, "run_pipeline", pipeline_with_a_broken_pass)
    compiled = torch.compile(build_mlp(), backend="memsave", options={"debug": True})
    with pytest.raises(Exception, match=r"pass 'broken' broke graph invariants .*passes run before it: cleanup"):
        with torch.no_grad():
            compiled(torch.randn(2, 64))
