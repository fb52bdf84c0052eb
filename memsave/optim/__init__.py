"""Training memory beyond activations: the optimizer step inside the backward."""

from memsave.optim.in_backward import InBackward, optimizer_in_backward

__all__ = ["InBackward", "optimizer_in_backward"]
