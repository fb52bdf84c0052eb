"""What the pipeline did, pass by pass: records, tables, and where reports are collected.

Every compiled graph gets a GraphReport: one PassRecord per pass that ran, in order. Recent
reports are kept (bounded) so a user can look at them after `torch.compile`; `collect()`
gathers the reports made inside a block (what `memsave.explain` uses).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from memsave.memory.process import rss_bytes


@dataclass(frozen=True)
class ErrorStats:
    """Error of a graph's outputs against the uncompressed graph's, on the example input."""

    sqnr_db: float  # 10·log10(‖ref‖² / ‖out − ref‖²); inf when identical
    max_abs: float
    cosine: float

    @staticmethod
    def between(reference: list[torch.Tensor], output: list[torch.Tensor]) -> ErrorStats:
        ref = torch.cat([t.detach().double().flatten() for t in reference]) if reference else torch.zeros(1)
        out = torch.cat([t.detach().double().flatten() for t in output]) if output else torch.zeros(1)
        sqnr = sqnr_db(ref, out)
        cos = torch.nn.functional.cosine_similarity(ref, out, dim=0).item() if ref.numel() else 1.0
        max_abs = (out - ref).abs().max().item() if ref.numel() else 0.0
        return ErrorStats(sqnr, max_abs, cos)

    def short(self) -> str:
        if math.isinf(self.sqnr_db) and self.sqnr_db > 0:
            return "exact"
        return f"{self.sqnr_db:.1f} dB"


@dataclass(frozen=True)
class PassRecord:
    name: str
    changed: bool
    nodes_before: int
    nodes_after: int
    nodes_added: int
    nodes_removed: int
    weight_bytes_before: int
    weight_bytes_after: int
    peak_activation_bytes_before: int
    peak_activation_bytes_after: int
    seconds: float
    error: ErrorStats | None = None  # measured in debug mode when real inputs are known
    notes: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def nodes_changed(self) -> int:
        return self.nodes_added + self.nodes_removed


@dataclass
class GraphReport:
    graph_id: int
    stage: str  # inference | joint | forward | backward
    records: list[PassRecord] = field(default_factory=list)
    codegen: str = ""
    notes: list[str] = field(default_factory=list)
    weights: dict[str, str] = field(default_factory=dict)  # placeholder -> the model's name for it
    # Weak references to the constants (packed weights, scales) the compiled graph holds, so
    # their bytes can be measured without the report keeping them alive.
    constants: list = field(default_factory=list, repr=False)
    # The process as the OS sees it (memory/process.py): RSS when the graph reached memsave
    # (the report is made then), RSS after lowering and giving freed memory back (lower.py),
    # and memsave's own count of what it holds for the graph's weights (WeightCache.held_bytes:
    # originals left + compressed forms), set when the passes finish.
    rss_before: int | None = field(default_factory=rss_bytes)
    rss_after: int | None = None
    held_bytes: int | None = None

    def constant_tensors(self) -> list[torch.Tensor]:
        return [t for t in (ref() for ref in self.constants) if t is not None]

    @property
    def title(self) -> str:
        return f"graph {self.graph_id} ({self.stage})"

    def table(self) -> str:
        """The per-pass table, as GitHub markdown (readable as plain text too)."""
        head = "| pass | changed | nodes ± | weight bytes | est. peak activation bytes | error vs. original | time |"
        rule = "|---|---|---|---|---|---|---|"
        rows = [f"**{self.title}**", "", head, rule]
        for r in self.records:
            rows.append(
                f"| {r.name} | {'yes' if r.changed else 'no'} | +{r.nodes_added}/−{r.nodes_removed} "
                f"| {fmt_bytes(r.weight_bytes_before)} → {fmt_bytes(r.weight_bytes_after)} "
                f"| {fmt_bytes(r.peak_activation_bytes_before)} → {fmt_bytes(r.peak_activation_bytes_after)} "
                f"| {r.error.short() if r.error else 'n/a'} | {r.seconds * 1e3:.0f} ms |"
            )
        notes = [f"- {r.name}: {n}" for r in self.records for n in r.notes] + [f"- {n}" for n in self.notes]
        memory = self.process_line()
        if memory:
            notes.append(f"- {memory}")
        if self.weights:
            names = list(self.weights.values())
            shown = ", ".join(names[:4]) + (f", … ({len(names)} in all)" if len(names) > 4 else "")
            notes.append(f"- weights read: {shown}")
        return "\n".join(rows + ([""] + notes if notes else []))

    def process_line(self) -> str:
        """Measured process RSS around this compile beside what memsave holds, in one line."""
        if self.rss_before is None or self.rss_after is None:
            return "" if self.held_bytes is None else f"memsave holds {fmt_bytes(self.held_bytes)} of weights for this graph"
        delta = self.rss_after - self.rss_before
        line = (
            f"process RSS {fmt_bytes(self.rss_before)} before the passes → {fmt_bytes(self.rss_after)} after "
            f"lowering ({'+' if delta >= 0 else '−'}{fmt_bytes(abs(delta))})"
        )
        if self.held_bytes is not None:
            line += f"; memsave holds {fmt_bytes(self.held_bytes)} of weights for this graph (originals left + compressed forms)"
        return line


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10·log10(‖reference‖² / ‖approx − reference‖²); inf when identical."""
    noise = (approx - reference).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    return math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


# Recent reports, newest last; bounded so a long-running process does not grow without end.
_RECENT: deque[GraphReport] = deque(maxlen=256)
_COLLECTORS: contextvars.ContextVar[tuple[list[GraphReport], ...]] = contextvars.ContextVar(
    "memsave_report_collectors", default=()
)


def publish(report: GraphReport) -> None:
    _RECENT.append(report)
    for sink in _COLLECTORS.get():
        sink.append(report)


def recent_reports() -> list[GraphReport]:
    return list(_RECENT)


@contextlib.contextmanager
def collect() -> Iterator[list[GraphReport]]:
    """Collect the GraphReports of every graph compiled inside the block."""
    sink: list[GraphReport] = []
    token = _COLLECTORS.set(_COLLECTORS.get() + (sink,))
    try:
        yield sink
    finally:
        _COLLECTORS.reset(token)
