"""Memory and time of the built-in decoder: eager vs Inductor vs memsave (default recipe).

One fresh process per configuration and repeat. Each process measures, on warm (already
compiled) calls:
  - an inference forward (no_grad): peak RSS growth, the tracker's peak of live tensor bytes,
    and the median time;
  - a training step (forward + loss + backward): the same, plus the activation bytes saved for
    backward (the model's own parameters, which autograd also saves, are not counted).
For memsave it also records the static estimator's prediction of the inference peak, so the
estimate stands beside the measurement.

    python benchmarks/bench_foundation.py                  # decoder-medium, batch 1 x seq 256
    python benchmarks/bench_foundation.py --quick          # decoder-small, one repeat
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Benchmark, MiB, current_rss_bytes, main, peak_rss_bytes, reset_peak_rss, time_call


def _compile(config: str, model):
    import torch

    if config == "eager":
        return model
    if config == "inductor":
        return torch.compile(model)
    if config == "memsave":
        return torch.compile(model, backend="memsave")
    raise ValueError(f"unknown config {config!r}")


def _rss_growth(fn) -> float:
    reset_peak_rss()
    before = current_rss_bytes()
    fn()
    return (peak_rss_bytes() - before) / MiB


def measure(config: str, params: dict) -> dict[str, float]:
    import torch

    import memsave
    from memsave.memory.track import measure_peak
    from memsave.models import build_decoder, decoder_inputs

    size = "small" if params.get("quick") else params["size"]
    model = build_decoder(size)
    ids, labels = decoder_inputs(model, batch=params["batch"], seq=params["seq"], labels=True)
    step = _compile(config, model)
    iters = 2 if params.get("quick") else params["iters"]
    out: dict[str, float] = {}

    # Inference.
    def infer():
        with torch.no_grad():
            return step(ids)

    with memsave.collect() as reports:
        infer()  # compile outside every measurement
    out["infer_rss_growth_mib"] = _rss_growth(infer)
    _, stats = measure_peak(infer)
    out["infer_tracked_peak_mib"] = stats.peak_bytes / MiB
    if reports:
        out["infer_estimated_peak_mib"] = sum(r.records[-1].peak_activation_bytes_after for r in reports) / MiB
    out["infer_ms"] = statistics.median(time_call(infer, warmup=1, iters=iters))

    # Training step.
    model.train()

    def train_step():
        loss = step(ids, labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    train_step()  # compile forward and backward
    out["train_rss_growth_mib"] = _rss_growth(train_step)
    _, stats = measure_peak(train_step, track_saved=True, exclude=list(model.parameters()))
    out["train_tracked_peak_mib"] = stats.peak_bytes / MiB
    out["train_saved_mib"] = stats.saved_bytes / MiB
    out["train_ms"] = statistics.median(time_call(train_step, warmup=1, iters=iters))
    return out


BENCH = Benchmark(
    name="foundation",
    title="Built-in decoder (Llama-style): eager vs Inductor vs memsave default recipe, inference and training step",
    configs=["eager", "inductor", "memsave"],
    baseline="eager",
    measure=measure,
    metrics={
        "infer_tracked_peak_mib": "lower",
        "infer_estimated_peak_mib": "lower",  # memsave's static estimate, beside the measurement
        "infer_rss_growth_mib": "lower",
        "infer_ms": "lower",
        "train_tracked_peak_mib": "lower",
        "train_saved_mib": "lower",
        "train_rss_growth_mib": "lower",
        "train_ms": "lower",
    },
    params={"size": "medium", "batch": 1, "seq": 256, "iters": 5},
    repeats=3,
)

if __name__ == "__main__":
    main(BENCH)
