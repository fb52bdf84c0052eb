"""The factorize pass: W ≈ U·V as two smaller linears, where that stores less; SVD and SVD-LLM."""

import copy

import pytest
import torch

import memsave
from helpers import compile_and_run
from memsave.calibrate import calibrate
from memsave.config import Config, FactorizeConfig
from memsave.memory.track import MemoryTracker, live_tensor_bytes
from memsave.models import build_decoder, build_mlp, decoder_inputs
from memsave.report import ErrorStats
from memsave.weights import WEIGHTS


def record(report, name):
    return next(r for r in report.records if r.name == name)


def best_rank_r(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def test_short_names_and_bad_values():
    assert Config.from_options({"factorize": "svd-20"}).factorize == FactorizeConfig(method="svd", reduction=0.2)
    assert Config.from_options({"factorize": "svd-llm"}).factorize == FactorizeConfig(method="svd-llm")
    with pytest.raises(ValueError, match=r"\['reduction'\]: 1.5 is not a fraction in \(0, 1\)"):
        Config.from_options({"factorize": {"reduction": 1.5}})
    with pytest.raises(ValueError, match=r"\['energy'\]: 0 is not a fraction in \(0, 1\]"):
        Config.from_options({"factorize": {"energy": 0}})
    with pytest.raises(ValueError, match=r"\['rank'\]: 0 is not a positive integer"):
        Config.from_options({"factorize": {"rank": 0}})
    with pytest.raises(ValueError, match=r"\['method'\]: invalid value 'qr'; valid choices: 'svd', 'svd-llm'"):
        Config.from_options({"factorize": {"method": "qr"}})


def test_svd_replaces_each_linear_by_its_best_rank_r_product():
    model = build_mlp(sizes=(64, 96, 48))
    x = torch.randn(4, 64)
    reference = copy.deepcopy(model)
    ranks = {}
    with torch.no_grad():
        for name, m in reference.named_modules():
            if isinstance(m, torch.nn.Linear):
                n, k = m.weight.shape
                ranks[name] = int(0.5 * n * k) // (n + k)  # keep half of the parameters
                m.weight.copy_(best_rank_r(m.weight, ranks[name]))
    _, out, (report,) = compile_and_run(model, x, factorize={"method": "svd", "reduction": 0.5})
    torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-5)
    layers = record(report, "factorize").details["layers"]
    assert {k: v["rank"] for k, v in layers.items()} == {f"{n}.weight": r for n, r in ranks.items()}
    for info in layers.values():
        n, k = info["shape"]
        assert info["bytes_after"] == info["rank"] * (n + k) * 4 <= 0.5 * info["bytes_before"]


def test_explicit_rank_and_a_rank_larger_than_the_matrix():
    model = build_mlp(sizes=(32, 48, 16))
    _, _, (report,) = compile_and_run(model, torch.randn(2, 32), factorize={"method": "svd", "rank": 4})
    assert {v["rank"] for v in record(report, "factorize").details["layers"].values()} == {4}
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"rank 40 is larger than layers.0.weight allows \(48×32: at most 32"):
        compile_and_run(build_mlp(sizes=(32, 48, 16)), torch.randn(2, 32), factorize={"method": "svd", "rank": 40})


def test_a_rank_that_would_not_save_leaves_the_layer_dense():
    model = build_mlp(sizes=(32, 48, 16))
    x = torch.randn(2, 32)
    with torch.no_grad():
        expected = model(x)
    # rank 12 on 16×48: 12·64 = 768 ≥ 768 = 16·48 → no saving; on 48×32: 12·80 = 960 < 1536.
    _, out, (report,) = compile_and_run(model, x, factorize={"method": "svd", "rank": 12})
    factorize = record(report, "factorize")
    assert set(factorize.details["layers"]) == {"layers.0.weight"}
    assert any("left layers.1.weight dense: rank 12 would store as much as dense" in n for n in factorize.notes)


def anisotropic_setup():
    """An MLP whose inputs have a few loud channels: where SVD-LLM's whitening matters."""
    torch.manual_seed(0)
    model = build_mlp(sizes=(64, 64, 64), bias=False)
    scale = torch.ones(64)
    scale[:4] = 20.0
    batches = [torch.randn(64, 64) * scale for _ in range(4)]
    return model, scale, batches


def test_svd_llm_has_lower_output_error_than_plain_svd_on_real_input_statistics():
    model, scale, batches = anisotropic_setup()
    x = torch.randn(32, 64) * scale
    with torch.no_grad():
        expected = model(x)
    calibrate(model, batches, progress=False)
    errors = {}
    for method in ("svd", "svd-llm"):
        torch._dynamo.reset()
        m = copy.deepcopy(model)
        calibrate(m, batches, progress=False)
        _, out, (report,) = compile_and_run(m, x, factorize={"method": method, "reduction": 0.6})
        errors[method] = ErrorStats.between([expected], [out]).sqnr_db
        assert record(report, "factorize").error is not None  # the report measures it too
    assert errors["svd-llm"] > errors["svd"] + 3, errors


def test_svd_llm_without_calibration_is_a_clear_error():
    with pytest.raises(Exception, match=r"method 'svd-llm' needs the input Gram matrix of layers.0.weight: run memsave.calibrate"):
        compile_and_run(build_mlp(sizes=(32, 48, 16)), torch.randn(2, 32), factorize="svd-llm")


def test_energy_and_sensitivity_allocation():
    model = build_decoder("tiny")
    ids = decoder_inputs(model, batch=1, seq=8)
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}  # released by the compile
    _, _, (report,) = compile_and_run(model, *ids, factorize={"method": "svd", "energy": 0.5})
    layers = record(report, "factorize").details["layers"]
    for name, info in layers.items():
        s = torch.linalg.svdvals(originals[name].double())
        energy = s.pow(2).cumsum(0) / s.pow(2).sum()
        assert energy[info["rank"] - 1] >= 0.5 > (energy[info["rank"] - 2] if info["rank"] > 1 else 0)
    torch._dynamo.reset()
    model = build_decoder("tiny")
    _, _, (report,) = compile_and_run(model, *ids, factorize={"method": "svd", "reduction": 0.4, "allocation": "sensitivity"})
    factorize = record(report, "factorize")
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not model.embed_tokens.weight)
    kept = sum(i["bytes_after"] // 4 for i in factorize.details["layers"].values())
    dense_left = linear_params - sum(i["bytes_before"] // 4 for i in factorize.details["layers"].values())
    assert kept + dense_left <= 0.6 * linear_params
    assert len({i["rank"] for i in factorize.details["layers"].values()}) > 1  # not one rank for all


def test_factors_free_the_originals_and_recompiles_reuse_them():
    with MemoryTracker("cpu") as tracker:
        model = build_decoder("tiny")
        compiled, out, (report,) = compile_and_run(model, *decoder_inputs(model, batch=1, seq=8), factorize="svd-50")
        del out
    held = live_tensor_bytes(list(model.parameters()) + list(model.buffers()))
    stored = sum(i["bytes_after"] for i in record(report, "factorize").details["layers"].values())
    assert tracker.stats.end_bytes <= 1.05 * (held + stored) + 64 * 1024
    builds = WEIGHTS.builds
    with torch.no_grad():
        compiled(*decoder_inputs(model, batch=1, seq=12))
    assert WEIGHTS.builds == builds


def test_prune_factorize_quantize_compose_and_each_reports_bytes_and_error():
    model = build_decoder("tiny")
    ids = decoder_inputs(model, batch=1, seq=8)
    with MemoryTracker("cpu") as tracker:
        _, out, (report,) = compile_and_run(
            model, *ids, prune="structured-25", factorize={"method": "svd", "reduction": 0.2}, quantize="int8"
        )
        del out
    prune, factorize, quantize, fold = (record(report, n) for n in ("prune", "factorize", "quantize", "fold_weights"))
    assert prune.weight_bytes_after < prune.weight_bytes_before
    assert factorize.weight_bytes_after < factorize.weight_bytes_before == prune.weight_bytes_after
    factors = sum(i["bytes_after"] for i in factorize.details["layers"].values())
    others = factorize.weight_bytes_after - factors  # embedding (tied to lm_head), norms, rotary tables
    assert fold.weight_bytes_after < others + 0.3 * factors  # int8 codes + per-channel scales
    assert all(r.error is not None for r in (prune, factorize, quantize))
    # The factors of the structurally pruned MLP weights got quantized, under their own labels.
    quantized = quantize.details["sqnr_db"]
    assert "layers.0.mlp.gate_proj.weight[rows·U]" in quantized
    assert "layers.0.mlp.down_proj.weight[columns·V]" in quantized
    assert "layers.0.self_attn.q_proj.weight[U]" in quantized
    # Nothing uncompressed is left behind: originals and intermediate fp32 forms are released.
    held = live_tensor_bytes(list(model.parameters()) + list(model.buffers()))
    assert tracker.stats.end_bytes <= 1.05 * (held + fold.weight_bytes_after) + 64 * 1024
