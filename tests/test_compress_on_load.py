"""Compressing while loading: checkpoint reading, memsave.empty_parameters, memsave.load(...,
options=...) on a plain safetensors checkpoint, memsave.plan(..., checkpoint=...), and the
meta-device estimate of one call's working memory."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import memsave
from memsave.budget.planner import measured_call, plan_layers, plannable_weights
from memsave.checkpoint import Checkpoint
from memsave.memory.meta_peak import meta_call_peak
from memsave.weights import WEIGHTS, is_released

REPO = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    fields.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="eager")).eval()


def empty_llama(**overrides):
    with memsave.empty_parameters():
        return tiny_llama(**overrides)


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_llama()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


TOKENS = torch.arange(24).view(2, 12) % 96


def test_checkpoint_reads_each_tensor_as_saved(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4).to(torch.bfloat16), "c": torch.arange(7),
               "d": torch.randn(2, 2).half(), "e": torch.zeros(0, 3)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    ckpt = Checkpoint(path)
    assert set(ckpt.names()) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(ckpt.read(name), t) and ckpt.read(name).dtype == t.dtype
        assert torch.equal(ckpt.read(name, own_mapping=False), t)
    assert torch.equal(ckpt.read("b", torch.float32), tensors["b"].float())
    (tmp_path / "bad").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Checkpoint(tmp_path / "bad")


def test_empty_parameters_leaves_buffers_real():
    model = empty_llama()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert isinstance(model.lm_head.weight, nn.Parameter)
    buffers = dict(model.named_buffers())
    assert buffers and all(b.device.type == "cpu" for b in buffers.values())  # rotary inv_freq
    assert nn.Linear(3, 3).weight.device.type == "cpu"  # only inside the block


def test_loading_compresses_each_weight_to_the_codes_a_compile_makes(checkpoint):
    model, path = checkpoint
    options = {"quantize": {"bits": 4, "group_size": 32, "method": "mse"}}
    compile_options = {**options, "codegen": "fx"}  # the weights are the point here, not the codegen
    with torch.no_grad():
        expected = torch.compile(model, backend="memsave", options=compile_options)(TOKENS).logits
    fresh = empty_llama()
    memsave.load(fresh, path, options=options)
    linears = [n for n, m in fresh.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(fresh._memsave_loaded["compressed"]) == sorted(f"{n}.weight" for n in linears)
    assert "model.embed_tokens.weight" in fresh._memsave_loaded["full"]
    for name in fresh._memsave_loaded["compressed"]:
        weight = fresh.get_parameter(name)
        assert is_released(weight) and weight.untyped_storage().nbytes() == 0
    builds = WEIGHTS.builds
    with torch.no_grad():
        out = torch.compile(fresh, backend="memsave", options=compile_options)(TOKENS).logits
    assert WEIGHTS.builds == builds  # every code was cached by the loader: the compile read no weight
    assert torch.equal(out, expected)


def test_a_tied_weight_is_loaded_as_it_is(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    path = tmp_path / "tied.safetensors"
    # safetensors keeps one name of a shared tensor, as HF's save_pretrained does
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(path))
    options = {"quantize": "int8", "codegen": "fx"}
    with torch.no_grad():
        expected = torch.compile(model, backend="memsave", options=options)(TOKENS).logits
    fresh = empty_llama(tie_word_embeddings=True)
    memsave.load(fresh, path, options=options)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert "model.embed_tokens.weight" in fresh._memsave_loaded["full"]
    with torch.no_grad():
        assert torch.equal(torch.compile(fresh, backend="memsave", options=options)(TOKENS).logits, expected)


def test_loading_refuses_what_it_cannot_do(checkpoint, tmp_path):
    model, path = checkpoint
    with pytest.raises(NotImplementedError, match="'quantize' options only"):
        memsave.load(empty_llama(), path, options={"prune": "2:4"})
    with pytest.raises(ValueError, match="options=...") as info:
        memsave.load(empty_llama(), path)  # a plain checkpoint without options
    assert "load_state_dict" in str(info.value)
    with pytest.raises(ValueError, match="missing key"):
        memsave.load(tiny_llama(num_hidden_layers=3), path, options={"quantize": "int8"})
    with pytest.raises(ValueError, match="shape mismatch"):
        memsave.load(empty_llama(intermediate_size=128), path, options={"quantize": "int8"}, strict=False)
    compiled = torch.compile(model, backend="memsave", options={"quantize": "int8"})
    with torch.no_grad():
        compiled(TOKENS)
    saved = tmp_path / "saved.safetensors"
    memsave.save(compiled, saved)
    with pytest.raises(ValueError, match="compressed already"):
        memsave.load(empty_llama(), saved, options={"quantize": "int8"})


def test_the_meta_estimate_of_working_memory_matches_a_measured_call():
    model = tiny_llama(hidden_size=128, intermediate_size=344, num_hidden_layers=3)
    tokens = torch.arange(4 * 48).view(4, 48) % 96
    _, measured = measured_call(model, [tokens])
    estimated = meta_call_peak(model, [tokens])
    assert abs(estimated - measured) <= 0.05 * measured, (estimated, measured)
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model itself is untouched


def test_a_plan_from_a_checkpoint_scores_each_weight_as_in_memory(checkpoint):
    model, path = checkpoint
    fresh = empty_llama()
    budget = 256 * 1024
    plan = memsave.plan(fresh, TOKENS, budget=budget, checkpoint=path, working=32 * 1024)
    assert not plan.calibrated and plan.total_bytes <= budget
    # the same knapsack over the same weights held in memory (no calibration, no gains)
    layers, tables = plannable_weights(model)
    other = sum(t.numel() * t.element_size() for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if n not in layers)
    in_memory = plan_layers(layers, other, 32 * 1024, budget, embeddings=tables)
    assert [(lp.name, lp.form, lp.bytes) for lp in plan.layers] == [(lp.name, lp.form, lp.bytes) for lp in in_memory.layers]
    assert len({lp.form for lp in plan.layers}) > 1  # the budget makes it choose
    json.loads(json.dumps(plan.options))
    memsave.load(fresh, path, options=plan.options)
    with torch.no_grad():
        torch.compile(fresh, backend="memsave", options={**plan.options, "codegen": "fx"})(TOKENS)
    held = WEIGHTS.held_bytes(list(fresh.parameters()))
    assert held == plan.weight_bytes - sum(b.numel() * b.element_size() for b in fresh.buffers())
    with pytest.raises(ValueError, match="calibration runs the model"):
        memsave.plan(empty_llama(), TOKENS, budget=budget, checkpoint=path, calibration=[TOKENS])


CHILD = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    from torch import nn
    import memsave
    from memsave.memory.process import rss_bytes, peak_rss_bytes, reset_peak_rss

    def mlp():
        return nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(16)]).eval()

    path, warm, mode = sys.argv[1:]
    from safetensors.torch import load_file
    with memsave.empty_parameters():  # imports and one-time setup before measuring
        memsave.load(nn.Sequential(nn.Linear(1024, 1024, bias=False)), warm, options={"quantize": "int8"})
    gc.collect()
    base = rss_bytes()
    reset_peak_rss()
    if mode == "compress":
        with memsave.empty_parameters():
            model = mlp()
        memsave.load(model, path, options={"quantize": "int8"})
    else:  # what a user does without memsave
        model = mlp()
        model.load_state_dict(load_file(path))
    print(json.dumps({"peak": peak_rss_bytes() - base}))
    """
)


@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_loading_holds_one_full_precision_weight_at_a_time(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "mlp.safetensors"
    save_file({f"{i}.weight": torch.randn(1024, 1024) for i in range(16)}, str(path))  # 64 MiB fp32, 4 MiB each
    warm = tmp_path / "warm.safetensors"
    save_file({"0.weight": torch.randn(1024, 1024)}, str(warm))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    peaks = {}
    for mode in ("compress", "plain"):
        run = subprocess.run([sys.executable, "-c", CHILD, str(path), str(warm), mode], env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        peaks[mode] = json.loads(run.stdout.strip().splitlines()[-1])["peak"] / 2**20
    # Without memsave: the model's 64 MiB and the file's 64 MiB (measured 127 MiB). Compressing
    # while loading: the 16 MiB of int8 codes, one 4 MiB weight and a small fixed overhead (the
    # compression's temporaries, 4.4 MiB for one of these weights, and the C heap's slack;
    # measured 29.8 MiB in all).
    assert peaks["plain"] > 100, peaks
    assert peaks["compress"] < 16 + 4 + 16, peaks


def test_rows_are_quantized_on_their_own_so_a_plan_may_score_a_subset():
    from memsave.budget.candidates import reconstructed
    from memsave.budget.sensitivity import relative_output_noise
    from memsave.budget.stream import QUANTIZED_FORMS, SCORE_ROWS, spread_rows

    torch.manual_seed(0)
    w = torch.randn(2 * SCORE_ROWS + 7, 64) * torch.linspace(0.1, 3.0, 2 * SCORE_ROWS + 7)[:, None]
    rows = torch.linspace(0, w.shape[0] - 1, SCORE_ROWS).round().long()
    assert torch.equal(spread_rows(w), w[rows])
    for form in QUANTIZED_FORMS[1:]:
        whole = reconstructed(w, form)
        assert torch.equal(reconstructed(w[rows], form), whole[rows]), form.name
        full, sampled = relative_output_noise(w, whole, None), relative_output_noise(w[rows], whole[rows], None)
        assert sampled == pytest.approx(full, rel=0.1), form.name


def test_the_budget_holds_for_the_compiled_call_as_measured(tmp_path):
    # A call whose peak is at the LM head, where the compiled int4 kernels hold bf16 tiles beside
    # the logits that the eager call does not (kernel_allowance): the measured weights + the
    # compiled call's tracked peak must stay within the budget.
    model = tiny_llama(vocab_size=4096, hidden_size=128, intermediate_size=256)
    path = tmp_path / "lm.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    tokens = torch.arange(96).view(1, 96) * 37 % 4096
    fresh = empty_llama(vocab_size=4096, hidden_size=128, intermediate_size=256)
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    budget = fp32 // 5 + measured_call(model, [tokens])[1]
    plan = memsave.plan(fresh, tokens, budget=budget, checkpoint=path)
    assert plan.total_bytes <= budget
    memsave.load(fresh, path, options=plan.options)
    compiled = torch.compile(fresh, backend="memsave", options=plan.options)
    with torch.no_grad():
        compiled(tokens)
    tensors = list(fresh.parameters()) + list(fresh.buffers())
    measured = WEIGHTS.held_bytes(tensors) + measured_call(compiled, [tokens])[1]
    assert measured <= budget, (measured, budget, str(plan))
