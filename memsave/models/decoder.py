"""A Llama-style decoder-only language model in plain PyTorch.

The model is the main test subject of memsave: it has every pattern the memory
passes care about (a full (T, T) attention score matrix, SwiGLU MLPs, RMSNorm,
a large vocabulary projection) and nothing else.  Parameter names follow Hugging
Face Llama (``layers.0.self_attn.q_proj.weight``, ``layers.0.mlp.gate_proj.weight``,
``norm.weight``, ...) so name-pattern configs read the same for both.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memsave.models.decoder_cache import DecoderCache, DecoderCacheLayer


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads means grouped-query attention
    intermediate: int  # hidden size of the SwiGLU MLP
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0  # on the attention probabilities, like HF Llama's attention_dropout
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden", "n_layers", "n_heads", "n_kv_heads", "intermediate", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DecoderConfig.{name} must be a positive int, got {value!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"DecoderConfig.{name} must be a positive number, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DecoderConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.hidden % self.n_heads != 0:
            raise ValueError(
                f"DecoderConfig.hidden ({self.hidden}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"DecoderConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"DecoderConfig head_dim = hidden / n_heads = {self.head_dim} must be even for rotary embeddings"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def kv_groups(self) -> int:
        """How many query heads share one key/value head."""
        return self.n_heads // self.n_kv_heads


# The parameter counts below are exact, computed (not guessed) as
#   V*h*(1 if tied else 2) + h + L*(2*h*h + 2*h*KV*D + 3*h*I + 2*h)
# and checked against the built modules by tests/test_models.py::test_named_size_parameter_counts.
DECODER_SIZES: dict[str, DecoderConfig] = {
    # 125,248 parameters. For unit tests.
    "tiny": DecoderConfig(
        vocab_size=256, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate=176, max_seq_len=128
    ),
    # 4,999,424 parameters. For the demo: a forward at batch 1 x seq 64 takes ~15 ms on 2 CPU cores.
    "small": DecoderConfig(
        vocab_size=4096, hidden=256, n_layers=4, n_heads=8, n_kv_heads=4, intermediate=688, max_seq_len=512
    ),
    # 112,082,688 parameters (10 layers: 8 would give only 99,496,704).
    "medium": DecoderConfig(
        vocab_size=32000, hidden=768, n_layers=10, n_heads=12, n_kv_heads=4, intermediate=2048, max_seq_len=2048
    ),
    # 1,100,048,384 parameters: the TinyLlama-1.1B shape.
    "1b": DecoderConfig(
        vocab_size=32000, hidden=2048, n_layers=22, n_heads=32, n_kv_heads=4, intermediate=5632, max_seq_len=2048
    ),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares overflows / loses precision in fp16 and bf16, so normalize in fp32.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE cos/sin tables in the rotate-half layout (the first and second half of
    each head are the real and imaginary parts), as in Hugging Face Llama."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        # Not persistent: they are a pure function of the config, so they don't belong in checkpoints.
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)compute the tables; needed after ``to_empty()`` turns them into garbage."""
        device = self.cos.device
        half = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim  # (D/2,)
        inv_freq = 1.0 / (self.theta**half)  # (D/2,)
        positions = torch.arange(self.max_seq_len, dtype=torch.float32, device=device)  # (S,)
        angles = torch.outer(positions, inv_freq)  # (S, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (S, D)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:seq_len], self.sin[:seq_len]  # (T, D), (T, D)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by position; cos/sin are (T, D)."""
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, KV, T, D) -> (B, KV * groups, T, D); query head h uses key/value head h // groups,
    the same grouping as SDPA's enable_gqa and Hugging Face's repeat_kv."""
    if groups == 1:
        return x
    b, kv, t, d = x.shape
    return x[:, :, None].expand(b, kv, groups, t, d).reshape(b, kv * groups, t, d)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        kv_dim = config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden, config.hidden, bias=False)
        self.k_proj = nn.Linear(config.hidden, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.hidden, config.hidden, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal_mask: torch.Tensor | None,
        cache: DecoderCacheLayer | None = None, positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, hidden = x.shape  # (B, T, h)
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if cache is not None:
            return self.o_proj(self._cached(q, k, v, cache, positions).transpose(1, 2).reshape(b, t, hidden))
        k = repeat_kv(k, self.n_heads // self.n_kv_heads)  # (B, H, T, D)
        v = repeat_kv(v, self.n_heads // self.n_kv_heads)  # (B, H, T, D)

        # Written out on purpose instead of F.scaled_dot_product_attention: the captured graph
        # must hold the full (T, T) score matrix so that a memsave pass can find it and route
        # it to memory-efficient attention.  softmax kernels accumulate in fp32 internally.
        scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim))  # (B, H, T, T)
        scores = scores.masked_fill(causal_mask, float("-inf"))  # (B, H, T, T)
        probs = F.softmax(scores, dim=-1)  # (B, H, T, T)
        probs = F.dropout(probs, p=self.dropout, training=self.training)
        out = probs @ v  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(b, t, hidden)  # (B, T, h)
        return self.o_proj(out)

    def _cached(self, q, k, v, cache: DecoderCacheLayer, positions: torch.Tensor) -> torch.Tensor:
        """Attention through the cache (decoder_cache.py), as SDPA: memsave's kv-cache passes
        match it (HF's pattern: repeat_kv, a (T, L) mask; a fresh cache's prefill causal)."""
        if self.training:
            raise ValueError("Decoder: a kv cache is for inference (call model.eval())")
        t, groups, fresh = q.shape[2], self.n_heads // self.n_kv_heads, not cache.is_initialized
        keys, values = cache.update(k, v, positions)  # (B, KV, L, D)
        if fresh:  # a prefill into an empty cache: its own T tokens, positions 0 .. T-1
            keys, values, mask = keys[:, :, :t], values[:, :, :t], None
        else:  # True = attend: every written position up to the query's own
            mask = torch.arange(keys.shape[2], device=q.device)[None, :] <= positions[:, None]  # (T, L)
        return F.scaled_dot_product_attention(q, repeat_kv(keys, groups), repeat_kv(values, groups), attn_mask=mask,
                                              is_causal=fresh)  # (B, H, T, D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.up_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.down_proj = nn.Linear(config.intermediate, config.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, h)


class Block(nn.Module):
    """Pre-norm transformer block with residual connections."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal_mask: torch.Tensor | None,
        cache: DecoderCacheLayer | None = None, positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, causal_mask, cache, positions)  # (B, T, h)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, h)


class Decoder(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.hidden, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head.weight with embed_tokens.weight when the config asks for it.
        Called again after ``to_empty()``, which may replace the shared Parameter objects."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """Deterministic init from ``generator`` alone, leaving the global RNG alone:
        normal(0, 0.02) for linears and embeddings, ones for norms."""
        self.tie_weights()
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02, generator=generator)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, RotaryEmbedding):
                module.reset_buffers()

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, cache: DecoderCache | None = None
    ) -> torch.Tensor:
        """Logits (B, T, V), or the loss given labels. With `cache` (decoder_cache.py) the
        tokens continue the cached ones: positions from `cache.length` on, written into it."""
        t = input_ids.shape[1]  # input_ids: (B, T)
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len {self.config.max_seq_len}")
        x = self.embed_tokens(input_ids)  # (B, T, h)
        if cache is not None:
            if len(cache.layers) != len(self.layers):
                raise ValueError(f"the cache has {len(cache.layers)} layers, the model {len(self.layers)}")
            positions = torch.arange(t, device=input_ids.device) + cache.length  # (T,)
            cos, sin = self.rotary.cos[positions], self.rotary.sin[positions]  # (T, D), (T, D)
            for layer, layer_cache in zip(self.layers, cache.layers):
                x = layer(x, cos, sin, None, layer_cache, positions)  # (B, T, h)
            cache.length.add_(t)
            return self._head(x, labels)
        cos, sin = self.rotary(t)  # (T, D), (T, D)
        # True above the diagonal = a future position that must not be attended to.
        # Built once per forward and shared by all layers.
        causal_mask = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).triu(1)  # (T, T)
        for layer in self.layers:
            x = layer(x, cos, sin, causal_mask)  # (B, T, h)
        return self._head(x, labels)

    def _head(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        b, t = x.shape[:2]
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if labels is None:
            return logits
        # Labels are used as given (no shifting): callers shift them, see decoder_inputs().
        return F.cross_entropy(logits.reshape(b * t, -1), labels.reshape(b * t), ignore_index=-100)


def _config_for(size: str, overrides: dict) -> DecoderConfig:
    if size not in DECODER_SIZES:
        raise ValueError(f"unknown decoder size {size!r}; valid sizes: {sorted(DECODER_SIZES)}")
    valid_fields = [f.name for f in dataclasses.fields(DecoderConfig)]
    unknown = sorted(set(overrides) - set(valid_fields))
    if unknown:
        raise ValueError(f"unknown DecoderConfig field(s) {unknown}; valid fields: {valid_fields}")
    return dataclasses.replace(DECODER_SIZES[size], **overrides)


def build_decoder(size: str = "tiny", *, seed: int = 0, device: str = "cpu", **overrides) -> Decoder:
    """A seeded, deterministic Decoder of a named size in eval mode; ``overrides`` replace
    config fields, e.g. ``build_decoder("small", n_layers=2)``. ``device="meta"``: shapes only,
    no weights (for memsave.distributed.defer_weights)."""
    if device not in ("cpu", "meta"):
        raise ValueError(f"build_decoder: device {device!r}; valid: 'cpu', 'meta' (move a built model with .to())")
    config = _config_for(size, overrides)
    # Build on meta and allocate afterwards: skips nn.Linear's default init, which would use
    # the global RNG and, for the 1b size, cost as much time as our own init.
    with torch.device("meta"):
        model = Decoder(config)
    if device == "meta":
        return model.eval()
    model.to_empty(device=device)
    model.init_weights(torch.Generator(device="cpu").manual_seed(seed))
    return model.eval()


def decoder_inputs(
    config_or_model: DecoderConfig | Decoder,
    batch: int = 1,
    seq: int = 32,
    *,
    seed: int = 0,
    labels: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Deterministic random token ids (B, T), plus next-token labels (B, T) when ``labels``:
    ``labels[:, i] = input_ids[:, i + 1]`` and the last position is ignored (-100).
    Inputs go to the model's device when a model is given."""
    if isinstance(config_or_model, Decoder):
        config = config_or_model.config
        device = config_or_model.embed_tokens.weight.device
    elif isinstance(config_or_model, DecoderConfig):
        config, device = config_or_model, torch.device("cpu")
    else:
        raise ValueError(f"expected a DecoderConfig or Decoder, got {type(config_or_model).__name__}")
    if batch <= 0 or seq <= 0:
        raise ValueError(f"batch and seq must be positive, got batch={batch}, seq={seq}")
    if seq > config.max_seq_len:
        raise ValueError(f"seq {seq} exceeds max_seq_len {config.max_seq_len}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)  # (B, T)
    if not labels:
        return (input_ids.to(device),)
    targets = torch.full_like(input_ids, -100)  # (B, T)
    targets[:, :-1] = input_ids[:, 1:]
    return input_ids.to(device), targets.to(device)
