"""The int8 key/value cache (memsave/kv_cache.py, ops/kv_cache.py) and the pass that reads it
inside attention (passes/dynamo/fuse_kv_attention.py), on HF Llama / Qwen2 / Mistral from
small configs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import memsave
from memsave.ops.kv_cache import (
    attention_int8_kv_reference,
    kv_int8_bytes,
    tile_tokens,
)
from memsave.ops.kv_lowbit import attention_kivi_reference, kv_lowbit_bytes

transformers = pytest.importorskip("transformers")


def _cache_tensors(b=2, h=2, length=600, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(b, h, length, d, generator=g), torch.randn(b, h, length, d, generator=g) * 3
    return k, v


def test_quantize_round_trip_is_within_half_a_step_and_contiguous():
    x = torch.randn(2, 3, 40, 16).transpose(1, 2)  # not contiguous
    codes, scale = torch.ops.memsave.quantize_kv_int8(x)
    assert codes.dtype == torch.int8 and codes.is_contiguous() and scale.shape == (2, 40, 3)
    back = torch.ops.memsave.dequantize_kv_int8(codes, scale, torch.float32)
    assert (back - x).abs().max() <= (scale.unsqueeze(-1) / 2 + 1e-7).expand_as(x).max()
    assert torch.all((back - x).abs() <= scale.unsqueeze(-1) / 2 + 1e-6)
    zeros, zero_scale = torch.ops.memsave.quantize_kv_int8(torch.zeros(1, 1, 2, 4))
    assert not zeros.any() and not zero_scale.any()


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("heads, t", [((2, 2), 1), ((8, 2), 1), ((4, 2), 5)])
def test_attention_over_codes_equals_dequantize_then_sdpa(mask_kind, heads, t):
    hq, hkv = heads
    tile = tile_tokens(hq // hkv * t, 16, 2 * hkv)
    length = 2 * tile + 37  # tiles, and a partial one
    k, v = _cache_tensors(h=hkv, length=length)
    kc, ks = torch.ops.memsave.quantize_kv_int8(k)
    vc, vs = torch.ops.memsave.quantize_kv_int8(v)
    q = torch.randn(2, hq, t, 16)
    mask = None
    if mask_kind != "none":
        keep = torch.zeros(2, 1, t, length, dtype=torch.bool)
        keep[..., : tile + 10] = True  # the last tile entirely hidden: skipped
        keep[1, ..., 3] = False
        mask = keep if mask_kind == "bool" else torch.where(keep, 0.0, float("-inf"))
    out = torch.ops.memsave.attention_int8_kv(q, kc, ks, vc, vs, mask, 0.3)
    expected = attention_int8_kv_reference(q, kc, ks, vc, vs, mask, 0.3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # and the reference is SDPA over the repeated, dequantized heads (HF's repeat_kv)
    deq = [torch.ops.memsave.dequantize_kv_int8(c, s, torch.float32) for c, s in ((kc, ks), (vc, vs))]
    rep = [x[:, :, None].expand(2, hkv, hq // hkv, length, 16).reshape(2, hq, length, 16) for x in deq]
    torch.testing.assert_close(expected, F.scaled_dot_product_attention(q, *rep, attn_mask=mask, scale=0.3))


def test_attention_refuses_head_counts_that_do_not_divide():
    k, _v = _cache_tensors(h=3, length=8)
    kc, ks = torch.ops.memsave.quantize_kv_int8(k)
    with pytest.raises(ValueError, match="not a multiple"):
        torch.ops.memsave.attention_int8_kv(torch.randn(2, 4, 1, 16), kc, ks, kc, ks, None, 1.0)


def test_ops_pass_opcheck():
    k, _v = _cache_tensors(length=20)
    kc, ks = torch.ops.memsave.quantize_kv_int8(k)
    torch.library.opcheck(torch.ops.memsave.quantize_kv_int8.default, (k,))
    torch.library.opcheck(torch.ops.memsave.dequantize_kv_int8.default, (kc, ks, torch.float32))
    q = torch.randn(2, 4, 3, 16)
    torch.library.opcheck(torch.ops.memsave.attention_int8_kv.default, (q, kc, ks, kc, ks, None, 0.25))


# -- the HF cache --------------------------------------------------------------------------------


def _llama(kind="llama", layers=2, d=16):
    torch.manual_seed(0)
    common = {"vocab_size": 128, "hidden_size": 4 * d, "intermediate_size": 128, "num_hidden_layers": layers,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()
    raise ValueError(kind)


def _generate(model, cache, ids, n=8):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, max_new_tokens=n, do_sample=False, cache=cache)


def test_cache_holds_int8_and_eager_generation_follows_fp32():
    model = _llama()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    cache = memsave.QuantizedStaticCache(model.config, max_cache_len=64)
    with torch.no_grad():
        logits = model(ids, cache=cache).logits
        reference = model(ids, cache=transformers.StaticCache(config=model.config, max_cache_len=64)).logits
    torch.testing.assert_close(logits, reference, rtol=0.02, atol=0.02)  # 8-bit keys/values
    layer = cache.layers[0]
    assert layer.keys.dtype == torch.int8 and layer.key_scales.shape == (1, 2, 64)
    assert memsave.cache_bytes(cache) == 2 * 2 * kv_int8_bytes((1, 2, 64, 16))
    assert cache.unquantized == []
    # Reset, the cache serves a new generation: the same tokens as a fresh cache.
    cache.reset()
    assert not cache.layers[0].key_scales.any() and not cache.layers[0].keys.any()
    first = _generate(model, cache, ids)
    cache.reset()
    assert torch.equal(_generate(model, cache, ids), first)
    assert torch.equal(_generate(model, memsave.QuantizedStaticCache(model.config, max_cache_len=64), ids), first)


@pytest.mark.parametrize("codegen, kind, scheme", [
    ("fx", "llama", "int8"), ("inductor", "llama", "int8"), ("fx", "qwen2", "int8"), ("fx", "llama", "int4"),
    ("fx", "qwen2", "kivi2"), ("inductor", "qwen2", "kivi2")])
def test_compiled_generation_reads_codes_inside_attention(codegen, kind, scheme):
    model = _llama(kind)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    # 40 new tokens: the KIVI key window fills and starts again (groups of 32)
    eager = _generate(model, memsave.QuantizedStaticCache(model.config, max_cache_len=300, scheme=scheme), ids, n=40)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="memsave", options={"codegen": codegen})
    with memsave.collect() as reports:
        out = _generate(model, memsave.QuantizedStaticCache(model.config, max_cache_len=300, scheme=scheme), ids, n=40)
    assert torch.equal(out, eager)
    fused = [rec for r in reports for rec in r.records if rec.name == "fuse_kv_attention"]
    assert len(fused) == 2  # prefill (is_causal, first T tokens) and decode (mask, whole cache)
    assert all(rec.details["fused"] == 2 and not rec.details["left"] for rec in fused), [r.notes for r in fused]


@pytest.mark.parametrize("codegen, scheme, share", [("fx", "int8", 0.27), ("fx", "int4", 0.16), ("inductor", "kivi2", 0.1)])
def test_a_compiled_decode_step_never_holds_a_dequantized_layer(codegen, scheme, share):
    model = _llama(layers=1, d=64)  # head size 64: the cache dominates a decode step
    length = 4096
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="memsave", options={"codegen": codegen})
    cache = memsave.QuantizedStaticCache(model.config, max_cache_len=length, scheme=scheme)
    with torch.no_grad():
        model(ids, cache=cache)  # prefill
        step = {"input_ids": ids[:, :1], "cache": cache, "position_ids": torch.tensor([[8]])}
        model(**step)
        with memsave.MemoryTracker() as tracker:
            model(**step)
    layer_fp32 = 1 * 2 * length * 64 * 4  # one of keys/values of the layer, dequantized
    assert memsave.cache_bytes(cache) < share * 2 * layer_fp32  # the goals: int8 0.27x, int4 0.16x
    # Unfused, the step would hold the layer's keys and values dequantized (4 MiB); fused, one
    # tile of each (1024 tokens: 512 KiB + 512 KiB) beside the model's own activations.
    assert tracker.stats.peak_bytes < layer_fp32, tracker.stats


def test_unknown_scheme_and_sliding_window_layers():
    model = _llama()
    with pytest.raises(ValueError, match="valid choices: int8, int4, kivi2"):
        memsave.QuantizedStaticCache(model.config, max_cache_len=16, scheme="int3")
    config = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    cache = memsave.QuantizedStaticCache(config, max_cache_len=32)
    assert [name for _, name in cache.unquantized] == ["StaticSlidingWindowLayer"] * 2


# -- KIVI's layout (ops/kv_lowbit.py) -------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 2])
def test_lowbit_round_trips_are_within_half_a_step(bits):
    x = torch.randn(2, 2, 64, 32) * torch.linspace(0.1, 5, 32)  # channels of very different size
    packed, scale, low = torch.ops.memsave.quantize_kv_tokens(x, bits, 16)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2, 64, 32 * bits // 8) and scale.shape == (2, 2, 64, 2)
    back = torch.ops.memsave.dequantize_kv_tokens(packed, scale, low, bits, 16, torch.float32)
    step = scale.float().repeat_interleave(16, dim=-1)
    assert torch.all((back - x).abs() <= step / 2 + 2e-3 * x.abs().amax())  # + the fp16 minimum's rounding
    packed, scale, low = torch.ops.memsave.quantize_kv_channels(x, bits, 32)
    assert scale.shape == (2, 2, 2, 32)  # per channel, per 32 tokens
    window, length = torch.zeros(2, 2, 32, 32, dtype=torch.float16), torch.tensor(64)  # full groups: no window
    back = torch.ops.memsave.dequantize_kv_channels(packed, scale, low, window, length, bits, 32, torch.float32)
    step = scale.float().repeat_interleave(32, dim=-2)
    assert torch.all((back - x).abs() <= step / 2 + 2e-3 * x.abs().amax())
    with pytest.raises(ValueError, match="not a multiple of the group size 32"):
        torch.ops.memsave.quantize_kv_channels(x[:, :, :40], bits, 32)


def _kivi_problem(length=576, written=300, hkv=2, d=32, bits=4):
    k, v = _cache_tensors(h=hkv, length=length, d=d)
    k_packed, k_scale, k_min = torch.ops.memsave.quantize_kv_channels(k, bits, 32)
    v_packed, v_scale, v_min = torch.ops.memsave.quantize_kv_tokens(v, bits, 16)
    current = written // 32 * 32
    window = torch.zeros(2, hkv, 32, d, dtype=torch.float16)
    window[:, :, : written - current] = k[:, :, current:written].half()  # the newest keys, fp16
    return [k_packed, k_scale, k_min, window, torch.tensor(written), v_packed, v_scale, v_min], k, v


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("t", [1, 3])
def test_kivi_attention_equals_dequantize_then_sdpa_and_reads_the_window(bits, t):
    cache, k, _ = _kivi_problem(bits=bits)
    written = 300
    q = torch.randn(2, 8, t, 32)
    keep = torch.zeros(2, 1, t, k.shape[2], dtype=torch.bool)
    keep[..., :written] = True
    args = (q, *cache, keep, 0.2, bits, 32, 16)
    out = torch.ops.memsave.attention_kivi(*args)
    torch.testing.assert_close(out, attention_kivi_reference(*args), rtol=1e-5, atol=1e-5)
    # The window's tokens are the fp16 keys themselves, not their codes.
    deq = torch.ops.memsave.dequantize_kv_channels(*cache[:5], bits, 32, torch.float32)
    torch.testing.assert_close(deq[:, :, 288:300], k[:, :, 288:300].half().float())
    assert (deq[:, :, :288] - k[:, :, :288]).abs().max() > 1e-3  # quantized there


def test_kivi_ops_pass_opcheck():
    cache, _, _ = _kivi_problem(length=64, written=40, d=16)
    q = torch.randn(2, 4, 1, 16)
    torch.library.opcheck(torch.ops.memsave.quantize_kv_tokens.default, (torch.randn(2, 2, 5, 16), 4, 16))
    torch.library.opcheck(torch.ops.memsave.quantize_kv_channels.default, (torch.randn(2, 2, 64, 16), 2, 32))
    torch.library.opcheck(torch.ops.memsave.attention_kivi.default, (q, *cache, None, 0.25, 4, 32, 16))


@pytest.mark.parametrize("scheme", ["int4", "kivi2"])
def test_kivi_cache_follows_fp32_and_takes_chunks_of_whole_groups(scheme):
    model = _llama(d=16)
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = model(ids).logits
        cache = memsave.QuantizedStaticCache(model.config, max_cache_len=100, scheme=scheme)
        assert cache.layers[0].max_cache_len == 128  # whole key groups
        parts = [model(ids[:, :64], cache=cache).logits]  # two whole groups: codes, empty window
        parts += [model(ids[:, i : i + 1], cache=cache).logits for i in range(64, 70)]  # into the window
        got = torch.cat(parts, dim=1)
        with pytest.raises(ValueError, match="multiple of its key group"):
            model(ids[:, :5], cache=cache)  # 70 is not a group boundary
    error = (got - reference).abs().max() / reference.abs().max()
    assert error < (0.1 if scheme == "int4" else 0.4), error
    layer = cache.layers[0]
    assert memsave.cache_bytes(cache) == 2 * layer.held_bytes()
    assert layer.held_bytes() == kv_lowbit_bytes(1, 2, 128, 16, layer.bits, 32, 16)


def _mistral_and_gpt2(kind):
    torch.manual_seed(0)
    if kind == "mistral":
        config = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
        return transformers.MistralForCausalLM(config).eval()
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("kind, scheme", [("mistral", "int4"), ("gpt2", "int8")])
def test_mistral_and_gpt2_with_quantized_weights(kind, scheme):
    model = _mistral_and_gpt2(kind)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))

    def prefill_and_step():
        cache = memsave.QuantizedStaticCache(model.config, max_cache_len=64, scheme=scheme)
        with torch.no_grad():
            first = model(ids, cache=cache).logits
            step = model(ids[:, :1], cache=cache, position_ids=torch.tensor([[12]])).logits
        return torch.cat([first, step], dim=1), cache

    expected, _ = prefill_and_step()
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="memsave", options={"codegen": "fx", "quantize": "int8"})
    with memsave.collect() as reports:
        got, cache = prefill_and_step()
    assert cache.unquantized == []
    assert [rec.details["fused"] for r in reports for rec in r.records if rec.name == "fuse_kv_attention"] == [2, 2]
    assert any(rec.name == "quantize" and rec.changed for r in reports for rec in r.records)  # the weights too
    # int8 weights change the logits a little, the cache the same way as eager
    assert (got - expected).abs().max() / expected.abs().max() < 0.05


def test_an_ordinary_cache_is_left_as_it_is_and_named_in_the_report():
    model = _llama()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(6))
    expected = _generate(model, transformers.StaticCache(config=model.config, max_cache_len=64), ids, n=6)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="memsave", options={"codegen": "fx"})
    with memsave.collect() as reports:
        out = _generate(model, transformers.StaticCache(config=model.config, max_cache_len=64), ids, n=6)
    assert torch.equal(out, expected)
    records = [rec for r in reports for rec in r.records if rec.name == "fuse_kv_attention"]
    assert records and not any(rec.changed for rec in records)
    assert any("full-precision kv cache" in note and "QuantizedStaticCache" in note for rec in records for note in rec.notes)
