"""Structured pruning of attention heads: the pruned model is exactly the model with those heads'
o_proj columns zeroed, it holds fewer bytes, and what it cannot prune it leaves as it was."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import compile_and_run
from memsave.calibrate import calibrate
from memsave.config import Config, OptionError, PruneConfig
from memsave.memory.track import live_tensor_bytes
from memsave.models import build_decoder, build_hf_bert, build_hf_gpt2, build_hf_llama, decoder_inputs, hf_inputs


def record(report, name):
    return next(r for r in report.records if r.name == name)


def attention_blocks(model):
    """((q, k, v, o) linears, kv heads) for every attention block of a decoder, HF Llama or BERT."""
    found = []
    config = getattr(model, "config", None)
    for mod in model.modules():
        if hasattr(mod, "q_proj") and hasattr(mod, "o_proj"):
            kv = getattr(mod, "n_kv_heads", None) or config.num_key_value_heads
            found.append(((mod.q_proj, mod.k_proj, mod.v_proj, mod.o_proj), kv))
        elif type(mod).__name__ == "BertAttention":
            found.append(((mod.self.query, mod.self.key, mod.self.value, mod.output.dense), config.num_attention_heads))
    return found


def o_proj_input_rms(model, batches):
    """Per o_proj, the RMS of each of its input channels over the calibration batches."""
    rows = {}
    hooks = [lin[3].register_forward_pre_hook(lambda m, args: rows.setdefault(m, []).append(args[0].reshape(-1, args[0].shape[-1]).double()))
             for lin, _ in attention_blocks(model)]
    with torch.no_grad():
        for b in batches:
            model(*b)
    for h in hooks:
        h.remove()
    return {m: torch.cat(r).pow(2).mean(0).sqrt().float() for m, r in rows.items()}


def heads_zeroed(model, sparsity, method="magnitude", rms=None):
    """The reference, in plain torch: per attention block, score each kv group (MHA: each head),
    drop the lowest floor(sparsity · KV), zero o_proj's columns of their query heads."""
    reference = copy.deepcopy(model)
    kept = {}
    with torch.no_grad():
        for ((q, k, v, o), kv), ((_, _, _, ref_o), _) in zip(attention_blocks(model), attention_blocks(reference)):
            wo = o.weight  # (hidden, H·D)
            block = wo.shape[1] // kv  # o_proj columns per kv group: (H / KV) · D
            if method == "wanda":
                wo = wo * rms[o][None, :]
            score = wo.t().reshape(kv, -1).norm(dim=1)
            if method == "magnitude":
                score = score * sum(p.weight.reshape(kv, -1).norm(dim=1) for p in (q, k, v))
            drop = score.argsort(descending=True, stable=True)[kv - math.floor(sparsity * kv):]
            for g in drop.tolist():
                ref_o.weight[:, g * block:(g + 1) * block] = 0
            kept[o] = kv - drop.numel()
    return reference, kept


def held_bytes(model, reports):
    consts = [t for r in reports for t in r.constant_tensors()]
    return live_tensor_bytes(list(model.parameters()) + list(model.buffers()) + consts)


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("structured-heads-25", PruneConfig(structure="structured", granularity="heads", sparsity=0.25)),
        ("wanda-structured-channels-50", PruneConfig(structure="structured", granularity="channels", method="wanda")),
        ("structured", PruneConfig(structure="structured", granularity="channels+heads")),
    ],
)
def test_granularity_short_names(name, expected):
    assert Config.from_options({"prune": name}).prune == expected


def test_bad_granularity_names_the_problem():
    with pytest.raises(OptionError, match=r"\['granularity'\]: invalid value 'neurons'; valid choices: 'channels\+heads', 'channels', 'heads'"):
        Config.from_options({"prune": {"structure": "structured", "granularity": "neurons"}})
    with pytest.raises(OptionError, match=r"\['granularity'\]: 'heads' applies to structure 'structured' only, not '2:4'"):
        Config.from_options({"prune": {"structure": "2:4", "granularity": "heads"}})
    with pytest.raises(OptionError, match=r"unknown value '2:4-heads'"):
        Config.from_options({"prune": "2:4-heads"})


# -- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, sparsity, kept_units",
    [
        ({"n_kv_heads": 4}, 0.5, 2),  # MHA: 4 heads, 2 go
        ({"n_heads": 8, "n_kv_heads": 4}, 0.25, 3),  # GQA: 4 kv groups of 2 query heads, 1 group goes
    ],
    ids=["mha", "gqa"],
)
def test_magnitude_heads_equal_zeroing_them_on_the_decoder(overrides, sparsity, kept_units):
    model = build_decoder("tiny", **overrides)
    ids = decoder_inputs(model, batch=2, seq=8)
    reference, kept = heads_zeroed(model, sparsity)
    dense = held_bytes(model, [])
    _, out, (report,) = compile_and_run(model, *ids, prune={"structure": "structured", "granularity": "heads", "sparsity": sparsity})
    torch.testing.assert_close(out, reference(*ids), rtol=1e-5, atol=1e-5)
    assert set(kept.values()) == {kept_units}

    prune = record(report, "prune")
    cfg = model.config
    kv, d = cfg.n_kv_heads, cfg.head_dim
    layers = prune.details["layers"]
    for i in range(cfg.n_layers):
        q, k, o = (layers[f"layers.{i}.self_attn.{p}_proj.weight"] for p in "qko")
        assert q["heads"] == o["heads"] == f"{kept_units * cfg.kv_groups}/{cfg.n_heads}"
        assert k["heads"] == f"{kept_units}/{kv}"
        assert k["bytes_after"] == kept_units * d * cfg.hidden * 4
        assert o["bytes_after"] == cfg.hidden * kept_units * cfg.kv_groups * d * 4
    kind = "heads" if cfg.kv_groups == 1 else "kv groups (1 kv head + 2 query heads each)"
    assert f"heads of layers.0.self_attn: kept {kept_units}/{kv} {kind}" in "\n".join(prune.notes)
    # Measured: the live bytes fall by exactly the removed rows and columns (the dense
    # originals are released; the graph holds the smaller weights).
    removed_per_layer = (kv - kept_units) * d * cfg.hidden * 4 * 2 * (1 + cfg.kv_groups)  # q, o: G·D each; k, v: D each
    assert held_bytes(model, [report]) == dense - cfg.n_layers * removed_per_layer


def test_wanda_heads_are_ranked_by_the_attention_outputs_rms():
    model = build_decoder("tiny", n_kv_heads=4)
    batches = [decoder_inputs(model, batch=2, seq=16, seed=s) for s in (3, 4, 5)]
    calibrate(model, batches, progress=False)
    with torch.no_grad():  # make head 0's outputs tiny in layer 0: wanda must drop it, magnitude need not
        model.layers[0].self_attn.v_proj.weight[:16] *= 1e-3
        model.layers[0].self_attn.o_proj.weight[:, :16] *= 50
    calibrate(model, batches, progress=False)
    rms = o_proj_input_rms(model, batches)
    reference, _ = heads_zeroed(model, 0.25, "wanda", rms)
    magnitude_reference, _ = heads_zeroed(model, 0.25, "magnitude")
    ids = decoder_inputs(model, batch=2, seq=8)
    _, out, (report,) = compile_and_run(model, *ids, prune="wanda-structured-heads-25")
    torch.testing.assert_close(out, reference(*ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, magnitude_reference(*ids), rtol=1e-3, atol=1e-3)  # a different head went
    assert record(report, "prune").details["layers"]["layers.0.self_attn.q_proj.weight"]["heads"] == "3/4"


def test_hf_llama_heads_and_mlp_channels_together_equal_zeroing_them():
    model = build_hf_llama("tiny")
    ids = hf_inputs(model, batch=2, seq=8)
    reference, kept = heads_zeroed(model, 0.5)
    with torch.no_grad():  # and the MLP channels, as test_prune.py's structured reference does
        for mod in reference.modules():
            if type(mod).__name__ == "LlamaMLP":
                score = mod.down_proj.weight.norm(dim=0) * (mod.gate_proj.weight.norm(dim=1) + mod.up_proj.weight.norm(dim=1))
                mod.down_proj.weight[:, score.argsort(stable=True)[: math.floor(0.5 * score.numel())]] = 0
    _, out, (report,) = compile_and_run(model, *ids, prune="structured-50")
    torch.testing.assert_close(out, reference(*ids), rtol=1e-5, atol=1e-5)
    layers = record(report, "prune").details["layers"]
    assert layers["model.model.layers.1.self_attn.v_proj.weight"]["heads"] == "1/2"
    assert layers["model.model.layers.1.mlp.up_proj.weight"]["channels"] == "88/176"
    assert "grouped-query attention: whole kv groups go" in "\n".join(record(report, "prune").notes)


def test_hf_llama_sdpa_heads_equal_zeroing_them():
    model = build_hf_llama("tiny", attn_implementation="sdpa")
    ids = hf_inputs(model, batch=1, seq=8)
    reference, _ = heads_zeroed(model, 0.5)
    _, out, (report,) = compile_and_run(model, *ids, prune="structured-heads-50")
    torch.testing.assert_close(out, reference(*ids), rtol=1e-5, atol=1e-5)
    assert record(report, "prune").changed


def test_hf_bert_heads_with_biases_and_padding_mask_equal_zeroing_them():
    model = build_hf_bert("tiny")  # q/k/v/o with biases (addmm), additive padding mask (B, 1, 1, T)
    ids = hf_inputs(model, batch=2, seq=8, attention_mask=True)
    reference, _ = heads_zeroed(model, 0.5)
    _, out, (report,) = compile_and_run(model, *ids, prune="structured-heads-50")
    torch.testing.assert_close(out, reference(*ids), rtol=1e-5, atol=1e-5)
    layers = record(report, "prune").details["layers"]
    assert layers["model.encoder.layer.0.attention.output.dense.weight"]["heads"] == "2/4"


def test_new_batch_and_sequence_sizes_recompile_the_pruned_heads_exactly():
    model = build_decoder("tiny", n_kv_heads=4)
    reference, _ = heads_zeroed(model, 0.5)
    compiled, _, _ = compile_and_run(model, *decoder_inputs(model, batch=2, seq=8), prune="structured-heads-50")
    with torch.no_grad():
        for batch, seq in ((3, 8), (4, 12), (5, 16)):  # dynamic batch: heads merge with it in (B·H, T, D)
            ids = decoder_inputs(model, batch=batch, seq=seq)
            torch.testing.assert_close(compiled(*ids), reference(*ids), rtol=1e-5, atol=1e-5)


def test_one_head_stays_at_high_sparsity():
    model = build_decoder("tiny", n_kv_heads=4)
    ids = decoder_inputs(model, batch=1, seq=8)
    reference, kept = heads_zeroed(model, 0.9)
    _, out, (report,) = compile_and_run(model, *ids, prune="structured-heads-90")
    assert set(kept.values()) == {1}
    torch.testing.assert_close(out, reference(*ids), rtol=1e-5, atol=1e-5)
    assert record(report, "prune").details["layers"]["layers.1.self_attn.o_proj.weight"]["heads"] == "1/4"


def test_prune_heads_then_quantize_runs():
    model = build_decoder("tiny", n_kv_heads=4)
    ids = decoder_inputs(model, batch=2, seq=8)
    reference, _ = heads_zeroed(model, 0.5)
    _, out, (report,) = compile_and_run(model, *ids, prune="structured-heads-50", quantize="int8")
    expected = reference(*ids)
    assert F.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > 0.999
    quantized = record(report, "quantize").details["sqnr_db"]
    assert "layers.0.self_attn.q_proj.weight[rows]" in quantized
    assert "layers.0.self_attn.o_proj.weight[columns]" in quantized


# -- refusals --------------------------------------------------------------------------------


def test_kv_groups_that_round_to_none_stay_and_say_so():
    model = build_decoder("tiny")  # 4 query heads, 2 kv heads: 25% of 2 kv groups is 0
    ids = decoder_inputs(model, batch=1, seq=8)
    with torch.no_grad():
        expected = model(*ids)
    _, out, (report,) = compile_and_run(model, *ids, prune="structured-heads-25")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    prune = record(report, "prune")
    assert not prune.changed
    assert any("25% of 2 kv groups (1 kv head + 2 query heads each) removes none" in n for n in prune.notes), prune.notes


def test_gpt2_conv1d_projections_are_refused_with_the_reason():
    model = build_hf_gpt2("tiny")
    ids = hf_inputs(model, batch=1, seq=8)
    with torch.no_grad():
        expected = model(*ids)
    _, out, (report,) = compile_and_run(model, *ids, prune="structured-heads-50")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    prune = record(report, "prune")
    assert not prune.changed
    assert any("h.0.attn.c_attn.weight dense (structured): used untransposed as x @ W (a Conv1D layer" in n for n in prune.notes)


class ToyAttention(nn.Module):
    """Multi-head self-attention with a twist that makes head pruning inexact (or unfollowable)."""

    def __init__(self, twist: str, hidden=32, heads=4):
        super().__init__()
        self.heads, self.twist = heads, twist
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.slopes = nn.Parameter(torch.linspace(0.5, 2.0, heads)[:, None, None])  # (H, 1, 1)

    def forward(self, x):
        b, t, h = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, H, T, D)
        scores = q @ k.transpose(-2, -1)  # (B, H, T, T)
        if self.twist == "per-head bias":
            scores = scores * self.slopes  # a per-head tensor no projection computes
        out = scores.softmax(-1) @ v  # (B, H, T, D)
        if self.twist == "mean over heads":
            return self.o(out.mean(1).repeat(1, 1, self.heads))  # (B, T, h): mixes the heads
        return self.o(out.transpose(1, 2).reshape(b, t, h))


@pytest.mark.parametrize(
    "twist, reason",
    [
        ("per-head bias", r"mul\w* combines the heads with \w+, which no prunable projection computes"),
        ("mean over heads", r"mean\w* \(aten.mean.dim\) reduces over the heads"),
    ],
)
def test_unrecognized_attention_is_left_as_it_was_with_a_reason(twist, reason):
    model = ToyAttention(twist).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = model(x)
    _, out, (report,) = compile_and_run(model, x, prune="structured-heads-50")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    prune = record(report, "prune")
    assert not prune.changed
    notes = "\n".join(prune.notes)
    assert "left q.weight dense (structured): " in notes
    assert __import__("re").search(reason, notes), notes
