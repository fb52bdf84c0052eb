"""Sequence chunking: peak memory of the LM-head loss, unchunked vs chunked, against sequence length.

Model: the built-in decoder (`memsave.models.build_decoder`) with a 32,000-token vocabulary,
fp32, batch 1, on the CPU, in two uses:
  fwd     forward + loss under no_grad (labels given: the model returns the loss);
  train   one training step: forward + loss + backward, then zero_grad(set_to_none=True).
and the LM head alone (`head`: a linear h → V followed by the cross-entropy, on random hidden
states that require grad), swept over tokens at V = 32,000 and over the vocabulary at
4,096 tokens, to show the loss's own extra memory.

Variants (every one compiled with backend="memsave"):
  unchunked  options {"chunk": "attention"}: eager attention routed to SDPA (so the (T, T)
             scores do not dominate long sequences), the loss as the model wrote it;
  chunked    options {"chunk": "auto"}: the same plus the fused, chunked LM-head loss
             (default budget: 32 MiB of logits per chunk);
  eager-attn options {"chunk": "loss"} (fwd only): the chunked loss with the eager attention
             left as written, so that against `chunked` it shows what attention routing
             itself saves on the CPU.

Configs are `<use>.<variant>.<size>`, size `s<tokens>` or `v<vocab>` (head at 4,096 tokens).
Each run is a fresh process (benchmarks/harness.py). Measured after one compiling call:
  tracked_peak_mib  peak of live CPU-allocator bytes during one call (memsave.MemoryTracker:
                    profiler allocation events, Inductor's C++ buffers included); for train it
                    includes the parameter gradients (the same in both variants);
  extra_mib         (head only) tracked peak minus the bytes the step must return anyway
                    (grad of the hidden states, grad of the weight): the loss's own workspace;
  est_peak_mib      memsave's estimate for the same call: the inference graph's estimated
                    peak after all passes, or the joint graph's simulated forward+backward peak;
  step_ms           median wall time of a few calls (a 2-core shared machine: indicative only).

    python benchmarks/bench_chunk.py                  # all sizes (1k-16k tokens), codegen inductor -> docs/results/chunk.*
    python benchmarks/bench_chunk.py --quick          # 1k-4k tokens, codegen fx, 1 repeat -> docs/results/chunk_quick.*
    python benchmarks/bench_chunk.py --configs train.chunked.s8192,train.unchunked.s8192
    python benchmarks/bench_chunk.py --redraw docs/results/chunk_quick.json

A config that does not fit in memory fails and is shown as failed ("where it fits").
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Benchmark, MiB, estimated_peak_mib, main, render_markdown, time_call  # noqa: E402

NAME = "chunk"
TITLE = "Sequence chunking: peak memory of the LM-head loss, unchunked vs chunked (decoder, vocab 32k, CPU fp32)"
SEQS = (1024, 2048, 4096, 8192, 16384)
VOCABS = (8192, 32000, 131072)
HEAD_TOKENS = 4096
VARIANT_OPTIONS = {"unchunked": "attention", "chunked": "auto", "eager-attn": "loss"}
CONFIGS = (
    [f"{use}.{v}.s{s}" for use in ("fwd", "train") for s in SEQS for v in ("unchunked", "chunked")]
    + [f"fwd.eager-attn.s{s}" for s in (1024, 2048, 4096)]
    + [f"head.{v}.s{s}" for s in SEQS for v in ("unchunked", "chunked")]
    + [f"head.{v}.v{n}" for n in VOCABS for v in ("unchunked", "chunked")]
)
QUICK_CONFIGS = [c for c in CONFIGS if c.rsplit(".", 1)[1] in ("s1024", "s2048", "s4096", "v8192", "v32000", "v131072")]
BASELINE = "fwd.unchunked.s1024"
METRICS = {"tracked_peak_mib": "lower", "est_peak_mib": "lower", "extra_mib": "lower", "step_ms": "lower"}
PARAMS = {"hidden": 256, "layers": 2, "heads": 8, "kv_heads": 4, "intermediate": 688, "vocab": 32000,
          "codegen": "inductor", "iters": 2}
QUICK = {"codegen": "fx"}


def _sizes(params: dict) -> dict:
    return {**PARAMS, **QUICK, **params} if params.get("quick") else {**PARAMS, **params}


def _parse(config: str) -> tuple[str, str, int, int]:
    """(use, variant, tokens, vocab) of a config name."""
    use, variant, size = config.split(".")
    return use, variant, (int(size[1:]) if size[0] == "s" else HEAD_TOKENS), (int(size[1:]) if size[0] == "v" else 0)


class LMHeadLoss:
    """The LM head and its loss alone: cross_entropy(lm_head(h).view(-1, V), labels.view(-1))."""

    @staticmethod
    def build(hidden: int, vocab: int):
        import torch
        import torch.nn.functional as F

        class Head(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)

            def forward(self, h, labels):
                logits = self.lm_head(h)  # (B, T, V)
                return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)

        return Head()


def measure(config: str, params: dict) -> dict[str, float]:
    import torch

    import memsave
    from memsave.memory.track import MemoryTracker
    from memsave.models import build_decoder, decoder_inputs

    p = _sizes(params)
    use, variant, tokens, vocab = _parse(config)
    vocab = vocab or p["vocab"]
    torch.manual_seed(0)
    if use == "head":
        module = LMHeadLoss.build(p["hidden"], vocab)
        h = torch.randn(1, tokens, p["hidden"], requires_grad=True)
        labels = torch.randint(0, vocab, (1, tokens))
        inputs = (h, labels)
    else:
        module = build_decoder("small", n_layers=p["layers"], hidden=p["hidden"], n_heads=p["heads"],
                               n_kv_heads=p["kv_heads"], intermediate=p["intermediate"], vocab_size=vocab,
                               max_seq_len=max(SEQS))
        inputs = decoder_inputs(module, batch=1, seq=tokens, labels=True)
    training = use in ("train", "head")
    module.train(training)
    compiled = torch.compile(module, backend="memsave",
                             options={"chunk": VARIANT_OPTIONS[variant], "codegen": p["codegen"]})

    def call():
        if not training:
            with torch.no_grad():
                return compiled(*inputs)
        loss = compiled(*inputs)
        loss.backward()
        grads = [t.grad for t in (*module.parameters(), inputs[0]) if t.grad is not None]
        module.zero_grad(set_to_none=True)
        inputs[0].grad = None
        return loss.detach(), grads

    with memsave.collect() as reports:
        first = call()  # compiles
    out: dict[str, float] = {"loss": float(first[0] if training else first)}
    est = estimated_peak_mib(reports)
    if est is not None:
        out["est_peak_mib"] = est
    notes = [n for r in reports for rec in r.records if rec.name in ("chunk_capture", "chunk") for n in rec.notes]
    out["fused_losses"] = float(sum("fused" in n for n in notes))
    with MemoryTracker("cpu") as tracker:
        result = call()
    out["tracked_peak_mib"] = tracker.stats.peak_bytes / MiB
    if use == "head":
        returned = sum(g.numel() * g.element_size() for g in result[1])  # grad h (N, H) + grad W (V, H)
        out["returned_mib"] = returned / MiB
        out["extra_mib"] = out["tracked_peak_mib"] - out["returned_mib"]
        out["logits_mib"] = tokens * vocab * 4 / MiB
    del result
    out["step_ms"] = statistics.median(time_call(call, warmup=0, iters=p["iters"]))
    return out


# ----------------------------------------------------------------------------- report


def _value(results: dict, config: str, metric: str) -> float | None:
    values = [r["metrics"][metric] for r in results["runs"] if r["config"] == config and r["ok"] and metric in r["metrics"]]
    return statistics.median(values) if values else None


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def render_report(results: dict) -> str:
    p = _sizes(results["params"])
    lines = [
        f"# {TITLE}", "",
        f"Command: `{results['command']}`" + (" (quick run: reduced set of sizes, codegen fx)" if results["params"].get("quick") else ""), "",
        f"Decoder: {p['layers']} layers, hidden {p['hidden']}, {p['heads']} heads / {p['kv_heads']} kv heads, "
        f"SwiGLU {p['intermediate']}, vocab {p['vocab']}, batch 1, fp32, codegen {p['codegen']}. "
        "`unchunked` = memsave with attention routed to SDPA only; `chunked` = the same plus the fused chunked "
        "LM-head loss (default 32 MiB of logits per chunk). Peaks are measured (memsave.MemoryTracker), "
        "estimates are memsave's static estimate of the same call. A failed cell did not fit or failed (see below).", "",
    ]
    for use, title in (("fwd", "Forward + loss (no_grad)"), ("train", "Training step (forward + loss + backward)")):
        lines += [f"## {title}", "", "| tokens | unchunked peak MiB | chunked peak MiB | saved | unchunked est. MiB "
                  "| chunked est. MiB | unchunked ms | chunked ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in SEQS:
            u, c = f"{use}.unchunked.s{s}", f"{use}.chunked.s{s}"
            if u not in results["configs"] and c not in results["configs"]:
                continue
            pu, pc = _value(results, u, "tracked_peak_mib"), _value(results, c, "tracked_peak_mib")
            saved = f"{100 * (1 - pc / pu):.0f}%" if pu and pc else "–"
            lines.append(f"| {s} | {_fmt(pu)} | {_fmt(pc)} | {saved} | {_fmt(_value(results, u, 'est_peak_mib'))} "
                         f"| {_fmt(_value(results, c, 'est_peak_mib'))} | {_fmt(_value(results, u, 'step_ms'))} "
                         f"| {_fmt(_value(results, c, 'step_ms'))} |")
        lines.append("")
    eager = [(s, _value(results, f"fwd.eager-attn.s{s}", "tracked_peak_mib"), _value(results, f"fwd.chunked.s{s}", "tracked_peak_mib"))
             for s in SEQS if f"fwd.eager-attn.s{s}" in results["configs"]]
    if eager:
        lines += ["## Attention routing (forward + chunked loss)", "",
                  "Both with the chunked loss; `eager` keeps the model's matmul → softmax → matmul attention, "
                  "`SDPA` is it routed to scaled_dot_product_attention (CPU: the flash kernel).", "",
                  "| tokens | eager attention peak MiB | SDPA peak MiB |", "|---:|---:|---:|"]
        lines += [f"| {s} | {_fmt(a)} | {_fmt(b)} |" for s, a, b in eager]
        lines.append("")
    lines += ["## LM head + loss alone (training step): the loss's own extra memory", "",
              "extra = measured peak − the gradients the step returns (grad of the hidden states and of the weight).", "",
              "| tokens × vocab | full logits MiB | unchunked extra MiB | chunked extra MiB | unchunked ms | chunked ms |",
              "|---|---:|---:|---:|---:|---:|"]
    for size in [f"s{s}" for s in SEQS] + [f"v{v}" for v in VOCABS]:
        u, c = f"head.unchunked.{size}", f"head.chunked.{size}"
        if u not in results["configs"]:
            continue
        _, _, tokens, vocab = _parse(u)
        vocab = vocab or p["vocab"]
        lines.append(f"| {tokens} × {vocab} | {tokens * vocab * 4 / MiB:.0f} | {_fmt(_value(results, u, 'extra_mib'))} "
                     f"| {_fmt(_value(results, c, 'extra_mib'))} | {_fmt(_value(results, u, 'step_ms'))} "
                     f"| {_fmt(_value(results, c, 'step_ms'))} |")
    chunked = [v for c in results["configs"] if c.startswith("head.chunked.") and (v := _value(results, c, "extra_mib")) is not None]
    unchunked = [v for c in results["configs"] if c.startswith("head.unchunked.") and (v := _value(results, c, "extra_mib")) is not None]
    if chunked and unchunked:
        lines += ["", f"Goal check: over every size measured, the chunked loss's extra memory stays within "
                  f"{min(chunked):.1f}–{max(chunked):.1f} MiB; the unchunked one spans {min(unchunked):.0f}–{max(unchunked):.0f} MiB."]
    lines += ["", "Times come from a 2-core machine shared with other jobs: indicative only."]
    lines += ["", "Anchors: Liger-Kernel reports −60% memory for its fused linear cross-entropy on Llama-3-8B; "
              "Cut Cross-Entropy cut the loss's memory from 24 GB to 1 MB on Gemma 2 2B. Goal: the chunked loss's "
              "extra memory stays flat in the vocabulary size and the sequence length while the unchunked one grows "
              "linearly.", ""]
    harness = render_markdown(results)
    lines += ["## Harness table (all configs)", "", harness.split("## Results", 1)[1].strip() if "## Results" in harness else harness]
    return "\n".join(lines) + "\n"


def render_plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    styles = {"unchunked": dict(color="tab:red", marker="o"), "chunked": dict(color="tab:blue", marker="s")}
    for use, dash in (("fwd", "--"), ("train", "-")):
        for variant, style in styles.items():
            points = [(s, _value(results, f"{use}.{variant}.s{s}", "tracked_peak_mib")) for s in SEQS]
            points = [(s, v) for s, v in points if v is not None]
            if points:
                axes[0].plot(*zip(*points), linestyle=dash, label=f"{use} {variant}", **style)
    axes[0].set(title="decoder, vocab 32k: measured peak", xlabel="tokens", ylabel="MiB", xscale="log", yscale="log")
    for ax, key, values, xlabel in ((axes[1], "s", SEQS, "tokens (vocab 32k)"), (axes[2], "v", VOCABS, f"vocab ({HEAD_TOKENS} tokens)")):
        for variant, style in styles.items():
            points = [(n, _value(results, f"head.{variant}.{key}{n}", "extra_mib")) for n in values]
            points = [(n, v) for n, v in points if v is not None]
            if points:
                ax.plot(*zip(*points), label=f"{variant}", **style)
        ax.set(title="LM head + loss, training step: extra memory", xlabel=xlabel, ylabel="MiB beyond the gradients",
               xscale="log", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    quick = " (quick run)" if results["params"].get("quick") else ""
    fig.suptitle(f"memsave chunk: measured peaks (memsave.MemoryTracker), CPU fp32{quick}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


BENCH = Benchmark(name=NAME, title=TITLE, configs=CONFIGS, baseline=BASELINE, measure=measure, metrics=METRICS,
                  params=PARAMS, quick=QUICK, quick_configs=QUICK_CONFIGS, repeats=1, plot=["tracked_peak_mib"],
                  timeout_s=1800.0, report=render_report, draw=render_plot)


if __name__ == "__main__":
    main(BENCH)
