"""Quantization schemes and methods beyond round-to-nearest weights: per-layer error in the
report, activation-aware scaling (AWQ) with calibration, and W8A8 dynamic int8 activations."""

import dataclasses
import math

import pytest
import torch

import memsave
from memsave.calibrate import CALIBRATION, calibrate
from memsave.config import Config, QuantizeConfig
from memsave.models import build_decoder, build_mlp, decoder_inputs
from memsave.ops import dequantize_affine, quantize_affine
from memsave.ops.affine import choose_qparams_mse
from memsave.ops.awq import choose_awq
from memsave.ops.w8a8 import dequantize_per_token, linear_w8a8, quantize_per_token
from memsave.report import ErrorStats

memsave_ops = torch.ops.memsave


def compile_and_run(model, *inputs, **options):
    compiled = torch.compile(model, backend="memsave", options={"codegen": "fx", **options})
    with memsave.collect() as reports, torch.no_grad():
        out = compiled(*inputs)
    return out, reports


def test_report_lists_each_layers_error_worst_first():
    model = build_mlp(sizes=(64, 128, 32))
    _, (report,) = compile_and_run(model, torch.randn(4, 64), quantize={"bits": 4, "group_size": 32, "overrides": {"layers.1.*": {"bits": 8}}})
    quantize = report.records[1]
    sqnr = quantize.details["sqnr_db"]
    assert set(sqnr) == {"layers.0.weight", "layers.1.weight"}
    assert sqnr["layers.1.weight"] > sqnr["layers.0.weight"] + 15  # 8 bits vs 4: ~24 dB apart
    lines = [n for n in quantize.notes if n.startswith("  ")]
    assert lines[0].startswith("  layers.0.weight:") and lines[0].endswith("dB")  # worst first


# -- AWQ --------------------------------------------------------------------------------------


def test_awq_beats_plain_quantization_when_some_channels_carry_large_activations():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(256, 128, generator=g)
    x[:, :8] *= 30  # a few outlier input channels, as in real LLM activations
    s, scale, offset, alpha = choose_awq(w, x.abs().mean(0), x, 4, 32, symmetric=False)

    def output_error(w_hat):
        return (x @ w_hat.t() - x @ w.t()).pow(2).sum().item()

    plain_scale, plain_offset = choose_qparams_mse(w, 4, 32, False)
    plain = dequantize_affine(quantize_affine(w, plain_scale, plain_offset, 4, 32), plain_scale, plain_offset, 4, 32, 128, torch.float32)
    awq = dequantize_affine(quantize_affine(w * s, scale, offset, 4, 32), scale, offset, 4, 32, 128, torch.float32) / s
    assert alpha > 0
    assert output_error(awq) < 0.8 * output_error(plain)


def test_calibrate_records_every_linear_and_awq_uses_it():
    model = build_decoder("tiny")
    batches = [decoder_inputs(model, batch=2, seq=16, seed=s) for s in range(3)]
    assert calibrate(model, batches, progress=False) == 15  # 7 per block × 2 + lm_head
    stats = CALIBRATION[model.layers[0].mlp.down_proj.weight]
    assert stats.mean_abs.shape == (176,) and stats.sample.shape == (96, 176) and stats.tokens == 96
    ids = decoder_inputs(model, batch=1, seq=16, seed=10)
    with torch.no_grad():
        expected = model(*ids)
    out, (report,) = compile_and_run(model, *ids, quantize="int4-g32-asym-awq")
    quantize = report.records[1]
    assert len(quantize.details["awq_alpha"]) == 15
    assert any("awq alpha" in n for n in quantize.notes)
    # The graph shows the compensation explicitly: x · (1/s) in front of each quantized matmul.
    assert ErrorStats.between([expected], [out]).sqnr_db > 12


def test_awq_without_calibration_falls_back_to_mse_and_says_so():
    model = build_mlp()
    _, (report,) = compile_and_run(model, torch.randn(4, 64), quantize={"bits": 4, "group_size": 32, "method": "awq"})
    assert any("no calibration statistics" in n and "used mse" in n for n in report.records[1].notes)


# -- W8A8 -------------------------------------------------------------------------------------


def test_w8a8_options():
    assert Config.from_options({"quantize": "w8a8"}).quantize == QuantizeConfig(bits=8, activations="int8")
    with pytest.raises(ValueError, match="W8A8.*needs int8 per-channel symmetric"):
        QuantizeConfig(bits=4, activations="int8")
    with pytest.raises(ValueError, match=r"\['activations'\]: invalid value 'int4'"):
        QuantizeConfig(activations="int4")


def test_per_token_ops_and_the_integer_linear():
    x = torch.randn(3, 5, 40)
    codes, scale = quantize_per_token(x)
    assert codes.dtype == torch.int8 and scale.shape == (3, 5, 1)
    assert (dequantize_per_token(codes, scale, torch.float32) - x).abs().max() <= scale.max() / 2 + 1e-6
    torch.library.opcheck(memsave_ops.quantize_per_token.default, (x,))
    torch.library.opcheck(memsave_ops.dequantize_per_token.default, (codes, scale, torch.float32))
    w = torch.randn(24, 40)
    from memsave.ops import quantize_weight

    packed, w_scale, _ = quantize_weight(w, 8, None, symmetric=True)
    bias = torch.randn(24)
    y = linear_w8a8(x, packed, w_scale, bias)
    torch.library.opcheck(memsave_ops.linear_w8a8.default, (x, packed, w_scale, bias))
    # The same numbers as the explicit Q/DQ graph: dequantized activations × dequantized weights.
    w_dq = dequantize_affine(packed, w_scale, None, 8, 40, 40, torch.float64)
    x_dq = dequantize_per_token(codes, scale, torch.float64)
    exact = x_dq @ w_dq.t() + bias.double()
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)


def test_w8a8_end_to_end_fuses_into_integer_matmuls():
    model = build_decoder("tiny")
    ids = decoder_inputs(model, batch=2, seq=16)
    with torch.no_grad():
        expected = model(*ids)
    out, (report,) = compile_and_run(model, *ids, quantize="w8a8")
    records = {r.name: r for r in report.records}
    assert records["fuse_dequant_matmul"].notes[0].startswith("fused 15 ")
    assert records["quantize"].details["quantized"][0].endswith("int8 activations")
    # Fusing changed nothing numerically beyond fp32 rounding of the integer sums.
    assert abs(records["fuse_dequant_matmul"].error.sqnr_db - records["quantize"].error.sqnr_db) < 0.5
    assert ErrorStats.between([expected], [out]).sqnr_db > 30
    assert not math.isinf(records["quantize"].error.sqnr_db)


def test_an_awq_model_saves_loads_and_compiles_without_calibration(tmp_path):
    from memsave.models import Decoder
    from memsave.weights import WEIGHTS

    model = build_decoder("tiny")
    calibrate(model, [decoder_inputs(model, batch=2, seq=16, seed=s) for s in range(2)], progress=False)
    ids = decoder_inputs(model, batch=1, seq=16, seed=5)
    options = {"codegen": "fx", "quantize": "int4-g32-asym-awq", "debug": False}
    compiled = torch.compile(model, backend="memsave", options=options)
    with torch.no_grad():
        expected = compiled(*ids)
    memsave.save(compiled, tmp_path / "awq.safetensors")
    torch._dynamo.reset()
    with torch.device("meta"):
        fresh = Decoder(model.config).eval()
    memsave.load(fresh, tmp_path / "awq.safetensors")
    builds = WEIGHTS.builds
    with memsave.collect() as reports, torch.no_grad():
        out = torch.compile(fresh, backend="memsave", options=options)(*ids)
    assert torch.equal(out, expected)
    assert WEIGHTS.builds == builds  # AWQ's scales came from the file, not a new search
    assert not any("no calibration statistics" in n for n in reports[0].records[1].notes)


# -- log and vector quantization through the pass ---------------------------------------------


@pytest.mark.parametrize(
    "name, scheme, min_sqnr",
    [("log4-g64-mse", "log", 14.0), ("vq4", "vq", 16.0), ("vq2", "vq", 6.0), ("log8", "log", 25.0)],
)
def test_log_and_vq_schemes_compile_fuse_and_compute_their_reference(name, scheme, min_sqnr):
    from memsave.ops.schemes import SCHEMES, QuantSpec

    model = build_decoder("tiny")
    ids = decoder_inputs(model, batch=2, seq=16)
    with torch.no_grad():
        expected = model(*ids)
    fast, _ = compile_and_run(model, *ids, quantize=name)  # default: the fastest kernels (may narrow)
    assert ErrorStats.between([expected], [fast]).sqnr_db > min_sqnr
    torch._dynamo.reset()
    # compute_dtype "float32": exactly the model whose linear weights are dequantize(quantize(w))
    # under the same scheme.
    config = Config.from_options({"quantize": name}).quantize
    out, (report,) = compile_and_run(build_decoder("tiny"), *ids, quantize=dataclasses.replace(config, compute_dtype="float32"))
    records = {r.name: r for r in report.records}
    assert records["fuse_dequant_matmul"].notes[0].startswith("fused 15 ")
    assert all(q.split(": ")[1].startswith(scheme) for q in records["quantize"].details["quantized"])
    reference = build_decoder("tiny")
    rules = SCHEMES[scheme]
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                k = w.shape[1]
                group = k if config.group_size is None or config.group_size >= k else config.group_size
                spec = QuantSpec(scheme, config.bits, group, config.symmetric, config.method)
                params = rules.choose(w, spec)
                codes = rules.quantize(w, *params, *rules.quantize_extra(spec))
                w.copy_(rules.dequantize(codes, *params, *rules.dequantize_extra(spec), k, w.dtype))
        torch.testing.assert_close(out, reference(*ids), rtol=1e-5, atol=1e-5)


def test_log_and_vq_options():
    assert Config.from_options({"quantize": "vq2"}).quantize == QuantizeConfig(scheme="vq", bits=2)
    assert Config.from_options({"quantize": "log4-g128"}).quantize == QuantizeConfig(scheme="log", bits=4, group_size=128)
    with pytest.raises(ValueError, match="scheme 'vq' supports methods 'rtn'/'mse' only"):
        QuantizeConfig(scheme="vq", method="awq")
    with pytest.raises(ValueError, match=r"\['scheme'\]: invalid value 'fp4'; valid choices: 'affine', 'log', 'vq', 'nf4'"):
        QuantizeConfig(scheme="fp4")


# -- GPTQ -------------------------------------------------------------------------------------


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    from memsave.ops.gptq import quantize_affine_gptq

    g = torch.Generator().manual_seed(1)
    mix = torch.randn(96, 96, generator=g)
    x = torch.randn(512, 96, generator=g) @ mix  # correlated input channels, as in real layers
    w = torch.randn(48, 96, generator=g)
    scale, offset = choose_qparams_mse(w, 4, 32, False)
    rtn = quantize_affine(w, scale, offset, 4, 32)
    gptq = quantize_affine_gptq(w, scale, offset, x.t() @ x / x.shape[0], 4, 32)
    assert gptq.shape == rtn.shape and gptq.dtype == torch.uint8

    def output_error(codes):
        w_hat = dequantize_affine(codes, scale, offset, 4, 32, 96, torch.float32)
        return (x @ (w_hat - w).t()).pow(2).sum().item()

    assert output_error(gptq) < 0.7 * output_error(rtn)
    torch.library.opcheck(memsave_ops.quantize_affine_gptq.default, (w, scale, offset, x.t() @ x, 4, 32))
    with pytest.raises(ValueError, match=r"hessian must be \(96, 96\)"):
        quantize_affine_gptq(w, scale, offset, torch.eye(5), 4, 32)


def test_gptq_through_the_pass_with_calibration_and_without():
    model = build_decoder("tiny")
    calibrate(model, [decoder_inputs(model, batch=4, seq=32, seed=s) for s in range(3)], progress=False)
    assert CALIBRATION[model.lm_head.weight].gram.shape == (64, 64)
    ids = decoder_inputs(model, batch=1, seq=16, seed=11)
    with torch.no_grad():
        expected = model(*ids)
    out, (report,) = compile_and_run(model, *ids, quantize="int4")  # the int4 recipe is GPTQ
    records = {r.name: r for r in report.records}
    assert all("gptq" in q for q in records["quantize"].details["quantized"])
    assert ErrorStats.between([expected], [out]).sqnr_db > 14
    assert records["fold_weights"].weight_bytes_after < records["quantize"].weight_bytes_after  # Hessians dropped
    torch._dynamo.reset()
    uncalibrated = build_mlp()
    _, (report,) = compile_and_run(uncalibrated, torch.randn(4, 64), quantize="int4")
    assert any("(gptq)" in n and "used mse" in n for n in report.records[1].notes)
