"""Lowering: turn the transformed ATen graph into something that runs.

Two ways, chosen by `options["codegen"]`:

- "inductor" (default): hand the graph to Inductor's inner compiler, as Inductor's own
  `compile_fx` would after AOTAutograd, so memsave + Inductor is comparable to Inductor alone.
  memsave ops reach Inductor as custom ops with fake kernels; Inductor calls them as extern
  kernels.
- "fx": run the graph as plain FX Python code. Useful to debug, and the closest match to the
  static estimate (no fusion).

Both return a *boxed* callable (`f(args: list)`, `f._boxed_call = True`) that empties the
argument list before it runs, so a backward frees each saved activation right after its last
use instead of holding all of them until it returns.

Before either, the backend runs `select_kernels`, which swaps memsave reference ops for fast
kernels where one is registered and applies (ATen packed kernels on CPU, `codegen/cpu.py`;
Triton on GPU): the seam every kernel plugs into.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.fx.graph import CodeGen


class BoxedCodeGen(CodeGen):
    """FX code that takes one list argument and clears it after unpacking.

    FX already writes `x = None` after a value's last use; with the caller's list cleared,
    the generated frame holds the only reference, so inputs die at their last use too.
    """

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, **kwargs: Any) -> str:
        names = [v.split(":")[0].split("=")[0].strip() for v in free_vars if v != "self"]
        lines = [f"def {self._func_name}(self, args_list){maybe_return_annotation}:"]
        if names:
            lines.append(f"    ({', '.join(names)},) = args_list")
            lines.append("    args_list.clear()")
        return "\n".join(lines)


def lower_fx(gm: fx.GraphModule) -> Callable[[list], Any]:
    gm.graph.set_codegen(BoxedCodeGen())
    gm.recompile()

    def run(args: list) -> Any:
        return gm.forward(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def lower_inductor(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    stage: str,
    num_user_outputs: int | None = None,
    static_input_idxs: Sequence[int] = (),
) -> Callable[[list], Any]:
    """Compile with Inductor the way `torch._inductor.compile_fx.compile_fx` does after AOT."""
    from torch._inductor.compile_fx import compile_fx_inner

    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    outputs = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    if stage == "inference":
        gm = inductor_joint_graph_passes(gm, example_inputs)
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    # Inductor keeps the strides of user-visible outputs as eager would give them.
    first = 0 if num_user_outputs is None else _mutations_first()
    user = range(first, first + (len(outputs) if num_user_outputs is None else num_user_outputs))
    output.meta["user_visible_output_idxs"] = [i for i in user if isinstance(outputs[i], fx.Node)]
    kwargs: dict[str, Any] = {"static_input_idxs": list(static_input_idxs)}
    if stage == "backward":
        kwargs["is_backward"] = True
    else:
        kwargs["is_inference"] = stage == "inference"
    with _allow_constants(gm, example_inputs):
        return compile_fx_inner(gm, list(example_inputs), **kwargs)


@contextlib.contextmanager
def _allow_constants(gm: fx.GraphModule, example_inputs: Sequence[Any]):
    """Let Inductor's fake-tensor propagation read memsave's constants (packed weights, scales).

    They are real tensors behind get_attr nodes; Inductor re-propagates fake tensors through
    the graph with the compile's fake mode, which refuses real tensors unless told otherwise
    (Inductor's own freezing path forces the same switch).
    """
    has_constants = any(n.op == "get_attr" for n in gm.graph.nodes)
    fake_mode = torch._guards.detect_fake_mode(list(example_inputs)) if has_constants else None
    if fake_mode is None:
        yield
        return
    before = fake_mode.allow_non_fake_inputs
    fake_mode.allow_non_fake_inputs = True
    try:
        yield
    finally:
        fake_mode.allow_non_fake_inputs = before


def inductor_joint_graph_passes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Inductor's pattern rewrites, run where Inductor runs them: on inference graphs, and on
    training graphs before partitioning. A private API; skipped when this torch lacks it."""
    from torch._inductor import compile_fx as cfx

    passes = getattr(cfx, "_recursive_joint_graph_passes", None)
    if passes is None:
        return gm
    from torch._inductor.virtualized import V

    # Some rewrites (e.g. the one for random ops) run under V.fake_mode, which compile_fx sets
    # around them; without it they fail with "'NullHandler' object does not support the
    # context manager protocol".
    fake_mode = torch._guards.detect_fake_mode(list(example_inputs)) or torch._guards.detect_fake_mode(
        [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    )
    with V.set_fake_mode(fake_mode) if fake_mode is not None else contextlib.nullcontext():
        if "input_device" in inspect.signature(passes).parameters:
            device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), None)
            return passes(gm, input_device=device)
        return passes(gm)


def _mutations_first() -> int:
    # In a training forward, AOTAutograd puts outputs for mutated inputs before the user's.
    context = torch._guards.TracingContext.try_get()
    if context is not None and context.fw_metadata is not None:
        return context.fw_metadata.num_mutated_inp_runtime_indices
    return 0


def lower(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    codegen: str,
    stage: str,
    num_user_outputs: int | None = None,
    static_input_idxs: Sequence[int] = (),
) -> Callable[[list], Any]:
    if codegen == "fx":
        return lower_fx(gm)
    if codegen == "inductor":
        return lower_inductor(
            gm, example_inputs, stage=stage, num_user_outputs=num_user_outputs, static_input_idxs=static_input_idxs
        )
    raise ValueError(f"unknown codegen {codegen!r}; valid choices: 'inductor', 'fx'")
