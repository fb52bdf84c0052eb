"""Estimate one call's working memory without the weights' values: run it on the meta device and
add up the bytes of the storages its ops create while they are alive.

For a plan made from a checkpoint (budget/stream.py): the model is too large to hold at full
precision, so its call cannot be measured the way memory/track.py measures (a real call under
the allocator's eye). On the meta device every op still produces its outputs' shapes, and a
storage dies when the last tensor viewing it does; the running sum of live storage bytes, and
its peak, is what those ops would allocate. It does not see what a CPU kernel allocates inside
itself beyond its outputs (a fused kernel's scratch), nor what another device's kernels would
choose; tests/test_compress_on_load.py compares it with memory/track.py's measurement of a real
call.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map


class _LiveStorages(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.alive: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.alive.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view or an in-place result shares an input's storage: nothing new (a weight's
        # transpose is a view of a storage that existed before the call, counted nowhere).
        inputs = {id(a.untyped_storage()) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.alive and key not in inputs:
                    self.alive.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def meta_call_peak(module: torch.nn.Module, args: Sequence[Any], call: Callable | None = None) -> int:
    """Peak bytes of live storages the ops of `module(*args)` create, run on the meta device
    (its parameters and buffers replaced by meta tensors of the same shapes for the call; the
    module itself is not changed). Tensors in `args` go to meta too."""
    state = {name: t.to("meta") for name, t in list(module.named_parameters()) + list(module.named_buffers())}
    meta_args = tree_map(lambda a: a.to("meta") if isinstance(a, torch.Tensor) else a, tuple(args))
    mode = _LiveStorages()
    with torch.no_grad(), mode:
        out = torch.func.functional_call(module, state, meta_args) if call is None else call(state, meta_args)
    del out
    return mode.peak
