"""Save and load compressed weights: `memsave.save(compiled, path)`, `memsave.load(model, path)`.

    compiled = torch.compile(model, backend="memsave", options={"quantize": "int4"})
    compiled(*example_inputs)                 # the first call compresses (and releases) the weights
    memsave.save(compiled, "model.safetensors")

    with torch.device("meta"):                # no full-precision weights are ever allocated
        fresh = Model()
    memsave.load(fresh, "model.safetensors")  # returns `fresh`; fresh._memsave_quantize = the options
    compiled = torch.compile(fresh, backend="memsave", options={"quantize": fresh._memsave_quantize})

What is stored: memsave's generic form of each weight it compressed — packed codes, fp16
scales (and offsets) exactly as the quantize/fold_weights passes cache them, bit for bit — and
every other parameter and buffer as it is (non-persistent buffers too, so that a model built on
the meta device needs nothing recomputed). Compressed weights are never dequantized: saving
reads the weight cache, loading fills it. A weight that a CPU kernel converted to its own
layout is saved in the generic form the cache rebuilds from that layout; for the int4 kernel
also with the kernel's own bf16 scales/zeros, which the generic fp16 form does not always
reproduce exactly, and loading converts it to that layout again, as the saved model held it.

Loading gives each compressed weight a parameter of its shape and dtype whose storage is empty
(what `release_weights` leaves behind), registers it as released, and puts the loaded codes and
scales in the weight cache under the keys the passes use. Compiling the loaded model with the
same quantize options then finds everything cached: no weight is read, nothing is rebuilt.

File format: a safetensors file.
  tensors   "<name>"                    an uncompressed parameter or buffer, as it was
            "<name>.memsave_packed"      uint8 packed codes of a compressed weight, (N, ·)
            "<name>.memsave_scale"       fp16 scales, (N, groups)
            "<name>.memsave_offset"      fp16 offsets, (N, groups); asymmetric schemes only
            "<name>.memsave_cpu_int4_scales_zeros"   bf16 (groups, N, 2), the CPU int4 kernel's
                                                     scales/zeros; only for weights it converted
            "<name>.memsave_cache<i>[_<j>]"          a tensor among other cached values (below)
  metadata  "format": "pt"; "memsave": JSON with
            format ("memsave.save"), format_version, memsave_version, torch_version,
            quantize (the quantize options, as a dict, or null) and quantize_source
            ("compile": read from the compiled model; "argument": given to save; "inferred":
            rebuilt from the weights' schemes, without compute_dtype or filters),
            weights: {name: {kind, bits, group_size (the effective group: in_features when
                             per-channel), symmetric, method, in_features, out_features, dtype
                             (of the original), also_full_precision (the original is stored too:
                             the compiled graph still read it), layout ("cpu_int4" or null),
                             cache: [[key, value], ...] (other values the passes cached for
                             the weight, e.g. its SQNR: JSON, a tensor as {"tensor": name},
                             a tuple as {"tuple": [...]})}},
            tensors: {name: {kind: "parameter" | "buffer"}} for the uncompressed entries,
            aliases: {name: name it shares its tensor with} (tied weights).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections import Counter
from typing import Any, Callable, Hashable

import torch
from torch import nn

import memsave.weight_keys as weight_keys
from memsave.config import Config, QuantizeConfig
from memsave.ops.affine import QPARAM_DTYPE, num_groups
from memsave.ops.pack import packed_length
from memsave.weights import WEIGHTS, is_released, release

FORMAT = "memsave.save"
FORMAT_VERSION = 1
SUFFIXES = {"packed": ".memsave_packed", "scale": ".memsave_scale", "offset": ".memsave_offset"}
# The CPU int4 kernel's bf16 scales/zeros, for weights that were converted to its layout: the
# fp16 scales/offsets rebuilt from them do not always convert back to the same bf16 zeros, so
# without them a reloaded model could compute slightly different outputs.
INT4_SCALES_ZEROS = ".memsave_cpu_int4_scales_zeros"
CACHE_PREFIX = ".memsave_cache"  # tensors among other cached values of a weight

__all__ = ["save", "load", "saved_options"]


# The weight-cache keys come from memsave/weight_keys.py, as the passes' do; tests/test_serialize.py
# checks that a compile after `load` finds everything cached (it would otherwise rebuild from a
# released weight and raise).


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


def _cached_keys(weight: torch.Tensor) -> list[Hashable]:
    # WeightCache has no public listing of a weight's keys; this only reads them.
    return list(WEIGHTS._entries.get(weight, {}))


# -- save ----------------------------------------------------------------------------------------


def save(model: nn.Module, path: str | os.PathLike, *, quantize: Any = None) -> None:
    """Write `model`'s parameters and buffers to a safetensors file, compressed ones compressed.

    model: the module or its `torch.compile`d wrapper, after the compiled model ran (that is
        when memsave compresses the weights).
    quantize: the quantize options to record for `load` (a string, dict or QuantizeConfig);
        by default read from the compiled wrapper, else inferred from the weights' schemes.
    Raises RuntimeError naming a weight that memsave released but holds no compressed form for.
    """
    from safetensors.torch import save_file

    module = getattr(model, "_orig_mod", model)
    options, source = _options_for_save(model, quantize)
    config = QuantizeConfig.parse(options) if options is not None else None
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
        form = _compressed_form(name, tensor, config)
        if form is None:
            if WEIGHTS.derived(tensor):
                raise NotImplementedError(
                    f"memsave.save: {name!r} was pruned or factorized; memsave.save stores quantized "
                    "weights only (pruned and factorized forms are not in its file format yet)"
                )
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
        qkey, (scale, offset), packed, extras, layout = form
        _, bits, group, symmetric, method = qkey
        cache = [[key, _encode(value, f"{name}{CACHE_PREFIX}{i}", store)] for i, (key, value) in enumerate(extras)]
        store(name + SUFFIXES["packed"], packed)
        store(name + SUFFIXES["scale"], scale)
        if offset is not None:
            store(name + SUFFIXES["offset"], offset)
        if layout is not None:
            store(name + INT4_SCALES_ZEROS, layout)
        # Not released although compressed, with free_weights on: the compiled graph also reads
        # the original (a tied weight, a use memsave does not quantize), so the file needs it too.
        # A memory-mapped weight (e.g. from safetensors) is never released, used or not: it is
        # stored too only when tied, the common case of a second use.
        keep = (
            not is_released(tensor)
            and (config is None or config.free_weights)
            and (tensor.untyped_storage().resizable() or name in aliases.values())
        )
        if keep:
            store(name, tensor)
        out_features, in_features = tensor.shape
        weights[name] = {
            "kind": kind,
            "bits": bits,
            "group_size": group,
            "symmetric": symmetric,
            "method": method,
            "in_features": in_features,
            "out_features": out_features,
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "also_full_precision": keep,
            "layout": "cpu_int4" if layout is not None else None,
            "cache": cache,
        }
    if source is None and weights:
        options, source = _infer_options(module, weights), "inferred"
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "memsave_version": _memsave_version(),
        "torch_version": torch.__version__,
        "quantize": options,
        "quantize_source": source if options is not None else None,
        "weights": weights,
        "tensors": plain,
        "aliases": aliases,
    }
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


def _compressed_form(name: str, weight: torch.Tensor, config: QuantizeConfig | None):
    """(qparams key, (scale, offset), packed, cached scalars) for a weight memsave compressed, or None."""
    if weight not in WEIGHTS or weight.dim() != 2:
        return None
    keys = _cached_keys(weight)
    forms = []
    for qkey in filter(weight_keys.is_affine_params, keys):
        if weight_keys.packed(qkey) not in keys:
            continue
        try:
            qparams, packed = _cached(weight, qkey), _cached(weight, weight_keys.packed(qkey))
        except _NotCached:
            continue  # stale: the weight changed after it was compressed
        forms.append((qkey, qparams, packed))
    if len(forms) > 1 and config is not None:
        scheme = config.for_weight(name)
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
    return qkey, (scale, offset), packed, _cached_extras(weight, keys), layout


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


def _cached_extras(weight: torch.Tensor, keys: list[Hashable]) -> list[tuple[Hashable, Any]]:
    """Other values the passes cached for this weight (its SQNR, AWQ's channel scales, ...):
    a compile after `load` asks for them and must not need the weight to compute them again.
    Kernel layouts are left out: they are converted again from the generic form (exactly, but
    for the int4 scales/zeros stored on their own)."""
    out = []
    for key in keys:
        if weight_keys.is_affine_params(key) or weight_keys.is_packed(key) or weight_keys.is_cpu_layout(key):
            continue
        if not _json_key(key):
            continue
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


def _encode(value: Any, tensor_name: str, store: Callable[[str, torch.Tensor], None]) -> Any:
    """A cached value as JSON: tensors stored under `tensor_name`, tuples element by element."""
    if isinstance(value, torch.Tensor):
        store(tensor_name, value)
        return {"tensor": tensor_name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, f"{tensor_name}_{j}", store) for j, v in enumerate(value)]}
    return value


def _decode(value: Any, get_tensor: Callable[[str], torch.Tensor]) -> Any:
    if isinstance(value, dict) and "tensor" in value:
        return get_tensor(value["tensor"])
    if isinstance(value, dict) and "tuple" in value:
        return tuple(_decode(v, get_tensor) for v in value["tuple"])
    return value


def _json_key(key: Any) -> bool:
    if isinstance(key, tuple):
        return all(_json_key(k) for k in key)
    return isinstance(key, (bool, int, float, str)) or key is None


def _from_json_key(key: Any) -> Any:
    return tuple(_from_json_key(k) for k in key) if isinstance(key, list) else key


# -- options ----------------------------------------------------------------------------------


def _options_for_save(model: Any, quantize: Any) -> tuple[dict | None, str | None]:
    if quantize is not None:
        config = quantize if isinstance(quantize, QuantizeConfig) else QuantizeConfig.parse(quantize)
        return (_options_dict(config) if config is not None else None), "argument"
    config = _compiled_quantize(model)
    if config is not None:
        return _options_dict(config), "compile"
    return None, None


def _compiled_quantize(model: Any) -> QuantizeConfig | None:
    """The quantize options a `torch.compile(..., backend="memsave", options=...)` wrapper was
    made with. Read from Dynamo's wrappers of the backend (private; best effort)."""
    node = getattr(getattr(model, "dynamo_ctx", None), "callback", None)
    for _ in range(16):
        if node is None:
            return None
        if isinstance(node, Config):
            return node.quantize
        if getattr(node, "compiler_name", None) == "memsave" and isinstance(getattr(node, "kwargs", None), dict):
            try:
                return Config.from_options(node.kwargs.get("options")).quantize
            except Exception:
                return None
        node = getattr(node, "_torchdynamo_orig_backend", None)
    return None


def _options_dict(config: QuantizeConfig) -> dict:
    """A QuantizeConfig as a JSON-able dict that `options={"quantize": ...}` accepts."""
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out["include"], out["exclude"] = list(config.include), list(config.exclude)
    out["overrides"] = {pattern: dict(changes) for pattern, changes in config.overrides}
    return out


def _infer_options(module: nn.Module, weights: dict[str, dict]) -> dict:
    """Options that quantize exactly the saved weights with their schemes (compute_dtype unknown)."""

    def scheme(info: dict) -> dict:
        group = None if info["group_size"] == info["in_features"] else info["group_size"]
        return {"bits": info["bits"], "group_size": group, "symmetric": info["symmetric"],
                "method": info["method"]}

    schemes = {name: scheme(info) for name, info in weights.items()}
    base = dict(Counter(tuple(s.items()) for s in schemes.values()).most_common(1)[0][0])
    embeddings = set(weights) & {
        f"{path}.weight" if path else "weight" for path, m in module.named_modules() if isinstance(m, nn.Embedding)
    }
    options = QuantizeConfig(
        **base,
        include=tuple(glob.escape(name) for name in weights),
        overrides={
            glob.escape(n): {k: v for k, v in s.items() if base[k] != v} for n, s in schemes.items() if s != base
        },
        embeddings=bool(embeddings),
    )
    return _options_dict(options)


def _memsave_version() -> str:
    from memsave.version import __version__

    return __version__


# -- load ----------------------------------------------------------------------------------------


def saved_options(path: str | os.PathLike) -> dict | None:
    """The quantize options recorded in a file written by `memsave.save` (None: not quantized)."""
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
    as released, with their codes and scales in the weight cache. Also sets
    `model._memsave_quantize` to the recorded quantize options (a dict, or None): compile with
    `options={"quantize": model._memsave_quantize}` to get the saved model's outputs.
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
        for part in ("packed", "scale") + (() if info["symmetric"] else ("offset",)):
            if name + SUFFIXES[part] not in names:
                raise ValueError(
                    f"memsave.load: {os.fspath(path)!r} lacks {name + SUFFIXES[part]!r} for compressed weight {name!r}"
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
        # Shapes first, so that a wrong architecture fails before anything is changed.
        for name, info in weights.items():
            if name in targets:
                _check_shape(name, targets[name], (info["out_features"], info["in_features"]))
        for name in plain:
            if name in targets:
                _check_shape(name, targets[name], tuple(f.get_slice(name).get_shape()))
        loaded: dict[str, torch.Tensor] = {}
        for name in plain:
            if name in targets:
                loaded[name] = _load_plain(targets[name], f.get_tensor(name))
        for name, info in weights.items():
            if name in targets:
                full = f.get_tensor(name) if info.get("also_full_precision") and name in names else None
                parts = {p: f.get_tensor(name + s) for p, s in SUFFIXES.items() if name + s in names}
                if info.get("layout") == "cpu_int4" and name + INT4_SCALES_ZEROS in names:
                    parts["cpu_int4"] = f.get_tensor(name + INT4_SCALES_ZEROS)
                parts["cache"] = [(_from_json_key(key), _decode(v, f.get_tensor)) for key, v in info.get("cache", [])]
                loaded[name] = _load_compressed(name, targets[name], info, parts, full, device)
    for alias, name in aliases.items():
        if alias in targets and name in loaded:
            targets[alias].assign(loaded[name])
    still_meta = [n for n, slot in targets.items() if slot.current().device.type == "meta"]
    if still_meta:
        raise ValueError(
            f"memsave.load: {still_meta} still on the meta device after loading {os.fspath(path)!r} "
            "(the file has no values for them)"
        )
    for obj in {id(model): model, id(module): module}.values():
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


def _load_compressed(
    name: str, slot: _Slot, info: dict, parts: dict, full: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    dtype = getattr(torch, info["dtype"])
    shape = (info["out_features"], info["in_features"])
    if slot.kind != "parameter":
        raise ValueError(f"memsave.load: compressed weight {name!r} is a buffer in the model, a parameter in the file")
    if full is not None:  # the compiled graph also reads the original
        # In ordinary memory, not mapped from the file: saving again tells it by its storage.
        weight = nn.Parameter(full.to(dtype, copy=True), requires_grad=slot.current().requires_grad)
    else:
        weight = nn.Parameter(_empty_storage_tensor(shape, dtype, device), requires_grad=False)
    slot.assign(weight)
    qkey = qparams_key(info["bits"], info["group_size"], info["symmetric"], info["method"])
    qparams = (parts["scale"], parts.get("offset"))
    WEIGHTS.get_or_build(weight, qkey, lambda: qparams, reads_weight=False)
    WEIGHTS.get_or_build(weight, weight_keys.packed(qkey), lambda: parts["packed"], reads_weight=False)
    for key, value in parts["cache"]:
        WEIGHTS.get_or_build(weight, key, lambda value=value: value, reads_weight=False)
    if "cpu_int4" in parts and device.type == "cpu":
        _restore_int4_layout(weight, qkey, parts["packed"], parts["cpu_int4"])
    if full is None:
        release(weight, name)  # storage already empty: registers it (clear errors on eager use)
    return weight


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


def _empty_storage_tensor(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
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
