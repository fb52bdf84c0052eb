"""Tensor parallelism: per-rank parameter bytes and peak memory for 1, 2 and 4 ranks.

The built-in decoder (`memsave.models.build_decoder`, size `small` by default: hidden 256,
8 query / 4 key-value heads, 4 layers, vocabulary 4096) compiled with
`torch.compile(model, backend="memsave", options={"tensor_parallel": "auto"})` on N gloo ranks
on this CPU (`tp1` is the same model compiled without tensor parallelism; `-vocab`: with
`{"vocab_parallel": True}`, the embedding and LM head split too). Each config is a
fresh process (benchmarks/harness.py) that spawns its N ranks; every rank runs one forward
(no grad) and one training step, and reports:
  held_param_mib     parameter bytes the rank holds, measured from the storages
                     (`memsave.tp_parameter_bytes`: its shards + the replicated weights);
  sharded_mib        of which shards;  replicated_mib  weights kept whole on every rank
                     (embedding, norms, LM head: the LM head's output is a graph output, which
                     the pass splits only with vocab_parallel; norms always stay whole);
  shard_ratio        sharded bytes × N / the split weights' full bytes (goal: ≤ 1.05; 1.0 is
                     an exact 1/N split);
  fwd_peak_mib       peak live CPU-allocator bytes during a forward (`memsave.MemoryTracker`);
  step_peak_mib      the same for forward + backward of one training step.
The table shows the maximum over ranks (they hold the same amounts).

    python benchmarks/bench_tensor_parallel.py --repeats 1   # decoder "small": docs/results/tensor_parallel.md
    python benchmarks/bench_tensor_parallel.py --quick    # decoder "tiny" (n_heads 8, kv 4), 1 repeat
"""

from __future__ import annotations

import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Benchmark, MiB, main  # noqa: E402

# config -> (ranks, vocab_parallel)
CONFIGS = {"tp1": (1, False), "tp2": (2, False), "tp4": (4, False), "tp2-vocab": (2, True), "tp4-vocab": (4, True)}
PARAMS = {"size": "small", "batch": 1, "seq": 64, "codegen": "fx"}


def _rank(rank: int, world: int, vocab_parallel: bool, port: int, params: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    import memsave
    from memsave.models.decoder import build_decoder, decoder_inputs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        overrides = {"n_heads": 8, "n_kv_heads": 4} if params["size"] == "tiny" else {}
        model = build_decoder(params["size"], **overrides)
        ids, labels = decoder_inputs(model, batch=params["batch"], seq=params["seq"], labels=True)
        options = {"codegen": params["codegen"], "recompute": "none"}
        if world > 1:
            options["tensor_parallel"] = {"vocab_parallel": vocab_parallel}
        compiled = torch.compile(model, backend="memsave", options=options)
        with torch.no_grad():
            compiled(ids)  # compiles (and splits the weights)
            with memsave.MemoryTracker("cpu") as fwd:
                compiled(ids)
        model.train()
        compiled(ids, labels).backward()  # compiles the training graphs
        for p in memsave.sharded_parameters(model):
            p.grad = None
        with memsave.MemoryTracker("cpu") as step:
            compiled(ids, labels).backward()
        b = memsave.tp_parameter_bytes(model)
        result = {
            "held_param_mib": b["held"] / MiB,
            "sharded_mib": b["sharded"] / MiB,
            "replicated_mib": b["replicated"] / MiB,
            "shard_ratio": b["sharded"] * world / b["full_of_sharded"] if b["full_of_sharded"] else 1.0,
            "fwd_peak_mib": fwd.stats.peak_bytes / MiB,
            "step_peak_mib": step.stats.peak_bytes / MiB,
        }
        torch.save(result, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def measure(config: str, params: dict) -> dict[str, float]:
    import socket

    import torch
    import torch.multiprocessing as mp

    if params.get("quick"):
        params = {**params, "size": "tiny", "seq": 16}
    world, vocab_parallel = CONFIGS[config]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world, vocab_parallel, port, params, out), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(out, f"{r}.pt")) for r in range(world)]
    return {key: max(r[key] for r in ranks) for key in ranks[0]}


BENCH = Benchmark(
    name="tensor_parallel",
    title="Tensor parallelism: per-rank parameter bytes and peak memory (decoder, gloo, CPU)",
    configs=list(CONFIGS),
    baseline="tp1",
    measure=measure,
    metrics={"held_param_mib": "lower", "sharded_mib": "lower", "replicated_mib": "lower",
             "shard_ratio": "lower", "fwd_peak_mib": "lower", "step_peak_mib": "lower"},
    params=PARAMS,
    repeats=3,
    plot=["held_param_mib", "step_peak_mib"],
)

if __name__ == "__main__":
    main(BENCH)
