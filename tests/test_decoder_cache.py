"""memsave's decoder with a static kv cache (models/decoder_cache.py), eager and under
options={"kv_cache": ...}."""

from __future__ import annotations

import pytest
import torch

import memsave
from memsave.kv_tensor import (
    QuantizedKV,
    allocate_int8,
    allocate_kivi_keys,
    allocate_kivi_values,
    layout_for,
)
from memsave.models.decoder import build_decoder, decoder_inputs
from memsave.models.decoder_cache import DecoderCache, generate
from memsave.ops.kv_cache import kv_int8_bytes
from memsave.ops.kv_lowbit import kv_lowbit_bytes


def _model():
    return build_decoder("tiny", n_layers=2, max_seq_len=128)


def test_cached_logits_equal_the_whole_sequence_and_generate_is_greedy():
    model = _model()
    (ids,) = decoder_inputs(model, batch=2, seq=10, seed=1)
    cache = DecoderCache(model.config.n_layers, max_len=24)
    with torch.no_grad():
        got = [model(ids[:, :7], cache=cache)]
        for i in range(7, 10):
            got.append(model(ids[:, i : i + 1], cache=cache))
        whole = model(ids)
    torch.testing.assert_close(torch.cat(got, dim=1), whole, rtol=1e-5, atol=1e-5)
    assert int(cache.length) == 10 and cache.layers[0].keys.shape == (2, model.config.n_kv_heads, 24, model.config.head_dim)
    tokens = generate(model, ids, 5)
    with torch.no_grad():  # greedy, one token at a time over the whole sequence
        seq = ids
        for _ in range(5):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, seq[:, 10:])
    with pytest.raises(ValueError, match="exceed the cache"):
        generate(model, ids, 20, cache=DecoderCache(model.config.n_layers, 16))
    with pytest.raises(ValueError, match="an earlier generation"):
        generate(model, ids, 2, cache=cache)


def _steps(model, ids, n, cache, after_prefill=lambda cache: None):
    """Greedy: the tokens and each step's last logits."""
    with torch.no_grad():
        logits = [model(ids, cache=cache)[:, -1]]
        after_prefill(cache)
        tokens = [logits[-1].argmax(-1, keepdim=True)]
        for _ in range(n - 1):
            logits.append(model(tokens[-1], cache=cache)[:, -1])
            tokens.append(logits[-1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1), logits


def _quantize_into(scheme, t):
    """The prefill's fp states written into QuantizedKV buffers, as options['kv_cache'] writes
    them (eager: the steps then read them dequantized)."""
    def convert(cache):
        for layer in cache.layers:
            for role in ("keys", "values"):
                full = getattr(layer, role)
                form, params, made = layout_for(scheme, role, full.shape[-1])
                allocate = {"int8": allocate_int8, "kivi-keys": allocate_kivi_keys,
                            "kivi-values": allocate_kivi_values}[form]
                held = QuantizedKV(form, allocate(tuple(full.shape), *made), full.dtype, tuple(full.shape), params)
                held.index_copy_(2, torch.arange(t), full[:, :, :t])
                setattr(layer, role, held)
    return convert


@pytest.mark.parametrize("scheme, codegen", [("int8", "fx"), ("int4", "fx")])  # Inductor: test_kv_cache_option
def test_compiled_decoder_holds_its_cache_quantized(scheme, codegen):
    model = _model()
    (ids,) = decoder_inputs(model, batch=1, seq=12, seed=2)
    n = 36  # past one key group of 32: the KIVI window fills and starts again
    expected, expected_logits = _steps(model, ids, n, DecoderCache(model.config.n_layers, 12 + n),
                                       _quantize_into(scheme, 12))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memsave", options={"codegen": codegen, "kv_cache": scheme})
    cache = DecoderCache(model.config.n_layers, 12 + n)
    with memsave.collect() as reports:
        tokens, logits = _steps(compiled, ids, n, cache)
    assert torch.equal(tokens, expected)
    for got, want in zip(logits, expected_logits):  # the fused attention over codes vs dequantize + SDPA
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(generate(compiled, ids, n), expected)  # a fresh cache: no recompile, the same tokens
    held = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    assert all(isinstance(t, QuantizedKV) for t in held)
    shape = tuple(held[0].shape)  # (1, 2, 48, 16)
    if scheme == "int8":  # codes and scales only
        assert memsave.cache_bytes(cache) == 2 * 2 * kv_int8_bytes(shape)
    else:  # 48 tokens as two key groups, the window, the written length (8 bytes)
        assert memsave.cache_bytes(cache) == 2 * (kv_lowbit_bytes(1, 2, 64, 16, 4, 32, 16) + 8)
    owned = [rec for r in reports for rec in r.records if rec.name == "quantize_static_cache"]
    assert [rec.details["buffers"] for rec in owned] == [4, 4]
    assert [rec.details["exact_prefill_reads"] for rec in owned] == [4, 0]
    fused = [rec.details["fused"] for r in reports for rec in r.records if rec.name == "fuse_kv_attention"]
    assert fused == [2]  # the decode step reads the codes
