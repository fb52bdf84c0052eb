"""memsave.plan: fit a model's weights (and one call's working memory) in a byte budget, with
each linear layer in the form that costs the least predicted error for the bytes it saves.

    plan = memsave.plan(model, *example_inputs, budget="24MiB", calibration=batches)
    print(plan)                                   # per layer: form, bytes, predicted error
    compiled = torch.compile(model, backend="memsave", options=plan.options)
    json.dump(plan.options, f)                    # the same plan again, without searching

Budget (inference): the stored weights + the peak of live tensors during one call at the
example inputs' shape. Linear weights and embedding tables are planned (an embedding's error is
its rows' own relative error: each call reads some rows, not a product with the inputs); the
other weights (norms, biases, a weight tied between two modules) count at their size; the call's working memory is measured on one
eager call (memsave.MemoryTracker), which memsave's kernels do not exceed (they never
materialize a dense weight). What is left is divided among the linear weights by a multiple-
choice knapsack (knapsack.py) over the forms in candidates.py, each scored by the output noise
it adds on the layer's calibration inputs (sensitivity.py) times the layer's gain (layer_gain:
how much of that noise reaches the model's output, measured with one forward per layer).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from memsave.config.units import parse_bytes
from memsave.report import fmt_bytes as format_bytes
from memsave.budget.candidates import FORMS, FORMS_BY_NAME, Form, Settings, reconstructed, stored_bytes
from memsave.budget.knapsack import BudgetError, choose
from memsave.budget.sensitivity import input_moment, relative_output_noise


@dataclass(frozen=True)
class LayerPlan:
    name: str  # the weight's name (what options' include/overrides patterns match)
    shape: tuple[int, int]
    form: str
    bytes: int
    error: float  # predicted: gain × the relative output noise on the calibration inputs (Plan.measure)
    candidates: dict[str, tuple[int, float]] = field(default_factory=dict)  # form -> (bytes, error)
    embedding: bool = False  # an embedding table (its error: the rows' own relative error)
    gain: float = 1.0  # model output error per unit of this layer's output noise (measured)
    settings: Settings = field(default_factory=dict)  # the form's per-layer options, per pass family
    pinned: bool = False  # the user's options chose this form (pinned.py), not the planner


@dataclass(frozen=True)
class Plan:
    budget: int
    layers: tuple[LayerPlan, ...]
    fixed_bytes: int  # weights the plan does not choose for (embeddings, norms, biases, ...)
    working_bytes: int  # measured peak of live tensors of one call beyond the weights, + kernel_allowance
    solver: str
    calibrated: bool
    measure: str = "relative"  # what `error` estimates: the output's "relative" change, or "kl" (see OutputChange)
    base: dict[str, dict[str, Any]] = field(default_factory=dict)  # pinned families' fields that are not per layer

    @property
    def weight_bytes(self) -> int:
        return self.fixed_bytes + sum(layer.bytes for layer in self.layers)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.working_bytes

    @property
    def predicted_error(self) -> float:
        return sum(layer.error for layer in self.layers)

    @property
    def options(self) -> dict[str, Any]:
        """The plan as torch.compile(..., backend="memsave", options=...) takes it: a plain dict,
        per pass family (prune, factorize, quantize) the layers it changes and each one's fields."""
        options: dict[str, Any] = {}
        for layer in self.layers:
            for family, fields in layer.settings.items():
                chosen = options.setdefault(family, {**self.base.get(family, {}), "include": [], "overrides": {}})
                chosen["include"].append(layer.name)
                chosen["overrides"][layer.name] = dict(fields)
                if layer.embedding:
                    chosen["embeddings"] = True  # include names the tables; the others stay as they are
        return options

    def to_json(self) -> str:
        return json.dumps({"budget": self.budget, "total_bytes": self.total_bytes, "solver": self.solver,
                           "measure": self.measure, "pinned": [layer.name for layer in self.layers if layer.pinned],
                           "fixed_bytes": self.fixed_bytes, "working_bytes": self.working_bytes,
                           "calibrated": self.calibrated, "predicted_error": self.predicted_error,
                           "layers": [asdict(layer) for layer in self.layers], "options": self.options}, indent=1)

    def __str__(self) -> str:
        width = max([len(layer.name) for layer in self.layers] + [5])
        form_width = max([len(layer.form) for layer in self.layers] + [10])
        lines = [f"memsave plan: {format_bytes(self.total_bytes)} of a {format_bytes(self.budget)} budget "
                 f"({self.solver}; layer noise {'on calibration inputs' if self.calibrated else 'of the weights (no calibration)'}; "
                 f"predicted error: the output's {MEASURES[self.measure]})",
                 f"  {'layer':<{width}}  {'shape':>12}  {'form':<{form_width}} {'MiB':>8}  predicted error"]
        for layer in self.layers:
            shape = "x".join(map(str, layer.shape))
            lines.append(f"  {layer.name:<{width}}  {shape:>12}  {layer.form:<{form_width}} {layer.bytes / 2**20:8.3f}  "
                         f"{layer.error:.3e}")
        lines += [f"  planned weights {format_bytes(sum(layer.bytes for layer in self.layers))} + other weights "
                  f"{format_bytes(self.fixed_bytes)} + one call's working memory {format_bytes(self.working_bytes)} "
                  f"= {format_bytes(self.total_bytes)}; predicted error (sum) {self.predicted_error:.3e}"]
        return "\n".join(lines)


# The form whose error measures a layer's gain: coarse enough that the model's output moves well
# above rounding, fine enough to stay where output error grows in proportion to the noise.
PROBE = FORMS_BY_NAME["int3-g128"]


def layer_gain(name: str, w: torch.Tensor, moment, effect) -> float:
    """How much of one unit of this layer's relative output noise reaches the model's output:
    the measured output change with the layer at PROBE, over its predicted noise. A layer whose
    output feeds a residual stream read by many others weighs more than one near the loss."""
    approx = reconstructed(w, PROBE)
    noise = relative_output_noise(w, approx, moment)
    if noise <= 0:
        return 1.0
    change = effect(name, approx)
    # NaN: keep the plain noise; 0.0: the output does not depend on this weight (left out)
    return change / noise if change == change and change >= 0 else 1.0


def plannable_weights(model: nn.Module) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """(name -> weight, the embedding tables' names) of every linear and embedding whose weight
    the plan may change: 2-D float, used by that one module only (a weight tied between an
    embedding and the LM head, or shared by two linears, stays as it is). A weight the call
    never reaches is left out later, by its gain of 0 (plan_layers)."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    found, tables = {}, set()
    for module_name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(module, (nn.Linear, nn.Embedding)) and isinstance(w, torch.Tensor) and w.dim() == 2 \
                and w.dtype.is_floating_point and uses.get(id(w), 0) == 1:
            name = f"{module_name}.weight" if module_name else "weight"
            found[name] = w
            if isinstance(module, nn.Embedding):
                tables.add(name)
    return found, frozenset(tables)


def storage_bytes(tensors, skip: set[int]) -> int:
    """Bytes of the storages of `tensors` (each once), leaving out the tensors whose id is in `skip`."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or id(t) in skip:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def measured_call(fn, args: Sequence) -> tuple[torch.Tensor, int]:
    """(the output tensor of one call without grad, the peak of live bytes it added)."""
    from memsave.memory.track import MemoryTracker

    with torch.no_grad(), MemoryTracker("cpu") as tracker:
        out = output_tensor(fn(*args)).float()
    return out, tracker.stats.peak_bytes


@contextlib.contextmanager
def linear_rows(model: nn.Module):
    """Inside: records in the yielded list's one item the most activation rows that any
    nn.Linear of `model` multiplies (forward pre-hooks, removed on exit)."""
    most = [0]

    def hook(module, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1]:
            most[0] = max(most[0], x.numel() // x.shape[-1])

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        yield most
    finally:
        for handle in handles:
            handle.remove()


def kernel_allowance(rows: int, layers: dict[str, torch.Tensor], embeddings: frozenset[str] = frozenset()) -> int:
    """What a compiled call may hold beyond the eager call it was measured on: the largest
    workspace of one of memsave's CPU kernels (codegen/native: bf16 copies of the activations,
    a decoded weight tile, a tile of products) over the planned linears at `rows` activation
    rows; one linear runs at a time. Measured on bench_load's quick model before this was
    counted: an int4 call 0.94 MiB above its eager measurement, 5 % over its budget."""
    from memsave.codegen.native.kernels import workspace_bytes

    return max((max(workspace_bytes(rows, w.shape[1], w.shape[0], narrow=True), workspace_bytes(rows, w.shape[1], w.shape[0]))
                for name, w in layers.items() if name not in embeddings), default=0)


def reference_call(model: nn.Module, inputs: Sequence, layers, tables) -> tuple[torch.Tensor, int]:
    """(the output of one eager call, the working memory a plan counts for a call: its measured
    peak of live bytes beyond the weights + kernel_allowance)."""
    with linear_rows(model) as rows:
        reference, measured = measured_call(model, inputs)
    return reference, measured + kernel_allowance(rows[0], layers, tables)


def working_bytes(model: nn.Module, inputs: Sequence) -> int:
    """The working memory memsave.plan counts for one call of `model` on `inputs`."""
    return reference_call(model, inputs, *plannable_weights(model))[1]


def plan(model: nn.Module, *inputs, budget, calibration=None, forms: Sequence[Form] = FORMS,
         checkpoint=None, working=None, error: str = "auto", options=None) -> Plan:
    """The plan for `model` called on `inputs` within `budget` (bytes, or "24MiB", "1.5GB").
    calibration: batches for memsave.calibrate (run here, with Gram matrices); without them,
    any statistics an earlier memsave.calibrate left are used, else the weights' own error.
    `inputs` also measure how much each layer's noise moves the model's output: use inputs
    like the ones the model will see (not the text you will evaluate on).
    checkpoint: a safetensors file to read the weights from, one at a time, for a model too
    large to hold at full precision (built with memsave.empty_parameters); see stream.py.
    working: one call's working memory in bytes, instead of measuring (or, from a
    checkpoint, estimating) it.
    error: how a layer's effect on the output is measured: "kl" (next-token distributions),
    "relative" (‖Δy‖²/‖y‖²), or "auto": "kl" where the output is logits over a vocabulary (its
    last dimension is an embedding table's row count), else "relative".
    options: quantize / prune / factorize options to pin (budget/pinned.py): the weights their
    patterns name get what they give; the planner chooses for the rest, and plan.options keeps
    both."""
    limit = parse_bytes(budget)
    if checkpoint is not None:
        from memsave.budget.stream import plan_checkpoint

        if calibration is not None:
            raise ValueError("memsave.plan: calibration runs the model, which needs its weights in memory; a plan "
                             "from a checkpoint scores each weight's own error (leave calibration out)")
        return plan_checkpoint(model, inputs, limit, checkpoint, forms, working, pinned=options)
    if calibration is not None:
        from memsave.calibrate import calibrate

        calibrate(model, calibration, progress=False, hessian=True)
    layers, tables = plannable_weights(model)
    fixed = storage_bytes(list(model.parameters()) + list(model.buffers()), {id(w) for w in layers.values()})
    reference, counted = reference_call(model, inputs, layers, tables)
    working = counted if working is None else parse_bytes(working)
    vocabularies = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    change = OutputChange(reference, error_measure(error, reference, vocabularies))

    def effect(name: str, approx: torch.Tensor) -> float:
        w = layers[name]
        original = w.data
        try:
            w.data = approx.to(w.dtype)
            with torch.no_grad():
                return change(output_tensor(model(*inputs)))
        finally:
            w.data = original

    return plan_layers(layers, fixed, working, limit, forms, tables, effect, measure=change.measure, pinned=options)


def output_tensor(out) -> torch.Tensor:
    """The tensor a call's output is judged by: itself, `.logits` (HF), or the first tensor of a
    tuple, list or dict."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"memsave.plan: cannot find a tensor in the model's output ({type(out).__name__})")


def relative_change(out: torch.Tensor, reference: torch.Tensor) -> float:
    """‖out − reference‖² / ‖reference‖²."""
    den = reference.pow(2).sum().item()
    return (out.float() - reference).pow(2).sum().item() / den if den > 0 else 0.0


MEASURES = {"relative": "relative change ‖Δy‖²/‖y‖²",
            "noise": "relative change, taken as the sum of the layers' own output noise (no model run)",
            "kl": "KL divergence from the reference's next-token distributions (mean per position, nats)"}


def error_measure(error: str, reference: torch.Tensor, vocabularies) -> str:
    """"kl" or "relative" for plan(error=...): "auto" is "kl" when the output looks like logits
    (its last dimension is the row count of one of the model's embedding tables: a vocabulary),
    since what a language model's user sees is its distribution over tokens, not its logits'
    scale; a perturbation that moves every logit alike changes nothing."""
    if error not in ("auto", "kl", "relative"):
        raise ValueError(f"memsave.plan: error={error!r} is not a measure; valid choices: 'auto', 'kl', 'relative'")
    if error != "auto":
        return error
    return "kl" if reference.dim() >= 2 and reference.shape[-1] > 1 and reference.shape[-1] in set(vocabularies) \
        else "relative"


class OutputChange:
    """How far an output moved from `reference`, by `measure` ("relative": ‖Δy‖²/‖y‖²; "kl":
    the mean over positions of KL(softmax(reference) ‖ softmax(output)) over the last dimension).
    Both grow with the square of a small perturbation, so layers' errors add up."""

    def __init__(self, reference: torch.Tensor, measure: str):
        self.measure, self.reference = measure, reference.float()
        if measure == "kl":
            self.log_p = self.reference.log_softmax(-1)
            self.p = self.log_p.exp()

    def __call__(self, out: torch.Tensor) -> float:
        if self.measure == "relative":
            return relative_change(out, self.reference)
        log_q = out.float().log_softmax(-1)
        return max((self.p * (self.log_p - log_q)).sum(-1).mean().item(), 0.0)


def plan_layers(layers: dict[str, torch.Tensor], fixed: int, working: int, limit: int,
                forms: Sequence[Form] = FORMS, embeddings: frozenset[str] = frozenset(), effect=None,
                score_rows=None, measure: str = "relative", pinned=None) -> Plan:
    """The plan for these weights (name -> the weight itself: calibration statistics are keyed
    by it; `embeddings` names the embedding tables among them), given the bytes of everything
    else and of one call's working memory. `effect(name, approx)`: the model output's relative
    change with that one weight replaced, by `measure` (see layer_gain and OutputChange); None:
    every layer's gain is 1.
    score_rows(w): the rows of `w` to score the forms' errors on (None: all of them); for
    quantized forms only (each row is quantized on its own, so a subset's error is those rows'
    exact error; pruning by magnitude and low rank look at the whole weight).
    pinned: the user's quantize / prune / factorize options (dict or configs; pinned.py): a
    weight their patterns name is scored in the form they give it, its only choice."""
    from memsave.budget import pinned as pins

    configs = pins.pinned_configs(pinned)
    names, options, costs, sizes = [], [], [], []
    pinned_names = set()
    calibrated = False
    gains, shapes = {}, {}
    # One pass over `layers` (a plan from a checkpoint reads each weight here, once).
    for name, w in layers.items():
        n, k = shapes[name] = tuple(w.shape)
        moment = input_moment(w)
        calibrated = calibrated or moment is not None
        gains[name] = layer_gain(name, w, moment, effect) if effect is not None else 1.0
        if gains[name] == 0.0:
            # Its noise does not reach the output at all (computed, then unused, as MiniLM's
            # pooler): the compiled graph drops it, so it stays as it is and counts as it is.
            fixed += w.untyped_storage().nbytes()
            continue
        scored, parts = [], {}  # parts: pruned values and factors, shared by the forms that quantize them
        rows = w if score_rows is None else score_rows(w)
        fixed_settings = pins.pinned_settings(name, (n, k), w.element_size(), name in embeddings, configs)
        if fixed_settings is None:
            menu = [(form, form.for_weight(w, embedding=name in embeddings)) for form in forms]
        else:  # its only choice: what the user's options give it
            pinned_names.add(name)
            menu = [(Form(pins.describe(fixed_settings)), fixed_settings)]
        for form, settings in menu:
            if settings is None or any(settings == seen for _, seen, _, _ in scored):
                continue  # not for this weight, or the same stored form as one scored (a share's rank)
            size = stored_bytes(n, k, w.element_size(), settings)
            noise = 0.0 if not settings else relative_output_noise(rows, reconstructed(rows, settings, name, parts), moment)
            scored.append((form, settings, size, gains[name] * noise))
        names.append(name)
        options.append(scored)
        costs.append([e for _, _, _, e in scored])
        sizes.append([s for _, _, s, _ in scored])
    try:
        picked, solver = choose(costs, sizes, limit - fixed - working)
    except BudgetError as e:
        smallest = fixed + working + e.smallest_bytes
        pinned_note = f", the {len(pinned_names)} pinned ones as pinned," if pinned_names else ""
        raise BudgetError(
            f"budget {format_bytes(limit)} cannot be met: the smallest plan memsave found needs {format_bytes(smallest)} "
            f"(other weights {format_bytes(fixed)} + one call's working memory {format_bytes(working)} + every "
            f"planned weight at its smallest form{pinned_note} {format_bytes(e.smallest_bytes)})", smallest) from None
    planned = []
    for name, scored, o in zip(names, options, picked):
        form, settings, size, error = scored[o]
        planned.append(LayerPlan(name, shapes[name], form.name, size, error, {f.name: (s, e) for f, _, s, e in scored},
                                 embedding=name in embeddings, gain=gains[name], settings=settings,
                                 pinned=name in pinned_names))
    base = {family: fields for family, config in configs.items() if (fields := pins.base_fields(config))}
    return Plan(limit, tuple(planned), fixed, working, solver, calibrated, measure if effect is not None else "noise", base)
