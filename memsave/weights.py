"""Work done on the user's weights happens once per weight, not once per compiled graph.

Dynamo compiles a model several times: one graph per graph break, a new graph on every
recompile (new shapes, dynamic shapes, failed guards). Each of those graphs receives the same
parameter tensors. A pass that compresses a weight (quantize, prune, factorize) asks this
cache instead of doing the work again, so a recompile costs no new compression and never needs
the original weight to still be there (a pass may free it after the first compression).

Entries are keyed by the weight tensor's identity (weakly: a model that is deleted takes its
entries with it) plus a key the pass chooses (e.g. its config), and remember the weight's
version counter: an in-place update of the weight (optimizer step, load_state_dict) makes the
entry stale, and it is rebuilt on next use.
"""

from __future__ import annotations

from typing import Callable, Hashable, TypeVar

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils.weak import WeakIdKeyDictionary

T = TypeVar("T")


class WeightCache:
    def __init__(self) -> None:
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.builds = 0  # how many times a build function ran (tests and reports read this)

    def get_or_build(self, weight: torch.Tensor, key: Hashable, build: Callable[[], T]) -> T:
        per_weight = self._entries.get(weight)
        if per_weight is None:
            per_weight = {}
            self._entries[weight] = per_weight
        entry = per_weight.get(key)
        version = weight._version
        if entry is not None and entry[0] == version:
            return entry[1]
        # Passes run while AOTAutograd's fake mode is active; weights are real tensors, and so
        # must be the work done on them.
        with unset_fake_temporarily(), torch.no_grad():
            value = build()
        self.builds += 1
        per_weight[key] = (weight._version, value)
        return value

    def __contains__(self, weight: torch.Tensor) -> bool:
        return weight in self._entries

    def clear(self) -> None:
        self._entries = WeakIdKeyDictionary()


# The process-wide cache every pass uses.
WEIGHTS = WeightCache()


# -- Released weights ---------------------------------------------------------------------
#
# Note [Releasing full-precision weights]
# Once every use of a weight in a compiled graph reads its compressed copy, memsave frees the
# original's memory with `storage.resize_(0)` (FSDP's trick). Swapping the Parameter is not
# possible from inside a backend (Dynamo's guards hold weakrefs to it), and resizing the
# storage keeps shape/stride/dtype, so guards still pass and recompiles still trace; they get
# the compressed copy from the cache above and never need the original again.
# Eager use of the original module afterwards would fail with an obscure "setStorage" error;
# a global forward pre-hook turns that into a clear error. It is installed at the first
# release, not before: torch warns about global hooks on every torch.compile(module), which
# users who never release a weight should not see. Dynamo does not guard on module hooks
# (skip_nnmodule_hook_guards), so installing it mid-compile causes no recompile.

_RELEASED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def release(weight: torch.Tensor, name: str) -> int:
    """Free a weight's storage; returns the bytes freed (0 if it was already released)."""
    if weight in _RELEASED:
        return 0
    storage = weight.untyped_storage()
    nbytes = storage.nbytes()
    install_eager_guard()
    with unset_fake_temporarily():
        storage.resize_(0)
    _RELEASED[weight] = name
    return nbytes


def is_released(weight: torch.Tensor) -> bool:
    return weight in _RELEASED


def _refuse_released_weights(module: torch.nn.Module, args):
    # Checked first so that Dynamo, which traces this hook, sees a constant and skips the rest.
    if torch.compiler.is_compiling() or not _RELEASED:
        return None
    for pname, param in module._parameters.items():
        if param is not None and param in _RELEASED:
            raise RuntimeError(
                f"{type(module).__name__}.{pname} ({_RELEASED[param]}) was released by memsave after "
                "it was compressed; run the compiled model instead, or compile with "
                "options={'quantize': {..., 'free_weights': False}} to keep the original weights"
            )
    return None


_GUARD_INSTALLED = False


def install_eager_guard() -> None:
    global _GUARD_INSTALLED
    if not _GUARD_INSTALLED:
        torch.nn.modules.module.register_module_forward_pre_hook(_refuse_released_weights)
        _GUARD_INSTALLED = True
