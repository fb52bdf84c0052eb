"""Calibration: what the inputs of each linear layer look like on real data.

    memsave.calibrate(model, batches)              # before torch.compile
    compiled = torch.compile(model, backend="memsave", options={"quantize": {"bits": 4, "method": "awq"}})

Runs the model eagerly on the calibration batches (each an input tuple, a tensor, or a dict of
keyword arguments) with hooks on every nn.Linear, and records per weight: the mean |x| of each
input channel and a fixed-size random sample of input rows (seeded, so calibration is
reproducible), the mean x² per input channel, and (hessian=True) the input Gram matrix.
Calibration-based methods (AWQ, GPTQ, Wanda pruning, SVD-LLM factorization) read these statistics
when they compress that weight; they are kept per weight object, weakly, like the weight cache.
A progress line on stderr shows how far it is.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary


@dataclass
class ActivationStats:
    mean_abs: torch.Tensor  # (K,) mean |x| per input channel
    sample: torch.Tensor  # (S, K) input rows, a seeded random subset
    tokens: int  # rows seen
    gram: torch.Tensor | None = None  # (K, K) mean of xᵀx over all rows (GPTQ's Hessian / 2)
    sq_mean: torch.Tensor | None = None  # (K,) mean x² per input channel (Wanda's ‖x_j‖² / rows)


# weight parameter -> ActivationStats of the inputs it multiplied.
CALIBRATION: WeakIdKeyDictionary = WeakIdKeyDictionary()


def calibrate(
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    sample_rows: int = 512,
    seed: int = 0,
    progress: bool = True,
    hessian: bool = True,
) -> int:
    """Record input statistics of every nn.Linear in `model`; returns how many layers.

    hessian: also accumulate each layer's (K, K) input Gram matrix, which GPTQ needs
    (K² floats per layer: 127 MB for K = 5632; turn it off for large models that use AWQ only).
    """
    model = getattr(model, "_orig_mod", model)
    sums: dict[torch.nn.Linear, torch.Tensor] = {}
    squares: dict[torch.nn.Linear, torch.Tensor] = {}
    counts: dict[torch.nn.Linear, int] = {}
    samples: dict[torch.nn.Linear, list[torch.Tensor]] = {}
    grams: dict[torch.nn.Linear, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(seed)

    def record(module: torch.nn.Linear, args) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (rows, K)
        xd = x.double()  # sums of squares and products accumulate in fp64
        sums[module] = sums.get(module, 0) + x.abs().sum(0)
        squares[module] = squares.get(module, 0) + xd.pow(2).sum(0)
        counts[module] = counts.get(module, 0) + x.shape[0]
        keep = torch.randperm(x.shape[0], generator=generator)[:sample_rows]
        samples.setdefault(module, []).append(x[keep].clone())
        if hessian:
            grams[module] = grams.get(module, 0) + xd.t() @ xd

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    handles = [m.register_forward_pre_hook(record) for m in linears]
    batches = list(batches)
    if not batches:
        raise ValueError("memsave.calibrate: no calibration batches given")
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches, 1):
                if isinstance(batch, dict):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
                if progress:
                    print(f"\rmemsave calibrate: {i}/{len(batches)} batches", end="", file=sys.stderr, flush=True)
    finally:
        for h in handles:
            h.remove()
        if progress:
            print(file=sys.stderr)
    for module in sums:
        rows = torch.cat(samples[module])
        keep = torch.randperm(rows.shape[0], generator=generator)[:sample_rows]
        gram = (grams[module] / counts[module]).float() if module in grams else None
        sq_mean = (squares[module] / counts[module]).float()
        CALIBRATION[module.weight] = ActivationStats(sums[module] / counts[module], rows[keep], counts[module], gram, sq_mean)
    return len(sums)
