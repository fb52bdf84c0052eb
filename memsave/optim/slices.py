"""Stepping a large parameter in slices, so its step's temporaries are a slice's, not its own.

An optimizer's step allocates temporaries beside the parameter it updates (AdamW's
single-tensor step: 2x the parameter's bytes; torchao's AdamW8bit: 2x; step_workspace.py
measures it). With the step inside the backward, the largest parameter sets the step's share of
the peak: on the 112M decoder the 94 MiB embedding, stepped last, brought 188 MiB of
temporaries beside its gradient. The optimizers below update every element from the same
element of the gradient and of the state (and scalars such as the step count), so stepping
the parameter as flat slices, each its own entry in the optimizer with its own state, gives
bit-identical values with the temporaries of one slice (tested). torchao's low-bit states are
quantized in blocks of the flattened tensor: slices keep whole blocks, and pieces of at least
MIN_PIECE elements (torchao leaves smaller tensors unquantized), so the state is the one the
whole parameter would have had.

Optimizers that look at a parameter as a whole (Adafactor's row and column statistics, a
trust ratio of norms, an orthogonalized update) are not sliced; nor are subclasses of the
classes below, which may do either.
"""

from __future__ import annotations

import math

import torch

ELEMENTWISE_TORCH = frozenset({
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.Adadelta,
    torch.optim.Adamax, torch.optim.ASGD, torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop,
    torch.optim.Rprop,
})
# torchao.optim's classes whose state is quantized block-wise over the flattened tensor
BLOCKWISE_TORCHAO = frozenset({"Adam8bit", "AdamW8bit", "Adam4bit", "AdamW4bit", "AdamFp8", "AdamWFp8"})
MIN_PIECE = 4096  # elements; torchao quantizes a state of at least this many (bitsandbytes' rule)
DEFAULT_SLICE_BYTES = 8 * 2**20


def slicing_block(optimizer: torch.optim.Optimizer) -> tuple[int, str | None]:
    """(the element count every slice boundary must be a multiple of, why this optimizer is not
    sliced or None)."""
    cls = type(optimizer)
    if cls in ELEMENTWISE_TORCH:
        return 1, None
    if cls.__module__.startswith("torchao.optim") and cls.__name__ in BLOCKWISE_TORCHAO:
        return int(getattr(optimizer, "block_size", 256)), None
    return 1, (f"{cls.__module__}.{cls.__name__} is not known to update element by element (sliced: "
               f"torch.optim's {', '.join(sorted(c.__name__ for c in ELEMENTWISE_TORCH))}; torchao.optim's "
               f"{', '.join(sorted(BLOCKWISE_TORCHAO))})")


def slice_bounds(param: torch.Tensor, slice_bytes: int, block: int) -> list[tuple[int, int]] | None:
    """Flat [start, stop) ranges covering `param`, each about `slice_bytes`, or None when it is
    stepped whole: small, not a plain contiguous tensor, or not whole blocks."""
    numel = param.numel()
    if (type(param) not in (torch.Tensor, torch.nn.Parameter) or not param.is_contiguous()
            or numel * param.element_size() <= slice_bytes or numel % block):
        return None
    unit = math.lcm(MIN_PIECE, block)
    piece = max(unit, slice_bytes // param.element_size() // unit * unit)
    starts = list(range(0, numel, piece))
    if numel - starts[-1] < MIN_PIECE:  # a short tail joins the slice before it
        starts.pop()
    if len(starts) < 2:
        return None
    return list(zip(starts, starts[1:] + [numel]))


def make_slices(param: torch.Tensor, bounds: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Leaf views of `param`'s storage, one per range: what the optimizer holds and updates."""
    flat = param.detach().view(-1)
    return [flat[start:stop] for start, stop in bounds]
