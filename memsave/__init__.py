"""memsave: a PyTorch 2 compiler backend that makes models need less memory.

    compiled = torch.compile(model, backend="memsave")                 # default recipe
    compiled = torch.compile(model, backend="memsave", options={...})  # see README's table
    report = memsave.explain(model, *example_inputs)                   # what each pass did
    plan = memsave.plan(model, *example_inputs, budget="24MiB")        # fit a byte budget
"""

import memsave.backend  # noqa: F401  (registers memsave's ops and kernels; Config's compile function)
from memsave.budget import BudgetError, Plan, plan
from memsave.calibrate import calibrate
from memsave.config import Config, DEFAULT_RECIPE, PASS_FAMILIES
from memsave.explain import Explanation, explain
from memsave.memory.estimate import MemoryEstimate, estimate_memory
from memsave.memory.track import MemoryStats, MemoryTracker, measure_peak
from memsave.report import GraphReport, PassRecord, collect, recent_reports
from memsave.serialize import load, save
from memsave.checkpoint import empty_parameters
from memsave.optim import InBackward, optimizer_in_backward
from memsave.kv_cache import QuantizedStaticCache, cache_bytes
from memsave.passes.dynamo.shard_tensor import (
    check_tensor_parallel,
    named_sharded_parameters,
    sharded_parameters,
    tp_parameter_bytes,
)

from memsave.version import __version__  # noqa: E402

__all__ = [
    "BudgetError",
    "Plan",
    "plan",
    "Config",
    "calibrate",
    "DEFAULT_RECIPE",
    "Explanation",
    "explain",
    "PASS_FAMILIES",
    "GraphReport",
    "PassRecord",
    "MemoryEstimate",
    "MemoryStats",
    "MemoryTracker",
    "collect",
    "estimate_memory",
    "measure_peak",
    "recent_reports",
    "save", "load", "empty_parameters",
    "InBackward", "optimizer_in_backward",
    "QuantizedStaticCache", "cache_bytes",
    "check_tensor_parallel", "named_sharded_parameters", "sharded_parameters", "tp_parameter_bytes",
]
