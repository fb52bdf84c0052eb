"""The optimizer step inside the backward: each parameter is updated as soon as its gradient is
final, and the gradient is freed right after, so no full set of gradients ever exists.

    handle = memsave.optimizer_in_backward(model, torch.optim.AdamW, lr=1e-4)
    compiled = torch.compile(model, backend="memsave")
    loss = compiled(ids, labels); loss.backward()      # the update happened in here
    scheduler = torch.optim.lr_scheduler.StepLR(handle.optimizer, 10)   # schedulers work as usual

Two roads apply the same update:

- **Compiled** (`backend="memsave"`, compiled after this call): the backward graph itself calls
  `memsave::step_in_backward(param, grad)` right after each gradient's last use and returns no
  gradient for that parameter (`passes/joint/step_in_backward.py`), so the graph frees each one
  at once. A backward compiled by anything else hands all gradients back together at its end.
- **Eager** (or a graph compiled before this call): a `register_post_accumulate_grad_hook` on
  each parameter steps and frees it once autograd has accumulated it (torchtune's road). The
  backward's gradients are not all alive at once either, but a compiled backward that is not
  memsave's has produced them all before the first hook runs.

One ordinary `torch.optim` optimizer holds every trainable parameter, so learning-rate
schedulers, `state_dict()` and `param_groups` are the usual ones. A step is that optimizer's
`step()` over a parameter group narrowed, for the call, to the one parameter (the optimizers in
torch and torchao keep their state per parameter), so the result equals the ordinary
`loss.backward(); opt.step()` (tested). An optimizer that needs every gradient at once (LBFGS's
closure) is refused.

A parameter larger than `slice_bytes` (default 8 MiB) is held by the optimizer as flat slices of
its storage, each stepped in turn (optim/slices.py): the step's temporaries are then one slice's,
not the parameter's (AdamW's step allocates 2x what it updates), with bit-identical results, for
the optimizers known to update element by element (torch's, torchao's low-bit AdamW); others
step whole, and `report()` says why. The optimizer's `state_dict()` then has one entry per slice.

Clipping by global norm needs every gradient before any update. `clipped_backward(closure,
max_norm)` does it in two passes, documented cost: the closure (forward) and the backward run
once to sum the squared norms, without updating, then again, same RNG state, to update with
clip_grad_norm_'s coefficient. Gradient accumulation (`accumulation_steps=N`) holds the sums
between micro-batches (a full set of gradients then exists again: the saving is gone, the
result is the ordinary one) and steps on every N-th backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from memsave.config import OptionError
from memsave.config.units import parse_bytes
from memsave.optim.slices import (
    DEFAULT_SLICE_BYTES,
    make_slices,
    slice_bounds,
    slicing_block,
)
from memsave.optim.step_workspace import UNMEASURED_RATIO, measure_step_workspace
from memsave.report import fmt_bytes

# parameter -> its entry. A compiled backward passes the parameter itself to
# memsave::step_in_backward (never a number baked into the graph: Dynamo reuses one compiled
# graph for every instance of a module class, so the graph cannot know whose parameter it got).
_by_param: WeakIdKeyDictionary = WeakIdKeyDictionary()

_REFUSED = {"LBFGS": "needs a closure that re-evaluates the loss with every gradient at once"}


@dataclass
class _Entry:
    handle: "InBackward | None"
    hook: Any = None
    graphs: set = field(default_factory=set)  # compiled graphs that step this parameter in-graph


def is_held(param: torch.Tensor) -> bool:
    """Whether an in-backward optimizer holds this parameter now."""
    entry = _by_param.get(param)
    return entry is not None and entry.handle is not None


def step_workspace_bytes(param: torch.Tensor) -> int:
    """The temporary bytes the holding optimizer's step allocates for `param` (measured ratio x
    its bytes), what a training budget adds when the gradient is stepped in the backward."""
    handle = _by_param[param].handle
    pieces = handle._slices.get(param)
    largest = max(p.numel() for p in pieces) if pieces else param.numel()
    return int(handle.step_workspace_ratio * largest * param.element_size())


def claim(param: torch.Tensor, graph_id: int) -> str | None:
    """A compiled graph will step `param` in its backward. Returns why not, if it must not: a
    parameter read by two compiled graphs gets its gradient summed across them by autograd, so
    neither may step it alone."""
    entry = _by_param[param]
    others = entry.graphs - {graph_id}
    if others:
        return f"also read by compiled graph {min(others)}; its gradient is summed by autograd"
    entry.graphs.add(graph_id)
    return None


def apply_gradient(param: torch.Tensor, grad: torch.Tensor) -> None:
    """The runtime of memsave::step_in_backward: hand one final gradient to its optimizer."""
    entry = _by_param.get(param)
    if entry is None or entry.handle is None:
        # Not (or no longer) held by an optimizer: do what autograd's accumulation would have.
        with torch.no_grad():
            if param.grad is None:
                param.grad = grad.detach().clone()
            else:
                param.grad += grad
        return
    # The op's kernel runs below autograd in the dispatcher (autograd keys excluded); an
    # optimizer's state may be a tensor subclass (torchao's low-bit state) whose composite ops
    # then reach its __torch_dispatch__ undecomposed. Step in the dispatcher state the handle
    # was made in, as from a hook.
    entry.handle.counts["in_graph"] += 1
    with torch._C._ForceDispatchKeyGuard(*entry.handle._dispatch_state):
        entry.handle._apply(param, grad)


class InBackward:
    """What `memsave.optimizer_in_backward` returns: the optimizer and the hooks that run it."""

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer, accumulation_steps: int,
                 step_workspace: tuple[float, str | None] = (UNMEASURED_RATIO, "not measured"),
                 slices: dict | None = None, not_sliced: str | None = None):
        self.optimizer = optimizer
        # parameter -> the flat views of it the optimizer holds in its place (optim/slices.py)
        self._slices: WeakIdKeyDictionary = WeakIdKeyDictionary(slices or {})
        self.not_sliced = not_sliced  # why large parameters step whole, if they do
        self._group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self.accumulation_steps = accumulation_steps
        self._params = params
        self._held: WeakIdKeyDictionary = WeakIdKeyDictionary()  # accumulated gradients
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()  # backwards per parameter
        self._mode = "update"  # or "norm" (first pass of clipped_backward)
        self._norms: list[torch.Tensor] = []
        self._coef: torch.Tensor | None = None
        self.counts = {"in_graph": 0, "by_hook": 0}  # gradients applied by each road
        # Temporary bytes of one step per byte of the parameter (optim/step_workspace.py, measured
        # by optimizer_in_backward), and why it is not measured, if it is not.
        self.step_workspace_ratio, self.step_workspace_note = step_workspace
        self._dispatch_state = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())
        for p in params:
            entry = _by_param.get(p)
            if entry is None:
                entry = _by_param[p] = _Entry(None)
            elif entry.handle is not None:
                entry.handle.remove()  # a later optimizer_in_backward for the same parameter replaces it
            entry.handle = self
            entry.hook = p.register_post_accumulate_grad_hook(self._from_hook)

    # -- the update ---------------------------------------------------------------------------

    def _from_hook(self, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:  # autograd runs the hook even when a backward returned no gradient
            return
        param.grad = None
        self.counts["by_hook"] += 1
        self._apply(param, grad)

    def _apply(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        if self._mode == "norm":
            self._norms.append(torch.linalg.vector_norm(grad.detach(), 2.0))
            return
        held = self._held.pop(param, None)
        if held is not None:
            grad = held.add_(grad)  # the sum autograd's accumulation would have formed
        seen = self._seen.get(param, 0) + 1
        self._seen[param] = seen
        if seen % self.accumulation_steps:
            self._held[param] = grad if held is not None else grad.detach().clone()
            return
        pieces = self._slices.get(param)
        if pieces is None:
            self._step(param, grad)
            return
        # The first slice starts where the parameter does, unless param.data was replaced (e.g.
        # by module.to): then the slices follow it, as an optimizer holding the parameter would.
        moved = param.detach().view(-1) if pieces[0].data_ptr() != param.data_ptr() else None
        flat = grad.detach().reshape(-1)
        start = 0
        for piece in pieces:
            stop = start + piece.numel()
            if moved is not None:
                piece.data = moved[start:stop]
            self._step(piece, flat[start:stop])
            start = stop

    def _step(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """The optimizer's step on `param` alone: its group narrowed to it for the call (the
        step then visits one parameter, not all of them for every gradient)."""
        if self._coef is not None:
            grad = grad.mul(self._coef)
        group = self._group_of.get(id(param))
        if group is None or not any(g is group for g in self.optimizer.param_groups):
            # load_state_dict makes new group dicts: find them again
            self._group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
            group = self._group_of[id(param)]
        params, group["params"] = group["params"], [param]
        param.grad = grad.detach()
        try:
            self.optimizer.step()
        finally:
            param.grad = None
            group["params"] = params

    # -- clipping by global norm ----------------------------------------------------------------

    def clipped_backward(self, closure: Callable[[], torch.Tensor], max_norm: float) -> torch.Tensor:
        """Forward + backward twice (same RNG state): first to sum the gradients' norms, then to
        update with torch.nn.utils.clip_grad_norm_'s coefficient. Returns the total norm."""
        if self.accumulation_steps != 1:
            raise OptionError("clipped_backward with accumulation_steps > 1 is not supported: the norm is of the "
                              "accumulated gradients, which exist only after the last micro-batch")
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self._mode, self._norms = "norm", []
        try:
            closure().backward()
        finally:
            self._mode = "update"
        if not self._norms:
            raise RuntimeError("clipped_backward: the backward reached no parameter of this optimizer")
        total = torch.linalg.vector_norm(torch.stack(self._norms), 2.0)
        self._norms = []
        # torch.nn.utils.clip_grad_norm_'s coefficient, clamped to 1, applied to every gradient
        self._coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        try:
            closure().backward()
        finally:
            self._coef = None
        return total

    # -- what the user sees ---------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of optimizer state held now (torchao's low-bit buffers counted as they store)."""
        return optimizer_state_bytes(self.optimizer)

    def report(self) -> str:
        """What the user sees: the optimizer, its state bytes, the gradients each road applied."""
        weights = sum(p.numel() * p.element_size() for p in self._params)
        state = self.state_bytes()
        return (
            f"{type(self.optimizer).__name__} in the backward: {len(self._params)} parameters "
            f"({weights / 2**20:.1f} MiB), optimizer state {state / 2**20:.1f} MiB "
            f"({state / max(weights, 1):.2f}x the weights); gradients applied inside compiled backwards "
            f"{self.counts['in_graph']}, by accumulate-grad hooks {self.counts['by_hook']}; a step's temporaries "
            f"{self.step_workspace_ratio:.2g}x its parameter's bytes"
            + (f" (assumed: {self.step_workspace_note})" if self.step_workspace_note else " (measured)")
            + (f"; {len(self._slices)} parameters stepped in {sum(len(v) for v in self._slices.values())} slices "
               f"of at most {fmt_bytes(self._largest_slice_bytes())}" if len(self._slices) else "")
            + (f"; large parameters step whole: {self.not_sliced}" if self.not_sliced else "")
            + (f"; accumulating {self.accumulation_steps} backwards per step" if self.accumulation_steps > 1 else "")
        )

    def _largest_slice_bytes(self) -> int:
        return max(p.numel() * p.element_size() for pieces in self._slices.values() for p in pieces)

    def held_gradient_bytes(self) -> int:
        """Gradients held between micro-batches (accumulation_steps > 1)."""
        return sum(g.numel() * g.element_size() for g in self._held.values())

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def step(self) -> None:
        raise RuntimeError(
            "memsave.optimizer_in_backward: the optimizer already stepped inside loss.backward(); "
            "drop the opt.step() / opt.zero_grad() calls (handle.optimizer is there for schedulers)"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.step()

    def remove(self) -> None:
        """Detach: hooks removed; compiled graphs that step in-graph then accumulate into .grad."""
        for p in self._params:
            entry = _by_param.get(p)
            if entry is not None and entry.handle is self:
                entry.hook.remove()
                entry.handle = entry.hook = None
        self._held = WeakIdKeyDictionary()

    def __repr__(self) -> str:
        return (f"InBackward({type(self.optimizer).__name__}, {len(self._params)} parameters, "
                f"accumulation_steps={self.accumulation_steps})")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of an optimizer's state held now, any optimizer (tensor-subclass state by its parts)."""
    from memsave.memory.track import live_tensor_bytes

    return live_tensor_bytes(inner for state in optimizer.state.values() for value in state.values() for inner in stored_tensors(value))


def stored_tensors(value: Any) -> Iterable[torch.Tensor]:
    """The plain tensors that store a state value (torchao's low-bit state is a tensor subclass
    whose codes and scales are inner tensors)."""
    if not isinstance(value, torch.Tensor):
        return
    flatten = getattr(value, "__tensor_flatten__", None)
    if flatten is None or type(value) in (torch.Tensor, torch.nn.Parameter):
        yield value
        return
    for name in flatten()[0]:
        yield from stored_tensors(getattr(value, name))


def optimizer_in_backward(
    model: torch.nn.Module | Iterable[torch.Tensor] | Iterable[dict],
    optimizer_class: type,
    *args: Any,
    accumulation_steps: int = 1,
    slice_bytes: int | str | None = DEFAULT_SLICE_BYTES,
    **kwargs: Any,
) -> InBackward:
    """Run `optimizer_class(trainable params of model, *args, **kwargs)` inside the backward;
    parameters larger than `slice_bytes` step in slices of about that size (None: whole).
    `model` may also be tensors, or parameter groups (dicts with "params" and per-group
    options, as torch's optimizers take them: e.g. no weight decay for norms and biases)."""
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise OptionError(
            f"optimizer_in_backward takes an optimizer class (a torch.optim.Optimizer subclass, e.g. "
            f"torch.optim.AdamW or torchao.optim.AdamW8bit), got {optimizer_class!r}"
        )
    if optimizer_class.__name__ in _REFUSED:
        raise OptionError(f"optimizer_in_backward: {optimizer_class.__name__} {_REFUSED[optimizer_class.__name__]}; "
                          "it cannot step one parameter at a time")
    if not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool) or accumulation_steps < 1:
        raise OptionError(f"accumulation_steps must be a positive int, got {accumulation_steps!r}")
    groups = _param_groups(model)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise OptionError("optimizer_in_backward: the model has no parameter that requires grad")
    limit = None if slice_bytes is None else _slice_limit(slice_bytes)
    # Which parameters step in slices needs the class's rule (and torchao's block size, set by
    # its constructor): ask a throwaway instance built on a stand-in.
    try:
        block, not_sliced = slicing_block(optimizer_class([torch.nn.Parameter(torch.zeros(1))], *args, **kwargs))
    except Exception as error:  # noqa: BLE001 - the real constructor below reports a real problem
        block, not_sliced = 1, f"its rule could not be read ({type(error).__name__}: {error})"
    slices = {}
    if limit is not None and not_sliced is None:
        for p in params:
            bounds = slice_bounds(p, limit, block)
            if bounds is not None:
                slices[p] = make_slices(p, bounds)
    held = [{**g, "params": [piece for p in g["params"] for piece in slices.get(p, [p])]} for g in groups]
    optimizer = optimizer_class(held, *args, **kwargs)
    # The step's temporaries may depend on a group's options (Adam's weight decay adds one):
    # measured for each group's, the largest kept.
    measured = [measure_step_workspace(optimizer_class, args, {**kwargs, **{k: v for k, v in g.items() if k != "params"}},
                                       g["params"][0]) for g in groups]
    step_workspace = max(measured, key=lambda m: m[0])
    return InBackward(params, optimizer, accumulation_steps, step_workspace, slices,
                      not_sliced if limit is not None else "slice_bytes=None")


def _param_groups(model: Any) -> list[dict]:
    """[{"params": [trainable tensors, each once], **group options}] from a module, tensors or
    parameter groups; groups left without a trainable parameter are dropped."""
    if isinstance(model, torch.nn.Module):
        groups = [{"params": model.parameters()}]
    else:
        items = [model] if isinstance(model, torch.Tensor) else list(model)
        if all(isinstance(i, dict) for i in items) and items:
            groups = items
        elif all(isinstance(i, torch.Tensor) for i in items):
            groups = [{"params": items}]
        else:
            raise OptionError("optimizer_in_backward: pass a module, tensors, or parameter groups (dicts with "
                              f"'params'), not a mix; got {sorted({type(i).__name__ for i in items})}")
    out = []
    for g in groups:
        if "params" not in g:
            raise OptionError(f"optimizer_in_backward: a parameter group needs 'params'; got keys {sorted(g)}")
        tensors = [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])
        trainable = list(dict.fromkeys((p for p in tensors if p.requires_grad), None))  # tied weights once
        if trainable:
            out.append({**g, "params": trainable})
    return out


def _slice_limit(value: Any) -> int:
    try:
        return parse_bytes(value)
    except ValueError as error:
        raise OptionError(f"optimizer_in_backward: slice_bytes {value!r}: a positive number of bytes or a string "
                          "such as '8MiB', or None to step every parameter whole") from error
