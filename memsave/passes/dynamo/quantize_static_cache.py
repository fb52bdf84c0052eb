"""`options={"kv_cache": "int8" | "int4" | "kivi2"}`: HF's own static cache, held in fewer bits,
under torch.compile.

    model.forward = torch.compile(model.forward, backend="memsave", options={"kv_cache": "int8"})
    model.generate(ids, cache_implementation="static", max_new_tokens=...)

HF's `generate` makes a fresh `StaticCache` whose layers allocate their buffers lazily, in the
first `update`: inside the compiled prefill. So the prefill's Dynamo graph holds

    keys = torch.zeros((B, H, L, D), dtype)          # StaticLayer.lazy_initialization
    keys.index_copy_(2, positions, k)                # StaticLayer.update
    ... read by attention ...
    return (..., keys, ...)                          # Dynamo sets layer.keys = this output

and this pass rewrites it: the layout's codes and scales (kv_tensor.LAYOUTS: int8, or KIVI's
keys / values) are allocated instead, each `index_copy_` / `copy_` quantizes, each read is the
layout's dequantize op (which `fuse_kv_attention` then fuses with the attention: the codes are
read tile by tile), and the output HF stores is a `kv_tensor.QuantizedKV` made of them. The fp
buffer is never allocated. Decode graphs receive that QuantizedKV as an input; the pass replaces
it by its inner tensors (the wrapper unpacks it at each call) and rewrites the writes and reads
the same way.

The prefill (the graph that allocates the buffers) attends to the states it has just written,
not to their codes: HF's causal prefill reads `buffer[:, :, :T]`, the T tokens written from
position 0 of a fresh buffer, and that read becomes the states themselves (an SDPA as Inductor
runs it, flash-style). So the first token is what the fp32 cache gives; what later steps read
is quantized. This is what HF's QuantizedCache and KIVI do. A prefill read of more tokens than
it wrote (a padded batch's mask over the whole buffer) reads the codes, fused.

Left as they were, with the reason in the report: a buffer allocated outside the compiled graph
(HF's `early_initialization`, which `prefill_chunk_size` calls, or a cache the user passed: then
the fp buffer exists already and memsave cannot take its memory; `memsave.QuantizedStaticCache`
is that case's answer), and a buffer used other than written by `index_copy_` along the tokens or
`copy_`, read and returned. Sliding-window layers are held in the layout too: once full, HF rolls the
window (a read: one layer's window dequantized) and `copy_`s it back (quantized again).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch._dynamo.source import AttrSource

from memsave.graph.meta import example_val
from memsave.kv_tensor import LAYOUTS, TOKENS_DIM, QuantizedKV, layout_for
from memsave.passes.base import PassResult
from memsave.passes.dynamo.fuse_kv_attention import (
    SDPA,
    _first_tokens,
    _method_or_function,
    _token_slice,
)


@dataclass
class _Buffer:
    node: fx.Node  # the zeros, or the placeholder that holds a QuantizedKV
    writes: list[fx.Node]
    reads: list[fx.Node]
    outputs: list[int]  # positions among the graph's outputs
    layout: str = ""
    params: tuple[int, ...] = ()  # of write / read
    allocate_params: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Packed:
    """A graph output that HF stores as a buffer: its first inner tensor at `position`, the rest
    appended after the original outputs (at `extra`)."""

    position: int
    extra: tuple[int, ...]
    layout: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    params: tuple[int, ...]


@dataclass
class StaticCacheRewrite:
    """What the pass did to one Dynamo graph; `wrap` makes the compiled graph callable as Dynamo
    calls the original (QuantizedKV inputs in, QuantizedKV outputs out)."""

    result: PassResult
    real_inputs: list[Any]
    gm: fx.GraphModule  # the graph to compile: a rewritten copy, or the one given when nothing changed
    input_expansion: dict[int, int] = field(default_factory=dict)  # input index -> its inner tensors
    packed_outputs: list[_Packed] = field(default_factory=list)
    num_outputs: int = 0

    def wrap(self, compiled: Callable) -> Callable:
        if not self.input_expansion and not self.packed_outputs:
            return compiled
        expand, packed, n = dict(self.input_expansion), list(self.packed_outputs), self.num_outputs

        def run(*args):
            flat = []
            for i, value in enumerate(args):
                if i in expand:
                    if not isinstance(value, QuantizedKV) or len(value.inner) != expand[i]:
                        raise TypeError(f"memsave: graph input {i} was a QuantizedKV cache buffer when compiled, "
                                        f"now {value!r}")
                    flat += value.inner
                else:
                    flat.append(value)
            out = compiled(*flat)
            if not packed:
                return out
            result = list(out[:n])
            for p in packed:
                inner = (out[p.position], *(out[i] for i in p.extra))
                result[p.position] = QuantizedKV(p.layout, inner, p.dtype, p.shape, p.params)
            return type(out)(result) if isinstance(out, tuple) else result

        return run


def _is_index_copy(node: fx.Node, buffer: fx.Node) -> bool:
    """`buffer.index_copy_(2, positions, states)`: HF's write of new tokens."""
    if not _method_or_function(node, "index_copy_") or len(node.args) != 4 or node.kwargs or node.args[0] is not buffer:
        return False
    dim = node.args[1]
    return isinstance(dim, int) and dim % 4 == TOKENS_DIM and node.args[3] is not buffer


def _is_copy(node: fx.Node, buffer: fx.Node) -> bool:
    """`buffer.copy_(states)`: a sliding-window layer's whole window written back."""
    return (_method_or_function(node, "copy_") and len(node.args) == 2 and not node.kwargs
            and node.args[0] is buffer and node.args[1] is not buffer)


def _output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def _classify(buffer: fx.Node, output: fx.Node) -> _Buffer | str:
    """The buffer's writes, reads and output positions, or why it is not a static cache buffer."""
    writes, reads, outputs = [], [], []
    flat = output.args[0] if isinstance(output.args[0], (list, tuple)) else (output.args[0],)
    for user in buffer.users:
        if _is_index_copy(user, buffer) or _is_copy(user, buffer):
            if user.users:
                return f"the result of its {user.target} is used"
            writes.append(user)
        elif user is output:
            outputs += [i for i, v in enumerate(flat) if v is buffer]
        elif user.op == "call_method" and user.target.endswith("_"):
            return f"it is written by {user.target}"
        elif user.op == "call_function" and getattr(user.target, "__name__", "").endswith("_"):
            return f"it is written by {user.target.__name__}"
        elif user.op == "call_function" and user.target is operator.setitem:
            return "it is written by an index assignment"
        else:
            reads.append(user)
    if not writes:
        return "it is not written by index_copy_ along the tokens or copy_"
    return _Buffer(buffer, writes, reads, outputs)


def _is_cache_allocation(node: fx.Node) -> bool:
    if not (node.op == "call_function" and node.target is torch.zeros):
        return False
    val = example_val(node)
    return isinstance(val, torch.Tensor) and val.dim() == 4 and val.is_floating_point() and any(
        _is_index_copy(u, node) or _is_copy(u, node) for u in node.users)


def quantize_static_cache(gm: fx.GraphModule, real_inputs: list[Any], scheme: str) -> StaticCacheRewrite:
    """Rewrite `gm`'s static cache buffers to `scheme` (see the module doc); `real_inputs` are the
    Dynamo graph's example inputs, in placeholder order."""
    output = _output_node(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    held = {node: value for node, value in zip(placeholders, real_inputs) if isinstance(value, QuantizedKV)}
    notes, found = [], []
    for node in placeholders:
        if node in held:
            kind = _classify(node, output)
            if isinstance(kind, str):
                raise NotImplementedError(f"memsave: the {held[node].form} cache buffer {node.name} cannot be "
                                          f"compiled: {kind}")
            kind.layout, kind.params = held[node].form, held[node].params
            found.append(kind)
        elif any(_is_index_copy(u, node) or _is_copy(u, node) for u in node.users) and \
                isinstance(example_val(node), torch.Tensor) and example_val(node).dim() == 4:
            notes.append(f"{node.name}: a full-precision cache buffer allocated outside the compiled graph "
                         "(HF's early_initialization, which prefill_chunk_size calls, or a cache passed in): left as it "
                         "is; memsave.QuantizedStaticCache holds such a cache in fewer bits")
    allocated = []
    for node in list(gm.graph.nodes):
        if _is_cache_allocation(node):
            kind = _classify(node, output)
            if isinstance(kind, str):
                notes.append(f"{node.name}: not a static cache buffer memsave quantizes ({kind}): left as it is")
            else:
                allocated.append(kind)
    roles = _roles(allocated)
    if isinstance(roles, str):
        notes.append(f"static cache buffers left as they are: {roles}")
        allocated = []
    for buffer, role in zip(allocated, roles if allocated else []):
        head_size = example_val(buffer.node).shape[-1]
        buffer.layout, buffer.params, buffer.allocate_params = layout_for(scheme, role, head_size)
        found.append(buffer)
    rewrite = StaticCacheRewrite(PassResult(False, tuple(notes)), list(real_inputs), gm)
    if not found:
        return rewrite
    # Rewritten on a copy: Dynamo reads its own graph's placeholders after the backend returns.
    gm, copied = _copy(gm)
    rewrite.gm = gm
    output = _output_node(gm)
    index_of = {copied[node]: i for i, node in enumerate(placeholders)}
    found = [_Buffer(copied[b.node], [copied[n] for n in b.writes], [copied[n] for n in b.reads], b.outputs,
                     b.layout, b.params, b.allocate_params) for b in found]
    flat = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    rewrite.num_outputs = len(flat)
    extra: list[fx.Node] = []
    saved = exact = 0
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for buffer in found:
        fake = example_val(buffer.node)
        shape, dtype, spec = tuple(fake.shape), fake.dtype, LAYOUTS[buffer.layout]
        inner = _inner_nodes(gm, buffer, fake)
        written = _prefill_states(buffer, order)  # before the writes are replaced
        for write in buffer.writes:
            with gm.graph.inserting_before(write):
                if len(write.args) == 4:  # index_copy_(2, positions, states)
                    gm.graph.call_function(spec.write, (*inner, write.args[2], write.args[3], *buffer.params))
                else:  # copy_(states)
                    gm.graph.call_function(spec.write_all, (*inner, write.args[1], *buffer.params))
            gm.graph.erase_node(write)
        padded = example_val(inner[0]).shape[2]
        for read in buffer.reads:
            if written is not None and _first_tokens_read(read) == example_val(written).shape[2]:
                # The prefill reads back the tokens it wrote: the states themselves (module doc).
                read.replace_all_uses_with(written)
                gm.graph.erase_node(read)
                exact += 1
                continue
            with gm.graph.inserting_before(read):
                value = gm.graph.call_function(spec.read, (*inner, *buffer.params, dtype))
                value.meta["example_value"] = _fake_like(fake, (*shape[:2], padded, shape[3]), dtype)
                if padded != shape[2]:  # whole key groups held; HF reads its L tokens
                    value = gm.graph.call_function(
                        operator.getitem, (value, (slice(None), slice(None), slice(None, shape[2]), slice(None))))
                    value.meta["example_value"] = _fake_like(fake, shape, dtype)
            read.replace_input_with(buffer.node, value)
        for position in buffer.outputs:
            flat[position] = inner[0]
            first = rewrite.num_outputs + len(extra)
            rewrite.packed_outputs.append(_Packed(position, tuple(range(first, first + len(inner) - 1)), buffer.layout,
                                                  dtype, shape, buffer.params))
            extra += inner[1:]
        held_bytes = sum(example_val(t).numel() * example_val(t).element_size() for t in inner)
        saved += fake.numel() * fake.element_size() - held_bytes
        if buffer.node.op == "placeholder":
            rewrite.input_expansion[index_of[buffer.node]] = len(inner)
    output.args = (tuple(flat + extra),)
    for buffer in found:
        gm.graph.erase_node(buffer.node)
    gm.graph.lint()
    gm.recompile()
    rewrite.real_inputs = _expand_inputs(real_inputs, rewrite.input_expansion)
    layouts = ", ".join(sorted({b.layout for b in found}))
    new = sum(1 for b in found if b.node.op != "placeholder")
    rewrite.result = PassResult(True, tuple(notes) + (
        f"{len(found)} static cache buffers held as {layouts} ({new} allocated here, {len(found) - new} passed in), "
        f"{saved} bytes fewer than their full-precision form" + (
            f"; {exact} prefill reads of the tokens just written take the states themselves" if exact else ""),),
        {"buffers": len(found), "bytes_saved": saved, "exact_prefill_reads": exact})
    return rewrite


def _prefill_states(buffer: _Buffer, order: dict[fx.Node, int]) -> fx.Node | None:
    """The states a fresh buffer's one write puts at its first tokens, when every read comes
    after it: a buffer allocated in this graph is zeros, and HF's StaticLayer writes a layer it
    has just initialized from position 0 (its cumulative_length starts at 0)."""
    if buffer.node.op == "placeholder" or len(buffer.writes) != 1 or len(buffer.writes[0].args) != 4:
        return None
    write = buffer.writes[0]
    if any(order[read] < order[write] for read in buffer.reads):
        return None
    return write.args[3]


def _first_tokens_read(read: fx.Node) -> int | None:
    """T when `read` is `buffer[:, :, :T]` (HF's causal prefill reads its T tokens), else None."""
    tokens = _token_slice(read)
    return tokens.stop if tokens is not None and _first_tokens(tokens) else None


def _roles(buffers: list[_Buffer]) -> list[str] | str:
    """"keys" or "values" for each allocated buffer, in graph order. HF's StaticLayer allocates a
    layer's keys, then its values; where a buffer is read by an attention, the argument it feeds
    must agree (else the buffers are left, with this reason)."""
    if len(buffers) % 2:
        return f"{len(buffers)} buffers allocated, not keys and values in pairs"
    roles = ["keys" if i % 2 == 0 else "values" for i in range(len(buffers))]
    for buffer, role in zip(buffers, roles):
        seen = _attention_roles(buffer.node)
        if seen and seen != {role}:
            return f"{buffer.node.name} is allocated as a layer's {role} but an attention reads it as {', '.join(seen)}"
    return roles


def _attention_roles(buffer: fx.Node) -> set[str]:
    """Which SDPA arguments (keys / values) `buffer` reaches through views (HF's repeat_kv)."""
    roles, frontier = set(), [buffer]
    for _ in range(5):
        following = []
        for node in frontier:
            for user in node.users:
                if user.op == "call_function" and user.target in SDPA:
                    args = dict(zip(("query", "key", "value"), user.args)) | dict(user.kwargs)
                    roles |= {"keys" if name == "key" else "values" for name in ("key", "value") if args.get(name) is node}
                elif user.op in ("call_function", "call_method"):
                    following.append(user)
        frontier = following
    return roles


def _inner_nodes(gm: fx.GraphModule, buffer: _Buffer, fake: torch.Tensor) -> tuple[fx.Node, ...]:
    """The nodes that stand for `buffer`'s inner tensors: placeholders in a QuantizedKV's place,
    or an allocation in the zeros' place."""
    node, spec = buffer.node, LAYOUTS[buffer.layout]
    if node.op == "placeholder":
        nodes = []
        with gm.graph.inserting_before(node):
            for name in spec.inner:
                nodes.append(gm.graph.placeholder(f"{node.name}_{name}"))
        # AOTAutograd asks each Dynamo placeholder where it came from: the buffer's inner tensors.
        source = getattr(node, "_dynamo_source", None)
        for inner, name in zip(nodes, spec.inner):
            inner.meta["example_value"] = getattr(fake, name)
            inner._dynamo_source = AttrSource(source, name) if source is not None else None
        return tuple(nodes)
    with gm.graph.inserting_before(node):
        made = gm.graph.call_function(spec.allocate, (tuple(fake.shape), *buffer.allocate_params, fake.device))
        nodes = tuple(gm.graph.call_function(operator.getitem, (made, i)) for i in range(len(spec.inner)))
    mode = getattr(fake, "fake_mode", None)
    with mode if mode is not None else contextlib.nullcontext():
        values = spec.allocate(tuple(fake.shape), *buffer.allocate_params, fake.device)
    made.meta["example_value"] = values
    for inner, value in zip(nodes, values):
        inner.meta["example_value"] = value
    return nodes


def _fake_like(fake: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    fake = fake.inner[0] if isinstance(fake, QuantizedKV) else fake
    mode = getattr(fake, "fake_mode", None)
    if mode is None:
        return torch.empty(shape, dtype=dtype, device="meta")
    with mode:
        return torch.empty(shape, dtype=dtype, device=fake.device)


def _expand_inputs(real_inputs: list[Any], expansion: dict[int, int]) -> list[Any]:
    flat = []
    for i, value in enumerate(real_inputs):
        flat += list(value.inner) if i in expansion else [value]
    return flat


def _copy(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A copy of a Dynamo GraphModule that AOTAutograd still takes for Dynamo's (its meta, the
    sources of its parameters and placeholders), and the map from old nodes to new."""
    graph = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    result = graph.graph_copy(gm.graph, copied)
    graph.output(result)
    new = fx.GraphModule(gm, graph)
    new.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    for old, node in copied.items():
        if hasattr(old, "_dynamo_source"):
            node._dynamo_source = old._dynamo_source
    copied[_output_node(gm)] = _output_node(new)
    return new, copied
