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

import re
import weakref
from typing import Any, Callable, Hashable, TypeVar

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils.weak import WeakIdKeyDictionary

from memsave.memory.process import give_back

T = TypeVar("T")

# Builds on weights at least this large give their working memory back to the OS after they
# run (memory/process.py); below it a trim would cost more time than it returns memory.
GIVE_BACK_MIN_BYTES = 1 << 20


class _Derived:
    """A cache entry given up for a converted form; rebuilt from it on demand."""

    def __init__(self, source_key: Hashable, rebuild: Callable[[Any], Any]):
        self.source_key, self.rebuild = source_key, rebuild


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a cached value: one tensor, or a tuple/list holding some."""
    return [t for t in (value if isinstance(value, (tuple, list)) else (value,)) if isinstance(t, torch.Tensor)]


class WeightCache:
    def __init__(self) -> None:
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()
        # value tensor -> (weak ref to its weight, key): which weight a cached tensor belongs to.
        self._owners: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.builds = 0  # how many times a build function ran (tests and reports read this)
        # Cached tensors that are weights in their own right (a pruned weight, low-rank factors,
        # sparse values): later passes may compress them too, and release them once compressed.
        self._derived: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def get_or_build(
        self, weight: torch.Tensor, key: Hashable, build: Callable[[], T], *, reads_weight: bool = True
    ) -> T:
        """The cached value for (weight, key), built once. reads_weight=False says `build` works
        from other cached values only, so it may run after the weight was released."""
        per_weight = self._entries.get(weight)
        if per_weight is None:
            per_weight = {}
            self._entries[weight] = per_weight
        entry = per_weight.get(key)
        version = weight._version
        if entry is not None and entry[0] == version:
            value = entry[1]
            if isinstance(value, _Derived):
                # Rebuilt for this compile only; the converted form stays the one copy held.
                source = per_weight[value.source_key][1]
                with unset_fake_temporarily(), torch.no_grad():
                    rebuilt = value.rebuild(source)
                self._remember_owner(weight, key, rebuilt)  # so a kernel finds its layout again
                return rebuilt
            return value
        if reads_weight and is_released(weight):
            # Its storage is gone: building from it would read freed memory.
            raise RuntimeError(
                f"memsave: weight {_RELEASED[weight]!r} was released after compression, and its "
                f"compressed form for {key!r} is not cached; compile with "
                "options={'quantize': {..., 'free_weights': False}} to keep the original"
            )
        # Passes run while AOTAutograd's fake mode is active; weights are real tensors, and so
        # must be the work done on them.
        with unset_fake_temporarily(), torch.no_grad():
            value = build()
        self.builds += 1
        if weight.numel() * weight.element_size() >= GIVE_BACK_MIN_BYTES:
            # The build's working memory (several weight-sized temporaries) is free now; in
            # glibc's heap it would stay resident and, fragmented, not even be reused by the
            # next build (measured: +45 MiB of RSS per 11 MiB weight pruned).
            give_back()
        per_weight[key] = (weight._version, value)
        self._remember_owner(weight, key, value)
        return value

    def owner(self, value: torch.Tensor) -> tuple[torch.Tensor, Hashable] | None:
        """The weight (and key) a cached tensor was built for, if it came from this cache."""
        found = self._owners.get(value)
        if found is None:
            return None
        weight = found[0]()
        return (weight, found[1]) if weight is not None else None

    def convert(
        self,
        weight: torch.Tensor,
        to_key: Hashable,
        build: Callable[[], T],
        rebuild: dict[Hashable, Callable[[T], Any]],
    ) -> T:
        """Store `build()` under `to_key` and give up the entries in `rebuild` for it.

        For kernels with their own weight layout: the converted copy becomes the one held,
        and each given-up entry is rebuilt from it by `rebuild[key]` when a later compile asks
        for it (transiently). Converting again returns the stored copy.
        """
        value = self.get_or_build(weight, to_key, build, reads_weight=False)
        per_weight = self._entries[weight]
        for key, fn in rebuild.items():
            if key in per_weight and not isinstance(per_weight[key][1], _Derived):
                per_weight[key] = (per_weight[key][0], _Derived(to_key, fn))
        return value

    def _remember_owner(self, weight: torch.Tensor, key: Hashable, value: Any) -> None:
        for t in _tensors(value):
            self._owners[t] = (weakref.ref(weight), key)

    def __contains__(self, weight: torch.Tensor) -> bool:
        return weight in self._entries

    def has(self, weight: torch.Tensor, key: Hashable) -> bool:
        """Whether (weight, key) is cached and current."""
        entry = self._entries.get(weight, {}).get(key)
        return entry is not None and entry[0] == weight._version

    def keys(self, weight: torch.Tensor) -> list[Hashable]:
        return list(self._entries.get(weight, {}))

    def held_bytes(self, weights) -> int:
        """Bytes `weights` take now: their own storages (0 once released) plus every tensor
        cached for them (packed, pruned, narrow copies) and for the weights derived from them,
        each storage counted once."""
        storages: dict[int, int] = {}
        todo, seen = list(weights), set()
        while todo:
            weight = todo.pop()
            if id(weight) in seen:
                continue
            seen.add(id(weight))
            tensors = [weight] + [t for _, value in self._entries.get(weight, {}).values() for t in _tensors(value)]
            # A derived weight (pruned, a factor) has entries of its own (its packed codes).
            todo.extend(t for t in tensors[1:] if t in self._derived)
            for t in tensors:
                storage = t.untyped_storage()
                if storage.nbytes():  # a released weight holds nothing
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def mark_derived(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            self._derived[t] = True

    def is_derived(self, tensor: torch.Tensor) -> bool:
        """Whether a pass marked `tensor` as a weight in its own right (see mark_derived)."""
        return tensor in self._derived

    def derived(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """The derived weights cached for `weight` (see mark_derived)."""
        return [t for _, value in self._entries.get(weight, {}).values() for t in _tensors(value) if t in self._derived]

    def clear(self) -> None:
        self._entries = WeakIdKeyDictionary()
        self._owners = WeakIdKeyDictionary()
        self._derived = WeakIdKeyDictionary()


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
# a forward pre-hook on the module that owns a released weight turns that into a clear error.
# Per module, not global: with any global module hook, torch warns on every call of every
# torch.compile(module) in the process and fires such hooks twice. The owners are found when
# the backend first sees a graph (`remember_owners`, from Dynamo's sources for the
# parameters); a weight whose owner is unknown is still released, without the clear error.
# Dynamo does not guard on module hooks (skip_nnmodule_hook_guards), so adding one
# mid-compile causes no recompile.

_RELEASED: WeakIdKeyDictionary = WeakIdKeyDictionary()
# weight -> (id of the graph whose compile released it, bytes freed): for the reports.
_RELEASED_BY: WeakIdKeyDictionary = WeakIdKeyDictionary()
COMPRESSING = ("prune", "factorize", "quantize")  # the families whose passes replace weights


def can_release(weight: torch.Tensor) -> bool:
    """False for storages that cannot shrink, e.g. memory-mapped from a safetensors file
    (those pages are file-backed: the OS drops them under pressure without our help)."""
    return weight.untyped_storage().resizable()


def release(weight: torch.Tensor, name: str, *, graph_id: int | None = None) -> int:
    """Free a weight's storage; returns the bytes freed (0 if it was already released).
    The memory goes back to the C heap; `memory.process.give_back` returns it to the OS."""
    if weight in _RELEASED:
        return 0
    storage = weight.untyped_storage()
    if not storage.resizable():
        raise ValueError(f"memsave: cannot release {name!r}: its storage is not resizable (memory-mapped?)")
    nbytes = storage.nbytes()
    _guard_owner(weight)
    with unset_fake_temporarily():
        storage.resize_(0)
    _RELEASED[weight] = name
    _RELEASED_BY[weight] = (graph_id, nbytes)
    return nbytes


def released_by(graph_id: int) -> list[tuple[str, int]]:
    """(name, bytes) of the weights the compile of graph `graph_id` released."""
    return [(_RELEASED[w], n) for w, (g, n) in list(_RELEASED_BY.items()) if g == graph_id and w in _RELEASED]


def frees_weights(config) -> bool:
    """Whether a recipe lets memsave free originals: a compressing family is on, and every
    one that is on allows it (free_weights)."""
    families = [getattr(config, f) for f in COMPRESSING if getattr(config, f, None) is not None]
    return bool(families) and all(f.free_weights for f in families)


def owns_storage(weight: torch.Tensor) -> bool:
    """The tensor is its storage's only view (no other tensor can share what a release frees)."""
    storage = weight.untyped_storage()
    return weight.storage_offset() == 0 and weight.is_contiguous() and storage.nbytes() == weight.numel() * weight.element_size()


# Note [Streaming compression]
# A compressing pass works weight by weight. If it released each original only after the
# whole graph was compressed (release_weights), compiling would hold the full model and its
# compressed copy at once, plus the working memory of the compression: measured on an HF Llama
# (int8), the peak RSS while compiling rose 1.7x the fp32 weight bytes above the loaded
# model. Instead, a pass that has built a weight's compressed form (cached in WEIGHTS, so a
# later pass or recompile never needs the original) and left nothing else in the graph reading
# it calls `release_streamed`, which frees it at once and gives the memory back to the OS.
# Not in debug mode: the per-pass error measurement runs the graph on the real weights after
# each pass; then release_weights frees them at the end, as before.


def compressible_in(stage: str, weight: torch.Tensor) -> bool:
    """Whether a graph of `stage` may compress (and release) `weight`: every weight of an
    inference graph; in a training (joint) graph only a frozen one, which it does not learn."""
    return stage == "inference" or (stage == "joint" and not weight.requires_grad)


def release_streamed(weight: torch.Tensor, name: str, ctx) -> int:
    """Free `weight` now, if the compile's recipe frees originals and nothing needs it again
    (see Note [Streaming compression]); the caller has checked that the graph only reads it
    to compute what is already cached. Returns the bytes freed."""
    from memsave.calibrate import CALIBRATION

    config = ctx.config
    if getattr(config, "debug", False) or not compressible_in(ctx.stage, weight) or not frees_weights(config):
        return 0
    if weight not in WEIGHTS or is_released(weight) or not can_release(weight) or not owns_storage(weight):
        return 0
    nbytes = release(weight, name, graph_id=ctx.graph_id)
    # Its calibration statistics could only serve to compress it again, which a released
    # weight cannot be.
    CALIBRATION.pop(weight, None)
    give_back()
    return nbytes


def restore(weight: torch.Tensor, value: torch.Tensor) -> int:
    """Give a released weight storage again, filled from `value` (same shape; cast like
    `copy_`), in place: the Parameter object stays the user's. Returns the bytes allocated."""
    if weight not in _RELEASED:
        raise ValueError("memsave: restore() is for released weights only")
    extent = weight.storage_offset() + sum((n - 1) * s for n, s in zip(weight.shape, weight.stride())) + 1
    nbytes = extent * weight.element_size() if weight.numel() else 0
    with unset_fake_temporarily(), torch.no_grad():
        weight.untyped_storage().resize_(nbytes)
        weight.copy_(value)
    del _RELEASED[weight]
    _RELEASED_BY.pop(weight, None)
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
                "it was compressed; run the compiled model instead, or compile with free_weights=False "
                "in the compressing pass's options (e.g. options={'quantize': {..., 'free_weights': False}}) "
                "to keep the original weights"
            )
    return None


# parameter -> weakref to the module whose _parameters holds it (see Note [Releasing ...]).
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_OWNER_SOURCE = re.compile(r"(.*)\._parameters\['[^']+'\]$")


def remember_owners(gm: torch.fx.GraphModule, example_inputs) -> None:
    """Record which module owns each parameter input of a Dynamo graph, so that releasing one
    can guard that module. Reads Dynamo's frame under compilation (its sources name each
    parameter from the frame's locals); where that is not available, nothing is recorded."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        scope = {"L": tx.f_locals, "G": tx.f_globals}
    except Exception:  # not under Dynamo (a graph handed to the backend directly)
        return
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        grapharg = node.meta.get("grapharg")
        if not isinstance(value, torch.nn.Parameter) or grapharg is None or grapharg.source is None:
            continue
        match = _OWNER_SOURCE.match(grapharg.source.name)
        if match is None:
            continue
        try:
            module = eval(match.group(1), {"__builtins__": {}}, scope)  # a source path, e.g. L['self']._modules['fc']
        except Exception:
            continue
        if isinstance(module, torch.nn.Module) and any(p is value for p in module._parameters.values()):
            _OWNERS[value] = weakref.ref(module)


def _guard_owner(weight: torch.Tensor) -> None:
    ref = _OWNERS.get(weight)
    module = ref() if ref is not None else None
    if module is not None and _refuse_released_weights not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_refuse_released_weights)
