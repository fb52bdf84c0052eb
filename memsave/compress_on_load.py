"""Compress a model while loading it from a plain safetensors checkpoint, so that its
full-precision weights never exist together: `memsave.load(model, "model.safetensors",
options=plan.options)`.

    with memsave.empty_parameters():                      # no weight memory yet
        model = Model(config)
    plan = memsave.plan(model, *example_inputs, budget="2GiB", checkpoint="model.safetensors")
    memsave.load(model, "model.safetensors", options=plan.options)
    compiled = torch.compile(model, backend="memsave", options=plan.options)

Each tensor is read on its own (checkpoint.Checkpoint). A weight the options quantize is
compressed at once by the quantize pass's own code (weight_codes, and its SQNR as the pass
records it), its codes put in the weight cache under the keys the pass uses, and its
full-precision form dropped before the next tensor is read: the parameter left behind has the
weight's shape and an empty storage and is registered as released, exactly what memsave.load
leaves for a file memsave.save wrote. The compile then finds every code cached and reads no
weight. Peak memory while loading: the compressed weights, the other tensors, the largest
single full-precision weight and the compression's working memory (benchmarks/bench_load.py
measures it).

Which weights are compressed here: those the quantize pass would quantize and could release,
seen from the module: the weight of an nn.Linear (or of an nn.Embedding, with "embeddings"),
2-D floating point, that the options select (include/exclude/overrides), and that belongs to
that one module (a weight tied between two modules is loaded as it is: the compile quantizes
its linear use and keeps the original for the other). Any other weight is loaded as it is.
Options other than quantize that change weights (prune, factorize) are refused here: their
passes would need the full-precision originals at compile time.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from memsave.checkpoint import Checkpoint
from memsave.config import Config
from memsave.memory.process import give_back
from memsave.weights import WEIGHTS, release

WEIGHT_CHANGING = ("prune", "factorize")


def load_compressing(model: nn.Module, path: str | os.PathLike, options: Any, *, strict: bool = True) -> nn.Module:
    """See the module docstring; returns `model`, with `model._memsave_loaded` = {"compressed":
    [names], "full": [names]} (what was compressed while loading, what was loaded as it is)."""
    from memsave.serialize.entries import empty_storage_tensor

    config = Config.from_options(options)
    pinned = [f for f in WEIGHT_CHANGING if getattr(config, f, None) is not None]
    if pinned:
        raise NotImplementedError(
            f"memsave.load: compressing while loading supports the 'quantize' options only, not {pinned}: load "
            "the checkpoint with model.load_state_dict and compile with those options"
        )
    module = getattr(model, "_orig_mod", model)
    ckpt = Checkpoint(path)
    slots = _slots(module)
    _check_names(ckpt, slots, strict)
    quantize = config.quantize
    compressed, full = [], []
    for name in ckpt.names():
        if name not in slots:
            continue
        slot = slots[name]
        target = slot.current()
        scheme = _scheme(quantize, name, slot)
        if scheme is None:
            value = ckpt.read(name, target.dtype, own_mapping=False)
            slot.assign(_plain(slot, target, value))
            full.append(name)
            continue
        original = ckpt.read(name, target.dtype)
        entries = _compress(original, scheme)
        del original  # its own mapping: unmapped here, before the next tensor is read
        weight = nn.Parameter(empty_storage_tensor(tuple(target.shape), target.dtype, torch.device("cpu")),
                              requires_grad=False)
        slot.assign(weight)
        for key, value in entries.items():
            WEIGHTS.get_or_build(weight, key, lambda value=value: value, reads_weight=False)
        release(weight, name)  # storage already empty: registers it, so eager use fails clearly
        give_back()  # the compression's temporaries (memory/process.py)
        compressed.append(name)
    still_meta = sorted(n for n, slot in slots.items() if slot.current().device.type == "meta")
    if still_meta:
        raise ValueError(f"memsave.load: {still_meta} still on the meta device after loading {ckpt.path!r} "
                         "(the checkpoint has no values for them)")
    for obj in {id(model): model, id(module): module}.values():
        obj._memsave_quantize = options.get("quantize") if isinstance(options, dict) else None
        obj._memsave_options = {"quantize": obj._memsave_quantize} if obj._memsave_quantize is not None else {}
        obj._memsave_loaded = {"compressed": compressed, "full": full}
    return model


class _Slot:
    """One parameter or buffer: every (module, attribute, kind) that holds it, and its names."""

    def __init__(self):
        self.places: list[tuple[nn.Module, str, str]] = []
        self.names: list[str] = []

    def current(self) -> torch.Tensor:
        module, attr, kind = self.places[0]
        return getattr(module, "_parameters" if kind == "parameter" else "_buffers")[attr]

    def assign(self, value: torch.Tensor) -> None:
        for module, attr, kind in self.places:
            getattr(module, "_parameters" if kind == "parameter" else "_buffers")[attr] = value


def _slots(module: nn.Module) -> dict[str, _Slot]:
    """name -> slot for every parameter and persistent buffer; a tied tensor's names share one slot."""
    by_id: dict[int, _Slot] = {}
    slots: dict[str, _Slot] = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        items = [(a, t, "parameter") for a, t in sub._parameters.items()]
        items += [(a, t, "buffer") for a, t in sub._buffers.items() if a not in sub._non_persistent_buffers_set]
        for attr, tensor, kind in items:
            if tensor is None:
                continue
            slot = by_id.setdefault(id(tensor), _Slot())
            slot.places.append((sub, attr, kind))
            slot.names.append(prefix + attr)
            slots[prefix + attr] = slot
    return slots


def _check_names(ckpt: Checkpoint, slots: dict[str, _Slot], strict: bool) -> None:
    """Names and shapes, before anything is read or changed."""
    unexpected = sorted(n for n in ckpt.entries if n not in slots)
    # A tied tensor needs one of its names in the file (safetensors files keep one).
    missing = sorted({s.names[0] for s in slots.values() if not any(n in ckpt for n in s.names)})
    if strict and (unexpected or missing):
        parts = [f"unexpected key(s) {unexpected}" if unexpected else "", f"missing key(s) {missing}" if missing else ""]
        raise ValueError(f"memsave.load: {ckpt.path!r} does not match the model: " + "; ".join(p for p in parts if p))
    for name, entry in ckpt.entries.items():
        if name in slots and tuple(slots[name].current().shape) != entry.shape:
            raise ValueError(f"memsave.load: shape mismatch for {name!r}: the file has {list(entry.shape)}, "
                             f"the model {list(slots[name].current().shape)}")


def _scheme(quantize, name: str, slot: _Slot):
    """The quantize scheme for this weight if it is compressed while loading (module docstring), else None."""
    if quantize is None or len(slot.places) != 1:
        return None
    module, attr, kind = slot.places[0]
    tensor = slot.current()
    if kind != "parameter" or attr != "weight" or tensor.dim() != 2 or not tensor.dtype.is_floating_point:
        return None
    if not (isinstance(module, nn.Linear) or (quantize.embeddings and isinstance(module, nn.Embedding))):
        return None
    return quantize.for_weight(name)


def _compress(original: torch.Tensor, scheme) -> dict:
    """Every weight-cache entry the quantize pass makes for this weight, built from `original`."""
    from memsave.passes.aten.quantize import resolve_method, weight_codes, weight_sqnr

    entries: dict = {}

    def record(key, build):
        if key not in entries:
            entries[key] = build()
        return entries[key]

    k = original.shape[1]
    group = k if scheme.group_size is None or scheme.group_size >= k else scheme.group_size
    # No calibration statistics exist for a weight read from a file: GPTQ/AWQ fall back to the
    # MSE grid, as the pass does (and as memsave.plan from a checkpoint scores them).
    resolved = resolve_method(original, scheme, group)
    with torch.no_grad():
        codes = weight_codes(original, resolved, group, cached=record)
        weight_sqnr(original, codes, cached=record)
    return entries


def _plain(slot: _Slot, target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """What a loaded uncompressed tensor becomes: copied into a real tensor the model already
    has (like load_state_dict), or replacing a meta one."""
    if target.device.type != "meta":
        with torch.no_grad():
            target.copy_(value)
        return target
    if isinstance(target, nn.Parameter):
        return nn.Parameter(value, requires_grad=target.requires_grad)
    return value
