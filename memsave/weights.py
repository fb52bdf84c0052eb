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
