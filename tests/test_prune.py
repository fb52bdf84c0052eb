"""The prune pass: each structure stores less, computes exactly the pruned model, and reports its error."""

import copy
import math

import pytest
import torch

import memsave
from helpers import compile_and_run
from memsave.calibrate import calibrate
from memsave.config import Config, PruneConfig
from memsave.memory.track import MemoryTracker, live_tensor_bytes
from memsave.models import build_decoder, build_hf_llama, build_mlp, decoder_inputs, hf_inputs
from memsave.weights import WEIGHTS

memsave_ops = torch.ops.memsave


def linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def record(report, name):
    return next(r for r in report.records if r.name == name)


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("2:4", PruneConfig(structure="2:4")),
        ("wanda-4:8", PruneConfig(structure="4:8", method="wanda")),
        ("magnitude-unstructured-30", PruneConfig(structure="unstructured", sparsity=0.3)),
        ("structured-25", PruneConfig(structure="structured", sparsity=0.25)),
    ],
)
def test_short_names(name, expected):
    assert Config.from_options({"prune": name}).prune == expected


def test_bad_prune_options_name_the_problem():
    with pytest.raises(ValueError, match=r"\['sparsity'\]: 1.0 is not a fraction in \[0, 1\)"):
        Config.from_options({"prune": {"sparsity": 1.0}})
    with pytest.raises(ValueError, match=r"\['sparsity'\]: -0.1 is not a fraction"):
        Config.from_options({"prune": {"sparsity": -0.1}})
    with pytest.raises(ValueError, match=r"\['structure'\]: invalid value '3:4'; valid choices: 'unstructured', 'structured', '2:4', '4:8'"):
        Config.from_options({"prune": {"structure": "3:4"}})
    with pytest.raises(ValueError, match=r"unknown value '2:3'"):
        Config.from_options({"prune": "2:3"})
    with pytest.raises(ValueError, match=r"\['overrides'\]\['x'\]: unknown key 'bits'"):
        Config.from_options({"prune": {"overrides": {"x": {"bits": 3}}}})


def test_n_m_needs_in_features_divisible_by_m():
    model = build_mlp(sizes=(30, 64, 32))  # the first linear has 30 inputs
    with pytest.raises(Exception, match=r"2:4 needs the in-feature count of layers.0.weight \(30\) to be divisible by 4"):
        compile_and_run(model, torch.randn(2, 30), prune="2:4")


# -- unstructured ----------------------------------------------------------------------------


def magnitude_masked(model, sparsity):
    """The reference: each linear's smallest-|w| share zeroed, one threshold per layer."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for m in linears(reference).values():
            w = m.weight
            drop = math.floor(sparsity * w.numel())
            idx = w.abs().flatten().argsort(stable=True)[:drop]
            w.view(-1)[idx] = 0
    return reference


def test_unstructured_magnitude_computes_the_pruned_model_from_bitmask_storage():
    model = build_mlp(sizes=(64, 128, 32))
    x = torch.randn(4, 64)
    expected = magnitude_masked(model, 0.5)(x)
    dense_bytes = sum(m.weight.numel() * 4 for m in linears(model).values())
    _, out, (report,) = compile_and_run(model, x, prune="magnitude-unstructured-50")
    torch.testing.assert_close(out, expected)
    prune = record(report, "prune")
    for info in prune.details["layers"].values():
        assert info["stored"] == "bitmask + values"
        assert info["nonzero"] == pytest.approx(0.5)
    stored = sum(i["bytes_after"] for i in prune.details["layers"].values())
    assert stored == pytest.approx(dense_bytes * (0.5 + 1 / 32))  # 2 of 4 bytes + 1 bit per weight
    assert record(report, "fuse_dequant_matmul").changed  # densify → mm became linear_bitmask
    assert record(report, "prune").error is not None


def test_wanda_keeps_the_largest_weight_times_input_rms_in_each_row():
    model = build_mlp(sizes=(32, 48, 16), bias=False)
    scale = torch.linspace(0.1, 10, 32)  # very unequal input channels
    batches = [torch.randn(16, 32) * scale for _ in range(4)]
    calibrate(model, batches, progress=False)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        first = linears(reference)["layers.0"].weight
        rms = torch.cat(batches).pow(2).mean(0).sqrt()
        score = first.abs() * rms
        drop = score.argsort(dim=1, stable=True)[:, :16]
        first.scatter_(1, drop, 0)
        second = linears(reference)["layers.1"].weight  # its inputs: hidden activations
        hidden = torch.cat([model.activation(model.layers[0](b)) for b in batches])
        score2 = second.abs() * hidden.pow(2).mean(0).sqrt()
        second.scatter_(1, score2.argsort(dim=1, stable=True)[:, :24], 0)
    x = torch.randn(3, 32) * scale
    _, out, (report,) = compile_and_run(model, x, prune={"method": "wanda", "sparsity": 0.5})
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
    # Every row lost exactly half of its weights (Wanda compares within a row).
    assert all(i["nonzero"] == 0.5 for i in record(report, "prune").details["layers"].values())
    # Released weights take their calibration statistics with them.
    from memsave.calibrate import CALIBRATION

    assert all(lin.weight not in CALIBRATION for lin in linears(model).values())


def test_wanda_without_calibration_is_a_clear_error():
    model = build_mlp(sizes=(32, 48, 16))
    with pytest.raises(Exception, match=r"method 'wanda' needs the input statistics of layers.0.weight: run memsave.calibrate"):
        compile_and_run(model, torch.randn(2, 32), prune={"method": "wanda"})


def test_unstructured_that_would_not_be_smaller_stays_dense_and_says_why():
    model = build_mlp(sizes=(64, 128, 32))
    x = torch.randn(2, 64)
    with torch.no_grad():
        expected = model(x)
    _, out, (report,) = compile_and_run(model, x, prune={"sparsity": 0.02})  # 98% of 4 B + 1 bit > 4 B
    torch.testing.assert_close(out, expected)
    prune = record(report, "prune")
    assert not prune.changed
    assert all(i["stored"] == "dense" for i in prune.details["layers"].values())
    assert any("is not smaller than dense at torch.float32" in note for note in prune.notes)


# -- N:M -------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure, n, m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_n_m_keeps_n_of_every_m_and_computes_the_pruned_model(structure, n, m):
    model = build_mlp(sizes=(64, 96, 32))
    x = torch.randn(5, 64)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for lin in linears(reference).values():
            groups = lin.weight.view(lin.weight.shape[0], -1, m)
            drop = groups.abs().argsort(dim=-1, stable=True)[..., : m - n]
            groups.scatter_(-1, drop, 0)
    compiled, out, (report,) = compile_and_run(model, x, prune=structure)
    torch.testing.assert_close(out, reference(x))
    prune = record(report, "prune")
    index_bits = math.ceil(math.log2(m))
    for info in prune.details["layers"].values():
        assert info["bytes_after"] == pytest.approx(info["bytes_before"] * n / m * (1 + index_bits / 32), rel=0.01)
    assert record(report, "fuse_dequant_matmul").changed


# -- structured ------------------------------------------------------------------------------


def test_structured_removes_mlp_channels_and_equals_zeroing_them():
    model = build_decoder("tiny")
    ids = decoder_inputs(model, batch=2, seq=8)
    reference = copy.deepcopy(model)
    kept = {}
    with torch.no_grad():
        for i, layer in enumerate(reference.layers):
            mlp = layer.mlp
            score = mlp.down_proj.weight.norm(dim=0) * (mlp.gate_proj.weight.norm(dim=1) + mlp.up_proj.weight.norm(dim=1))
            channels = score.numel()
            keep = score.argsort(descending=True, stable=True)[: channels - math.floor(0.25 * channels)]
            dropped = torch.ones(channels, dtype=torch.bool)
            dropped[keep] = False
            mlp.down_proj.weight[:, dropped] = 0  # removing a channel = its column of down_proj is 0
            kept[i] = keep.numel()
    _, out, (report,) = compile_and_run(model, *ids, prune="structured-channels-25")  # heads: test_prune_heads.py
    torch.testing.assert_close(out, reference(*ids), rtol=1e-4, atol=1e-5)
    prune = record(report, "prune")
    layers = prune.details["layers"]
    assert set(layers) == {f"layers.{i}.mlp.{p}.weight" for i in range(len(model.layers)) for p in ("gate_proj", "up_proj", "down_proj")}
    for i in range(len(model.layers)):
        gate = layers[f"layers.{i}.mlp.gate_proj.weight"]
        assert gate["channels"] == f"{kept[i]}/{model.layers[i].mlp.gate_proj.weight.shape[0]}"
        assert gate["bytes_after"] == kept[i] * model.layers[i].mlp.gate_proj.weight.shape[1] * 4
    # Attention projections are not channel groups (reshaped into heads, or feeding the residual);
    # with granularity "channels" they stay dense.
    assert any("self_attn.q_proj.weight dense (structured)" in note for note in prune.notes)
    assert any(
        "self_attn.o_proj.weight dense (structured): add" in note and "combines the channels with" in note
        for note in prune.notes
    ), prune.notes
    assert prune.weight_bytes_after < prune.weight_bytes_before


def test_structured_on_hf_llama_matches_the_masked_model():
    model = build_hf_llama("tiny")
    ids = hf_inputs(model, batch=1, seq=8)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for mod in reference.modules():
            if type(mod).__name__ == "LlamaMLP":
                score = mod.down_proj.weight.norm(dim=0) * (mod.gate_proj.weight.norm(dim=1) + mod.up_proj.weight.norm(dim=1))
                n = score.numel()
                drop = score.argsort(stable=True)[: math.floor(0.5 * n)]
                mod.down_proj.weight[:, drop] = 0
    _, out, (report,) = compile_and_run(model, *ids, prune="structured-channels-50")
    torch.testing.assert_close(out, reference(*ids), rtol=1e-4, atol=1e-5)
    assert record(report, "prune").changed


def test_wanda_structured_scores_by_the_channels_activation():
    model = build_mlp(sizes=(16, 64, 8), bias=True)
    batches = [torch.randn(32, 16) for _ in range(3)]
    calibrate(model, batches, progress=False)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        hidden = torch.cat([model.activation(model.layers[0](b)) for b in batches])
        score = model.layers[1].weight.norm(dim=0) * hidden.pow(2).mean(0).sqrt()
        drop = score.argsort(stable=True)[:32]
        reference.layers[1].weight[:, drop] = 0
    x = torch.randn(4, 16)
    _, out, (report,) = compile_and_run(model, x, prune={"structure": "structured", "method": "wanda", "sparsity": 0.5})
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
    layers = record(report, "prune").details["layers"]
    assert layers["layers.0.weight"]["channels"] == "32/64"


# -- memory, recompiles, selection, training -------------------------------------------------


def test_pruned_weights_really_free_the_dense_originals():
    with MemoryTracker("cpu") as tracker:
        model = build_decoder("tiny")
        ids = decoder_inputs(model, batch=1, seq=8)
        _, out, (report,) = compile_and_run(model, *ids, prune="2:4")
        del out
    release = record(report, "release_weights")
    linear_bytes = sum(m.weight.numel() * 4 for m in linears(model).values() if m.weight is not model.embed_tokens.weight)
    assert release.details["released_bytes"] == linear_bytes
    held = live_tensor_bytes(list(model.parameters()) + list(model.buffers()))
    stored = sum(i["bytes_after"] for i in record(report, "prune").details["layers"].values())
    assert tracker.stats.end_bytes <= 1.05 * (held + stored) + 64 * 1024, (tracker.stats.end_bytes, held + stored)


def test_recompiles_reuse_the_pruned_forms():
    model = build_decoder("tiny")
    compiled, _, _ = compile_and_run(model, *decoder_inputs(model, batch=1, seq=8), prune="structured-50")
    builds = WEIGHTS.builds
    with torch.no_grad():
        for seq in (12, 16):
            out = compiled(*decoder_inputs(model, batch=1, seq=seq))
    assert out.shape == (1, 16, 256)
    assert WEIGHTS.builds == builds


def test_excluded_layers_stay_dense():
    model = build_mlp(sizes=(64, 128, 32))
    _, _, (report,) = compile_and_run(model, torch.randn(2, 64), prune={"structure": "2:4", "exclude": ["layers.1.*"]})
    assert set(record(report, "prune").details["layers"]) == {"layers.0.weight"}
    assert not memsave.weights.is_released(model.layers[1].weight)


def test_training_graphs_keep_dense_weights():
    model = build_mlp(sizes=(16, 32, 8)).train()
    compiled = torch.compile(model, backend="memsave", options={"prune": "2:4", "codegen": "fx"})
    with memsave.collect() as reports:
        compiled(torch.randn(2, 16)).sum().backward()
    assert model.layers[0].weight.grad is not None
    assert all(not r.changed for rep in reports for r in rep.records if r.name == "prune")
