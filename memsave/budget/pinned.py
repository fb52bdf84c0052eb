"""Choices a user pins beside a budget: `options={"budget": "24MiB", "quantize": {...}}`.

The rule: a planned weight that the patterns of a given `quantize`, `prune` or `factorize`
option name (its `include` or its `exclude`) is pinned: it gets exactly what those options give
it, in every family (a family not given: nothing; `exclude`: nothing from that family), and the
planner counts its bytes and scores its error as given. Every other weight is the planner's.
So `{"quantize": {"include": ["lm_head.weight"], "bits": 8}}` pins the LM head at int8 and plans
the rest; `{"quantize": {"exclude": ["*.embed*"]}}` (include "*") pins everything: the budget is
then a check. A pinned form the planner cannot count exactly (log / vector / NF4 codes, AWQ's
column scales, structured pruning, an energy-chosen rank) is refused with the forms it can
count: the plan would not know its bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from memsave.budget.candidates import Settings
from memsave.config import FactorizeConfig, PruneConfig, QuantizeConfig
from memsave.config.base import OptionError, name_matches
from memsave.ops.lowrank import max_useful_rank, rank_for_ratio
from memsave.ops.sparse import bitmask_bytes

PINNABLE = {"quantize": QuantizeConfig, "prune": PruneConfig, "factorize": FactorizeConfig}


def pinned_configs(options: dict[str, Any] | None) -> dict[str, Any]:
    """family -> its parsed config, for the families of `options` a plan pins (other keys ignored)."""
    found = {}
    for family, cls in PINNABLE.items():
        value = (options or {}).get(family)
        config = value if isinstance(value, cls) else cls.parse(value)
        if config is not None:
            found[family] = config
    return found


def names(config, name: str) -> bool:
    """Whether `config`'s include or exclude patterns name weight `name`."""
    return any(name_matches(name, p) for p in (*config.include, *config.exclude))


def pinned_settings(name: str, shape: tuple[int, int], element_size: int, embedding: bool,
                    configs: dict[str, Any]) -> Settings | None:
    """The settings (candidates.Settings: per family its override fields) that `configs` give
    weight `name`, or None when no given family names it (the planner's to choose)."""
    if not any(names(config, name) for config in configs.values()):
        return None
    n, k = shape
    settings: Settings = {}
    prune = configs["prune"].for_weight(name) if "prune" in configs and not embedding else None
    factorize = configs["factorize"].for_weight(name) if "factorize" in configs and not embedding else None
    quantize = configs["quantize"].for_weight(name) if "quantize" in configs else None
    if prune is not None and factorize is not None:
        raise OptionError(f"options['budget']: {name} is pinned to be pruned and factorized; the planner counts one of "
                          "the two per weight (exclude it from one of them)")
    if prune is not None:
        fields = _prune_fields(name, n, k, element_size, prune)
        if fields is not None:
            settings["prune"] = fields
    if factorize is not None:
        fields = _factorize_fields(name, n, k, factorize, configs["factorize"])
        if fields is not None:
            settings["factorize"] = fields
    if quantize is not None and (not embedding or quantize.embeddings):
        settings["quantize"] = _quantize_fields(name, quantize)
    return settings


def base_fields(config) -> dict[str, Any]:
    """The fields of a family's config that are not per layer (e.g. quantize's compute_dtype),
    where they differ from the defaults: a plan's options keep them beside its per-layer choices."""
    per_layer = {"include", "exclude", "overrides", *type(config).override_keys}
    default = type(config)()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in per_layer and getattr(config, f.name) != getattr(default, f.name)}


def describe(settings: Settings) -> str:
    """A short name of pinned settings, for the plan's table: "pinned 2:4-wanda+int4-g128-asym-gptq"."""
    parts = []
    if "prune" in settings:
        p = settings["prune"]
        parts.append(f"{p['structure']}" + (f"-{p['sparsity']:g}" if "sparsity" in p else "") + f"-{p['method']}")
    if "factorize" in settings:
        parts.append(f"rank{settings['factorize']['rank']}-{settings['factorize']['method']}")
    if "quantize" in settings:
        q = settings["quantize"]
        parts.append(f"int{q['bits']}" + (f"-g{q['group_size']}" if q["group_size"] else "")
                     + ("-sym" if q["symmetric"] else "-asym") + f"-{q['method']}")
    return "pinned " + ("+".join(parts) if parts else "dense")


def _quantize_fields(name: str, cfg: QuantizeConfig) -> dict[str, Any]:
    if cfg.scheme != "affine" or cfg.method not in ("rtn", "mse", "gptq"):
        raise OptionError(
            f"options['budget']: {name} is pinned to {cfg.describe()}, whose bytes and error the planner does not "
            "count yet; pinned quantization beside a budget: affine int<bits> with method 'rtn', 'mse' or 'gptq' "
            "(or plan without the budget and compile the edited plan.options)")
    return {"bits": cfg.bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric, "method": cfg.method}


def _prune_fields(name: str, n: int, k: int, element_size: int, cfg: PruneConfig) -> dict[str, Any] | None:
    """The prune fields, or None where the prune pass would leave the weight dense."""
    if cfg.structure == "structured":
        raise OptionError(
            f"options['budget']: {name} is pinned to structured pruning, which changes two layers at once; pinned "
            "pruning beside a budget: '2:4', '4:8' or 'unstructured'")
    if cfg.n_m is not None:
        if k % cfg.n_m[1]:
            raise OptionError(f"options['budget']: {name} is pinned to {cfg.structure}, which needs its input features "
                              f"({k}) divisible by {cfg.n_m[1]}; exclude it from options['prune']")
        return {"structure": cfg.structure, "method": cfg.method}
    from memsave.passes.aten.prune import kept_weights

    if bitmask_bytes(n, k, kept_weights(n, k, cfg), element_size) >= n * k * element_size:
        return None  # the pass keeps it dense: a bitmask and values would not be smaller
    return {"structure": cfg.structure, "method": cfg.method, "sparsity": cfg.sparsity}


def _factorize_fields(name: str, n: int, k: int, cfg: FactorizeConfig, family: FactorizeConfig) -> dict[str, Any] | None:
    """The factorize fields (a rank), or None where the factorize pass would leave the weight dense."""
    if family.allocation != "uniform" or (cfg.rank is None and cfg.energy is not None):
        raise OptionError(
            f"options['budget']: {name} is pinned to a rank chosen from its spectrum ({cfg.describe()}); pinned "
            "factorization beside a budget: a 'rank' or a 'reduction' with allocation 'uniform'")
    if cfg.rank is not None and cfg.rank > min(n, k):
        raise OptionError(f"options['budget']: {name} is pinned to rank {cfg.rank}, larger than its {n}x{k} shape allows "
                          f"(at most {min(n, k)})")
    rank = cfg.rank if cfg.rank is not None else rank_for_ratio(n, k, 1 - cfg.reduction)
    if rank == 0 or rank > max_useful_rank(n, k):
        return None  # the pass keeps it dense
    return {"method": cfg.method, "rank": rank}
