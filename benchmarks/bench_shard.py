"""Pipeline sharding on CPU ranks (gloo): per-rank memory for 1, 2 and 4 ranks, and throughput and
bubble of GPipe and 1F1B against the number of micro-batches.

Model: the built-in decoder (`build_decoder(size, n_layers=L, vocab_size=V)`), fp32, inputs
batch B x seq T. Each config is a fresh process (benchmarks/harness.py) that launches its ranks
with `memsave.distributed.launch` (one torch thread per rank).

Memory configs `ranks-N` (inference). N=1 is the plain eager model built as usual (the baseline).
For N>1 every rank builds the model on the meta device, gives it storage-less weights
(`memsave.distributed.defer_weights`) and reads only its own stage's weights from a
`save_weights` file (options["pipeline"]["weights"], memory-mapped): no rank ever holds the
whole model.
  weights_held_mib   the most parameter bytes any rank holds after compiling (measured: storage
                     bytes of the model's parameters on that rank);
  weights_share      that, over the model's total parameter bytes;
  goal_share         (1/N) x 1.05 + the share deliberately replicated (buffers: RoPE tables);
  peak_rss_run_mib   the highest per-rank peak RSS during `steps` pipelined forwards, after the
                     first call (VmHWM reset after compile);
  peak_rss_setup_mib the highest per-rank peak RSS from process start through the first call
                     (building, reading the stage's weights, compiling, one forward; the file's
                     pages this rank read count while it is mapped);
  est_stage_mib      the planner's estimate for the largest stage (weights + activations + sends);
  infer_ms           median wall time of one batch forward.
Schedule configs `<gpipe|1f1b>-mb<m>` (training step on `sched_ranks` ranks, loss on the last stage;
model `sched_layers` layers of the same widths, `sched_batch` sequences):
  step_ms, samples_per_s;
  bubble             1 - busy / (ranks x wall): busy = time inside the stages' forward_one_chunk and
                     backward_one_chunk, summed over ranks (communication waits count as bubble);
  bubble_theory      (S - 1) / (m + S - 1), the idle share of an ideal schedule with equal stages.
The schedules run on 2 ranks by default: on a 2-core machine more ranks than cores would count
waiting for a core as busy time.

    python benchmarks/bench_shard.py --quick     # small run (a few minutes) -> docs/results/shard_quick.*
    python benchmarks/bench_shard.py             # full run -> docs/results/shard.*
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Benchmark, current_rss_bytes, main, peak_rss_bytes, reset_peak_rss  # noqa: E402

MiB = 1024 * 1024
# The memory run's model (decoder "medium" widths, 20 layers, vocab 2048: ~129M parameters, ~490
# MiB fp32) is big enough that weights, not the ~400 MiB of torch + Dynamo every process carries,
# decide the per-rank RSS; many equal layers and a small vocabulary let 4 stages come within 5%
# of 1/4. The schedule runs use 4 layers of the same widths: stage compute (not gloo latency)
# must dominate a micro-batch for the bubble to mean anything.
PARAMS = {"size": "medium", "n_layers": 20, "vocab": 2048, "batch": 8, "seq": 128, "steps": 3,
          "sched_ranks": 2, "sched_layers": 4, "sched_batch": 16}
QUICK = {"size": "small", "n_layers": 4, "vocab": 1024, "batch": 16, "seq": 32, "steps": 3,
         "sched_ranks": 2, "sched_layers": 4, "sched_batch": 16}
MEMORY_CONFIGS = ["ranks-1", "ranks-2", "ranks-4"]
SCHEDULE_CONFIGS = [f"{s}-mb{m}" for s in ("gpipe", "1f1b") for m in (2, 4, 8, 16)]
FAST_OPTIONS = {"codegen": "fx", "recompute": "none"}


def _model(params, n_layers=None, device="cpu"):
    from memsave.models import build_decoder

    return build_decoder(params.get("size", "small"), n_layers=n_layers or params["n_layers"],
                         vocab_size=params["vocab"], device=device)


def _inputs(params, batch):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, params["vocab"], (batch, params["seq"]), generator=g)
    return ids, torch.randint(0, params["vocab"], (batch, params["seq"]), generator=g)


def memory_rank(rank: int, world: int, params: dict, weights_path: str | None) -> dict:
    import torch

    import memsave.distributed as md

    ids, _ = _inputs(params, params["batch"])
    estimate = 0
    if world == 1:
        model = run = _model(params)
    else:
        model = md.defer_weights(_model(params, device="meta"))
        options = {"pipeline": {"schedule": "gpipe", "microbatches": world, "weights": weights_path},
                   **FAST_OPTIONS}
        run = torch.compile(model, backend="memsave", dynamic=True, fullgraph=True, options=options)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    with torch.no_grad():
        run(ids)  # compiles; reads this rank's stage's weights
        if world > 1:
            runtime = md.last_runtime()
            estimate = max(r["estimate_bytes"] for r in runtime.plan.rows)
        setup_peak = peak_rss_bytes()
        reset_peak_rss()
        times = []
        for _ in range(params["steps"]):
            start = time.perf_counter()
            run(ids)
            times.append(time.perf_counter() - start)
    held = sum(p.untyped_storage().nbytes() for p in model.parameters())
    return {"held": held, "total": total, "buffers": buffers, "run_peak": peak_rss_bytes(),
            "setup_peak": setup_peak, "rss": current_rss_bytes(), "estimate": estimate,
            "infer_ms": statistics.median(times) * 1e3}


def schedule_rank(rank: int, world: int, params: dict, schedule: str, microbatches: int) -> dict:
    import torch
    import torch.nn.functional as F

    import memsave.distributed as md

    def loss_fn(logits, target):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    model = _model(params, n_layers=params["sched_layers"]).train()
    ids, target = _inputs(params, params["sched_batch"])
    options = {"pipeline": {"schedule": schedule, "microbatches": microbatches}, **FAST_OPTIONS}
    compiled = torch.compile(model, backend="memsave", dynamic=True, fullgraph=True, options=options)
    md.train_step(compiled, ids, target=target, loss_fn=loss_fn)  # compiles, builds the stage
    runtime = md.last_runtime()
    busy = [0.0]
    for stage, _ in runtime._stages.values():
        for name in ("forward_one_chunk", "backward_one_chunk"):
            original = getattr(stage, name)

            def timed(*args, _original=original, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    busy[0] += time.perf_counter() - start

            setattr(stage, name, timed)
    walls, busies = [], []
    for _ in range(params["steps"]):
        busy[0] = 0.0
        torch.distributed.barrier()
        start = time.perf_counter()
        md.train_step(compiled, ids, target=target, loss_fn=loss_fn)
        torch.distributed.barrier()
        walls.append(time.perf_counter() - start)
        busies.append(busy[0])
        model.zero_grad(set_to_none=True)
    return {"wall": walls, "busy": busies}


def measure(config: str, params: dict) -> dict[str, float]:
    import memsave.distributed as md

    if config.startswith("ranks-"):
        world = int(config.split("-")[1])
        with tempfile.TemporaryDirectory() as tmp:
            weights_path = None
            if world > 1:  # the checkpoint the ranks read their stages from, written here once
                weights_path = os.path.join(tmp, "weights.pt")
                md.save_weights(_model(params), weights_path)
            ranks = md.launch(memory_rank, world, (params, weights_path), timeout_s=1200, pg_timeout_s=600)
        held = max(r["held"] for r in ranks)
        total = ranks[0]["total"]
        return {
            "weights_held_mib": held / MiB,
            "weights_share": held / total,
            "goal_share": 1.05 / world + (ranks[0]["buffers"] / total if world > 1 else 0.0),
            "peak_rss_run_mib": max(r["run_peak"] for r in ranks) / MiB,
            "peak_rss_setup_mib": max(r["setup_peak"] for r in ranks) / MiB,
            "est_stage_mib": max(r["estimate"] for r in ranks) / MiB,
            "infer_ms": statistics.median(r["infer_ms"] for r in ranks),
        }
    schedule, mb = config.split("-mb")
    world, microbatches = params["sched_ranks"], int(mb)
    ranks = md.launch(schedule_rank, world, (params, schedule, microbatches), timeout_s=1200, pg_timeout_s=600)
    steps = len(ranks[0]["wall"])
    walls = [max(r["wall"][i] for r in ranks) for i in range(steps)]
    bubbles = [1 - sum(r["busy"][i] for r in ranks) / (world * walls[i]) for i in range(steps)]
    wall = statistics.median(walls)
    return {
        "step_ms": wall * 1e3,
        "samples_per_s": params["sched_batch"] / wall,
        "bubble": statistics.median(bubbles),
        "bubble_theory": (world - 1) / (microbatches + world - 1),
    }


BENCH = Benchmark(
    name="shard",
    title="Pipeline sharding on CPU ranks (gloo): per-rank memory, and GPipe vs 1F1B throughput and bubble",
    configs=MEMORY_CONFIGS + SCHEDULE_CONFIGS,
    baseline="ranks-1",
    measure=measure,
    metrics={
        "weights_held_mib": "lower", "weights_share": "lower", "goal_share": "lower",
        "peak_rss_run_mib": "lower", "peak_rss_setup_mib": "lower", "est_stage_mib": "lower",
        "infer_ms": "lower", "step_ms": "lower", "samples_per_s": "higher", "bubble": "lower",
        "bubble_theory": "lower",
    },
    params=PARAMS,
    quick=QUICK,
    repeats=2,
    plot=["weights_held_mib", "peak_rss_run_mib", "samples_per_s", "bubble"],
    timeout_s=1500,
)

if __name__ == "__main__":
    main(BENCH)
