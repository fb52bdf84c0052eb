"""One compressed weight as an entry of a memsave.save file, and back into the weight cache.

What memsave made of a weight is in the weight cache (memsave/weights.py; keys in
memsave/weight_keys.py): an affine-quantized weight has its scales and packed codes; a pruned
one (values, positions, SQNR); a factorized one (U, V, error); a structurally pruned one its
kept rows or columns. Pruned values, factors and kept rows are weights in their own right
(WEIGHTS.mark_derived): a later quantize compresses them under entries of their own and frees
them. So the forms of one weight are a tree, and so is its file entry:

    entry  {dtype, shape, [affine form: bits, group_size, ... as version 1 has them],
            cache: [[key, value], ...]}                      every other cache entry of the tensor
    value  a JSON scalar | {"tensor": name} | {"tuple": [value, ...]}
           | {"derived": entry + {name, stored}}             a derived weight: its own entry;
                                                             stored: its values are in the file
                                                             under `name` (false once released)

`describe` writes one weight's tree (its tensors into a dict), `restore` puts the tree back in
the cache under the same keys, as the passes' own objects: a compile then finds every form
cached and reads nothing from the released weight.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

import memsave.weight_keys as weight_keys  # noqa: PLR0402 (tests/test_layers.py reads `from memsave import` as the package)
from memsave.config import QuantizeConfig
from memsave.ops.affine import QPARAM_DTYPE, num_groups
from memsave.ops.pack import packed_length
from memsave.weights import WEIGHTS, is_released, release

SUFFIXES = {"packed": ".memsave_packed", "scale": ".memsave_scale", "offset": ".memsave_offset"}
# The CPU int4 kernel's bf16 scales/zeros, for weights that were converted to its layout: the
# fp16 scales/offsets rebuilt from them do not always convert back to the same bf16 zeros, so
# without them a reloaded model could compute slightly different outputs.
INT4_SCALES_ZEROS = ".memsave_cpu_int4_scales_zeros"
CACHE_PREFIX = ".memsave_cache"  # tensors among other cached values of a weight
AFFINE_FIELDS = ("bits", "group_size", "symmetric", "method", "in_features", "out_features", "layout")


def qparams_key(bits: int, group: int, symmetric: bool, method: str) -> tuple:
    """The affine parameters' key, the form memsave.save stores."""
    return weight_keys.quant_params("affine", bits, group, symmetric, method)


class _NotCached(Exception):
    pass


def _not_cached():
    raise _NotCached


def _cached(weight: torch.Tensor, key: Hashable) -> Any:
    """The cache's current value for (weight, key), rebuilt from a kernel layout if converted;
    raises _NotCached if there is none (or it is stale: the weight changed since)."""
    return WEIGHTS.get_or_build(weight, key, _not_cached, reads_weight=False)


# -- save ----------------------------------------------------------------------------------------


def describe(
    weight: torch.Tensor, name: str, base: str, quantize: QuantizeConfig | None, tensors: dict[str, torch.Tensor]
) -> dict:
    """The file entry of `weight`'s cached forms; their tensors go into `tensors`, named from
    `base`. `name` is the user's weight name (for options and messages); `quantize` chooses
    among several affine forms of one weight."""
    entry: dict[str, Any] = {"dtype": str(weight.dtype).removeprefix("torch."), "shape": list(weight.shape)}
    keys = WEIGHTS.keys(weight)
    affine = _affine_form(name, weight, keys, quantize)
    if affine is not None:
        qkey, (scale, offset), packed, layout = affine
        _, bits, group, symmetric, method = qkey
        out_features, in_features = weight.shape
        entry.update(bits=bits, group_size=group, symmetric=symmetric, method=method,
                     in_features=in_features, out_features=out_features,
                     layout="cpu_int4" if layout is not None else None)
        tensors[base + SUFFIXES["packed"]] = packed
        tensors[base + SUFFIXES["scale"]] = scale
        if offset is not None:
            tensors[base + SUFFIXES["offset"]] = offset
        if layout is not None:
            tensors[base + INT4_SCALES_ZEROS] = layout
    cache = []
    for i, (key, value) in enumerate(_other_entries(weight, keys)):
        cache.append([key, _encode(value, name, f"{base}{CACHE_PREFIX}{i}", quantize, tensors)])
    entry["cache"] = cache
    return entry


def is_quantized(entry: dict) -> bool:
    """The entry holds an affine form (the one version-1 files know)."""
    return "bits" in entry


def holds_derived(entry: dict) -> bool:
    return any(True for _ in derived_entries(entry))


def derived_entries(entry: dict):
    """The entries of the derived weights in `entry`'s cache (not theirs)."""

    def find(value):
        if isinstance(value, dict) and "derived" in value:
            yield value["derived"]
        elif isinstance(value, dict) and "tuple" in value:
            for v in value["tuple"]:
                yield from find(v)

    for _, value in entry.get("cache", []):
        yield from find(value)


def _affine_form(name: str, weight: torch.Tensor, keys: list[Hashable], quantize: QuantizeConfig | None):
    """(qparams key, (scale, offset), packed, cpu int4 scales/zeros or None), or None."""
    if weight.dim() != 2:
        return None
    forms = []
    for qkey in filter(weight_keys.is_affine_params, keys):
        if weight_keys.packed(qkey) not in keys:
            continue
        try:
            qparams, packed = _cached(weight, qkey), _cached(weight, weight_keys.packed(qkey))
        except _NotCached:
            continue  # stale: the weight changed after it was compressed
        forms.append((qkey, qparams, packed))
    if len(forms) > 1 and quantize is not None:
        scheme = quantize.for_weight(name)
        if scheme is not None:
            k = weight.shape[1]
            group = k if scheme.group_size is None or scheme.group_size >= k else scheme.group_size
            forms = [f for f in forms if f[0] == qparams_key(scheme.bits, group, scheme.symmetric, scheme.method)]
    if len(forms) > 1:
        raise RuntimeError(
            f"memsave.save: {name!r} is compressed under several schemes ({[f[0][1:] for f in forms]}); "
            "pass quantize=<the options to save> to choose one"
        )
    if not forms:
        return None
    qkey, (scale, offset), packed = forms[0]
    _check_form(name, weight, qkey, scale, offset, packed)
    layout = None
    if weight_keys.cpu_int4(qkey) in keys:
        try:
            layout = _cached(weight, weight_keys.cpu_int4(qkey))[1]
        except _NotCached:
            pass
    return qkey, (scale, offset), packed, layout


def _check_form(name, weight, qkey, scale, offset, packed) -> None:
    _, bits, group, symmetric, _ = qkey
    n, k = weight.shape
    groups = num_groups(k, group)
    expected = {"packed": ((n, packed_length(groups * group, bits)), torch.uint8), "scale": ((n, groups), QPARAM_DTYPE)}
    if not symmetric:
        expected["offset"] = ((n, groups), QPARAM_DTYPE)
    got = {"packed": packed, "scale": scale, "offset": offset}
    for part, (shape, dtype) in expected.items():
        t = got[part]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or (
            t.dtype != dtype and not (part != "packed" and t.dtype.is_floating_point)
        ):
            raise RuntimeError(
                f"memsave.save: cached {part} of {name!r} is not memsave's generic form "
                f"(expected {dtype} {shape}, got {None if t is None else (t.dtype, tuple(t.shape))})"
            )
    if symmetric and offset is not None:
        raise RuntimeError(f"memsave.save: symmetric scheme of {name!r} has an offset")


def _other_entries(weight: torch.Tensor, keys: list[Hashable]) -> list[tuple[Hashable, Any]]:
    """The cache entries besides the affine form: a compile after `load` asks for them (pruned
    values, factors, other schemes' codes, the SQNR, AWQ's channel scales, ...) and must not
    need the weight to compute them again. Kernel layouts are left out: they are converted
    again from the generic form (exactly, but for the int4 scales/zeros stored on their own)."""
    out = []
    for key in keys:
        affine_codes = weight_keys.is_packed(key) and weight_keys.is_affine_params(key[1])
        if weight_keys.is_affine_params(key) or affine_codes or weight_keys.is_kernel_layout(key):
            continue
        if not _json_key(key):
            continue  # e.g. mixed precision's ("precision", torch.bfloat16)
        try:
            value = _cached(weight, key)
        except _NotCached:
            continue
        if _storable(value):
            out.append((key, value))
    return out


_SCALARS = (bool, int, float, str, type(None))


def _storable(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(_storable(v) for v in value)
    return isinstance(value, (torch.Tensor, *_SCALARS))


def _encode(value: Any, name: str, tensor_name: str, quantize, tensors: dict[str, torch.Tensor]) -> Any:
    """A cached value as JSON: tensors stored under `tensor_name`, tuples element by element,
    a derived weight as its own entry (its values only while it is not released)."""
    if isinstance(value, torch.Tensor) and WEIGHTS.is_derived(value):
        entry = describe(value, name, tensor_name, quantize, tensors)
        stored = not is_released(value)
        if stored:
            tensors[tensor_name] = value
        elif not (is_quantized(entry) or entry["cache"]):
            raise RuntimeError(
                f"memsave.save: a form of {name!r} that memsave made ({list(value.shape)}) was released "
                "without a compressed form of it cached (nothing to save; mixed precision's narrowed "
                "copies are not in the file format: options={'precision': {..., 'weights': 'fp32'}} "
                "keeps the forms in their dtype)"
            )
        return {"derived": {**entry, "name": tensor_name, "stored": stored}}
    if isinstance(value, torch.Tensor):
        tensors[tensor_name] = value
        return {"tensor": tensor_name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, name, f"{tensor_name}_{j}", quantize, tensors) for j, v in enumerate(value)]}
    return value


def _json_key(key: Any) -> bool:
    if isinstance(key, tuple):
        return all(_json_key(k) for k in key)
    return isinstance(key, (bool, int, float, str)) or key is None


# -- load ----------------------------------------------------------------------------------------


def entry_shape(entry: dict) -> tuple[int, ...]:
    """Version-1 entries are 2-D affine weights without "shape"."""
    if "shape" in entry:
        return tuple(entry["shape"])
    return entry["out_features"], entry["in_features"]


def required_tensors(entry: dict, base: str) -> list[str]:
    """The file's tensors `entry` (its tensors named from `base`) is restored from."""
    names = []
    if is_quantized(entry):
        names += [base + SUFFIXES[p] for p in ("packed", "scale") + (() if entry["symmetric"] else ("offset",))]

    def walk(value):
        if isinstance(value, dict) and "tensor" in value:
            names.append(value["tensor"])
        elif isinstance(value, dict) and "tuple" in value:
            for v in value["tuple"]:
                walk(v)
        elif isinstance(value, dict) and "derived" in value:
            sub = value["derived"]
            names.extend([sub["name"]] if sub["stored"] else [])
            names.extend(required_tensors(sub, sub["name"]))

    for _, value in entry.get("cache", []):
        walk(value)
    return names


@dataclass
class Reader:
    get: Callable[[str], torch.Tensor]  # a tensor of the file, by name
    names: set[str]  # every tensor name in the file
    device: torch.device


def restore(weight: torch.Tensor, entry: dict, base: str, name: str, reader: Reader) -> None:
    """Put `entry`'s forms in the weight cache for `weight`, under the keys the passes use."""
    qkey = packed = None
    if is_quantized(entry):
        qkey = qparams_key(entry["bits"], entry["group_size"], entry["symmetric"], entry["method"])
        offset = reader.get(base + SUFFIXES["offset"]) if base + SUFFIXES["offset"] in reader.names else None
        qparams, packed = (reader.get(base + SUFFIXES["scale"]), offset), reader.get(base + SUFFIXES["packed"])
        WEIGHTS.get_or_build(weight, qkey, lambda: qparams, reads_weight=False)
        WEIGHTS.get_or_build(weight, weight_keys.packed(qkey), lambda: packed, reads_weight=False)
    for key, value in entry.get("cache", []):
        decoded = _decode(value, name, reader)
        WEIGHTS.get_or_build(weight, _from_json_key(key), lambda decoded=decoded: decoded, reads_weight=False)
    if entry.get("layout") == "cpu_int4" and base + INT4_SCALES_ZEROS in reader.names and reader.device.type == "cpu":
        _restore_int4_layout(weight, qkey, packed, reader.get(base + INT4_SCALES_ZEROS))


def _decode(value: Any, name: str, reader: Reader) -> Any:
    if isinstance(value, dict) and "tensor" in value:
        return reader.get(value["tensor"])
    if isinstance(value, dict) and "tuple" in value:
        return tuple(_decode(v, name, reader) for v in value["tuple"])
    if isinstance(value, dict) and "derived" in value:
        return _derived_weight(value["derived"], name, reader)
    return value


def _derived_weight(entry: dict, name: str, reader: Reader) -> torch.Tensor:
    """A derived weight as the passes left it: its values, or (released) its shape over empty
    storage, with its own compressed forms cached."""
    dtype, shape = getattr(torch, entry["dtype"]), entry_shape(entry)
    if entry["stored"]:
        tensor = reader.get(entry["name"])
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"memsave.load: {entry['name']!r} is {tensor.dtype} {list(tensor.shape)}, its entry says {dtype} {list(shape)}")
    else:
        tensor = empty_storage_tensor(shape, dtype, reader.device)
    restore(tensor, entry, entry["name"], name, reader)
    WEIGHTS.mark_derived(tensor)
    if not entry["stored"]:
        release(tensor, f"{name} (derived)")  # storage already empty: registers it
    return tensor


def _from_json_key(key: Any) -> Any:
    return tuple(_from_json_key(k) for k in key) if isinstance(key, list) else key


def _restore_int4_layout(weight: torch.Tensor, qkey: tuple, packed: torch.Tensor, scales_zeros: torch.Tensor) -> None:
    """Convert to the CPU int4 kernel's layout as codegen/cpu.py's _lower_int4 does, with the
    saved scales/zeros: the cache then holds what the saved model's held (the kernel layout,
    the generic form derived from it), and a compile finds the conversion already done."""
    from memsave.codegen import cpu

    if not cpu.int4_layout_matches_torch():
        return  # this torch packs differently: the kernel is not used, the generic form serves
    n, k = weight.shape
    symmetric = qkey[3]
    WEIGHTS.convert(
        weight, weight_keys.cpu_int4(qkey),
        lambda: (cpu.to_int4pack(packed, n, k), scales_zeros),
        rebuild={
            weight_keys.packed(qkey): lambda kernel: cpu.from_int4pack(kernel[0], n, k),
            qkey: lambda kernel: cpu.qparams_from_int4(kernel[1], symmetric),
        },
    )


def empty_storage_tensor(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous tensor of `shape` whose storage is empty (0 bytes), allocating nothing.

    `set_` checks the shape against the storage's size and grows a resizable storage to fit,
    which would allocate the full-precision bytes. So: set the shape on a storage that claims
    the size but owns no memory (null pointer, not resizable), then swap that storage's
    contents with an empty resizable one, leaving exactly what `storage.resize_(0)` leaves.
    """
    stride, step = [], 1
    for size in reversed(shape):
        stride.insert(0, step)
        step *= size
    nbytes = step * dtype.itemsize
    try:
        claimed = torch._C._construct_storage_from_data_pointer(0, device, nbytes)
        t = torch.empty(0, dtype=dtype, device=device).set_(claimed, 0, shape, stride)
        t.untyped_storage()._swap_data_ptr_(torch.UntypedStorage(0, device=device))
        if t.untyped_storage().nbytes() == 0 and t.untyped_storage().resizable() and tuple(t.shape) == tuple(shape):
            return t
    except (AttributeError, RuntimeError, TypeError):
        pass
    # Fallback if those private APIs move: allocate (never written, so never resident) and free.
    t = torch.empty(shape, dtype=dtype, device=device)
    t.untyped_storage().resize_(0)
    return t
