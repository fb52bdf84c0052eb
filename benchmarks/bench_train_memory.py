"""Training memory beyond activations: the optimizer step inside the backward, low-bit state.

Two parts, each against its own baseline, one fresh process per config and repeat, the C
allocator as a user's process has it (no MALLOC_* settings):

- **memory** — a full fine-tuning step (forward, backward, AdamW update) of the built-in
  decoder-medium (112M parameters, batch 1 x 256):
    eager                          loss.backward(); AdamW.step()
    eager_adamw8bit                the same with torchao's AdamW8bit
    eager_in_backward              memsave.optimizer_in_backward on the eager model (hooks,
                                   torchtune's road)
    memsave                        backend="memsave" (default recipe) + ordinary AdamW
    memsave_in_backward            + memsave.optimizer_in_backward(AdamW): stepped in the graph
    memsave_in_backward_8bit       + torchao AdamW8bit state
    memsave_in_backward_8bit_recompute  + options={"recompute": "budget-min"}
    memsave_in_backward_8bit_recompute_chunk  + "chunk": "loss" (the LM head's loss by token chunks)
  Per run: the step's peak of live tensor bytes (held before the step: weights, optimizer
  state, gradients; plus the tracker's peak during it), the process's peak RSS during the step
  above the RSS before the model was built, the optimizer state bytes, and the median step time.
- **qlora** — the same model frozen, peft LoRA rank 16 on every attention and MLP linear, AdamW
  on the adapters: eager_full (the full fine-tune above, this part's baseline), peft on the fp32
  base, peft on torchao's NF4 base (eager), memsave with options={"quantize": "int8"} / "int4" / "nf4"
  (frozen weights quantized in the training graph, originals released).
- **fidelity** — 100 steps of AdamW (lr 1e-3) on the docs LM's real text (the small causal LM's
  architecture, batches in a fixed order), each config's loss curve beside a reference curve
  computed in the same process: full fine-tuning from the seeded initialization against fp32
  eager; LoRA on the trained docs LM (memsave.models.docs_lm.load) against peft on its fp32 base.
  Reported: the largest and the final (mean of the last 10 steps) difference.
- **weights** — NF4 vs int4 (group 64, RTN and MSE) weight error on the real all-MiniLM-L6-v2's
  linears: median and worst SQNR, stored bits per weight; torchao's NF4 beside memsave's.

    python benchmarks/bench_train_memory.py            # both parts
    python benchmarks/bench_train_memory.py --quick    # decoder-small, 10 steps, one repeat
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    Benchmark, MiB, Part, current_rss_bytes, main, peak_rss_bytes, reset_peak_rss, time_call, with_sections,
)
from benchmarks.harness import run_median as _median  # noqa: E402

NAME = "train_memory"
TITLE = "Full fine-tuning step: optimizer step in the backward, 8-bit AdamW state, recompute"
MEMORY = ["eager", "eager_adamw8bit", "eager_in_backward", "memsave", "memsave_in_backward",
          "memsave_in_backward_8bit", "memsave_in_backward_8bit_recompute", "memsave_in_backward_8bit_recompute_chunk"]
QLORA = ["eager_full", "peft_lora_fp32", "torchao_nf4_peft", "memsave_lora_int8", "memsave_lora_int4", "memsave_lora_nf4"]
FIDELITY = ["eager", "eager_adamw8bit", "memsave_in_backward", "memsave_in_backward_8bit",
            "memsave_in_backward_8bit_recompute", "peft_lora_fp32", "memsave_lora_int8", "memsave_lora_int4",
            "memsave_lora_nf4"]
WEIGHTS = ["int4_g64_rtn", "int4_g64_mse", "nf4", "torchao_nf4"]
CONFIGS = ([f"memory.{v}" for v in MEMORY] + [f"qlora.{v}" for v in QLORA] + [f"fidelity.{v}" for v in FIDELITY]
           + [f"weights.{v}" for v in WEIGHTS])
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MEMORY_METRICS = {"step_peak_mib": "lower", "rss_peak_mib": "lower", "state_mib": "lower",
                  "grads_held_mib": "lower", "step_ms": "lower"}
FIDELITY_METRICS = {"final_loss": "lower", "max_abs_diff": "lower", "final_abs_diff": "lower"}
WEIGHT_METRICS = {"median_sqnr_db": "higher", "worst_sqnr_db": "higher", "bits_per_weight": "lower"}
PARAMS = {"size": "medium", "batch": 1, "seq": 256, "iters": 3, "fid_steps": 100, "fid_batch": 8, "fid_seq": 128}
QUICK = {"size": "small", "iters": 1, "fid_steps": 10}


def _setup(variant: str, model, lr: float):
    """(the callable to train, the torch optimizer, whether the step is in the backward)."""
    import torch

    import memsave

    eight = "8bit" in variant
    if eight:
        from torchao.optim import AdamW8bit as optimizer_class
    else:
        optimizer_class = torch.optim.AdamW
    in_backward = "in_backward" in variant
    if in_backward:
        handle = memsave.optimizer_in_backward(model, optimizer_class, lr=lr)
        optimizer = handle.optimizer
    else:
        optimizer = optimizer_class(model.parameters(), lr=lr)
    if variant.startswith("eager"):
        run = model
    else:
        options = None
        if "recompute" in variant:
            options = {"recompute": "budget-min"}
        if variant.endswith("chunk"):  # the LM-head loss over token chunks: no full logits or their gradient
            options["chunk"] = "loss"
        run = torch.compile(model, backend="memsave", options=options)
    return run, optimizer, in_backward


def _lora(model, rank: int = 16):
    """peft's LoRA (rank 16) on every attention and MLP linear; everything else frozen."""
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS))


def _nf4_base(model) -> None:
    """torchao's NF4 (block 64, double-quantized scales) for every frozen base linear weight."""
    import torch

    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:  # torchao before the move
        from torchao.dtypes.nf4tensor import to_nf4

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and "lora_" not in name:
            if module.weight.numel() % (64 * 256):
                continue  # torchao's NF4 needs whole blocks of 256 scales: this one stays fp32
            module.weight = torch.nn.Parameter(to_nf4(module.weight.detach()), requires_grad=False)


def _setup_lora(variant: str, model, lr: float):
    """QLoRA-style: (the callable to train, AdamW over the adapters)."""
    import torch

    peft_model = _lora(model)
    if variant == "torchao_nf4_peft":
        _nf4_base(peft_model)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    if variant.startswith("memsave_lora_"):
        run = torch.compile(peft_model, backend="memsave", options={"quantize": variant.rsplit("_", 1)[1]})
    else:
        run = peft_model
    return run, optimizer, False


def _weight_bytes(model) -> int:
    """Parameters as they are held (a released original holds nothing; torchao's NF4 by its
    parts), plus the compressed forms compiled graphs hold (memsave's weight cache)."""
    from memsave.optim.in_backward import stored_tensors
    from memsave.weights import WEIGHTS

    return WEIGHTS.held_bytes([inner for p in model.parameters() for inner in stored_tensors(p)])


def _held_bytes(model, optimizer) -> int:
    from memsave.memory.track import live_tensor_bytes
    from memsave.optim.in_backward import optimizer_state_bytes

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return _weight_bytes(model) + live_tensor_bytes(grads) + optimizer_state_bytes(optimizer)


def measure_memory(variant: str, params: dict, part: str = "memory") -> dict[str, float]:

    from memsave.memory.track import measure_peak
    from memsave.models import build_decoder, decoder_inputs
    from memsave.optim.in_backward import optimizer_state_bytes

    if "8bit" in variant:
        import torchao.optim  # noqa: F401  (imported before the baseline RSS, like torch)
    rss_start = current_rss_bytes()
    model = build_decoder(params["size"]).train()
    ids, labels = decoder_inputs(model, batch=params["batch"], seq=params["seq"], labels=True)
    if part == "qlora" and variant != "eager_full":
        run, optimizer, in_backward = _setup_lora(variant, model, lr=1e-4)
    else:
        run, optimizer, in_backward = _setup("eager" if variant == "eager_full" else variant, model, lr=1e-5)

    def step():
        run(ids, labels).backward()
        if not in_backward:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # compiles; creates the optimizer state
    step()
    out = {"weights_mib": _weight_bytes(model) / MiB, "state_mib": optimizer_state_bytes(optimizer) / MiB}
    held = _held_bytes(model, optimizer)
    reset_peak_rss()
    step()
    out["rss_peak_mib"] = (peak_rss_bytes() - rss_start) / MiB
    _, stats = measure_peak(step)
    out["step_peak_mib"] = (held + stats.peak_bytes) / MiB
    # Gradients alive at the end of the backward, before the update (0 when stepped inside it).
    loss = run(ids, labels)
    loss.backward()
    out["grads_held_mib"] = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                                if p.grad is not None) / MiB
    if not in_backward:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out["step_ms"] = statistics.median(time_call(step, warmup=0, iters=params["iters"]))
    return out


def _fidelity_curve(variant: str, params: dict) -> list[float]:
    import torch

    from memsave.models import docs_lm

    torch._dynamo.reset()
    if "lora" in variant:  # adapters on the trained docs LM (built and cached by docs_lm.load)
        model = docs_lm.load()[0].train()
        run, optimizer, in_backward = _setup_lora(variant, model, lr=1e-3)
    else:  # full fine-tuning from the seeded initialization
        model = docs_lm.build().train()
        run, optimizer, in_backward = _setup(variant, model, lr=1e-3)
    tokens = docs_lm._tokens(docs_lm.corpus().train)
    gen = torch.Generator().manual_seed(1)
    seq, batch = params["fid_seq"], params["fid_batch"]
    losses = []
    for _ in range(params["fid_steps"]):
        starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=gen)
        window = torch.stack([tokens[s: s + seq + 1] for s in starts.tolist()])
        loss = run(input_ids=window, labels=window, use_cache=False).loss
        loss.backward()
        if not in_backward:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def measure_fidelity(variant: str, params: dict) -> dict[str, float]:
    curve = _fidelity_curve(variant, params)
    baseline = "peft_lora_fp32" if "lora" in variant else "eager"  # LoRA beside LoRA on the fp32 base
    reference = curve if variant == baseline else _fidelity_curve(baseline, params)
    diffs = [abs(a - b) for a, b in zip(curve, reference)]
    out = {"final_loss": statistics.fmean(curve[-10:]), "max_abs_diff": max(diffs),
           "final_abs_diff": abs(statistics.fmean(curve[-10:]) - statistics.fmean(reference[-10:]))}
    out.update({f"curve_{i:03d}": v for i, v in enumerate(curve)})
    return out


def measure_weights(variant: str, params: dict) -> dict[str, float]:
    """Weight SQNR of every linear of the real all-MiniLM-L6-v2 (NF4 vs int4 at the same group)."""
    import math

    import torch

    from memsave.config import QuantizeConfig
    from memsave.models.minilm import load_minilm
    from memsave.ops.schemes import SCHEMES
    from memsave.passes.aten.quantize import weight_codes

    model, _ = load_minilm()
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    sqnr, bits = [], []
    for w in weights:
        if variant == "torchao_nf4":
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

            nf4 = to_nf4(w, 64, 256)
            w_hat = nf4.get_original_weight()
            stored = sum(t.numel() * t.element_size() for t in (nf4.quantized_data, nf4.quantized_scalers,
                                                              nf4.quantization_factor, nf4.scaler_mean))
        else:
            fields = {"nf4": {"scheme": "nf4", "bits": 4, "group_size": 64},
                      "int4_g64_rtn": {"bits": 4, "group_size": 64, "symmetric": False, "method": "rtn"},
                      "int4_g64_mse": {"bits": 4, "group_size": 64, "symmetric": False, "method": "mse"}}[variant]
            codes = weight_codes(w, QuantizeConfig(**fields), 64, cached=lambda key, build: build())
            rules = SCHEMES[codes.spec.scheme]
            w_hat = rules.dequantize(codes.packed, *codes.params, *rules.dequantize_extra(codes.spec), w.shape[1], w.dtype)
            stored = codes.packed.numel() + sum(p.numel() * p.element_size() for p in codes.params if p is not None)
        sqnr.append(10 * math.log10(w.pow(2).sum().item() / (w_hat - w).pow(2).sum().item()))
        bits.append(stored * 8 / w.numel())
    return {"median_sqnr_db": statistics.median(sqnr), "worst_sqnr_db": min(sqnr), "bits_per_weight": statistics.fmean(bits)}


def measure(config: str, params: dict) -> dict[str, float]:
    part, variant = config.split(".", 1)
    if part == "weights":
        return measure_weights(variant, params)
    return measure_fidelity(variant, params) if part == "fidelity" else measure_memory(variant, params, part)


def _parts(params: dict) -> dict[str, Part]:
    return {"memory": Part([f"memory.{v}" for v in MEMORY], "memory.eager", metrics=MEMORY_METRICS),
            "qlora": Part([f"qlora.{v}" for v in QLORA], "qlora.eager_full", metrics=MEMORY_METRICS),
            "weights": Part([f"weights.{v}" for v in WEIGHTS], "weights.int4_g64_rtn", repeats=1, metrics=WEIGHT_METRICS),
            "fidelity": Part([f"fidelity.{v}" for v in FIDELITY], "fidelity.eager", repeats=1,
                             metrics=FIDELITY_METRICS)}



def render_sections(results) -> str:
    lines = ["", "## Goals (issue 15)", ""]
    eager_peak = _median(results, "memory.eager", "step_peak_mib")
    eager_ms = _median(results, "memory.eager", "step_ms")
    for variant in MEMORY[1:]:
        peak = _median(results, f"memory.{variant}", "step_peak_mib")
        ms = _median(results, f"memory.{variant}", "step_ms")
        rss = _median(results, f"memory.{variant}", "rss_peak_mib")
        if None in (peak, ms, eager_peak, eager_ms):
            continue
        rss_eager = _median(results, "memory.eager", "rss_peak_mib")
        lines.append(f"- {variant}: tracked peak {peak / eager_peak:.2f}x eager's, RSS peak "
                     f"{rss / rss_eager:.2f}x, step time {ms / eager_ms:.2f}x")
    lines.append("- goal: memsave_in_backward_8bit_recompute <= 0.45x eager's peak and <= 1.15x its step time")
    full = _median(results, "qlora.eager_full", "step_peak_mib")
    for variant in QLORA[1:]:
        peak = _median(results, f"qlora.{variant}", "step_peak_mib")
        if peak is not None and full:
            lines.append(f"- {variant}: tracked peak {peak / full:.2f}x the eager full fine-tune's (goal for QLoRA: <= 0.25x)")
    return "\n".join(lines) + "\n"


def render_plot(results, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(19, 5.5))
    FigureCanvasAgg(fig)
    bars, lora_bars, curves = fig.subplots(1, 3)
    for ax, part, variants, title in ((bars, "memory", MEMORY, "full fine-tune step"),
                                      (lora_bars, "qlora", QLORA, "LoRA r16 on a frozen base")):
        names, tracked, rss = [], [], []
        for variant in variants:
            t, r = _median(results, f"{part}.{variant}", "step_peak_mib"), _median(results, f"{part}.{variant}", "rss_peak_mib")
            if t is not None:
                names.append(variant.replace("memsave_", "ms_").replace("in_backward", "inbw"))
                tracked.append(t)
                rss.append(r or 0.0)
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], tracked, width=0.4, label="live tensors (tracker)")
        ax.bar([x + 0.2 for x in xs], rss, width=0.4, label="process RSS above start")
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("peak of a training step, MiB (median)")
        ax.legend(fontsize=8)
        ax.set_title(f"decoder-{results['params'].get('size')}: {title}", fontsize=10)
    for variant in FIDELITY:
        run = next((r for r in results["runs"] if r["config"] == f"fidelity.{variant}" and r["ok"]), None)
        if run is None:
            continue
        keys = sorted(k for k in run["metrics"] if k.startswith("curve_"))
        curves.plot([run["metrics"][k] for k in keys], label=variant, lw=1.2)
    curves.set_xlabel("step")
    curves.set_ylabel("training loss (docs LM text)")
    curves.set_title("loss curves, AdamW lr 1e-3", fontsize=10)
    curves.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


BENCH = Benchmark(
    name=NAME, title=TITLE, configs=CONFIGS, baseline="memory.eager", measure=measure,
    metrics={**MEMORY_METRICS, **FIDELITY_METRICS, **WEIGHT_METRICS}, params=PARAMS, quick=QUICK, repeats=3,
    timeout_s=1200.0, default_allocator=True, parts=_parts, report=with_sections(render_sections), draw=render_plot,
)

if __name__ == "__main__":
    main(BENCH)
