"""memsave::step_in_backward(param, grad, after): hand a final gradient to the parameter's in-backward
optimizer, which updates the parameter in place.

The backward graph calls it right after the gradient's last use (passes/joint/
step_in_backward.py) and returns no gradient for that parameter, so the graph frees each
gradient at once. The schema says what happens: `param` is mutated (which also keeps a call
without outputs in the graph: FX's dead-code elimination and Inductor's scheduler keep mutating
ops). `after` are results of the backward's other reads of the parameter (through saved views
of it), passed only so that every compiler orders the in-place update after them. A parameter no
optimizer holds gets the gradient accumulated into `.grad`, as autograd
would have done. The reference is the ordinary step (memsave/optim, tested equal).
"""

from __future__ import annotations

import torch


@torch.library.custom_op("memsave::step_in_backward", mutates_args=("param",))
def step_in_backward(param: torch.Tensor, grad: torch.Tensor, after: list[torch.Tensor]) -> None:
    from memsave.optim.in_backward import apply_gradient

    apply_gradient(param, grad)


@step_in_backward.register_fake
def _(param: torch.Tensor, grad: torch.Tensor, after: list[torch.Tensor]) -> None:
    return None
