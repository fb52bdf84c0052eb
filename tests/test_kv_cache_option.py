"""options={"kv_cache": "int8"}: HF's own static cache, generate(cache_implementation="static"),
held in int8 (passes/dynamo/quantize_static_cache.py, kv_tensor.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

import memsave
from memsave.config import OptionError
from memsave.kv_tensor import (
    QuantizedKV,
    allocate_int8,
    allocate_kivi_keys,
    allocate_kivi_values,
)
from memsave.ops.kv_cache import kv_int8_bytes

transformers = pytest.importorskip("transformers")


def _model(kind="llama", layers=2, d=16, **extra):
    torch.manual_seed(0)
    common = {"vocab_size": 128, "hidden_size": 4 * d, "intermediate_size": 128, "num_hidden_layers": layers,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8192, **extra}
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}
    config_class, model_class = classes[kind]
    return model_class(config_class(**common)).eval()


def _generate(model, ids, n, **kwargs):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return model.generate(ids, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                              output_scores=True, **kwargs)


def _records(reports, name):
    return [rec for r in reports for rec in r.records if rec.name == name]


@pytest.mark.parametrize("codegen, kind, scheme, n", [
    ("fx", "llama", "int8", 10), ("inductor", "llama", "int8", 10),
    ("fx", "llama", "int4", 40), ("inductor", "qwen2", "kivi2", 40)])  # 40: the key window fills and starts again
def test_static_generation_holds_the_scheme_and_equals_the_quantized_cache_class(codegen, kind, scheme, n):
    model = _model(kind)
    prompt = 12
    ids = torch.randint(0, 128, (1, prompt), generator=torch.Generator().manual_seed(1))
    forward = model.forward
    torch._dynamo.reset()
    model.forward = torch.compile(forward, backend="memsave", options={"codegen": codegen, "kv_cache": scheme})
    with memsave.collect() as reports:
        out = _generate(model, ids, n, cache_implementation="static")
    # A second generate makes a fresh cache: the prefill graph allocates it again, nothing recompiles.
    with memsave.collect() as again_reports:
        again = _generate(model, ids, n, cache_implementation="static")
    assert not again_reports and torch.equal(again.sequences, out.sequences)
    first = out.past_key_values.layers[0].keys
    assert again.past_key_values.layers[0].keys.codes.data_ptr() != first.codes.data_ptr()
    # The reference: the prefill attends to its own full-precision states (an fp32 static cache,
    # compiled the same way), which then go into memsave.QuantizedStaticCache; each decode step
    # reads the quantized cache. The option does the same in one graph each: the same tokens and
    # (to fp32 rounding) the same scores.
    torch._dynamo.reset()
    model.forward = torch.compile(forward, backend="memsave", options={"codegen": codegen})
    full = transformers.StaticCache(config=model.config, max_cache_len=prompt)
    cache = memsave.QuantizedStaticCache(model.config, max_cache_len=out.past_key_values.layers[0].keys.shape[2],
                                         scheme=scheme)
    with torch.no_grad():
        scores = [model(ids, cache=full).logits[:, -1]]
        for layer, states in zip(cache.layers, full.layers):
            layer.update(states.keys, states.values)
        tokens = [scores[-1].argmax(-1)]
        for i in range(n - 1):
            step = model(tokens[-1].view(1, 1), cache=cache, position_ids=torch.tensor([[prompt + i]]))
            scores.append(step.logits[:, -1])
            tokens.append(scores[-1].argmax(-1))
    assert torch.equal(out.sequences[0, prompt:], torch.cat(tokens))
    for got, want in zip(out.scores, scores):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cache = out.past_key_values
    held = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    assert all(isinstance(t, QuantizedKV) for t in held)
    assert [t.form for t in held[:2]] == (["int8", "int8"] if scheme == "int8" else ["kivi-keys", "kivi-values"])
    length = held[0].shape[2]  # HF's max_cache_len
    same = memsave.QuantizedStaticCache(model.config, max_cache_len=length, scheme=scheme)
    with torch.no_grad():
        model(ids, cache=same)  # allocates its buffers
    # Codes and scales only (KIVI: the written length too, 8 bytes a layer, which HF's layer keeps apart).
    assert memsave.cache_bytes(cache) == memsave.cache_bytes(same) + (0 if scheme == "int8" else 8 * len(cache.layers))
    owned = _records(reports, "quantize_static_cache")
    assert [rec.details["buffers"] for rec in owned] == [4, 4]  # prefill (allocates) and decode (passed in)
    assert [rec.details["exact_prefill_reads"] for rec in owned] == [4, 0]  # the prefill reads its states
    fused = _records(reports, "fuse_kv_attention")
    assert [rec.details["fused"] for rec in fused] == [2], [rec.notes for rec in fused]  # decode reads the codes


@pytest.mark.parametrize("scheme, share", [("int8", 0.27), ("int4", 0.16)])
def test_no_full_precision_buffer_exists_and_a_decode_step_stays_below_one(scheme, share):
    model = _model(layers=1, d=64)  # head size 64: the cache dominates
    length, prompt = 8192, 8  # attention's tiles are a fixed 1024 tokens; at 8k the buffers dominate
    ids = torch.randint(0, 128, (1, prompt), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="memsave", options={"codegen": "fx", "kv_cache": scheme})
    _generate(model, ids, 2, cache_implementation="static", max_cache_len=length)  # compiles
    with memsave.MemoryTracker() as tracker:
        out = _generate(model, ids, 2, cache_implementation="static", max_cache_len=length)
    buffer_fp32 = 1 * 2 * length * 64 * 4  # one of the layer's keys / values in fp32: 4 MiB
    held = memsave.cache_bytes(out.past_key_values)
    assert held < share * 2 * buffer_fp32  # the goals: int8 0.27x, int4 0.16x (scales included)
    if scheme == "int8":
        assert held == 2 * kv_int8_bytes((1, 2, length, 64))
    # Prefill and decode steps: the buffers (int8: 2.1 MiB) and one tile of keys and values
    # (1 MiB), never one fp buffer (4 MiB).
    assert tracker.stats.peak_bytes < buffer_fp32, tracker.stats


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_sliding_window_layers_are_held_quantized_through_the_roll(scheme):
    model = _model("mistral", sliding_window=8)
    for prompt in (5, 12):  # filled by index_copy_, then rolled; and a prefill past the window
        ids = torch.randint(0, 128, (1, prompt), generator=torch.Generator().manual_seed(prompt))
        forward = model.forward
        expected = _generate(model, ids, 9, cache_implementation="static")
        torch._dynamo.reset()
        model.forward = torch.compile(forward, backend="memsave", options={"codegen": "fx", "kv_cache": scheme})
        out = _generate(model, ids, 9, cache_implementation="static")
        model.forward = forward
        if scheme == "int8":
            assert torch.equal(out.sequences, expected.sequences)
        for got, want in zip(out.scores, expected.scores):  # 8 / 4-bit keys and values (the window's keys fp16)
            assert (got - want).abs().max() < (0.02 if scheme == "int8" else 0.1) * want.abs().max()
        assert isinstance(out.past_key_values.layers[0].keys, QuantizedKV)


@pytest.mark.parametrize("scheme", ["int8", "kivi2"])
def test_beam_search_reorders_the_quantized_rows(scheme):
    model = _model()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    forward = model.forward
    torch._dynamo.reset()
    model.forward = torch.compile(forward, backend="memsave", options={"codegen": "fx"})
    expected = _generate(model, ids, 6, num_beams=2,
                         cache=memsave.QuantizedStaticCache(model.config, max_cache_len=18, scheme=scheme))
    torch._dynamo.reset()
    model.forward = torch.compile(forward, backend="memsave", options={"codegen": "fx", "kv_cache": scheme})
    out = _generate(model, ids, 6, num_beams=2, cache_implementation="static")
    assert torch.equal(out.sequences, expected.sequences)


def test_a_buffer_allocated_outside_the_graph_is_left_with_the_reason():
    model = _model()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))

    def early_cache():
        cache = transformers.StaticCache(config=model.config, max_cache_len=20)
        cache.early_initialization(batch_size=1, num_heads=2, head_dim=16, dtype=torch.float32, device="cpu")
        return cache

    expected = _generate(model, ids, 4, cache=early_cache())
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="memsave", options={"codegen": "fx", "kv_cache": "int8"})
    with memsave.collect() as reports:
        out = _generate(model, ids, 4, cache=early_cache())
    assert torch.equal(out.sequences, expected.sequences)
    records = _records(reports, "quantize_static_cache")
    assert records and not any(rec.changed for rec in records)
    assert all(any("allocated outside the compiled graph" in note for note in rec.notes) for rec in records)
    assert not isinstance(out.past_key_values.layers[0].keys, QuantizedKV)


def test_quantized_kv_in_eager_code_follows_the_int8_reference():
    torch.manual_seed(6)
    shape = (2, 2, 8, 16)
    buffer = QuantizedKV("int8", allocate_int8(shape), torch.float32, shape)
    codes, scales = buffer.inner
    states = torch.randn(2, 2, 3, 16)
    buffer.index_copy_(2, torch.tensor([1, 2, 3]), states)
    k_codes, k_scale = torch.ops.memsave.quantize_kv_int8(states)
    reference = torch.zeros(shape)
    reference[:, :, 1:4] = torch.ops.memsave.dequantize_kv_int8(k_codes, k_scale, torch.float32)
    assert torch.equal(buffer.dequantize(), reference)
    assert torch.equal(buffer + 0, reference) and torch.equal(buffer[:, :, 1:4], reference[:, :, 1:4])  # reads
    picked = buffer.index_select(0, torch.tensor([1, 1]))
    assert isinstance(picked, QuantizedKV) and torch.equal(picked.dequantize(), reference[[1, 1]])
    buffer.copy_(reference * 2)
    assert torch.allclose(buffer.dequantize(), reference * 2, atol=1e-6)
    with pytest.raises(RuntimeError, match="would write a QuantizedKV"):
        buffer.add_(1)
    with pytest.raises(NotImplementedError, match="along the tokens"):
        buffer.index_copy_(3, torch.tensor([0]), states[..., :1])
    buffer.zero_()
    assert not codes.any() and not scales.any()
    with pytest.raises(ValueError, match="a layout of int8, kivi-keys, kivi-values"):
        QuantizedKV("int3", (codes,), torch.float32, shape)


@pytest.mark.parametrize("bits", [4, 2])
def test_kivi_buffers_in_eager_code_hold_each_token_within_half_a_step(bits):
    torch.manual_seed(7)
    shape, g = (1, 2, 70, 64), 32  # 70 tokens: held as 96, three key groups
    keys = QuantizedKV("kivi-keys", allocate_kivi_keys(shape, bits, g), torch.float32, shape, (bits, g))
    values = QuantizedKV("kivi-values", allocate_kivi_values(shape, bits, 64, g), torch.float32, shape, (bits, 64))
    assert keys.codes.shape[2] == values.codes.shape[2] == 96
    states = torch.randn(1, 2, 40, 64) * torch.linspace(0.5, 4, 64)  # channels of different ranges
    for buffer in (keys, values):
        buffer.index_copy_(2, torch.arange(33), states[:, :, :33])  # a prefill: one group and one token
        for t in range(33, 40):  # decode steps join the window
            buffer.index_copy_(2, torch.tensor([t]), states[:, :, t : t + 1])
    assert int(keys.length) == 40
    got_k, got_v = keys.dequantize(), values.dequantize()
    assert got_k.shape == got_v.shape == shape
    # Keys of the whole group: per channel over its 32 tokens; the window's (32..39): fp16.
    group = states[:, :, :32]
    step = (group.amax(2, keepdim=True) - group.amin(2, keepdim=True)) / (2**bits - 1)
    assert ((got_k[:, :, :32] - group).abs() <= step / 2 + 1e-2 * step + 1e-3).all()
    torch.testing.assert_close(got_k[:, :, 32:40], states[:, :, 32:40].half().float())
    # Values: per token over its 64 channels.
    step = (states.amax(3, keepdim=True) - states.amin(3, keepdim=True)) / (2**bits - 1)
    assert ((got_v[:, :, :40] - states).abs() <= step / 2 + 1e-2 * step + 1e-3).all()
    assert not got_k[:, :, 40:].any() and not got_v[:, :, 40:].any()  # never written
    # copy_ writes the whole buffer again from token 0 (a sliding window's roll).
    keys.copy_(got_k.roll(-1, dims=2))
    assert int(keys.length) == 70
    assert (keys.dequantize()[:, :, :31] - got_k[:, :, 1:32]).abs().max() <= 2 * step.max()


def test_unknown_kv_cache_value_names_the_choices():
    with pytest.raises(OptionError, match="options\\['kv_cache'\\].*valid choices: 'int8', 'int4', 'kivi2'"):
        memsave.Config.from_options({"kv_cache": "int3"})


@pytest.mark.parametrize("kind, scheme", [("gpt2", "int8"), ("llama", "kivi2")])
def test_with_quantized_weights_and_gpt2(kind, scheme):
    if kind == "gpt2":
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)
        model = transformers.GPT2LMHeadModel(config).eval()
    else:
        model = _model(kind)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(8))
    forward = model.forward
    expected = _generate(model, ids, 8, cache_implementation="static")  # fp32 weights and cache, eager
    torch._dynamo.reset()
    model.forward = torch.compile(forward, backend="memsave",
                                  options={"codegen": "fx", "kv_cache": scheme, "quantize": "int8"})
    with memsave.collect() as reports:
        out = _generate(model, ids, 8, cache_implementation="static")
    assert all(isinstance(layer.keys, QuantizedKV) for layer in out.past_key_values.layers)
    assert any(rec.name == "quantize" and rec.changed for r in reports for rec in r.records)  # the weights too
    assert [rec.details["fused"] for rec in _records(reports, "fuse_kv_attention")] == [2]  # the decode step
    # int8 weights: the first token's logits as fp32's within the weights' rounding (the prefill
    # attends to its own states, not the cache's codes).
    first, want = out.scores[0], expected.scores[0]
    assert (first - want).abs().max() < 0.05 * want.abs().max()
