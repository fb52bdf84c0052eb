"""Pass-by-pass debug output: graph code after every pass, the per-pass table, tlparse artifacts.

With `debug_dir` set (option or MEMSAVE_DEBUG_DIR), each compiled graph gets a folder

    <debug_dir>/graph_003_forward/
        00_input.py          the ATen graph as memsave received it
        01_cleanup.py        the graph after each pass, numbered in pipeline order
        ...
        report.md            the per-pass table

The same graphs and table go to TORCH_TRACE as structured artifacts (one entry per pass in
tlparse), whether or not debug_dir is set; trace_structured costs nothing when tracing is off.
"""

from __future__ import annotations

import os
import re

import torch.fx as fx
from torch._logging import trace_structured

from memsave.graph.meta import PROVENANCE
from memsave.report import GraphReport


class DebugDump:
    def __init__(self, debug_dir: str | None, graph_id: int, stage: str):
        self.graph_id, self.stage = graph_id, stage
        self.folder = None
        if debug_dir:
            self.folder = os.path.join(debug_dir, f"graph_{graph_id:03d}_{stage}")
            os.makedirs(self.folder, exist_ok=True)
        self._count = 0

    def graph(self, label: str, gm: fx.GraphModule) -> None:
        index = self._count
        self._count += 1
        name = f"memsave_graph{self.graph_id}_{self.stage}_{index:02d}_{_slug(label)}"
        trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": name, "encoding": "string"},
            payload_fn=lambda: _readable(gm),
        )
        if self.folder:
            with open(os.path.join(self.folder, f"{index:02d}_{_slug(label)}.py"), "w") as f:
                f.write(f"# memsave graph {self.graph_id} ({self.stage}) after: {label}\n")
                f.write(_readable(gm))

    def report(self, report: GraphReport) -> None:
        table = report.table()
        trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": f"memsave_graph{self.graph_id}_{self.stage}_report", "encoding": "string"},
            payload_fn=lambda: table,
        )
        if self.folder:
            with open(os.path.join(self.folder, "report.md"), "w") as f:
                f.write(table + "\n")


def _readable(gm: fx.GraphModule) -> str:
    # Shapes, strides and provenance on every line make the dump answer "what made this?".
    return gm.print_readable(
        print_output=False, include_stride=True, include_device=True, additional_meta=[PROVENANCE]
    )


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "pass"
