"""Options for the memsave backend: one frozen dataclass per pass family, one `Config` over them.

Users write options in one of three ways, all validated here with errors that name the key and
the valid choices:

    torch.compile(model, backend="memsave")                                   # default recipe
    torch.compile(model, backend="memsave", options={"recompute": "none"})    # short strings
    torch.compile(model, backend="memsave", options={"recompute": {"policy": "min-cut"}})
    torch.compile(model, backend=memsave.Config(recompute="none"))          # a Config is a backend

Each pass family (quantize, prune, ...) takes a short string, a dict of its config's fields, an
instance of its config class, or None/"none"/False to switch it off. One module per family;
`recipe.py` holds `Config`, the default recipe and the options table; `base.py` what they share.
"""

from memsave.config.base import CODEGEN_CHOICES, OFF_VALUES, PASS_FAMILIES, FamilyConfig, LayerSelection, OptionError
from memsave.config.chunk import CHUNK_DEFAULT_BUDGET, CHUNK_TARGETS, ChunkConfig
from memsave.config.factorize import FACTORIZE_METHODS, FactorizeConfig
from memsave.config.pipeline import PIPELINE_SCHEDULES, PipelineConfig
from memsave.config.plan_memory import PlanMemoryConfig
from memsave.config.precision import PRECISION_COMPUTE, PRECISION_SAVED, PrecisionConfig
from memsave.config.prune import PRUNE_GRANULARITIES, PRUNE_METHODS, PRUNE_STRUCTURES, PruneConfig
from memsave.config.quantize import QUANT_BITS, QUANT_GROUPS, QUANT_METHODS, QUANT_SCHEMES, QuantizeConfig
from memsave.config.recipe import DEFAULT_RECIPE, FAMILY_CONFIGS, Config, describe_options, options_table_markdown
from memsave.config.recompute import RECOMPUTE_POLICIES, RecomputeConfig
from memsave.config.tensor_parallel import TensorParallelConfig

__all__ = [
    "CHUNK_DEFAULT_BUDGET", "CHUNK_TARGETS", "CODEGEN_CHOICES", "ChunkConfig", "Config", "DEFAULT_RECIPE",
    "FACTORIZE_METHODS", "FAMILY_CONFIGS", "FactorizeConfig", "FamilyConfig", "LayerSelection", "OFF_VALUES",
    "OptionError", "PASS_FAMILIES", "PIPELINE_SCHEDULES", "PRECISION_COMPUTE", "PRECISION_SAVED",
    "PRUNE_GRANULARITIES", "PRUNE_METHODS", "PRUNE_STRUCTURES", "PipelineConfig", "PlanMemoryConfig",
    "PrecisionConfig", "PruneConfig", "QUANT_BITS", "QUANT_GROUPS", "QUANT_METHODS", "QUANT_SCHEMES",
    "QuantizeConfig", "RECOMPUTE_POLICIES", "RecomputeConfig", "TensorParallelConfig", "describe_options",
    "options_table_markdown",
]
