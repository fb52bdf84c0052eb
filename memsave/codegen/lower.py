"""Lowering: turn the transformed ATen graph into something that runs.

Two ways, chosen by `options["codegen"]`:

- "inductor" (default): hand the graph to Inductor's inner compiler, as Inductor's own
  `compile_fx` would after AOTAutograd, so memsave + Inductor is comparable to Inductor alone.
  memsave ops reach Inductor as custom ops with fake kernels; Inductor calls them as extern
  kernels. memsave's constants (packed weights, pruned weights, factors) reach it as extra
  graph inputs, not as get_attr constants (see Note [Constants as inputs to Inductor]).
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

from memsave.codegen.reinplace import reinplace_writes
from memsave.memory.process import give_back, rss_bytes


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
    reinplace_writes(gm)  # what Inductor's reinplacing does for its own code (codegen/reinplace.py)
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
    example_inputs = list(example_inputs)
    values, fakes = lift_constants(gm, example_inputs)
    static = list(static_input_idxs) + list(range(len(example_inputs), len(example_inputs) + len(values)))
    kwargs: dict[str, Any] = {"static_input_idxs": static}
    if stage == "backward":
        kwargs["is_backward"] = True
    else:
        kwargs["is_inference"] = stage == "inference"
    with _allow_constants(gm, example_inputs):
        compiled = compile_fx_inner(gm, example_inputs + fakes, **kwargs)
    if not values:
        return compiled

    def run(args: list) -> Any:
        args.extend(values)  # the compiled code clears the list (boxed): the constants stay here
        return compiled(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    run.memsave_constants = values  # type: ignore[attr-defined]  (tests compare storages)
    run.compiled = compiled  # type: ignore[attr-defined]
    return run


# Note [Constants as inputs to Inductor]
# memsave's passes put the compressed weights in the graph as get_attr constants. Handed to
# Inductor as such, each costs what the weight costs again, for the life of the process: the
# FX graph cache hashes every constant's values into its key (`t.tolist()`: seconds, and a
# Python list of 8 bytes per element while it runs), pickles them into the cache entry on disk,
# and `CacheArtifactManager` keeps that pickled entry in memory, for
# `torch.compiler.save_cache_artifacts()`, until the process ends (measured: +0.25x the fp32
# weight bytes of RSS after an int8 compile, +0.37x after structured-50 pruning, none with
# codegen "fx"). As graph inputs they are only metadata to Inductor: the cache key is their
# shapes, nothing is copied or serialized, and a cache hit (same shapes) reuses the compiled
# code with whatever values the inputs have. The lowered function appends them to each
# call's arguments; it holds the only reference the compiled model keeps.
# Tiny constants (a few elements) stay constants: Inductor may inline them into its kernels.

LIFT_MIN_NUMEL = 64


def lift_constants(gm: fx.GraphModule, example_inputs: list[Any]) -> tuple[list[torch.Tensor], list[Any]]:
    """Turn the graph's tensor constants (get_attr) into placeholders after the existing ones;
    returns their values (in placeholder order) and fake example inputs for them."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    attrs: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            attrs.setdefault(node.target, []).append(node)
    targets = []
    for target in attrs:
        value = _get_attr(gm, target)
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor) and value.numel() >= LIFT_MIN_NUMEL:
            targets.append((target, value))
    if not targets:
        return [], []
    fake_mode = torch._guards.detect_fake_mode(example_inputs) or torch._guards.detect_fake_mode(
        [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    )
    if fake_mode is None:
        return [], []  # nothing to describe the new inputs with: leave the constants as they are
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    values, fakes = [], []
    for target, value in targets:
        if anchor is None:
            with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
                node = gm.graph.placeholder(_placeholder_name(gm, target))
        else:
            with gm.graph.inserting_after(anchor):
                node = gm.graph.placeholder(_placeholder_name(gm, target))
        anchor = node
        with unset_fake_temporarily():
            fake = fake_mode.from_tensor(value, static_shapes=True)
        old = attrs[target][0]
        node.meta.update({k: v for k, v in old.meta.items() if k != "val"})
        node.meta["val"] = fake
        for use in attrs[target]:
            use.replace_all_uses_with(node)
            gm.graph.erase_node(use)
        _del_attr(gm, target)
        values.append(value)
        fakes.append(fake)
    gm.graph.lint()
    gm.recompile()
    return values, fakes


def _placeholder_name(gm: fx.GraphModule, target: str) -> str:
    return "memsave_const_" + target.replace(".", "_")


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _del_attr(gm: fx.GraphModule, target: str) -> None:
    *path, name = target.split(".")
    owner: Any = gm
    for part in path:
        owner = getattr(owner, part)
    if name in getattr(owner, "_buffers", {}):
        del owner._buffers[name]
    elif name in getattr(owner, "_parameters", {}):
        del owner._parameters[name]
    elif hasattr(owner, name):
        delattr(owner, name)


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
    report: Any = None,
) -> Callable[[list], Any]:
    """Lower `gm` with `codegen`; then give the memory the compile freed back to the OS and
    record the process's RSS in `report` (a GraphReport), if given."""
    if codegen == "fx":
        compiled = lower_fx(gm)
    elif codegen == "inductor":
        compiled = lower_inductor(
            gm, example_inputs, stage=stage, num_user_outputs=num_user_outputs, static_input_idxs=static_input_idxs
        )
    else:
        raise ValueError(f"unknown codegen {codegen!r}; valid choices: 'inductor', 'fx'")
    # The passes' working memory and the originals they released are free now, but glibc
    # keeps freed heap memory (Note [What memsave does to its host's allocator]).
    give_back()
    if report is not None:
        report.rss_after = rss_bytes()
    return _give_back_after_first_call(compiled)


def _give_back_after_first_call(compiled: Callable[[list], Any]) -> Callable[[list], Any]:
    """`compiled`, which gives freed memory back once more after its first call.

    The first call still does work of its own (Inductor's first run, kernels' scratch memory in
    their threads' heaps) whose freed pages would otherwise stay resident until something else
    trims. Measured (tests/test_process_memory.py, a cold Inductor cache): about 1 run in 4
    kept 32 MiB more (0.83x instead of 0.32x the fp32 weight bytes); a trim after the call
    returns them. Later calls pay one flag test."""
    first = [True]

    def run(args: list) -> Any:
        out = compiled(args)
        if first[0]:
            first[0] = False
            give_back()
        return out

    run._boxed_call = True  # type: ignore[attr-defined]
    for name in ("memsave_constants", "compiled"):  # what tests and reports look at
        if hasattr(compiled, name):
            setattr(run, name, getattr(compiled, name))
    return run
