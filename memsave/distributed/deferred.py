"""A model without its weights, so that each pipeline rank materializes only its own stage.

Building the whole model on every rank and then freeing the other stages' weights costs every
rank the whole model's memory at start-up: the one moment a model too big for a rank must not
need it. Instead:

    with torch.device("meta"):
        model = MyModel(config)                 # shapes only, no memory
    memsave.distributed.defer_weights(model)    # CPU tensors of those shapes, without storage
    compiled = torch.compile(model, backend="memsave", dynamic=True,
                             options={"pipeline": {"weights": "model.pt", ...}})

Dynamo traces shapes, so it compiles the storage-less model; the pipeline split then reads
only this rank's stage's weights from the source (runtime.py) into their own Parameter
objects, in place (the user's optimizer and `param.grad` keep working). The source is a path
written by `save_weights` (or any `torch.save`d / safetensors name → tensor file: loaded
memory-mapped, so only this stage's tensors are read), a name → tensor mapping, or a callable
name → tensor. Names are the compiled module's own (`model.named_parameters()` /
`named_buffers()`), so buffers such as RoPE tables must be in the source too: `save_weights`
writes non-persistent buffers, which `state_dict()` leaves out.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from memsave.config import OptionError
from memsave.weights import release, restore

_DEFERRED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage-less weight -> its name


def defer_weights(model: nn.Module) -> nn.Module:
    """Give every meta-device parameter and buffer of `model` a CPU tensor of the same shape,
    dtype and strides whose storage is empty; returns `model`. Tied weights stay tied. Tensors
    already on a real device are left as they are."""
    replaced: dict[int, torch.Tensor] = {}  # id of a meta tensor -> its stand-in (tied: one)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, value in list(table.items()):
                if value is None or value.device.type != "meta":
                    continue
                if id(value) not in replaced:
                    full = f"{module_name}.{name}" if module_name else name
                    empty = _storageless(value)
                    if is_param:
                        empty = nn.Parameter(empty, requires_grad=value.requires_grad)
                    release(empty, f"{full} (built without storage by memsave.distributed.defer_weights)")
                    _DEFERRED[empty] = full
                    replaced[id(value)] = empty
                table[name] = replaced[id(value)]
    if not replaced:
        raise ValueError(
            "memsave.distributed.defer_weights: the model has no parameter or buffer on the meta device; "
            "build it under `with torch.device('meta'):` first"
        )
    return model


def is_deferred(weight: torch.Tensor) -> bool:
    return weight in _DEFERRED


def deferred_name(weight: torch.Tensor) -> str:
    return _DEFERRED[weight]


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every parameter and buffer of `model` (non-persistent buffers included) by name, for
    options['pipeline']['weights']."""
    tensors = dict(model.state_dict(keep_vars=False))
    tensors.update({name: b.detach() for name, b in model.named_buffers(remove_duplicate=False)})
    torch.save(tensors, path)


def materialize(weight: torch.Tensor, name: str, source: "WeightSource") -> int:
    """Fill the storage-less `weight` (model name `name`) from `source`; returns bytes allocated."""
    value = source.get(name)
    if tuple(value.shape) != tuple(weight.shape):
        raise OptionError(
            f"options['pipeline']['weights']: {name!r} has shape {tuple(value.shape)} in {source}, but the model's "
            f"is {tuple(weight.shape)}"
        )
    nbytes = restore(weight, value)
    del _DEFERRED[weight]
    source.copied(value)
    return nbytes


class WeightSource:
    """Where a pipeline stage's deferred weights come from (options['pipeline']['weights'])."""

    def __init__(self, spec: Any):
        self.spec = spec
        self._opened: Mapping[str, torch.Tensor] | None = None  # torch.load(mmap=True) of our own file
        self._safetensors = None
        self.pages_dropped = 0

    def __str__(self) -> str:
        if isinstance(self.spec, (str, os.PathLike)):
            return repr(os.fspath(self.spec))
        return f"the {type(self.spec).__name__} given"

    def get(self, name: str) -> torch.Tensor:
        if callable(self.spec) and not isinstance(self.spec, Mapping):
            value = self.spec(name)
            if not isinstance(value, torch.Tensor):
                raise OptionError(
                    f"options['pipeline']['weights']: the callable returned {type(value).__name__} for {name!r}, "
                    "expected a tensor"
                )
            return value
        self._open()
        if self._safetensors is not None:
            names = self._safetensors.keys()
            if name in names:
                return self._safetensors.get_tensor(name)
        else:
            names = self._opened if self._opened is not None else self.spec
            if name in names:
                return names[name]
        raise self._missing(name, list(names))

    def copied(self, value: torch.Tensor) -> None:
        """`value` is copied into the model: if it came from the file this source mapped, give its
        pages back now, not when the file is closed, so that a stage is never held twice."""
        if self._opened is not None and _drop_mapped_pages(value):
            self.pages_dropped += value.numel() * value.element_size()

    def close(self) -> None:
        """Drop the opened file (its memory map) once this rank's weights are copied."""
        self._opened = self._safetensors = None

    def _open(self) -> None:
        """A path is opened once: safetensors lazily, anything else with torch.load(mmap=True),
        so that only the tensors this stage copies are read from disk."""
        if isinstance(self.spec, Mapping) or self._opened is not None or self._safetensors is not None:
            return
        path = os.fspath(self.spec)
        if not os.path.exists(path):
            raise OptionError(f"options['pipeline']['weights']: no file {path!r}")
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            self._safetensors = safe_open(path, framework="pt", device="cpu")
            return
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(loaded, Mapping):
            raise OptionError(
                f"options['pipeline']['weights']: {path!r} holds a {type(loaded).__name__}, expected a "
                "name -> tensor dict (write it with memsave.distributed.save_weights)"
            )
        self._opened = loaded

    def _missing(self, name: str, names: list[str]) -> OptionError:
        return OptionError(
            f"options['pipeline']['weights']: {name!r} is not in {self}, which has {len(names)} entries, e.g. "
            f"{', '.join(repr(n) for n in names[:3])} (non-persistent buffers such as RoPE tables are not in "
            "state_dict(); memsave.distributed.save_weights writes them)"
        )


def _storageless(meta: torch.Tensor) -> torch.Tensor:
    # empty_strided reserves the bytes (malloc, pages untouched) and release() gives them back
    # at once: one weight at a time, never the model.
    return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device="cpu")


def _drop_mapped_pages(value: torch.Tensor) -> bool:
    """madvise(MADV_DONTNEED) over the pages of a tensor that torch.load mapped from a file
    (MAP_PRIVATE, never written): the process stops holding them, the file keeps them, and a
    later read faults them in again from the file. Linux only; False where not done."""
    if not sys.platform.startswith("linux") or value.numel() == 0:
        return False
    page = mmap.PAGESIZE
    start = value.data_ptr()
    end = start + value.numel() * value.element_size()
    first, last = start // page * page, -(-end // page) * page
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4) == 0  # 4: MADV_DONTNEED

