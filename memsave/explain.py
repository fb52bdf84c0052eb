"""`memsave.explain`: compile a model, run it, and say what every pass did and what it cost.

    report = memsave.explain(model, *example_inputs, quantize=..., train=False)
    print(report)

returns the per-pass table of every graph memsave compiled, plus measurements on the example
input: peak live tensor bytes of eager vs compiled execution (from the tracker, warm calls
only, compilation excluded), the model's weight bytes, and the output error (and, with
train=True, the gradient error) against eager.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from memsave.config import Config
from memsave.memory.process import rss_bytes
from memsave.memory.track import MemoryStats, MemoryTracker, live_tensor_bytes
from memsave.passes.joint.recompute import COMPARING_POLICIES
from memsave.report import ErrorStats, GraphReport, collect, fmt_bytes
from memsave.weights import WEIGHTS


@dataclass
class Explanation:
    graphs: list[GraphReport]
    config: Config
    train: bool
    weight_bytes: int  # the model's parameters and buffers, as held by the process before compiling
    compiled_weight_bytes: int  # what is held after: parameters left + compressed constants
    eager: MemoryStats
    compiled: MemoryStats
    output_error: ErrorStats
    grad_error: ErrorStats | None = None
    notes: list[str] = field(default_factory=list)
    # The process as the OS sees it (memory/process.py): RSS before compiling (the model loaded,
    # eager run done) and after compiling and the measured call; beside it memsave's own count
    # of what it holds for the model's weights (WeightCache.held_bytes). None where /proc is missing.
    rss_before: int | None = None
    rss_after: int | None = None
    held_bytes: int | None = None

    def summary(self) -> str:
        rows = [
            "| measured on the example input | eager | memsave | ratio |",
            "|---|---|---|---|",
            f"| peak live tensor bytes during the call | {fmt_bytes(self.eager.peak_bytes)} "
            f"| {fmt_bytes(self.compiled.peak_bytes)} | {_ratio(self.compiled.peak_bytes, self.eager.peak_bytes)} |",
        ]
        if self.train:
            rows.append(
                f"| bytes saved for backward | {fmt_bytes(self.eager.saved_bytes)} "
                f"| {fmt_bytes(self.compiled.saved_bytes)} | {_ratio(self.compiled.saved_bytes, self.eager.saved_bytes)} |"
            )
        rows.append(
            f"| weight bytes held (measured storages) | {fmt_bytes(self.weight_bytes)} "
            f"| {fmt_bytes(self.compiled_weight_bytes)} | {_ratio(self.compiled_weight_bytes, self.weight_bytes)} |"
        )
        if self.rss_before is not None and self.rss_after is not None:
            delta = self.rss_after - self.rss_before
            rows.append(
                f"| process RSS, before compiling → after compile + call (measured; includes code the compile "
                f"loads, tens of MiB on a process's first compile) | {fmt_bytes(self.rss_before)} "
                f"| {fmt_bytes(self.rss_after)} ({'+' if delta >= 0 else '−'}{fmt_bytes(abs(delta))}) "
                f"| {_ratio(self.rss_after, self.rss_before)} |"
            )
        if self.held_bytes is not None:
            rows.append(
                f"| weight bytes memsave holds (its own count, WeightCache.held_bytes) | {fmt_bytes(self.weight_bytes)} "
                f"| {fmt_bytes(self.held_bytes)} | {_ratio(self.held_bytes, self.weight_bytes)} |"
            )
        errors = f"output error vs eager: {self.output_error.short()} (max abs {self.output_error.max_abs:.2e}, cosine {self.output_error.cosine:.6f})"
        if self.grad_error is not None:
            errors += f"; gradient error vs eager: {self.grad_error.short()} (max abs {self.grad_error.max_abs:.2e})"
        return "\n".join(rows + ["", errors])

    def __str__(self) -> str:
        families = ", ".join(f"{n}={getattr(self.config, n)!r}" for n in self.config.enabled_families()) or "none"
        parts = [f"memsave recipe: {families}; codegen={self.config.codegen}", ""]
        for graph in self.graphs:
            parts += [graph.table(), ""]
            parts += [recompute_view(r.details) + "\n" for r in graph.records if r.name == "recompute"]
        parts += [self.summary()] + [f"note: {n}" for n in self.notes]
        return "\n".join(parts)


SHOWN_TENSORS = 12  # the largest saved tensors listed by name; the rest are counted


def recompute_view(details: dict[str, Any]) -> str:
    """The training view of one joint graph: every policy side by side (when compared), what
    the chosen policy saves for backward (largest first) and what it recomputes."""
    lines = []
    rows = details.get("policies")
    if rows:
        lines += [
            "| recompute policy | saved for backward | activations | recomputed ops | extra FLOPs (% of forward) | est. peak fw+bw |",
            "|---|---|---|---|---|---|",
        ]
        for row in rows:
            share = row["extra_flops"] / row["forward_flops"] if row["forward_flops"] else 0.0
            lines.append(
                f"| {row['policy']} | {fmt_bytes(row['saved_bytes'])} | {row['saved_tensors']} | {row['recomputed_ops']} "
                f"| {row['extra_flops'] / 1e9:.3g} G ({share:.0%}) | {fmt_bytes(row['peak_activation_bytes'])} |"
            )
        lines.append("")
    saved = sorted(details.get("saved", []), key=lambda item: -item[2])
    inputs = details.get("saved_inputs", [])
    lines.append(
        f"saved for backward by policy {details.get('policy')}: {len(saved)} activations ({fmt_bytes(details.get('saved_bytes'))}), "
        f"besides {len(inputs)} graph inputs (weights, the batch) alive anyway:"
    )
    lines += [f"  {name:32s} {desc:28s} {fmt_bytes(nbytes)}" for name, desc, nbytes in saved[:SHOWN_TENSORS]]
    if len(saved) > SHOWN_TENSORS:
        rest = sum(nbytes for _, _, nbytes in saved[SHOWN_TENSORS:])
        lines.append(f"  … {len(saved) - SHOWN_TENSORS} more ({fmt_bytes(rest)})")
    recomputed = details.get("recomputed", [])
    shown = ", ".join(recomputed[:SHOWN_TENSORS]) + (f", … ({len(recomputed)} in all)" if len(recomputed) > SHOWN_TENSORS else "")
    lines.append(f"recomputed in backward: {len(recomputed)} ops ({details.get('extra_flops', 0) / 1e9:.3g} GFLOP)"
                 + (f": {shown}" if recomputed else ""))
    return "\n".join(lines)


def _ratio(a: int | None, b: int | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def explain(model: torch.nn.Module, *example_inputs: Any, train: bool = False, **options: Any) -> Explanation:
    """Compile `model` with memsave (options as for torch.compile) and report on every pass.

    Debug mode is on (invariants checked, per-pass error measured). With train=True the
    measured step is forward + backward of the output's sum (or of the loss, when the model
    returns a scalar); gradients are compared with eager's.
    """
    config = Config.from_options({**options, "debug": True})
    weights = list(model.parameters()) + list(model.buffers())
    weight_bytes_before = live_tensor_bytes(weights)
    # Eager first: a compile that releases full-precision weights makes eager use impossible.
    eager_out, eager_stats, eager_grads = _measured_step(model, example_inputs, train)
    torch._dynamo.reset()  # a fresh cache: explain reports this model's graphs, not old ones
    rss_before = rss_bytes()
    compiled = torch.compile(model, backend=config)
    token = COMPARING_POLICIES.set(train)
    try:
        with collect() as graphs:
            _step(compiled, example_inputs, train)  # compiles; the measured call below is warm
    finally:
        COMPARING_POLICIES.reset(token)
    if not graphs:
        raise RuntimeError("memsave.explain: Dynamo produced no graph for this model (is its forward traceable?)")
    out, compiled_stats, grads = _measured_step(compiled, example_inputs, train)
    rss_after = rss_bytes()
    constants = [t for g in graphs for t in g.constant_tensors()]
    explanation = Explanation(
        graphs=list(graphs),
        config=config,
        train=train,
        weight_bytes=weight_bytes_before,
        compiled_weight_bytes=live_tensor_bytes(weights + constants),
        eager=eager_stats,
        compiled=compiled_stats,
        output_error=ErrorStats.between(_tensors(eager_out), _tensors(out)),
        grad_error=ErrorStats.between(eager_grads, grads) if train else None,
        rss_before=rss_before,
        rss_after=rss_after,
        held_bytes=WEIGHTS.held_bytes(weights),
    )
    if any(r.name == "release_weights" and r.changed for g in graphs for r in g.records):
        explanation.notes.append(
            "debug mode (explain always uses it) measures each pass's error on the real weights, so the "
            "originals were released after the last pass, not one by one as they were compressed: the RSS "
            "after compiling is the same, the peak while compiling is higher than without debug"
        )
    return explanation


def _step(fn, inputs, train: bool):
    if not train:
        with torch.no_grad():
            return fn(*inputs)
    out = fn(*inputs)
    if isinstance(out, torch.Tensor) and out.dim() == 0:
        loss = out
    else:
        loss = sum(t.float().sum() for t in _tensors(out, detach=False) if t.requires_grad)
    loss.backward()
    return out


def _measured_step(fn, inputs, train: bool):
    module = getattr(fn, "_orig_mod", fn)
    params = [p for p in module.parameters() if p.requires_grad] if train else []
    for p in params:
        p.grad = None
    weights = list(module.parameters()) + list(module.buffers())
    with MemoryTracker(None, track_saved=train, exclude=weights) as tracker:
        out = _step(fn, inputs, train)
    grads = [p.grad.detach().clone() for p in params if p.grad is not None]
    for p in params:
        p.grad = None
    return out, tracker.stats, grads


def _tensors(value, detach: bool = True) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach() if detach else value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v, detach)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v, detach)]
    return []
