"""The whole recipe: one `Config` over the families' configs, the default recipe, and the
README's options table."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Callable

from memsave.config.units import parse_bytes
from memsave.config.base import CODEGEN_CHOICES, KV_CACHE_CHOICES, PASS_FAMILIES, FamilyConfig, OptionError, _choices
from memsave.config.chunk import ChunkConfig
from memsave.config.factorize import FactorizeConfig
from memsave.config.pipeline import PipelineConfig
from memsave.config.plan_memory import PlanMemoryConfig
from memsave.config.precision import PrecisionConfig
from memsave.config.prune import PruneConfig
from memsave.config.quantize import QuantizeConfig
from memsave.config.recompute import RecomputeConfig
from memsave.config.tensor_parallel import TensorParallelConfig

# compile_graph(gm, example_inputs, config), set by memsave.backend (see Config.__call__).
_COMPILE_GRAPH: Callable | None = None


def set_compile_graph(fn: Callable) -> None:
    global _COMPILE_GRAPH
    _COMPILE_GRAPH = fn


# One config class per family.
FAMILY_CONFIGS: dict[str, type[FamilyConfig]] = {
    "quantize": QuantizeConfig,
    "prune": PruneConfig,
    "factorize": FactorizeConfig,
    "recompute": RecomputeConfig,
    "pipeline": PipelineConfig,
    "tensor_parallel": TensorParallelConfig,
    "chunk": ChunkConfig,
    "precision": PrecisionConfig,
    "plan_memory": PlanMemoryConfig,
}
assert tuple(FAMILY_CONFIGS) == PASS_FAMILIES

# The default recipe: what `backend="memsave"` does with no options. Documented in the README;
# change both together.
DEFAULT_RECIPE: dict[str, Any] = {
    "recompute": "min-cut",
    "codegen": "inductor",
}


@dataclass(frozen=True)
class Config:
    """The whole recipe for one `torch.compile(..., backend="memsave")`.

    Frozen and hashable, so a Config can key caches. A Config is itself a torch.compile
    backend: `torch.compile(model, backend=memsave.Config(...))`.
    """

    quantize: FamilyConfig | None = None
    prune: FamilyConfig | None = None
    factorize: FamilyConfig | None = None
    recompute: FamilyConfig | None = RecomputeConfig()
    pipeline: FamilyConfig | None = None
    tensor_parallel: FamilyConfig | None = None
    chunk: FamilyConfig | None = None
    precision: FamilyConfig | None = None
    plan_memory: FamilyConfig | None = None
    # Bytes (or "24MiB", "1.5GB") that the stored weights plus one call's peak of live tensors
    # must fit in: memsave.plan chooses each linear's form (inference graphs); the weights that
    # quantize / prune / factorize options name keep what those give them (budget/pinned.py).
    budget: Any = None
    # HF's static cache (generate(cache_implementation="static")) held in this layout: "int8",
    # "int4" or "kivi2" (KIVI's per-channel keys, per-token values).
    kv_cache: str | None = None
    # "inductor" hands the transformed graph to Inductor; "fx" runs it as plain FX code.
    codegen: str = "inductor"
    # Write the graph after every pass and the per-pass table here (implies debug).
    debug_dir: str | None = None
    # Check graph invariants after every pass and measure each pass's error on the example
    # input. Costs one extra run of the graph per pass; on in tests and in `memsave explain`.
    debug: bool = False

    def __post_init__(self):
        for name in PASS_FAMILIES:
            object.__setattr__(self, name, FAMILY_CONFIGS[name].parse(getattr(self, name)))
        if self.budget is not None:
            try:
                object.__setattr__(self, "budget", parse_bytes(self.budget))
            except ValueError as e:
                raise OptionError(f"options['budget']: {e}") from None
        if self.kv_cache is not None and self.kv_cache not in KV_CACHE_CHOICES:
            raise OptionError(
                f"options['kv_cache']: invalid value {self.kv_cache!r}; valid choices: {_choices(KV_CACHE_CHOICES)}"
            )
        if self.codegen not in CODEGEN_CHOICES:
            raise OptionError(
                f"options['codegen']: invalid value {self.codegen!r}; valid choices: "
                f"{_choices(CODEGEN_CHOICES)}"
            )
        if self.debug_dir is not None:
            if not isinstance(self.debug_dir, (str, os.PathLike)):
                raise OptionError(
                    f"options['debug_dir']: expected a path string, got {type(self.debug_dir).__name__}"
                )
            object.__setattr__(self, "debug_dir", os.fspath(self.debug_dir))
            object.__setattr__(self, "debug", True)
        if not isinstance(self.debug, bool):
            raise OptionError(f"options['debug']: expected True or False, got {self.debug!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any] | Config | None = None) -> Config:
        """Build a Config from `torch.compile(options=...)`, on top of the default recipe.

        MEMSAVE_DEBUG_DIR in the environment sets debug_dir when the options do not, and
        MEMSAVE_DEBUG=1 turns debug mode on.
        """
        if isinstance(options, Config):
            return options
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise OptionError(f"memsave options must be a dict or memsave.Config, got {type(options).__name__}")
        valid = {f.name for f in fields(cls)}
        for key in options:
            if key not in valid:
                raise OptionError(
                    f"unknown memsave option {key!r}; valid keys: {_choices(sorted(valid))}"
                )
        merged = {**DEFAULT_RECIPE, **options}
        if merged.get("budget") is not None and "chunk" not in options:
            # A training step's budget: the loss over chunks and attention as SDPA (exact) lower
            # the peak the recompute plan starts from (ChunkConfig.training_only); "chunk": "none"
            # or a chunk config beside the budget pins it instead.
            merged["chunk"] = ChunkConfig(targets=("loss", "attention"), training_only=True)
        if "debug_dir" not in merged and os.environ.get("MEMSAVE_DEBUG_DIR"):
            merged["debug_dir"] = os.environ["MEMSAVE_DEBUG_DIR"]
        if "debug" not in merged and os.environ.get("MEMSAVE_DEBUG") == "1":
            merged["debug"] = True  # the test suite sets this: invariants after every pass, everywhere
        return cls(**merged)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def as_options(self) -> dict[str, Any]:
        """The dict form, usable as `torch.compile(..., options=config.as_options())`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def enabled_families(self) -> list[str]:
        return [name for name in PASS_FAMILIES if getattr(self, name) is not None]

    def __call__(self, gm, example_inputs, **kwargs):
        # A Config is a torch.compile backend in its own right. The backend (a layer above
        # this one) hands its entry down when it is imported, which `import memsave` does.
        if _COMPILE_GRAPH is None:
            raise RuntimeError("memsave.backend is not loaded: import memsave before compiling with a memsave.Config")
        return _COMPILE_GRAPH(gm, example_inputs, self)


def describe_options() -> list[tuple[str, str, str]]:
    """(key, accepted values, what it does) for every option: the README table comes from this."""
    rows = []
    for name in PASS_FAMILIES:
        cls = FAMILY_CONFIGS[name]
        shorts = _choices(("none", *cls.shorthands))
        if getattr(cls, "name_pattern", None):
            shorts += ", " + cls.name_pattern
        keys = ", ".join(f.name for f in fields(cls))
        rows.append((name, f"{shorts} or dict({keys})", (cls.__doc__ or "").strip().splitlines()[0]))
    rows.append(("budget", "bytes, or a string such as '24MiB', '1.5GB'",
                 "stored weights + one call's peak of live tensors within this: memsave.plan picks each linear's form (inference); "
                 "weights that quantize/prune/factorize options name keep what those give them; a training step's peak: "
                 "the loss chunked, attention as SDPA (unless chunk is given) and the recompute plan chosen to fit"))
    rows.append(("kv_cache", _choices(KV_CACHE_CHOICES),
                 "HF's static cache (generate(cache_implementation='static')) and memsave's DecoderCache held in "
                 "this layout where the compiled prefill allocates them; attention reads the codes tile by tile"))
    rows.append(("codegen", _choices(CODEGEN_CHOICES), "how the transformed graph runs"))
    rows.append(("debug_dir", "path", "write the graph after every pass and the per-pass table"))
    rows.append(("debug", "True/False", "check invariants and measure error after every pass"))
    return rows


def options_table_markdown() -> str:
    """The README's options table (a test keeps the README in step with this)."""
    rows = ["| key | accepted values | what it does |", "|---|---|---|"]
    rows += [f"| `{key}` | {values} | {what} |" for key, values, what in describe_options()]
    return "\n".join(rows)
