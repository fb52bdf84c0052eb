"""The compile options a memsave.save file records, so that a loaded model compiles as saved.

A compile after `memsave.load` must make the same choices as the compile that compressed the
weights (which weights, which forms, which keys), or it would ask the weight cache for a form
that was not saved, from a weight that was released. So a file records the options of each
compressing family: given to `save` (quantize only), read from the compiled wrapper, or, for a
bare module, inferred from the saved forms themselves (their cache keys hold the parameters
that chose them; filters, compute_dtype and free_weights are not in them).
"""

from __future__ import annotations

import dataclasses
import glob
from collections import Counter
from typing import Any

from torch import nn

from memsave.config import FAMILY_CONFIGS, Config, QuantizeConfig
from memsave.serialize.entries import derived_entries, entry_shape, is_quantized

FAMILIES = ("quantize", "prune", "factorize")  # the families whose forms a file holds


def recorded_options(model: Any, quantize: Any) -> dict[str, tuple[dict | None, str | None]]:
    """{family: (options as a dict, where they came from)}: `quantize` given to save wins
    ("argument"), then the compiled wrapper's options ("compile"); (None, None) if neither."""
    config = _compiled_config(model)
    out: dict[str, tuple[dict | None, str | None]] = {}
    for family in FAMILIES:
        if family == "quantize" and quantize is not None:
            parsed = QuantizeConfig.parse(quantize)
            out[family] = (options_dict(parsed) if parsed is not None else None), "argument"
        elif config is not None and getattr(config, family) is not None:
            out[family] = options_dict(getattr(config, family)), "compile"
        else:
            out[family] = None, None
    return out


def _compiled_config(model: Any) -> Config | None:
    """The Config a `torch.compile(..., backend="memsave", options=...)` wrapper was made with.
    Read from Dynamo's wrappers of the backend (private; best effort)."""
    node = getattr(getattr(model, "dynamo_ctx", None), "callback", None)
    for _ in range(16):
        if node is None:
            return None
        if isinstance(node, Config):
            return node
        if getattr(node, "compiler_name", None) == "memsave" and isinstance(getattr(node, "kwargs", None), dict):
            try:
                return Config.from_options(node.kwargs.get("options"))
            except ValueError:  # OptionError: not options this memsave takes
                return None
        node = getattr(node, "_torchdynamo_orig_backend", None)
    return None


def options_dict(config) -> dict:
    """A family's config as a JSON-able dict that `options={family: ...}` accepts."""
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out["include"], out["exclude"] = list(config.include), list(config.exclude)
    out["overrides"] = {pattern: dict(changes) for pattern, changes in config.overrides}
    return out


# -- inferred from the saved forms ---------------------------------------------------------------


def infer_options(family: str, module: nn.Module, weights: dict[str, dict]) -> dict | None:
    """Options of `family` that make exactly the saved forms (None: the file holds none)."""
    per_weight = {"quantize": _quantize_fields, "prune": _prune_fields, "factorize": _factorize_fields}[family](weights)
    if not per_weight:
        return None
    fixed = {"quantize": ("scheme",), "prune": (), "factorize": ("method", "damp")}[family]
    extra = {}
    if family == "quantize":
        embeddings = {f"{path}.weight" if path else "weight" for path, m in module.named_modules() if isinstance(m, nn.Embedding)}
        extra["embeddings"] = bool(set(per_weight) & embeddings)
    return options_dict(_config_for(family, per_weight, fixed, extra))


def _config_for(family: str, per_weight: dict[str, dict], fixed: tuple[str, ...], extra: dict):
    """The config whose base is the commonest fields, with overrides where a weight differs;
    `fixed` fields cannot be overridden per weight, so they must agree."""
    for field in fixed:
        values = {fields[field] for fields in per_weight.values()}
        if len(values) > 1:
            raise ValueError(
                f"memsave.save: the saved {family} forms use several {field}s ({sorted(values, key=str)}), which "
                f"options[{family!r}] cannot express; save the compiled model (torch.compile(...)) instead"
            )
    base = dict(Counter(tuple(sorted(f.items())) for f in per_weight.values()).most_common(1)[0][0])
    return FAMILY_CONFIGS[family](
        **base,
        **extra,
        include=tuple(glob.escape(name) for name in per_weight),
        overrides={
            glob.escape(name): {k: v for k, v in fields.items() if base[k] != v}
            for name, fields in per_weight.items() if fields != base
        },
    )


def _parts(entry: dict):
    """An entry and its derived weights' entries, theirs too."""
    yield entry
    for sub in derived_entries(entry):
        yield from _parts(sub)


def _keys(entry: dict):
    for key, _ in entry.get("cache", []):
        yield tuple(key) if isinstance(key, list) else key


def _quantize_fields(weights: dict[str, dict]) -> dict[str, dict]:
    """Per weight, its quantized parts' scheme. A part whose group spans its whole row says
    nothing about the group size (group_size None or any larger one gives it); another part
    of the same weight (a factor with more inputs) may."""
    found: dict[str, dict] = {}
    for name, entry in weights.items():
        schemes = []
        for part in _parts(entry):
            k = entry_shape(part)[-1]
            if is_quantized(part):
                schemes.append(("affine", part["bits"], part["group_size"], part["symmetric"], part["method"], k))
            for key in _keys(part):
                if key[0] == "params":  # another scheme's side parameters (log, vq)
                    schemes.append((key[1], *key[2:6], k))
        if not schemes:
            continue
        groups = {group for *_, group, _, _, k in schemes if group < k}
        kinds = {(scheme, bits, symmetric, method) for scheme, bits, _, symmetric, method, _ in schemes}
        if len(groups) > 1 or len(kinds) > 1:
            raise ValueError(
                f"memsave.save: the parts of {name!r} are quantized under different schemes; pass "
                "quantize=<the options used> or save the compiled model (torch.compile(...))"
            )
        scheme, bits, symmetric, method = kinds.pop()
        found[name] = {"scheme": scheme, "bits": bits, "group_size": groups.pop() if groups else None,
                       "symmetric": symmetric, "method": method}
    return found


def _prune_fields(weights: dict[str, dict]) -> dict[str, dict]:
    """From the prune keys: ("prune", structure, method, sparsity) on a pruned weight;
    ("prune-structured" | "prune-channels" | "prune-heads", method, sparsity, members) on the
    weights of a structured group (the latter two say which kind of group it was)."""
    found: dict[str, dict] = {}
    granularity: dict[str, str] = {}
    for name, entry in weights.items():
        for key in _keys(entry):
            if key[0] == "prune":
                found[name] = {"structure": key[1], "method": key[2], "sparsity": key[3]}
            elif key[0] == "prune-structured":
                for member in key[3]:
                    found[member] = {"structure": "structured", "method": key[1], "sparsity": key[2]}
            elif key[0] in ("prune-channels", "prune-heads"):
                for member in key[3]:
                    granularity[member] = key[0].removeprefix("prune-")
    for member, fields in found.items():
        # Every weight names its granularity: an override then never leaves a structured
        # base's granularity on an unstructured weight (which the config refuses).
        fields["granularity"] = granularity.get(member, "channels+heads")
    return found


def _factorize_fields(weights: dict[str, dict]) -> dict[str, dict]:
    """From the factor keys, ("factor", method, rank, damp): the rank each weight got (by
    whatever rule chose it), so the inferred options ask for exactly that rank."""
    found: dict[str, dict] = {}
    for name, entry in weights.items():
        ranks = {(key[1], key[2], key[3]) for part in _parts(entry) for key in _keys(part) if key[0] == "factor"}
        if len(ranks) > 1:
            raise ValueError(
                f"memsave.save: {name!r} has several low-rank forms {sorted(ranks)}; save the compiled "
                "model (torch.compile(...)) instead"
            )
        if ranks:
            method, rank, damp = ranks.pop()
            found[name] = {"method": method, "rank": rank, "damp": damp}
    return found
