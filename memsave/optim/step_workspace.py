"""The temporary memory an optimizer's step allocates for one parameter, measured.

A training budget with `memsave.optimizer_in_backward` counts each gradient as freed right after
its step inside the backward; the step itself allocates temporaries beside it, and how many
depends on the optimizer: per byte of the parameter, on the CPU with torch 2.13, AdamW's
single-tensor step 2.0 (sqrt(v), then its quotient), Adam with weight decay 3.0, SGD 0 (with
momentum and weight decay 1.0; tests/test_optimizer_in_backward.py), and, seen by hand, foreach
AdamW 1.0, fused AdamW 0, torchao's AdamW8bit 2.0 and AdamW4bit 6.5. So it is measured, not
assumed: when `optimizer_in_backward`
builds the optimizer, the same class with the same arguments steps a stand-in parameter of
DUMMY_SHAPE twice (the first step makes the state) under memsave's tracker, and the second
step's peak over the stand-in's bytes is the ratio. The planner adds ratio x the parameter's
bytes at the moment its gradient is stepped (memory.estimate.estimate_memory's consumers).
"""

from __future__ import annotations

from typing import Any

import torch

DUMMY_SHAPE = (256, 256)  # whole blocks for torchao's block-wise state (block size 256 or 128)
# Where the step cannot be measured (a profiler already running, an optimizer that fails on
# the stand-in): the largest ratio measured above, rounded up.
UNMEASURED_RATIO = 7.0


def measure_step_workspace(optimizer_class: type, args: tuple, kwargs: dict[str, Any],
                           like: torch.Tensor) -> tuple[float, str | None]:
    """(temporary bytes of one step per byte of the parameter, why it is not measured or None)."""
    from memsave.memory.track import MemoryTracker

    device = "cuda" if like.is_cuda else "cpu"
    if device == "cpu" and torch.autograd.profiler._is_profiler_enabled:
        return UNMEASURED_RATIO, "a profiler was running (the CPU tracker is one)"
    try:
        generator = torch.Generator(device=like.device).manual_seed(0)
        stand_in = torch.nn.Parameter(torch.randn(DUMMY_SHAPE, generator=generator, device=like.device).to(like.dtype))
        optimizer = optimizer_class([stand_in], *args, **kwargs)
        for _ in range(2):  # the first step allocates the state; the second is every later one
            stand_in.grad = torch.randn(DUMMY_SHAPE, generator=generator, device=like.device).to(like.dtype)
            with MemoryTracker(device) as tracker:
                optimizer.step()
    except Exception as error:  # noqa: BLE001 - any failure leaves the safe ratio, with its reason
        return UNMEASURED_RATIO, f"{type(error).__name__}: {error}"
    return tracker.stats.peak_bytes / (stand_in.numel() * stand_in.element_size()), None
