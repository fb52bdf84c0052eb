"""Hugging Face ``transformers`` models built from small configs: nothing is downloaded.

Each builder returns the HF model wrapped in a thin module whose ``forward(input_ids,
attention_mask=None)`` returns a plain tensor, because compiled-vs-eager comparisons and
memory measurements need tensors, not ModelOutput objects.

``transformers`` is imported inside the builders only, so ``import memsave.models`` stays
fast (importing transformers takes seconds).

Attention defaults to ``"eager"``: transformers 5.x picks ``"sdpa"`` when nothing is asked
for, which hides the (T, T) score matrix inside one fused op.  The eager implementation keeps
it in the captured graph, where memsave's passes can see it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")

# Config keyword arguments per family and size.  Dropout is zeroed in the configs (not only by
# eval mode) so that training-mode runs are deterministic too.
GPT2_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=128),
    # GPT-2 small (124M parameters).
    "small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
}
LLAMA_SIZES: dict[str, dict[str, Any]] = {
    # The exact shape of DECODER_SIZES["tiny"], so the two implementations can be cross-checked.
    "tiny": dict(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=176, vocab_size=256, max_position_embeddings=128,
    ),
    # GPT-2-small-like width and depth with grouped-query attention.
    "small": dict(
        num_hidden_layers=12, hidden_size=768, num_attention_heads=12, num_key_value_heads=4,
        intermediate_size=2048, vocab_size=32000, max_position_embeddings=2048,
    ),
}
BERT_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256,
        vocab_size=512, max_position_embeddings=128,
    ),
    # bert-base.
    "small": dict(
        num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
        vocab_size=30522, max_position_embeddings=512,
    ),
}


class HFCausalLM(nn.Module):
    """Wraps a ``*ForCausalLM`` / ``*LMHeadModel``: forward returns the logits (B, T, V)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class HFEncoder(nn.Module):
    """Wraps an encoder such as ``BertModel``: forward returns the last hidden state (B, T, h)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _size_kwargs(family: str, sizes: dict[str, dict[str, Any]], size: str, attn_implementation: str) -> dict:
    if size not in sizes:
        raise ValueError(f"unknown {family} size {size!r}; valid sizes: {sorted(sizes)}")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attn_implementation {attn_implementation!r}; valid choices: {list(ATTN_IMPLEMENTATIONS)}"
        )
    return dict(sizes[size], attn_implementation=attn_implementation)


def _seeded(seed: int, construct):
    """Run ``construct()`` with the global RNG seeded, then restore the global RNG: transformers'
    init draws from the global generator and offers no other."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return construct()


def build_hf_gpt2(size: str = "tiny", seed: int = 0, *, attn_implementation: str = "eager") -> HFCausalLM:
    from transformers import GPT2Config, GPT2LMHeadModel

    kwargs = _size_kwargs("gpt2", GPT2_SIZES, size, attn_implementation)
    last_token = kwargs["vocab_size"] - 1  # GPT-2's default 50256 is outside the tiny vocabulary
    config = GPT2Config(
        **kwargs, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        use_cache=False, bos_token_id=last_token, eos_token_id=last_token,
    )
    return HFCausalLM(_seeded(seed, lambda: GPT2LMHeadModel(config))).eval()


def build_hf_llama(size: str = "tiny", seed: int = 0, *, attn_implementation: str = "eager") -> HFCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = _size_kwargs("llama", LLAMA_SIZES, size, attn_implementation)
    # rms_norm_eps 1e-5 (HF's default is 1e-6) to match memsave's Decoder and TinyLlama.
    config = LlamaConfig(**kwargs, rms_norm_eps=1e-5, attention_dropout=0.0, use_cache=False)
    return HFCausalLM(_seeded(seed, lambda: LlamaForCausalLM(config))).eval()


def build_hf_bert(size: str = "tiny", seed: int = 0, *, attn_implementation: str = "eager") -> HFEncoder:
    from transformers import BertConfig, BertModel

    kwargs = _size_kwargs("bert", BERT_SIZES, size, attn_implementation)
    config = BertConfig(**kwargs, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, use_cache=False)
    # No pooler: forward returns the last hidden state, and unused parameters would only
    # confuse memory accounting and gradients.
    return HFEncoder(_seeded(seed, lambda: BertModel(config, add_pooling_layer=False))).eval()


def hf_inputs(
    model: HFCausalLM | HFEncoder, batch: int = 1, seq: int = 16, seed: int = 0, *, attention_mask: bool = False
) -> tuple[torch.Tensor, ...]:
    """Deterministic token ids (B, T) for a wrapped HF model, on its device.  With
    ``attention_mask``, also a right-padded mask (B, T): row b has ``max(1, seq - b)`` real tokens."""
    config = model.config
    if batch <= 0 or seq <= 0:
        raise ValueError(f"batch and seq must be positive, got batch={batch}, seq={seq}")
    if seq > config.max_position_embeddings:
        raise ValueError(f"seq {seq} exceeds max_position_embeddings {config.max_position_embeddings}")
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)  # (B, T)
    if not attention_mask:
        return (input_ids.to(device),)
    lengths = (seq - torch.arange(batch)).clamp(min=1)  # (B,)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()  # (B, T)
    return input_ids.to(device), mask.to(device)
