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

Memory (measured on the real all-MiniLM-L6-v2, see benchmarks/bench_process_memory.py): the
statistics are kept in their final form while the batches run, so calibrating costs what
they hold and little more — the Gram matrices accumulate in place in fp32 (K² floats: for
K = 1536 that is 4x the weight), the row sample is a running uniform sample of at most
`sample_rows` rows (not `sample_rows` per batch), and linears that read the same input
tensor (Q/K/V, gate/up) share one set of statistics instead of each computing its own.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from memsave.memory.process import give_back, mapped_zeros


@dataclass
class ActivationStats:
    mean_abs: torch.Tensor  # (K,) mean |x| per input channel
    sample: torch.Tensor  # (S, K) input rows, a seeded random subset
    tokens: int  # rows seen
    gram: torch.Tensor | None = None  # (K, K) mean of xᵀx over all rows (GPTQ's Hessian / 2)
    sq_mean: torch.Tensor | None = None  # (K,) mean x² per input channel (Wanda's ‖x_j‖² / rows)

    @property
    def nbytes(self) -> int:
        """Bytes the statistics hold (shared by the linears that read the same input)."""
        return sum(t.untyped_storage().nbytes() for t in (self.mean_abs, self.sample, self.gram, self.sq_mean)
                   if t is not None)


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
    (K² floats per input: 127 MB for K = 5632, shared by the linears that read the same input;
    turn it off for large models that use AWQ only).
    """
    model = getattr(model, "_orig_mod", model)
    batches = list(batches)
    if not batches:
        raise ValueError("memsave.calibrate: no calibration batches given")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        found = _run(model, linears, batches, sample_rows, seed, progress, hessian, share=True)
    except _SharingBroke:
        # Some linear read the same tensor as another in one batch but not in another (control
        # flow that depends on the data): statistics per linear, from the start.
        found = _run(model, linears, batches, sample_rows, seed, progress, hessian, share=False)
    for module, stats in found.items():
        CALIBRATION[module.weight] = stats
    give_back()  # the batches' activations and temporaries (memory/process.py)
    return len(found)


class _SharingBroke(Exception):
    pass


class _Accumulator:
    """Running statistics of one input stream (one linear's, or several linears' shared).

    Every buffer is allocated once, at the first batch, and updated in place: nothing of
    calibration's own is reallocated per batch.
    """

    def __init__(self, k: int, sample_rows: int, hessian: bool):
        self.sum_abs = torch.zeros(k)
        self.squares = torch.zeros(k, dtype=torch.float64)  # K floats: fp64 costs nothing here
        # The two large buffers live in memory mappings of their own (memory/process.py): once
        # compression has used and dropped them, that memory is the OS's again at once.
        self.gram = mapped_zeros((k, k)) if hessian else None
        self.rows = 0
        # A uniform sample without replacement of every row seen so far: each row gets a random
        # key, and the rows with the smallest keys are kept, in these slots.
        self.sample = mapped_zeros((sample_rows, k))
        self.keys = torch.empty(sample_rows)
        self.kept = 0

    def add(self, x: torch.Tensor, generator: torch.Generator) -> None:
        self.sum_abs += x.abs().sum(0)
        self.squares += x.square().sum(0)  # one batch's sum in fp32, the running total in fp64
        if self.gram is not None:
            self.gram.addmm_(x.t(), x)  # in place: no K×K temporary
        self.rows += x.shape[0]
        keys = torch.rand(x.shape[0], generator=generator)
        m, capacity = self.kept, self.sample.shape[0]
        merged = torch.cat([self.keys[:m], keys])
        keep = merged.topk(min(capacity, merged.numel()), largest=False).indices
        stays = torch.zeros(m, dtype=torch.bool)
        stays[keep[keep < m]] = True
        free = torch.cat([(~stays).nonzero().flatten(), torch.arange(m, keep.numel())])  # slots to fill
        new = keep[keep >= m] - m  # the batch's rows that enter the sample
        self.sample[free] = x[new]
        self.keys[free] = keys[new]
        self.kept = keep.numel()

    def finish(self) -> ActivationStats:
        gram = self.gram.div_(self.rows) if self.gram is not None else None
        sample = self.sample if self.kept == self.sample.shape[0] else self.sample[: self.kept].clone()
        return ActivationStats(self.sum_abs / self.rows, sample, self.rows, gram, (self.squares / self.rows).float())


def _run(model, linears, batches, sample_rows, seed, progress, hessian, *, share: bool) -> dict:
    generator = torch.Generator().manual_seed(seed)
    accumulators: dict[torch.nn.Linear, _Accumulator] = {}
    shares: dict[torch.nn.Linear, torch.nn.Linear] = {}  # linear -> the linear whose statistics it shares
    this_batch: dict[int, tuple[weakref.ref, torch.nn.Linear]] = {}  # id(input) -> (input, first reader)

    def record(module: torch.nn.Linear, args) -> None:
        x_in = args[0]
        first = this_batch.get(id(x_in))
        first = first[1] if first is not None and first[0]() is x_in else None
        if first is None:
            this_batch[id(x_in)] = (weakref.ref(x_in), module)
            if module in shares:
                raise _SharingBroke
        elif share and shares.get(module) is first:
            return  # counted already, by the linear it shares with
        elif share and module not in accumulators and module not in shares and first in accumulators:
            shares[module] = first
            return
        elif module in shares:
            raise _SharingBroke
        x = x_in.detach().reshape(-1, x_in.shape[-1]).float()  # (rows, K)
        if module not in accumulators:
            accumulators[module] = _Accumulator(x.shape[1], sample_rows, hessian)
        accumulators[module].add(x, generator)

    handles = [m.register_forward_pre_hook(record) for m in linears]
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches, 1):
                this_batch.clear()
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
    found = {module: acc.finish() for module, acc in accumulators.items()}
    found.update({module: found[first] for module, first in shares.items()})
    return found
