"""`memsave demo --nproc N`: the built-in decoder as an N-stage pipeline on N local ranks.

The parent checks the plan first (memsave.distributed.validate: bad options fail before any
rank starts), computes the single-process output as the reference, and launches N ranks (gloo
on CPUs). For models that can be built on the meta device (the built-in decoders) the parent
writes the weights to a file and each rank builds the model without weights
(`defer_weights`) and reads only its own stage's from that file; other models are built whole
on every rank and the other stages' weights freed. Each rank compiles with
`options={"pipeline": ...}`, runs one pipelined forward and reports its stage, the bytes it
holds and the output's difference from the reference.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import torch


def pipeline_options(nproc: int, options: dict[str, Any]) -> dict[str, Any]:
    """The demo's default pipeline (1F1B, one micro-batch per stage) under the user's options."""
    options = dict(options)
    pipe = options.get("pipeline") or {}
    if isinstance(pipe, str):
        pipe = {"schedule": pipe}
    options["pipeline"] = {"schedule": "1f1b", "microbatches": nproc, **pipe}
    options.setdefault("codegen", "fx")  # Inductor's C++ compile per stage would dominate a demo
    return options


def demo_inputs(model: torch.nn.Module, model_name: str, batch: int) -> tuple:
    from memsave.models import get_model

    (ids, *rest) = get_model(model_name).example_inputs(model)
    return (ids.repeat(batch // ids.shape[0] or 1, *[1] * (ids.dim() - 1))[:batch], *rest)


def demo_rank(rank: int, world: int, model_name: str, options: dict[str, Any], batch: int,
              expected: torch.Tensor) -> dict[str, Any]:
    import memsave.distributed as md
    from memsave.models import get_model

    spec = get_model(model_name)
    torch.manual_seed(0)
    deferred = options["pipeline"].get("weights") is not None
    model = md.defer_weights(spec.build_meta()) if deferred else spec.build()
    inputs = demo_inputs(model, model_name, batch)  # deferred weights are CPU tensors: inputs on the CPU
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    compiled = torch.compile(model, backend="memsave", dynamic=True, fullgraph=True, options=options)
    start = time.perf_counter()
    with torch.no_grad():
        got = compiled(*inputs)  # first call: split, read or keep this rank's stage, compile it, run
    first = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        compiled(*inputs)
    runtime = md.last_runtime()
    return {
        "rank": rank,
        "stage": runtime.stage_index,
        "kept_bytes": runtime.kept_bytes,
        "read_bytes": runtime.materialized_bytes,
        "total_bytes": total,
        "max_abs_diff": (got - expected).abs().max().item(),
        "first_call_s": first,
        "step_s": time.perf_counter() - start,
        "plan": runtime.describe(),
    }


def run_demo(model_name: str, nproc: int, options: dict[str, Any]) -> int:
    import memsave.distributed as md
    from memsave.distributed.validate import check_pipeline
    from memsave.models import get_model
    from memsave.report import fmt_bytes

    options = pipeline_options(nproc, options)
    spec = get_model(model_name)
    model = spec.build()
    batch = 2 * (options["pipeline"].get("microbatches") or nproc)
    plan = check_pipeline(model, demo_inputs(model, model_name, batch), options, nproc)  # fails here, not in N ranks
    print(f"memsave demo: {model_name} on {nproc} ranks (gloo), options {options}, batch {batch}\n")
    print(plan.describe() + "\n")
    with torch.no_grad():
        expected = model(*demo_inputs(model, model_name, batch))
    with tempfile.TemporaryDirectory() as tmp:
        if spec.build_meta is not None and "weights" not in options["pipeline"]:
            # Ranks build the model without weights and read their own stage from this file.
            path = os.path.join(tmp, "weights.pt")
            md.save_weights(model, path)
            options = {**options, "pipeline": {**options["pipeline"], "weights": path}}
            print(f"each rank builds {model_name} on the meta device and reads only its stage from {path}\n")
        del model
        start = time.perf_counter()
        results = md.launch(demo_rank, nproc, (model_name, options, batch, expected), timeout_s=600)
    print(f"{'rank':>4s} {'stage':>5s} {'weights held':>13s} {'of total':>9s} {'read from file':>15s} "
          f"{'max |diff| vs 1 process':>24s} {'1st call':>9s} {'step':>8s}")
    for r in results:
        print(f"{r['rank']:>4d} {r['stage']:>5d} {fmt_bytes(r['kept_bytes']):>13s} {r['kept_bytes'] / r['total_bytes']:>9.1%} "
              f"{fmt_bytes(r['read_bytes']):>15s} {r['max_abs_diff']:>24.2e} {r['first_call_s']:>8.1f}s {r['step_s']:>7.3f}s")
    print(f"\n(launched, compiled and ran in {time.perf_counter() - start:.1f} s)")
    return 0
