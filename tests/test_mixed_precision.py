"""Mixed precision (passes/aten/mixed_precision.py): the dtypes the graph gets (structure), its error
against fp32 (budgets, and no worse than torch's own autocast), fp32 master weights and
gradients in training, saved activations in bf16/fp8, fp16 training with loss scaling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import memsave
from memsave.config import Config, OptionError, PrecisionConfig
from memsave.graph.invariants import check_invariants, graph_signature
from memsave.graph.meta import node_val
from memsave.graph.rewrite import GraphBuilder
from memsave.memory.track import MemoryTracker
from memsave.models import build_decoder, decoder_inputs
from memsave.passes.aten.mixed_precision import cast_to_mixed_precision, loss_scaler
from memsave.report import sqnr_db
from memsave.weights import WEIGHTS
from tests.helpers import aten_inference_graph, compile_and_run, context_for

aten = torch.ops.aten
MATMULS = (aten.mm.default, aten.bmm.default, aten.addmm.default)
KEPT_FP32 = (aten._softmax.default, aten.mean.dim, aten.pow.Tensor_Scalar, aten.rsqrt.default)


def _record(reports, name: str, stage: str):
    found = [r for report in reports if report.stage == stage for r in report.records if r.name == name]
    assert found, f"no {name!r} record for stage {stage!r}"
    return found[0]


@pytest.fixture(scope="module")
def decoder():
    model = build_decoder("tiny")
    (x,) = decoder_inputs(model, batch=2, seq=32)
    with torch.no_grad():
        reference = model(x)
    return model, x, reference


# -- structure ------------------------------------------------------------------------------


@pytest.mark.parametrize("compute", ["bf16", "fp16"])
def test_matmuls_narrow_norms_and_softmax_fp32(decoder, compute):
    model, x, _ = decoder
    gm, real = aten_inference_graph(model, x)
    signature = graph_signature(gm)
    # weights="fp32": the fixture's weights stay (the stored-weights test below has its own model)
    result = cast_to_mixed_precision(gm, PrecisionConfig(compute=compute, weights="fp32"), context_for(gm, real))
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[compute]
    all_matmuls = [n for n in gm.graph.nodes if n.target in MATMULS]
    # The LM head's matmul, whose result is only returned, runs in fp32: no narrow logits
    # alive beside their fp32 cast. Every other matmul is narrow.
    output = next(reversed(gm.graph.nodes))
    returned = [n for n in all_matmuls if _only_returned(n, output)]
    assert len(returned) == 1 and node_val(returned[0]).dtype == torch.float32
    matmuls = [n for n in all_matmuls if n not in returned]
    assert matmuls and all(node_val(n).dtype == low for n in matmuls)
    kept = [n for n in gm.graph.nodes if n.target in KEPT_FP32]
    assert len(kept) >= 4 and all(node_val(n).dtype == torch.float32 for n in kept)
    assert result.changed and len(result.details["narrow_ops"]) == len(matmuls)
    # Same calling convention: the logits are still float32.
    assert check_invariants(gm, signature) == []
    # Weights stay the user's fp32 placeholders; what the matmul reads is a per-call cast.
    weight_inputs = [n.args[0] for n in matmuls if n.target == aten.mm.default]
    assert all(node_val(w).dtype == low for w in weight_inputs)


def _only_returned(node, output) -> bool:
    return all(u is output or (u.target in (aten.view.default, aten._unsafe_view.default) and _only_returned(u, output))
               for u in node.users)


def test_op_that_refuses_new_dtypes_is_left_as_it_was():
    class Lerp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8, bias=False)

        def forward(self, x, y):
            return torch.lerp(self.fc(x), y, 0.25)  # lerp needs equal dtypes: bf16 vs fp32 fails

    model = Lerp()
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    gm, real = aten_inference_graph(model, x, y)
    result = cast_to_mixed_precision(gm, PrecisionConfig(), context_for(gm, real))
    lerp = next(n for n in gm.graph.nodes if n.target == aten.lerp.Scalar)
    assert lerp.name in result.details["kept"]
    assert all(node_val(a).dtype == torch.float32 for a in lerp.all_input_nodes)
    mm = next(n for n in gm.graph.nodes if n.target == aten.mm.default)
    assert node_val(mm).dtype == torch.bfloat16
    with torch.no_grad():
        out = gm(*real)[0]
        expected = model(x, y)
    assert sqnr_db(expected, out) > 40


def test_constants_are_cast_once_at_compile_time():
    # A ReLU after the linear: a matmul whose result is only returned would run in fp32.
    model = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False), torch.nn.ReLU())
    gm, real = aten_inference_graph(model, torch.randn(4, 16))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weight = next(n for n in placeholders if node_val(n).shape == (8, 16))
    # Dynamo's input order (weight or batch first) is not fixed: index by the placeholder.
    w_index = placeholders.index(weight)
    x = real[1 - w_index]
    builder = GraphBuilder(gm, "test")
    constant = builder.constant("w_const", real[w_index].clone(), before=weight.next)  # a derived weight, say
    for user in list(weight.users):
        user.replace_input_with(weight, constant)
    gm.recompile()
    cast_to_mixed_precision(gm, PrecisionConfig(), context_for(gm, real))
    constants = [n for n in gm.graph.nodes if n.op == "get_attr" and n.users]
    assert [getattr(gm, n.target).dtype for n in constants] == [torch.bfloat16]
    # No cast node reads a constant: the conversion happened at compile time.
    casts = [n for n in gm.graph.nodes if n.target == torch.ops.prims.convert_element_type.default]
    assert all(c.args[0].op != "get_attr" for c in casts)
    with torch.no_grad():
        assert sqnr_db(model(x), gm(*real)[0]) > 40


def test_inference_stores_matmul_weights_narrow_and_releases_fp32(decoder):
    # (FX codegen here; the Inductor case of test_error_within_budget... runs stored weights too)
    _, x, reference = decoder
    model = build_decoder("tiny")
    linears = {n: p for n, p in model.named_parameters() if n.endswith("proj.weight")}
    # embedding, norm scales, and the LM head: its matmul, whose logits are returned, runs fp32
    kept = {n: p for n, p in model.named_parameters() if n not in linears}
    compiled, out, reports = compile_and_run(model, x, precision="bf16")
    record = _record(reports, "mixed_precision", "inference")
    assert sorted(record.details["stored_weights"]) == sorted(linears)
    assert record.details["released_bytes"] == sum(p.numel() * 4 for p in linears.values())
    assert all(p.untyped_storage().nbytes() == 0 for p in linears.values())
    assert all(p.untyped_storage().nbytes() == p.numel() * 4 for p in kept.values())
    # What stands in for each: one bf16 copy, half the bytes.
    for p in linears.values():
        copy = WEIGHTS.get_or_build(p, ("precision", torch.bfloat16), lambda: pytest.fail("not stored"), reads_weight=False)
        assert copy.dtype == torch.bfloat16 and copy.shape == p.shape
    assert sqnr_db(reference, out) > 40
    # A recompile (new sequence length) finds the bf16 copies: the fp32 originals are gone.
    (x2,) = decoder_inputs(model, batch=1, seq=24, seed=3)
    with torch.no_grad():
        again = compiled(x2)
    fresh = build_decoder("tiny")
    with torch.no_grad():
        assert sqnr_db(fresh(x2), again) > 40
    # The model itself now says why it cannot run eagerly.
    with pytest.raises(RuntimeError, match="released"):
        model(x)


def test_inference_weights_fp32_keeps_the_originals(decoder):
    _, x, reference = decoder
    model = build_decoder("tiny")
    _, out, reports = compile_and_run(model, x, precision={"compute": "bf16", "weights": "fp32"})
    assert _record(reports, "mixed_precision", "inference").details["stored_weights"] == []
    assert all(p.untyped_storage().nbytes() == p.numel() * 4 for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x), reference)


# -- error -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "compute,dtype,budget_db,codegen",
    [("bf16", torch.bfloat16, 40.0, "fx"), ("fp16", torch.float16, 55.0, "fx"), ("bf16", torch.bfloat16, 40.0, "inductor")],
)
def test_error_within_budget_and_no_worse_than_autocast(decoder, compute, dtype, budget_db, codegen):
    _, x, reference = decoder
    model = build_decoder("tiny")  # its own: compiling releases the fp32 weights it stores narrow
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        autocast = sqnr_db(reference, model(x).float())
    _, out, reports = compile_and_run(model, x, precision=compute, codegen=codegen)
    assert out.dtype == torch.float32
    ours = sqnr_db(reference, out)
    assert ours > budget_db
    assert ours > autocast - 1.0  # at least about as close to fp32 as torch's own autocast
    # Reported like any lossy pass: the runner measured this pass's error on the example.
    error = _record(reports, "mixed_precision", "inference").error
    assert error is not None and budget_db < error.sqnr_db < float("inf")


# -- training --------------------------------------------------------------------------------


def _train_step(options: dict, *, codegen: str = "fx"):
    torch._dynamo.reset()
    model = build_decoder("tiny").train()
    x, labels = decoder_inputs(model, batch=2, seq=32, labels=True)
    compiled = torch.compile(model, backend="memsave", options={"codegen": codegen, "recompute": "none", **options})
    with memsave.collect() as reports, MemoryTracker("cpu", track_saved=True, exclude=list(model.parameters())) as tracker:
        loss = compiled(x, labels)
        loss.backward()
    return model, loss.detach(), tracker.stats, reports


@pytest.fixture(scope="module")
def fp32_step():
    model, loss, stats, _ = _train_step({})
    return [p.grad.clone() for p in model.parameters()], loss, stats


def _min_cosine(grads_a, grads_b) -> float:
    return min(F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() for a, b in zip(grads_a, grads_b))


def test_bf16_training_keeps_fp32_master_weights_and_grads(fp32_step):
    grads, loss_fp32, _ = fp32_step
    model, loss, _, reports = _train_step({"precision": "bf16"})
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert _record(reports, "mixed_precision", "joint").details["narrow_ops"]
    assert _min_cosine(grads, [p.grad for p in model.parameters()]) > 0.999
    assert abs(loss.item() - loss_fp32.item()) < 1e-3


def test_saved_bf16_halves_saved_bytes(fp32_step):
    grads, loss_fp32, stats_fp32 = fp32_step
    model, loss, stats, reports = _train_step({"precision": "saved-bf16"})
    record = _record(reports, "narrow_saved", "joint")
    assert record.details["narrowed"] and record.details["saved_bytes_after"] * 2 == record.details["saved_bytes_before"]
    # Measured: what autograd actually holds between forward and backward.
    assert stats.saved_bytes < 0.6 * stats_fp32.saved_bytes
    assert torch.equal(loss, loss_fp32)  # the forward itself still computes in fp32
    assert _min_cosine(grads, [p.grad for p in model.parameters()]) > 0.9999


@pytest.mark.slow
def test_saved_fp8_with_scale_quarters_saved_bytes(fp32_step):
    grads, loss_fp32, stats_fp32 = fp32_step
    model, loss, stats, reports = _train_step({"precision": "saved-fp8"}, codegen="inductor")
    narrowed = _record(reports, "narrow_saved", "joint").details["narrowed"]
    assert narrowed and all("float8_e4m3fn" in line for line in narrowed)
    assert stats.saved_bytes < 0.35 * stats_fp32.saved_bytes
    torch.testing.assert_close(loss, loss_fp32, atol=1e-5, rtol=1e-5)  # Inductor vs FX fp32 forward
    assert _min_cosine(grads, [p.grad for p in model.parameters()]) > 0.99


def test_saved_int8_with_row_scales_quarters_saved_bytes_and_beats_fp8(fp32_step):
    """int8 codes with an fp32 scale per row: about a quarter of the bytes (the scales cost 4 per
    row), and a smaller gradient error than fp8's per-tensor scale on the same step."""
    grads, loss_fp32, stats_fp32 = fp32_step
    model, loss, stats, reports = _train_step({"precision": "saved-int8"}, codegen="inductor")
    record = _record(reports, "narrow_saved", "joint")
    assert record.details["narrowed"] and all("int8" in line for line in record.details["narrowed"])
    assert stats.saved_bytes < 0.35 * stats_fp32.saved_bytes
    int8_cos = _min_cosine(grads, [p.grad for p in model.parameters()])
    fp8_model, _, _, _ = _train_step({"precision": "saved-fp8"}, codegen="inductor")
    fp8_cos = _min_cosine(grads, [p.grad for p in fp8_model.parameters()])
    assert int8_cos > 0.995 and int8_cos > fp8_cos, (int8_cos, fp8_cos)
    torch.testing.assert_close(loss, loss_fp32, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_fp16_training_with_dynamic_loss_scaling():
    model = build_decoder("tiny").train()
    x, labels = decoder_inputs(model, batch=4, seq=32, labels=True)
    compiled = torch.compile(model, backend="memsave", options={"codegen": "inductor", "precision": "fp16"})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Started too high on purpose: the first fp16 backward overflows, the scaler must skip
    # that step (no inf reaches the weights) and lower the scale.
    scaler = loss_scaler(init_scale=2.0**20)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = compiled(x, labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert scaler.get_scale() < 2.0**20  # an overflow was seen and the step skipped
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 1.0


# -- options ---------------------------------------------------------------------------------


def test_options():
    assert Config(precision="bf16").precision == PrecisionConfig("bf16")
    assert Config(precision="saved-fp8").precision == PrecisionConfig(compute="fp32", saved="fp8")
    assert Config(precision={"compute": "fp16", "saved": "bf16"}).precision.saved == "bf16"
    with pytest.raises(OptionError, match="'compute'.*'bf16', 'fp16', 'fp32'"):
        Config(precision={"compute": "int8"})
    with pytest.raises(OptionError, match="'saved'.*'bf16', 'fp8'"):
        Config(precision={"saved": "fp16"})
    with pytest.raises(OptionError, match="unknown value 'half'.*'bf16', 'fp16', 'saved-bf16'"):
        Config(precision="half")
