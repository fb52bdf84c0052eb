"""A plain multi-layer perceptron: the smallest model whose graph still has the
linear -> activation -> linear chains that activation-memory passes act on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}

DEFAULT_SIZES = (64, 256, 256, 64)


class MLP(nn.Module):
    """nn.Linear layers ``sizes[0] -> sizes[1] -> ... -> sizes[-1]`` with the activation
    between them (not after the last one)."""

    def __init__(self, sizes: Sequence[int] = DEFAULT_SIZES, activation: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        sizes = tuple(sizes)
        if len(sizes) < 2:
            raise ValueError(f"MLP sizes needs at least 2 entries (input and output), got {sizes!r}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
            raise ValueError(f"MLP sizes must be positive ints, got {sizes!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid activations: {sorted(ACTIVATIONS)}")
        self.sizes = sizes
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out, bias=bias) for n_in, n_out in zip(sizes, sizes[1:]))
        # Stateless, so one instance serves every position.
        self.activation = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *hidden_layers, last = self.layers
        for layer in hidden_layers:
            x = self.activation(layer(x))  # (B, sizes[i + 1])
        return last(x)  # (B, sizes[-1])


@torch.no_grad()
def build_mlp(
    sizes: Sequence[int] = DEFAULT_SIZES, *, activation: str = "gelu", bias: bool = True, seed: int = 0
) -> MLP:
    """A seeded MLP in eval mode, initialized like nn.Linear's default (Kaiming-uniform weights,
    uniform(+-1/sqrt(fan_in)) biases) but from a local generator, so the global RNG is untouched."""
    with torch.device("meta"):  # skip nn.Linear's default init, which draws from the global RNG
        model = MLP(sizes, activation, bias)
    model.to_empty(device="cpu")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for layer in model.layers:
        nn.init.kaiming_uniform_(layer.weight, a=5**0.5, generator=generator)
        if layer.bias is not None:
            bound = 1.0 / layer.in_features**0.5
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return model.eval()


def mlp_inputs(model: MLP, batch: int = 8, seed: int = 0) -> tuple[torch.Tensor]:
    """Deterministic standard-normal inputs (B, sizes[0]) on the model's device."""
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, model.sizes[0], generator=generator)  # (B, sizes[0])
    return (x.to(model.layers[0].weight.device),)
