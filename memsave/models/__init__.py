"""Built-in models for tests, demos and benchmarks, by name:
``memsave demo --model decoder-small`` or ``memsave explain hf-gpt2-tiny``.

Every builder is seeded and returns its model in eval mode; every ``example_inputs`` is
deterministic.  The Hugging Face and MiniLM entries import ``transformers`` only when built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from memsave.models.decoder import (
    DECODER_SIZES,
    Attention,
    Block,
    Decoder,
    DecoderConfig,
    RMSNorm,
    RotaryEmbedding,
    build_decoder,
    decoder_inputs,
)
from memsave.models.hf import HFCausalLM, HFEncoder, build_hf_bert, build_hf_gpt2, build_hf_llama, hf_inputs
from memsave.models.minilm import (
    SentenceEmbedder,
    load_minilm,
    load_minilm_tokenizer,
    minilm_inputs,
    reference_sentences,
)
from memsave.models.mlp import MLP, build_mlp, mlp_inputs


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    build: Callable[[], nn.Module]  # seeded, eval mode
    example_inputs: Callable[[nn.Module], tuple]  # deterministic inputs for that model
    # The same architecture on the meta device (no weights), where the model supports it:
    # pipeline ranks then read only their stage's weights (memsave.distributed.defer_weights).
    build_meta: Callable[[], nn.Module] | None = None


def _decoder_spec(size: str, seq: int) -> ModelSpec:
    config = DECODER_SIZES[size]
    return ModelSpec(
        name=f"decoder-{size}",
        description=(
            f"Llama-style decoder, {config.n_layers} layers, hidden {config.hidden}, "
            f"{config.n_heads} heads / {config.n_kv_heads} kv heads, vocab {config.vocab_size}; "
            f"inputs: batch 1 x seq {seq}"
        ),
        build=lambda: build_decoder(size),
        example_inputs=lambda model: decoder_inputs(model, batch=1, seq=seq),
        build_meta=lambda: build_decoder(size, device="meta"),
    )


def _minilm_inputs_for(model: nn.Module) -> tuple:
    return minilm_inputs(load_minilm_tokenizer(), reference_sentences(8))


_SPECS = [
    _decoder_spec("tiny", seq=32),
    _decoder_spec("small", seq=64),
    _decoder_spec("medium", seq=256),
    _decoder_spec("1b", seq=512),
    ModelSpec(
        name="mlp",
        description="MLP 64 -> 256 -> 256 -> 64 with GELU; inputs: batch 8",
        build=build_mlp,
        example_inputs=mlp_inputs,
    ),
    ModelSpec(
        name="hf-gpt2-tiny",
        description="transformers GPT2LMHeadModel, 2 layers, hidden 64, eager attention; returns logits",
        build=build_hf_gpt2,
        example_inputs=hf_inputs,
    ),
    ModelSpec(
        name="hf-llama-tiny",
        description="transformers LlamaForCausalLM, the decoder-tiny shape, eager attention; returns logits",
        build=build_hf_llama,
        example_inputs=hf_inputs,
    ),
    ModelSpec(
        name="hf-bert-tiny",
        description="transformers BertModel, 2 layers, hidden 64, eager attention; returns last hidden state",
        build=build_hf_bert,
        example_inputs=hf_inputs,
    ),
    ModelSpec(
        name="hf-gpt2-small",
        description="transformers GPT2LMHeadModel, GPT-2 small shape (124M), eager attention; batch 1 x seq 256",
        build=lambda: build_hf_gpt2("small"),
        example_inputs=lambda model: hf_inputs(model, batch=1, seq=256),
    ),
    ModelSpec(
        name="hf-llama-small",
        description="transformers LlamaForCausalLM, 12 layers, hidden 768, 4 kv heads; batch 1 x seq 256",
        build=lambda: build_hf_llama("small"),
        example_inputs=lambda model: hf_inputs(model, batch=1, seq=256),
    ),
    ModelSpec(
        name="hf-bert-small",
        description="transformers BertModel, bert-base shape, eager attention; batch 1 x seq 256",
        build=lambda: build_hf_bert("small"),
        example_inputs=lambda model: hf_inputs(model, batch=1, seq=256),
    ),
    ModelSpec(
        name="minilm",
        description="pretrained all-MiniLM-L6-v2 sentence embedder (offline), 8 standard-library docstring sentences",
        build=lambda: load_minilm()[0],
        example_inputs=_minilm_inputs_for,
    ),
]

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


def get_model(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    return MODELS[name]


__all__ = [
    "DECODER_SIZES",
    "MLP",
    "MODELS",
    "Attention",
    "Block",
    "Decoder",
    "DecoderConfig",
    "HFCausalLM",
    "HFEncoder",
    "ModelSpec",
    "RMSNorm",
    "RotaryEmbedding",
    "SentenceEmbedder",
    "build_decoder",
    "build_hf_bert",
    "build_hf_gpt2",
    "build_hf_llama",
    "build_mlp",
    "decoder_inputs",
    "get_model",
    "hf_inputs",
    "load_minilm",
    "load_minilm_tokenizer",
    "minilm_inputs",
    "mlp_inputs",
    "reference_sentences",
]
