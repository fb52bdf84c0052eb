"""The quantize → fold_weights → release_weights passes: structure, numerics, memory really freed."""

import warnings

import pytest
import torch

import memsave
from helpers import compile_and_run
from memsave.config import Config, QuantizeConfig
from memsave.memory.track import MemoryTracker, live_tensor_bytes
from memsave.models import build_decoder, build_hf_llama, build_mlp, decoder_inputs, hf_inputs
from memsave.ops import dequantize_affine, quantize_affine
from memsave.report import ErrorStats
from memsave.weights import WEIGHTS

memsave_ops = torch.ops.memsave


@pytest.mark.parametrize(
    "name, expected",
    [
        ("int8", QuantizeConfig(bits=8, group_size=None, symmetric=True, method="rtn")),
        ("int4", QuantizeConfig(bits=4, group_size=64, symmetric=False, method="gptq")),
        ("int4-g128", QuantizeConfig(bits=4, group_size=128)),
        ("int3-g32-asym-mse", QuantizeConfig(bits=3, group_size=32, symmetric=False, method="mse")),
        ("int2-g32-sym", QuantizeConfig(bits=2, group_size=32, symmetric=True)),
    ],
)
def test_short_names(name, expected):
    assert Config.from_options({"quantize": name}).quantize == expected


def test_bad_quantize_options_name_the_choices():
    with pytest.raises(ValueError, match=r"options\['quantize'\]\['bits'\]: invalid value 5; valid choices: 2, 3, 4, 8"):
        Config.from_options({"quantize": {"bits": 5}})
    with pytest.raises(ValueError, match=r"\['group_size'\]: invalid value 100; valid choices: None, 32, 64, 128, 256"):
        Config.from_options({"quantize": {"group_size": 100}})
    with pytest.raises(ValueError, match=r"\['method'\]: invalid value 'smoothquant'; valid choices: 'rtn', 'mse', 'awq', 'gptq'"):
        Config.from_options({"quantize": {"method": "smoothquant"}})
    with pytest.raises(ValueError, match=r"\['overrides'\]\['x'\]: unknown key 'bitz'"):
        Config.from_options({"quantize": {"overrides": {"x": {"bitz": 3}}}})
    with pytest.raises(ValueError, match=r"unknown value 'int5'"):
        Config.from_options({"quantize": "int5"})


def test_per_layer_patterns():
    config = QuantizeConfig(bits=4, group_size=32, exclude=("lm_head.weight",), overrides={"*.down_proj.weight": {"bits": 8, "group_size": None}})
    assert config.for_weight("lm_head.weight") is None
    assert config.for_weight("layers.0.mlp.down_proj.weight").bits == 8
    assert config.for_weight("layers.0.mlp.up_proj.weight").bits == 4
    assert QuantizeConfig(include=("layers.*",)).for_weight("embed_tokens.weight") is None
    # A pattern may name the module as well as the parameter; it never matches a longer name.
    by_module = QuantizeConfig(bits=4, group_size=32, exclude=("lm_head", "*.o"), overrides={"layers.0.mlp.down_proj": {"bits": 8, "group_size": None}})
    assert by_module.for_weight("lm_head.weight") is None and by_module.for_weight("lm_head2.weight") is not None
    assert by_module.for_weight("attn.o.weight") is None and by_module.for_weight("attn.out.weight") is not None
    assert by_module.for_weight("layers.0.mlp.down_proj.weight").bits == 8
    assert by_module.for_weight("layers.0.mlp.up_proj.weight").bits == 4


def test_graph_gets_visible_qdq_nodes_then_packed_constants(tmp_path):
    model = build_mlp(sizes=(64, 128, 32))
    _, _, (report,) = compile_and_run(model, torch.randn(4, 64), quantize="int8", debug_dir=str(tmp_path))
    assert [r.name for r in report.records] == [
        "cleanup", "quantize", "fold_weights", "release_weights", "fuse_dequant_matmul", "select_kernels"
    ]
    (folder,) = list(tmp_path.iterdir())
    after_quantize = (folder / "02_quantize.py").read_text()
    after_fold = (folder / "03_fold_weights.py").read_text()
    # Two linears: two explicit Q/DQ pairs, visible by name, tagged with the pass that made them.
    assert after_quantize.count("torch.ops.memsave.quantize_affine.default") == 2
    assert after_quantize.count("torch.ops.memsave.dequantize_affine.default") == 2
    assert "memsave_pass: quantize" in after_quantize
    # The weight-side quantize became stored constants.
    assert "quantize_affine" not in after_fold.replace("dequantize_affine", "")
    assert after_fold.count("torch.ops.memsave.dequantize_affine.default") == 2
    quantize, fold, release, fuse, _ = report.records[1:]
    assert quantize.nodes_added == 2 * 3  # per linear: the scale constant, quantize, dequantize (symmetric: no offset)
    assert fold.weight_bytes_after < fold.weight_bytes_before / 3  # fp32 → int8 codes + fp16 scales
    assert release.details["released"] == ["layers.0.weight", "layers.1.weight"]
    # dequantize → permute → addmm became one linear_affine per layer. Its reference kernel
    # still materializes one layer's weight while it runs, which the estimate counts: never
    # more than the unfused graph, which kept a dequantized weight alive across its matmul.
    after_fuse = (folder / "05_fuse_dequant_matmul.py").read_text()
    assert after_fuse.count("torch.ops.memsave.linear_affine.default") == 2
    assert "dequantize_affine" not in after_fuse and "addmm" not in after_fuse
    assert fuse.peak_activation_bytes_after <= fuse.peak_activation_bytes_before
    assert fuse.peak_activation_bytes_after >= 128 * 64 * 4  # the first layer's fp32 weight, while it runs
    assert fuse.error.sqnr_db == quantize.error.sqnr_db or abs(fuse.error.sqnr_db - quantize.error.sqnr_db) < 0.1


def test_compiled_output_is_exactly_the_quantized_model():
    # The reference for int4 g32: the same model with each linear weight replaced by
    # dequantize(quantize(w)). The compiled graph must compute exactly that (to fp32 rounding).
    model = build_decoder("tiny")
    ids = decoder_inputs(model, batch=2, seq=16)
    reference = build_decoder("tiny")
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                from memsave.ops.affine import choose_qparams_mse

                scale, offset = choose_qparams_mse(w, 4, 32, False)
                packed = quantize_affine(w, scale, offset, 4, 32)
                w.copy_(dequantize_affine(packed, scale, offset, 4, 32, w.shape[1], w.dtype))
        expected = reference(*ids)
    # compute_dtype "float32": exact activations (by default codegen may run int4 on a bf16 copy
    # of them, the fastest kernel here; that error is bounded below).
    exact = {"bits": 4, "group_size": 32, "symmetric": False, "method": "mse", "compute_dtype": "float32"}
    _, out, _ = compile_and_run(model, *ids, quantize=exact)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    _, fast, (report,) = compile_and_run(build_decoder("tiny"), *ids, quantize="int4-g32-asym-mse")
    assert ErrorStats.between([expected], [fast]).sqnr_db > 30


@pytest.mark.parametrize("scheme, min_sqnr", [("int8", 35.0), ("int4-g32-asym-mse", 15.0), ("int4", 14.0)])
def test_error_against_full_precision_is_bounded(scheme, min_sqnr):
    model = build_decoder("tiny")
    ids = decoder_inputs(model, batch=2, seq=16)
    with torch.no_grad():
        expected = model(*ids)
    _, out, (report,) = compile_and_run(model, *ids, quantize=scheme)
    sqnr = ErrorStats.between([expected], [out]).sqnr_db
    assert sqnr > min_sqnr
    # The report's per-pass error is the same measurement (up to decomposition rounding).
    assert abs(report.records[1].error.sqnr_db - sqnr) < 0.5


def test_full_precision_weights_are_really_freed():
    with MemoryTracker("cpu") as tracker:
        model = build_decoder("tiny")
        ids = decoder_inputs(model, batch=1, seq=8)
        _, out, (report,) = compile_and_run(model, *ids, quantize="int4-g32-asym-mse")
        del out
    (quantize, fold, release, fuse, _) = report.records[1:]
    held = live_tensor_bytes(list(model.parameters()) + list(model.buffers()))
    compressed = fold.weight_bytes_after - (held - 0)  # packed codes + scales/offsets in the graph
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert release.details["released_bytes"] == linear_bytes
    # What the process still holds from this block: the unquantized parameters and buffers,
    # the packed weights with their scales (and small compile-time leftovers).
    expected = held + compressed
    assert tracker.stats.end_bytes <= 1.05 * expected + 64 * 1024, (tracker.stats.end_bytes, expected)
    assert tracker.stats.end_bytes < 0.5 * (held + linear_bytes)


def test_recompiles_need_neither_the_originals_nor_new_work():
    model = build_decoder("tiny")
    compiled, _, _ = compile_and_run(model, *decoder_inputs(model, batch=1, seq=8), quantize="int8")
    builds = WEIGHTS.builds
    with memsave.collect() as reports, torch.no_grad():
        for seq in (12, 16):
            out = compiled(*decoder_inputs(model, batch=1, seq=seq))
    assert out.shape == (1, 16, 256)
    assert len(reports) == 1  # one dynamic-shape recompile
    assert WEIGHTS.builds == builds  # scales and packed codes came from the cache


def test_eager_use_after_release_is_a_clear_error_and_keeping_is_an_option():
    model = build_mlp()
    x = torch.randn(2, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about global module hooks
        compile_and_run(model, x, quantize="int8")
    # The guard is a hook on the modules that own released weights, not a global one (with a
    # global module hook torch warns on every call of every compiled module).
    assert not torch.nn.modules.module._has_any_global_hook()
    with pytest.raises(RuntimeError, match=r"Linear.weight \(layers.0.weight\) was released by memsave"):
        model(x)
    kept = build_mlp()
    with torch.no_grad():
        expected = kept(x)
    compile_and_run(kept, x, quantize={"bits": 8, "free_weights": False})
    with torch.no_grad():
        torch.testing.assert_close(kept(x), expected)


def test_a_graph_that_reads_a_released_weight_fails_clearly():
    model = build_mlp()
    x = torch.randn(2, 64)
    compiled, _, _ = compile_and_run(model, x, quantize="int8")
    # Training reads the full-precision weights (gradients are taken with respect to them).
    with pytest.raises(RuntimeError, match=r"reads weight 'layers.0.weight' in full precision .* released"):
        compiled(x.requires_grad_()).sum().backward()


class LinearAndSum(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)

    def forward(self, x):
        return self.fc(x) + self.fc.weight.sum()  # a use memsave does not quantize


def test_weights_with_other_uses_are_kept():
    model = LinearAndSum()
    x = torch.randn(2, 32)
    with torch.no_grad():
        expected = model(x)
    _, out, (report,) = compile_and_run(model, x, quantize="int8")
    assert report.records[3].details["released"] == []
    assert model.fc.weight.untyped_storage().nbytes() == 32 * 32 * 4
    assert ErrorStats.between([expected], [out]).sqnr_db > 35


def test_trained_weights_are_left_in_full_precision():
    model = build_mlp()
    x = torch.randn(4, 64, requires_grad=True)
    compiled = torch.compile(model, backend="memsave", options={"quantize": "int8", "codegen": "fx"})
    with memsave.collect() as reports:
        compiled(x).sum().backward()
    joint = next(r for r in reports if r.stage == "joint")
    assert joint.records[1].notes == ("training graph: every weight requires grad and stays in full precision "
                                      "(only frozen weights are quantized)",)
    assert model.layers[0].weight.grad is not None
    assert model.layers[0].weight.untyped_storage().nbytes() > 0  # and is not released


def test_embeddings_are_quantized_when_asked():
    model = build_decoder("tiny")
    ids = decoder_inputs(model, batch=1, seq=8)
    with torch.no_grad():
        expected = model(*ids)
    _, out, (report,) = compile_and_run(model, *ids, quantize={"bits": 8, "embeddings": True})
    assert "embed_tokens.weight: int8 per-channel sym rtn" in report.records[1].details["quantized"]
    assert ErrorStats.between([expected], [out]).sqnr_db > 35


def test_hf_llama_quantizes_and_stays_close():
    model = build_hf_llama()
    inputs = hf_inputs(model, batch=1, seq=16)
    with torch.no_grad():
        expected = model(*inputs)
    _, out, (report,) = compile_and_run(model, *inputs, quantize="int8")
    assert len(report.records[1].details["quantized"]) == 2 * 7 + 1  # q,k,v,o,gate,up,down × 2 + lm_head
    assert ErrorStats.between([expected], [out]).sqnr_db > 35


def test_linear_affine_passes_opcheck_and_matches_its_definition():
    from memsave.ops import linear_affine, quantize_weight

    w, x, b = torch.randn(48, 80), torch.randn(3, 5, 80), torch.randn(48)
    packed, scale, offset = quantize_weight(w, 4, 32, symmetric=False)
    args = (x, packed, scale, offset, b, 4, 32, 80)
    torch.library.opcheck(memsave_ops.linear_affine.default, args)
    dq = dequantize_affine(packed, scale, offset, 4, 32, 80, torch.float32)
    torch.testing.assert_close(linear_affine(*args), torch.nn.functional.linear(x, dq, b))


def test_inductor_runs_the_fused_quantized_graph():
    model = build_decoder("tiny")
    ids = decoder_inputs(model, batch=2, seq=16)
    reference = build_decoder("tiny")
    _, fx_out, _ = compile_and_run(reference, *ids, quantize="int4")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memsave", options={"quantize": "int4"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(*ids), fx_out, rtol=1e-4, atol=1e-4)


def test_work_on_a_released_weight_is_refused_not_a_crash():
    model = build_mlp()
    compile_and_run(model, torch.randn(2, 64), quantize="int8")
    released = model.layers[0].weight
    with pytest.raises(RuntimeError, match=r"weight 'layers.0.weight' was released after compression"):
        WEIGHTS.get_or_build(released, "something-new", lambda: released * 2)
