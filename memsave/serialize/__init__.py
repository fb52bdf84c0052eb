"""Save and load compressed weights: `memsave.save(compiled, path)`, `memsave.load(model, path)`.

    compiled = torch.compile(model, backend="memsave", options={"prune": "2:4", "quantize": "int4"})
    compiled(*example_inputs)                 # the first call compresses (and releases) the weights
    memsave.save(compiled, "model.safetensors")

    with torch.device("meta"):                # no full-precision weights are ever allocated
        fresh = Model()
    memsave.load(fresh, "model.safetensors")  # returns `fresh`; fresh._memsave_options = the options
    compiled = torch.compile(fresh, backend="memsave", options=fresh._memsave_options)

What is stored: every form memsave made of a weight, exactly as the passes cached it (bit for
bit), and every other parameter and buffer as it is (non-persistent buffers too, so that a
model built on the meta device needs nothing recomputed). The forms: affine quantization
(packed codes, fp16 scales and offsets), the log and vq schemes' codes and parameters,
unstructured pruning (kept values and bitmask), N:M pruning (kept values and their positions),
low-rank factors, structured pruning's kept rows/columns (and sliced biases), and those forms
compressed further (pruned values or factors quantized, factors of a structurally pruned
weight). Compressed weights are never decompressed: saving reads the weight cache, loading
fills it (serialize/entries.py). A weight that a CPU kernel converted to its own layout is
saved in the generic form the cache rebuilds from that layout; for the int4 kernel also with
the kernel's own bf16 scales/zeros, which the generic fp16 form does not always reproduce
exactly, and loading converts it to that layout again, as the saved model held it. Not stored:
mixed precision's narrowed copies (options['precision'] with narrow weights: save refuses).

Loading gives each compressed weight a parameter of its shape and dtype whose storage is empty
(what `release_weights` leaves behind), registers it as released, and puts the loaded forms in
the weight cache under the keys the passes use; a derived form that was released (a pruned
weight's values once quantized) gets the same. Compiling the loaded model with the recorded
options then finds everything cached: no weight is read, nothing is rebuilt.

File format: a safetensors file.
  tensors   "<name>"                    an uncompressed parameter or buffer, as it was
            "<name>.memsave_packed"      uint8 packed codes of an affine-quantized weight, (N, ·)
            "<name>.memsave_scale"       fp16 scales, (N, groups)
            "<name>.memsave_offset"      fp16 offsets, (N, groups); asymmetric schemes only
            "<name>.memsave_cpu_int4_scales_zeros"   bf16 (groups, N, 2), the CPU int4 kernel's
                                                     scales/zeros; only for weights it converted
            "<name>.memsave_cache<i>[_<j>]"          a tensor among other cached values (below);
                                                     a derived weight's values (while it is not
                                                     released), and its own parts under this
                                                     name as "<name>" is above
  metadata  "format": "pt"; "memsave": JSON with
            format ("memsave.save"), format_version, memsave_version, torch_version,
            quantize, prune, factorize (each family's options, as a dict, or null) and
            quantize_source, prune_source, factorize_source ("compile": read from the compiled
            model; "argument": given to save; "inferred": rebuilt from the saved forms' cache
            keys, without filters, compute_dtype or free_weights),
            weights: {name: {kind, dtype, shape, also_full_precision (the original is stored
                             too: the compiled graph still read it),
                             the affine form if the weight has one: bits, group_size (the
                             effective group: in_features when per-channel), symmetric, method,
                             in_features, out_features, layout ("cpu_int4" or null),
                             cache: [[key, value], ...] (the weight's other cache entries, keys as
                             in weight_keys.py: pruned values, factors, another scheme's codes,
                             the SQNR, ...; a value is JSON, a tensor as {"tensor": name}, a
                             tuple as {"tuple": [...]}, a derived weight as {"derived": {its
                             own entry as above, name, stored}})}},
            tensors: {name: {kind: "parameter" | "buffer"}} for the uncompressed entries,
            aliases: {name: name it shares its tensor with} (tied weights).
  Versions: 2 has derived weights and weights without an affine form; a file whose weights are
  all affine-quantized alone is written as version 1 (readable by memsave before version 2,
  which ignores "shape", "prune" and "factorize"). This memsave reads both.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
from torch import nn

from memsave.config import FAMILY_CONFIGS, QuantizeConfig
from memsave.serialize.entries import (
    Reader,
    describe,
    empty_storage_tensor,
    entry_shape,
    holds_derived,
    is_quantized,
    qparams_key,
    required_tensors,
    restore,
)
from memsave.serialize.options import FAMILIES, infer_options, recorded_options
from memsave.weights import WEIGHTS, is_released, release

FORMAT = "memsave.save"
FORMAT_VERSION = 2  # the newest this memsave writes and reads (see "Versions" above)

__all__ = ["load", "qparams_key", "save", "saved_options"]

# The weight-cache keys come from memsave/weight_keys.py, as the passes' do; tests/test_serialize.py
# and tests/test_serialize_forms.py check that a compile after `load` finds everything cached (it
# would otherwise rebuild from a released weight and raise).
_empty_storage_tensor = empty_storage_tensor  # its old name (tests)


# -- save ----------------------------------------------------------------------------------------


def save(model: nn.Module, path: str | os.PathLike, *, quantize: Any = None) -> None:
    """Write `model`'s parameters and buffers to a safetensors file, compressed ones compressed.

    model: the module or its `torch.compile`d wrapper, after the compiled model ran (that is
        when memsave compresses the weights).
    quantize: the quantize options to record for `load` (a string, dict or QuantizeConfig);
        by default read from the compiled wrapper, else inferred from the weights' schemes.
        Prune and factorize options are read from the compiled wrapper, else inferred.
    Raises RuntimeError naming a weight that memsave released but holds no compressed form for.
    """
    from safetensors.torch import save_file

    module = getattr(model, "_orig_mod", model)
    options = recorded_options(model, quantize)
    quantize_config = QuantizeConfig.parse(options["quantize"][0]) if options["quantize"][0] is not None else None
    # Whether the recorded options free originals: if not, a compressed weight that was not
    # released is not stored in full (loading releases it; the compiled graph does not read it).
    frees = all(FAMILY_CONFIGS[f].parse(opts).free_weights for f, (opts, _) in options.items() if opts is not None)
    tensors: dict[str, torch.Tensor] = {}
    weights: dict[str, dict] = {}
    plain: dict[str, dict] = {}
    seen_storages: set[tuple] = set()

    def store(name: str, t: torch.Tensor) -> None:
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        storage = (t.device, t.untyped_storage().data_ptr())
        if storage in seen_storages and t.numel():  # safetensors refuses tensors sharing memory
            t = t.clone()
        seen_storages.add((t.device, t.untyped_storage().data_ptr()))
        tensors[name] = t

    entries, aliases = _named_tensors(module)
    for name, (tensor, kind) in entries.items():
        parts: dict[str, torch.Tensor] = {}
        entry = describe(tensor, name, name, quantize_config, parts) if tensor in WEIGHTS else None
        compressed = entry is not None and (
            is_quantized(entry) or holds_derived(entry) or (is_released(tensor) and bool(entry["cache"]))
        )
        if not compressed:
            if is_released(tensor):
                raise RuntimeError(
                    f"memsave.save: {name!r} was released by memsave but no compressed form of it is "
                    "cached (nothing to save); save before releasing it, or compile with "
                    "options={'quantize': {..., 'free_weights': False}} (mixed precision's stored "
                    "bf16/fp16 weights are not in the file format: options={'precision': {..., "
                    "'weights': 'fp32'}} keeps the originals)"
                )
            if tensor.device.type == "meta":
                raise ValueError(f"memsave.save: {name!r} is on the meta device: it holds no values to save")
            store(name, tensor)
            plain[name] = {"kind": kind}
            continue
        for part_name, part in parts.items():
            store(part_name, part)
        # Not released although compressed, with free_weights on: the compiled graph also reads
        # the original (a tied weight, a use memsave does not compress), so the file needs it too.
        # A memory-mapped weight (e.g. from safetensors) is never released, used or not: it is
        # stored too only when tied, the common case of a second use.
        keep = (
            not is_released(tensor)
            and frees
            and (tensor.untyped_storage().resizable() or name in aliases.values())
        )
        if keep:
            store(name, tensor)
        weights[name] = {"kind": kind, **entry, "also_full_precision": keep}
    header = {
        "format": FORMAT,
        # Version 1 where it is enough, so that older memsave reads affine-only files.
        "format_version": 2 if any(not is_quantized(e) or holds_derived(e) for e in weights.values()) else 1,
        "memsave_version": _memsave_version(),
        "torch_version": torch.__version__,
    }
    for family in FAMILIES:
        opts, source = options[family]
        if source is None:
            opts = infer_options(family, module, weights)
            source = "inferred" if opts is not None else None
        header[family], header[f"{family}_source"] = opts, source
    header.update(weights=weights, tensors=plain, aliases=aliases)
    save_file(tensors, os.fspath(path), metadata={"format": "pt", "memsave": json.dumps(header)})


def _named_tensors(module: nn.Module) -> tuple[dict[str, tuple[torch.Tensor, str]], dict[str, str]]:
    """Every parameter and buffer once, by its first name; other names of the same tensor as aliases."""
    entries: dict[str, tuple[torch.Tensor, str]] = {}
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for kind, items in (
        ("parameter", module.named_parameters(remove_duplicate=False)),
        ("buffer", module.named_buffers(remove_duplicate=False)),
    ):
        for name, tensor in items:
            if tensor is None:
                continue
            if id(tensor) in first:
                aliases[name] = first[id(tensor)]
            else:
                first[id(tensor)] = name
                entries[name] = (tensor, kind)
    return entries, aliases


def _memsave_version() -> str:
    from memsave.version import __version__

    return __version__


# -- load ----------------------------------------------------------------------------------------


def saved_options(path: str | os.PathLike) -> dict | None:
    """The quantize options recorded in a file written by `memsave.save` (None: not quantized);
    all recorded options, for `torch.compile(options=...)`, are what `load` sets as
    `model._memsave_options`."""
    return _read_header(path)[0]["quantize"]


def load(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, device: str | torch.device = "cpu",
    options: Any = None,
) -> nn.Module:
    """Load a file written by `memsave.save` into `model`; returns `model`. With `options` (e.g.
    a plan's options), load a plain safetensors checkpoint instead, compressing each weight the
    options quantize as it is read (memsave/compress_on_load.py; CPU).

    model: a module of the same architecture (or its compiled wrapper), best built on the meta
        device (`with torch.device("meta"): model = Model()`), so no full-precision weight is
        ever allocated. Meta tensors are replaced by the loaded ones; real ones are copied into.
    Compressed weights become parameters with empty storage (requires_grad=False), registered
    as released, with their forms in the weight cache. Also sets `model._memsave_options` to
    the recorded options of the compressing families ({"quantize": ..., "prune": ...,
    "factorize": ...}, those the file has): compile with `options=model._memsave_options`
    (plus any others, e.g. codegen) to get the saved model's outputs. `model._memsave_quantize`
    is the quantize options alone (a dict, or None).
    strict: unexpected and missing names are errors (as in `load_state_dict`).
    device: where the loaded tensors go. On the CPU, safetensors maps them from the file
        (file-backed pages, no copy), so the loaded tensors read the file for as long as
        they live.
    """
    from safetensors import safe_open

    if options is not None:
        if _has_memsave_header(path):
            raise ValueError(f"memsave.load: {os.fspath(path)!r} was written by memsave.save and is compressed "
                             "already; load it without options")
        if torch.device(device).type != "cpu":
            raise ValueError(f"memsave.load: compressing while loading runs on the CPU, not {device!r}")
        from memsave.compress_on_load import load_compressing

        return load_compressing(model, path, options, strict=strict)
    module = getattr(model, "_orig_mod", model)
    header, names = _read_header(path)
    device = torch.device(device)
    targets = _tensor_slots(module)
    weights, plain, aliases = header["weights"], header["tensors"], header["aliases"]
    for name, info in weights.items():
        for needed in required_tensors(info, name):
            if needed not in names:
                raise ValueError(
                    f"memsave.load: {os.fspath(path)!r} lacks {needed!r} for compressed weight {name!r}"
                )
    in_file = set(weights) | set(plain) | set(aliases)
    unexpected = sorted(in_file - set(targets))
    missing = sorted(n for n, slot in targets.items() if slot.persistent and n not in in_file)
    if strict and (unexpected or missing):
        raise ValueError(
            f"memsave.load: {os.fspath(path)!r} does not match {type(module).__name__}: "
            + "; ".join(
                part for part in (
                    f"unexpected key(s) {unexpected}" if unexpected else "",
                    f"missing key(s) {missing}" if missing else "",
                ) if part
            )
        )
    with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
        # Shapes and kinds first, so that a wrong architecture fails before anything is changed.
        for name, info in weights.items():
            if name in targets:
                _check_shape(name, targets[name], entry_shape(info))
                _check_kind(name, targets[name], info)
        for name in plain:
            if name in targets:
                _check_shape(name, targets[name], tuple(f.get_slice(name).get_shape()))
        loaded: dict[str, torch.Tensor] = {}
        for name in plain:
            if name in targets:
                loaded[name] = _load_plain(targets[name], f.get_tensor(name))
        reader = Reader(f.get_tensor, names, device)
        for name, info in weights.items():
            if name in targets:
                full = f.get_tensor(name) if info.get("also_full_precision") and name in names else None
                loaded[name] = _load_compressed(name, targets[name], info, reader, full)
    for alias, name in aliases.items():
        if alias in targets and name in loaded:
            targets[alias].assign(loaded[name])
    still_meta = [n for n, slot in targets.items() if slot.current().device.type == "meta"]
    if still_meta:
        raise ValueError(
            f"memsave.load: {still_meta} still on the meta device after loading {os.fspath(path)!r} "
            "(the file has no values for them)"
        )
    options = {family: header[family] for family in FAMILIES if header.get(family) is not None}
    for obj in {id(model): model, id(module): module}.values():
        obj._memsave_options = options
        obj._memsave_quantize = header["quantize"]
    return model


def _read_header(path: str | os.PathLike) -> tuple[dict, set[str]]:
    from safetensors import SafetensorError, safe_open

    where = repr(os.fspath(path))
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata, names = f.metadata() or {}, set(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"memsave.load: {where} is not a safetensors file written by memsave.save ({e})") from e
    raw = metadata.get("memsave")
    if raw is None:
        raise ValueError(
            f"memsave.load: {where} is a safetensors file but was not written by memsave.save "
            "(no 'memsave' metadata); load plain checkpoints with model.load_state_dict, or with "
            "memsave.load(model, path, options=...) to compress them while loading"
        )
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"memsave.load: {where} has unreadable 'memsave' metadata ({e})") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"memsave.load: {where}: 'memsave' metadata is not memsave.save's format")
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"memsave.load: {where} has format version {header.get('format_version')}, newer than this "
            f"memsave reads ({FORMAT_VERSION}); it was written by memsave {header.get('memsave_version')}"
        )
    return header, names


def _has_memsave_header(path: str | os.PathLike) -> bool:
    from memsave.checkpoint import Checkpoint

    return "memsave" in Checkpoint(path).metadata


@dataclasses.dataclass
class _Slot:
    """Where a parameter or buffer lives: every (module, attribute) that holds it."""

    places: list[tuple[nn.Module, str]]
    kind: str  # "parameter" | "buffer"
    persistent: bool

    def current(self) -> torch.Tensor:
        module, attr = self.places[0]
        return (module._parameters if self.kind == "parameter" else module._buffers)[attr]

    def assign(self, value: torch.Tensor) -> None:
        for module, attr in self.places:
            (module._parameters if self.kind == "parameter" else module._buffers)[attr] = value


def _tensor_slots(module: nn.Module) -> dict[str, _Slot]:
    slots: dict[str, _Slot] = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for attr, p in sub._parameters.items():
            if p is not None:
                slots.setdefault(prefix + attr, _Slot([], "parameter", True)).places.append((sub, attr))
        for attr, b in sub._buffers.items():
            if b is not None:
                persistent = attr not in sub._non_persistent_buffers_set
                slots.setdefault(prefix + attr, _Slot([], "buffer", persistent)).places.append((sub, attr))
    return slots


def _check_shape(name: str, slot: _Slot, shape: tuple) -> None:
    have = tuple(slot.current().shape)
    if have != tuple(shape):
        raise ValueError(
            f"memsave.load: shape mismatch for {name!r}: the file has {list(shape)}, the model {list(have)}"
        )


def _load_plain(slot: _Slot, value: torch.Tensor) -> torch.Tensor:
    old = slot.current()
    if old.device.type != "meta" and not is_released(old) and old.device == value.device:
        with torch.no_grad():
            old.copy_(value)  # keeps the module's tensor (and its dtype), like load_state_dict
        return old
    if slot.kind == "parameter":
        value = nn.Parameter(value, requires_grad=old.requires_grad)
    slot.assign(value)
    return value




def _check_kind(name: str, slot: _Slot, info: dict) -> None:
    kind = info.get("kind", "parameter")
    if slot.kind != kind:
        raise ValueError(f"memsave.load: compressed weight {name!r} is a {slot.kind} in the model, a {kind} in the file")


def _load_compressed(name: str, slot: _Slot, info: dict, reader: Reader, full: torch.Tensor | None) -> torch.Tensor:
    dtype = getattr(torch, info["dtype"])
    if full is not None:  # the compiled graph also reads the original
        # In ordinary memory, not mapped from the file: saving again tells it by its storage.
        weight = full.to(dtype, copy=True)
        requires_grad = slot.current().requires_grad
    else:
        weight = empty_storage_tensor(entry_shape(info), dtype, reader.device)
        requires_grad = False
    if slot.kind == "parameter":
        weight = nn.Parameter(weight, requires_grad=requires_grad)
    slot.assign(weight)
    restore(weight, info, name, name, reader)
    if full is None:
        release(weight, name)  # storage already empty: registers it (clear errors on eager use)
    return weight
