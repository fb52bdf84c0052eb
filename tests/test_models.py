"""Tests for memsave.models: the built-in models that memsave is developed and measured on."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from memsave.models import (
    DECODER_SIZES,
    MLP,
    MODELS,
    Decoder,
    RotaryEmbedding,
    build_decoder,
    build_hf_bert,
    build_hf_gpt2,
    build_hf_llama,
    build_mlp,
    decoder_inputs,
    get_model,
    hf_inputs,
    load_minilm,
    minilm_inputs,
    mlp_inputs,
    reference_sentences,
)
from memsave.models.decoder import apply_rotary

# The counts written next to DECODER_SIZES in memsave/models/decoder.py.
EXPECTED_PARAMETERS = {"tiny": 125_248, "small": 4_999_424, "medium": 112_082_688, "1b": 1_100_048_384}


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _compiled_eager(model: torch.nn.Module, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[str], int]:
    """Run ``model`` under torch.compile(backend="eager"); return the output, the names of the
    captured graph's call targets, and how many frames were compiled (0 would mean a silent
    fallback to plain eager, which would make an equality check meaningless)."""
    torch._dynamo.reset()
    targets: list[str] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs):
        for node in gm.graph.nodes:
            if node.op in ("call_function", "call_method"):
                targets.append(getattr(node.target, "__name__", str(node.target)))
        return gm.forward

    counter = CompileCounterWithBackend(recording_backend)
    with torch.no_grad():
        output = torch.compile(model, backend=counter)(*inputs)
    return output, targets, counter.frame_count


# ----------------------------------------------------------------------------- decoder


def test_decoder_shapes_and_parameter_names():
    model = build_decoder("tiny")
    (input_ids,) = decoder_inputs(model, batch=2, seq=16)
    assert input_ids.shape == (2, 16) and input_ids.dtype == torch.int64
    with torch.no_grad():
        logits = model(input_ids)
    assert logits.shape == (2, 16, 256)
    assert not model.training
    names = dict(model.named_parameters())
    for name in (
        "embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
        "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_proj.weight",
        "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight", "layers.0.input_layernorm.weight",
        "layers.0.post_attention_layernorm.weight", "norm.weight", "lm_head.weight",
    ):
        assert name in names
    assert names["layers.1.self_attn.k_proj.weight"].shape == (2 * 16, 64)  # 2 kv heads of dim 16
    # The RoPE tables are derived from the config and stay out of checkpoints.
    assert not any("rotary" in key for key in model.state_dict())


def test_decoder_loss_is_mean_cross_entropy_ignoring_minus_100():
    model = build_decoder("tiny")
    input_ids, labels = decoder_inputs(model, batch=2, seq=16, labels=True)
    assert torch.equal(labels[:, :-1], input_ids[:, 1:])
    assert (labels[:, -1] == -100).all()
    with torch.no_grad():
        logits = model(input_ids)
        loss = model(input_ids, labels=labels)
    assert loss.shape == ()
    kept = labels != -100  # (B, T)
    log_probs = logits.log_softmax(-1)[kept]  # (N, V)
    expected = -log_probs.gather(1, labels[kept][:, None]).mean()
    torch.testing.assert_close(loss, expected)
    # Near-uniform predictions at init: the loss is close to log(V).
    assert abs(loss.item() - math.log(256)) < 0.1


def test_decoder_loss_backward_reaches_every_parameter():
    model = build_decoder("tiny").train()
    loss = model(*decoder_inputs(model, batch=2, seq=8, labels=True))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_decoder_rejects_sequences_longer_than_max_seq_len():
    model = build_decoder("tiny", max_seq_len=8)
    with pytest.raises(ValueError, match="exceeds max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="exceeds max_seq_len 8"):
        decoder_inputs(model, seq=9)


def test_decoder_is_causal():
    model = build_decoder("tiny")
    (input_ids,) = decoder_inputs(model, batch=1, seq=20)
    changed = input_ids.clone()
    changed[0, 12] = (changed[0, 12] + 1) % 256
    with torch.no_grad():
        before, after = model(input_ids), model(changed)
    torch.testing.assert_close(before[:, :12], after[:, :12], rtol=0, atol=0)
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_attention_matches_sdpa_with_grouped_query_attention():
    torch.manual_seed(0)
    model = build_decoder("tiny")
    attention = model.layers[0].self_attn
    b, t, h, heads, kv_heads, d = 2, 12, 64, 4, 2, 16
    x = torch.randn(b, t, h)  # (B, T, h)
    cos, sin = model.rotary(t)
    causal = torch.ones(t, t, dtype=torch.bool).triu(1)
    with torch.no_grad():
        ours = attention(x, cos, sin, causal)
        q = apply_rotary(attention.q_proj(x).view(b, t, heads, d).transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rotary(attention.k_proj(x).view(b, t, kv_heads, d).transpose(1, 2), cos, sin)  # (B, KV, T, D)
        v = attention.v_proj(x).view(b, t, kv_heads, d).transpose(1, 2)  # (B, KV, T, D)
        reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, H, T, D)
        reference = attention.o_proj(reference.transpose(1, 2).reshape(b, t, h))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_rotary_matches_complex_multiplication():
    """Rotate-half RoPE == multiplying (first half + i * second half) by exp(i * pos * freq)."""
    head_dim, seq, theta = 16, 10, 10000.0
    cos, sin = RotaryEmbedding(head_dim, max_seq_len=32, theta=theta)(seq)
    assert cos.shape == (seq, head_dim)
    x = torch.randn(2, 3, seq, head_dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = apply_rotary(x, cos.double(), sin.double())
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * freqs[None, :]  # (T, D/2)
    z = torch.complex(x[..., : head_dim // 2], x[..., head_dim // 2 :]) * torch.polar(torch.ones_like(angles), angles)
    expected = torch.cat([z.real, z.imag], dim=-1)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)  # cos/sin tables are fp32


def test_rotary_scores_depend_only_on_relative_position():
    head_dim, seq = 16, 24
    cos, sin = RotaryEmbedding(head_dim, max_seq_len=seq, theta=10000.0)(seq)
    generator = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, head_dim, generator=generator)
    q_at = apply_rotary(q.expand(1, 1, seq, head_dim), cos, sin)[0, 0]  # (T, D): q placed at each position
    k_at = apply_rotary(k.expand(1, 1, seq, head_dim), cos, sin)[0, 0]  # (T, D)
    score = lambda m, n: torch.dot(q_at[m], k_at[n])  # noqa: E731
    torch.testing.assert_close(score(5, 2), score(15, 12), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(score(3, 3), score(20, 20), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4))
    torch.testing.assert_close(q_at[0], q)  # position 0 is not rotated


def test_decoder_matches_hf_llama_with_the_same_weights():
    """An independent implementation of the same architecture: checks RoPE, GQA, RMSNorm and
    SwiGLU together, and that the parameter names really are HF-Llama names."""
    ours = build_decoder("tiny")
    theirs = build_hf_llama("tiny")
    state = {(key if key == "lm_head.weight" else f"model.{key}"): value for key, value in ours.state_dict().items()}
    theirs.model.load_state_dict(state, strict=True)
    (input_ids,) = decoder_inputs(ours, batch=2, seq=32)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids), theirs(input_ids), rtol=1e-5, atol=1e-5)


def test_attention_dropout_is_active_only_in_training():
    model = build_decoder("tiny", dropout=0.5)
    (input_ids,) = decoder_inputs(model, seq=16)
    with torch.no_grad():
        assert torch.equal(model(input_ids), model(input_ids))
        model.train()
        assert not torch.equal(model(input_ids), model(input_ids))


@pytest.mark.parametrize("size", sorted(DECODER_SIZES))
def test_named_size_parameter_counts(size):
    config = DECODER_SIZES[size]
    with torch.device("meta"):  # no memory, no init: the 1b count is free
        model = Decoder(config)
    h, kv, d = config.hidden, config.n_kv_heads, config.head_dim
    per_layer = 2 * h * h + 2 * h * kv * d + 3 * h * config.intermediate + 2 * h
    formula = 2 * config.vocab_size * h + h + config.n_layers * per_layer
    assert sum(p.numel() for p in model.parameters()) == formula == EXPECTED_PARAMETERS[size]
    # Shapes propagate through the whole model on meta too.
    input_ids, labels = decoder_inputs(model, batch=1, seq=16, labels=True)
    assert input_ids.device.type == "meta"
    assert model(input_ids).shape == (1, 16, config.vocab_size)
    assert model(input_ids, labels=labels).shape == ()


def test_small_size_is_fast_enough_for_the_demo():
    model = build_decoder("small")
    (input_ids,) = decoder_inputs(model, batch=1, seq=64)
    timings = []
    with torch.no_grad():
        model(input_ids)  # warm-up
        for _ in range(5):
            start = time.perf_counter()
            model(input_ids)
            timings.append(time.perf_counter() - start)
    # ~15 ms when the machine is idle; the best of 5 with a wide margin, so other load can't flake it.
    assert min(timings) < 0.5, timings


def test_tied_embeddings_share_one_parameter():
    model = build_decoder("tiny", tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMETERS["tiny"] - 256 * 64


def test_build_decoder_is_deterministic_and_leaves_global_rng_alone():
    rng_before = torch.get_rng_state()
    a, b, c = build_decoder("tiny", seed=0), build_decoder("tiny", seed=0), build_decoder("tiny", seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert _same_state(a, b)
    assert not torch.equal(a.embed_tokens.weight, c.embed_tokens.weight)
    std = a.layers[0].mlp.up_proj.weight.std().item()
    assert 0.018 < std < 0.022
    assert torch.equal(a.norm.weight, torch.ones(64))
    # Same for the inputs.
    assert torch.equal(decoder_inputs(a, 2, 8, seed=3)[0], decoder_inputs(a.config, 2, 8, seed=3)[0])
    assert not torch.equal(decoder_inputs(a, 2, 8, seed=3)[0], decoder_inputs(a, 2, 8, seed=4)[0])
    assert torch.equal(torch.get_rng_state(), rng_before)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden=66), "hidden \\(66\\) must be divisible by n_heads \\(4\\)"),
        (dict(n_kv_heads=3), "n_heads \\(4\\) must be divisible by n_kv_heads \\(3\\)"),
        (dict(hidden=12, n_heads=4, n_kv_heads=4), "head_dim = hidden / n_heads = 3 must be even"),
        (dict(vocab_size=0), "vocab_size must be a positive int, got 0"),
        (dict(n_layers=2.0), "n_layers must be a positive int, got 2.0"),
        (dict(dropout=1.0), "dropout must be in \\[0, 1\\), got 1.0"),
        (dict(dropout=-0.1), "dropout must be in \\[0, 1\\)"),
        (dict(norm_eps=0.0), "norm_eps must be a positive number"),
    ],
)
def test_decoder_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(DECODER_SIZES["tiny"], **overrides)


def test_decoder_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DECODER_SIZES["tiny"].hidden = 32


def test_build_decoder_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match=r"unknown decoder size 'huge'.*\['1b', 'medium', 'small', 'tiny'\]"):
        build_decoder("huge")
    with pytest.raises(ValueError, match=r"unknown DecoderConfig field\(s\) \['width'\].*'vocab_size'"):
        build_decoder("tiny", width=3)
    assert build_decoder("tiny", n_layers=1).config.n_layers == 1


def test_compiled_decoder_equals_eager_and_keeps_the_explicit_score_matrix():
    model = build_decoder("tiny")
    input_ids, labels = decoder_inputs(model, batch=2, seq=32, labels=True)
    with torch.no_grad():
        expected_logits, expected_loss = model(input_ids), model(input_ids, labels=labels)
    logits, targets, frames = _compiled_eager(model, input_ids)
    assert frames == 1  # one graph, no graph break
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
    assert {"softmax", "masked_fill", "matmul"} <= set(targets)
    assert "scaled_dot_product_attention" not in targets
    loss, _, _ = _compiled_eager(model, input_ids, labels)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)


# ----------------------------------------------------------------------------- MLP


def test_mlp_shapes_init_and_determinism():
    rng_before = torch.get_rng_state()
    model = build_mlp((8, 32, 4), activation="relu", seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert _same_state(model, build_mlp((8, 32, 4), activation="relu", seed=0))
    assert not _same_state(model, build_mlp((8, 32, 4), activation="relu", seed=1))
    assert isinstance(model.activation, torch.nn.ReLU) and not model.training
    # nn.Linear's default bounds: |w| and |b| <= 1/sqrt(fan_in).
    first = model.layers[0]
    assert first.weight.abs().max() <= 1 / math.sqrt(8) and first.bias.abs().max() <= 1 / math.sqrt(8)
    (x,) = mlp_inputs(model, batch=5)
    assert torch.equal(x, mlp_inputs(model, batch=5)[0])
    with torch.no_grad():
        out = model(x)
        manual = model.layers[1](torch.relu(model.layers[0](x)))
    assert out.shape == (5, 4)
    torch.testing.assert_close(out, manual)
    assert build_mlp(bias=False).layers[0].bias is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(activation="tanh"), r"unknown activation 'tanh'; valid activations: \['gelu', 'relu', 'silu'\]"),
        (dict(sizes=(8,)), "at least 2 entries"),
        (dict(sizes=(8, 0, 4)), "positive ints"),
    ],
)
def test_mlp_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLP(**kwargs)


# ----------------------------------------------------------------------------- Hugging Face

HF_BUILDERS = {"gpt2": build_hf_gpt2, "llama": build_hf_llama, "bert": build_hf_bert}


@pytest.mark.parametrize("family", sorted(HF_BUILDERS))
def test_hf_tiny_compiled_equals_eager(family):
    model = HF_BUILDERS[family]()
    assert not model.training and model.config._attn_implementation == "eager"
    input_ids, attention_mask = hf_inputs(model, batch=3, seq=16, attention_mask=True)
    assert attention_mask.sum(1).tolist() == [16, 15, 14]
    with torch.no_grad():
        expected = model(input_ids, attention_mask)
        expected_unmasked = model(input_ids)
    output, targets, frames = _compiled_eager(model, input_ids, attention_mask)
    assert frames == 1 and output.shape[:2] == (3, 16)
    torch.testing.assert_close(output, expected)
    assert "softmax" in targets and "scaled_dot_product_attention" not in targets
    output, _, _ = _compiled_eager(model, input_ids)
    torch.testing.assert_close(output, expected_unmasked)


@pytest.mark.parametrize("family", sorted(HF_BUILDERS))
def test_hf_builders_are_seeded_and_leave_global_rng_alone(family):
    rng_before = torch.get_rng_state()
    a, b, c = HF_BUILDERS[family](seed=0), HF_BUILDERS[family](seed=0), HF_BUILDERS[family](seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert _same_state(a, b) and not _same_state(a, c)
    assert torch.equal(hf_inputs(a, seed=5)[0], hf_inputs(a, seed=5)[0])


def test_hf_sdpa_attention_gives_the_same_outputs():
    eager, sdpa = build_hf_gpt2(), build_hf_gpt2(attn_implementation="sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    inputs = hf_inputs(eager, batch=2, seq=16, attention_mask=True)
    with torch.no_grad():
        torch.testing.assert_close(eager(*inputs), sdpa(*inputs), rtol=1e-4, atol=1e-5)


def test_hf_builder_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match=r"unknown gpt2 size 'xl'; valid sizes: \['small', 'tiny'\]"):
        build_hf_gpt2("xl")
    with pytest.raises(ValueError, match=r"unknown attn_implementation 'flash'.*\['eager', 'sdpa'\]"):
        build_hf_bert(attn_implementation="flash")
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 128"):
        hf_inputs(build_hf_llama(), seq=129)


# ----------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    from memsave.models.minilm import get_minilm_path

    embedder, tokenizer = minilm
    sentences = reference_sentences(16)
    input_ids, attention_mask = minilm_inputs(tokenizer, sentences, max_length=128)
    assert attention_mask.sum(1).max() < 128  # nothing was truncated, so both see the same tokens
    assert attention_mask.sum(1).min() < attention_mask.shape[1]  # padding is exercised
    with torch.no_grad():
        ours = embedder(input_ids, attention_mask)
    reference = SentenceTransformer(str(get_minilm_path()), device="cpu", local_files_only=True)
    theirs = reference.encode(sentences, convert_to_tensor=True)
    assert ours.shape == theirs.shape == (16, 384)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(16))
    assert F.cosine_similarity(ours, theirs, dim=1).min() > 0.9999


def test_minilm_compiled_equals_eager(minilm):
    embedder, tokenizer = minilm
    inputs = minilm_inputs(tokenizer, reference_sentences(4))
    with torch.no_grad():
        expected = embedder(*inputs)
    output, targets, frames = _compiled_eager(embedder, *inputs)
    assert frames == 1
    torch.testing.assert_close(output, expected)
    with pytest.raises(ValueError, match="list of strings"):
        minilm_inputs(tokenizer, "one sentence")


def test_reference_sentences_are_distinct_deterministic_english():
    sentences = reference_sentences(256)
    assert len(sentences) == len(set(sentences)) == 256
    assert sentences == reference_sentences(256)
    assert reference_sentences(10) == sentences[:10]
    assert all(20 <= len(s) <= 200 and s[0].isupper() and s.endswith(".") for s in sentences)
    with pytest.raises(ValueError, match="more than the"):
        reference_sentences(100_000)


# ----------------------------------------------------------------------------- registry


def test_get_model_error_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown model 'gpt5'; valid names: decoder-tiny, decoder-small") as info:
        get_model("gpt5")
    for name in ("decoder-1b", "mlp", "hf-gpt2-tiny", "hf-llama-tiny", "hf-bert-tiny", "hf-gpt2-small", "minilm"):
        assert name in str(info.value)
    assert get_model("mlp").name == "mlp"


# Every entry but decoder-1b (14 s to initialize 1.1B parameters on 2 cores; its shapes are
# covered on the meta device by test_named_size_parameter_counts).  The ~110-125M-parameter
# entries take 1.5-3 s each.
@pytest.mark.parametrize("name", sorted(set(MODELS) - {"decoder-1b"}))
def test_registry_entries_build_and_run(name):
    spec = get_model(name)
    model = spec.build()
    assert not model.training
    inputs = spec.example_inputs(model)
    assert isinstance(inputs, tuple)
    assert all(torch.equal(a, b) for a, b in zip(inputs, spec.example_inputs(model)))
    with torch.no_grad():
        output = model(*inputs)
    assert isinstance(output, torch.Tensor) and torch.isfinite(output).all()


def test_importing_models_does_not_import_transformers():
    code = "import sys, memsave.models; assert 'transformers' not in sys.modules, 'transformers was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
