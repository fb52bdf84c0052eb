"""memsave.plan from a safetensors checkpoint, for a model too large to hold at full precision:
`memsave.plan(model, *inputs, budget=..., checkpoint="model.safetensors")`.

The model is built without its weights (memsave.empty_parameters); each linear and embedding
weight is read from the file on its own (checkpoint.Checkpoint), scored under every candidate
form, and dropped before the next is read, so planning holds one full-precision weight at a
time. What cannot be had without the whole model in memory is left out, and the plan says so
(`calibrated` False): no calibration statistics (each form is scored by the weight's own
relative error, as memsave.plan does without calibration; GPTQ falls back to the MSE grid,
as the quantize pass does for weights without statistics) and no per-layer gains (every
layer's gain is 1). One call's working memory is estimated on the meta device
(memory/meta_peak.py) unless `working` gives it.

Scoring every form on every row of a large model takes minutes per GB (the MSE grid search
dominates), so a weight with more than SCORE_ROWS rows is scored on SCORE_ROWS rows evenly
spread over it: each row's codes are its own (groups lie within rows), so those rows' errors
are exactly what the compile will make of them, and their relative error estimates the
weight's. The bytes are always the whole weight's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Sequence

import torch
from torch import nn

from memsave.budget.candidates import FORMS, Form
from memsave.budget.planner import Plan, kernel_allowance, linear_rows, plan_layers, plannable_weights
from memsave.checkpoint import Checkpoint
from memsave.config.units import parse_bytes
from memsave.memory.meta_peak import meta_call_peak


SCORE_ROWS = 512
QUANTIZED_FORMS = tuple(f for f in FORMS if f.structure is None and f.share is None)


def spread_rows(w: torch.Tensor) -> torch.Tensor:
    """At most SCORE_ROWS rows of `w`, evenly spaced (all of them if it has no more)."""
    n = w.shape[0]
    if n <= SCORE_ROWS:
        return w
    return w[torch.linspace(0, n - 1, SCORE_ROWS).round().long()]


class _WeightsFromFile(Mapping):
    """name -> the weight read from the checkpoint (at the model's dtype), read when asked for."""

    def __init__(self, ckpt: Checkpoint, model_weights: dict[str, torch.Tensor]):
        self.ckpt, self.model_weights = ckpt, model_weights

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.ckpt.read(name, self.model_weights[name].dtype)

    def __iter__(self):
        return iter(self.model_weights)

    def __len__(self) -> int:
        return len(self.model_weights)


def plan_checkpoint(model: nn.Module, inputs: Sequence, limit: int, path, forms: Sequence[Form],
                    working=None, pinned=None) -> Plan:
    # Quantized forms only: memsave.load compresses only those while loading (prune and
    # factorize need the originals at compile time), and only they may be scored on a row subset.
    unloadable = [f.name for f in forms if f.structure is not None or f.share is not None]
    if forms is FORMS:
        forms = QUANTIZED_FORMS
    elif unloadable:
        raise ValueError(f"memsave.plan from a checkpoint: forms {unloadable} prune or factorize, which memsave.load "
                         f"cannot apply while loading; choose among {[f.name for f in QUANTIZED_FORMS]}")
    held = [family for family in ("prune", "factorize") if (pinned or {}).get(family) is not None]
    if held:
        raise ValueError(f"memsave.plan from a checkpoint: pinned options {held} need the originals at compile time, "
                         "which memsave.load does not keep; pin 'quantize' options only")
    ckpt = Checkpoint(path)
    layers, tables = plannable_weights(model)
    absent = sorted(name for name in layers if name not in ckpt)
    if absent:
        raise ValueError(f"memsave.plan: {ckpt.path!r} has no tensor for {absent[:5]}"
                         + (f" and {len(absent) - 5} more" if len(absent) > 5 else ""))
    for name, w in layers.items():
        if ckpt.entries[name].shape != tuple(w.shape):
            raise ValueError(f"memsave.plan: shape mismatch for {name!r}: the file has "
                             f"{list(ckpt.entries[name].shape)}, the model {list(w.shape)}")
    planned = {id(w) for w in layers.values()}
    others = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in planned}
    # at the size the model will hold them (a meta tensor has no storage to measure)
    fixed = sum(t.numel() * t.element_size() for t in others.values())
    if working is None:
        with linear_rows(model) as rows:
            working = meta_call_peak(model, inputs) + kernel_allowance(rows[0], layers, tables)
    else:
        working = parse_bytes(working)
    return plan_layers(_WeightsFromFile(ckpt, layers), fixed, working, limit, forms, tables, score_rows=spread_rows,
                       pinned=pinned)
