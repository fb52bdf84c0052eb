"""codegen/reinplace.py: functional writes become in-place ones only where nothing can tell."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from memsave.codegen.reinplace import reinplace_writes

aten = torch.ops.aten


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_a_written_back_input_is_written_in_place():
    def step(cache, position, new):
        out = aten.index_put.default(cache, [None, position], new)
        total = out.sum()
        aten.copy_.default(cache, out)
        return total

    gm = make_fx(step)(torch.zeros(2, 8), torch.tensor([3]), torch.ones(2, 1))
    assert reinplace_writes(gm) == 1
    assert aten.index_put_.default in _targets(gm) and aten.copy_.default not in _targets(gm)
    cache = torch.zeros(2, 8)
    address = cache.data_ptr()
    assert gm(cache, torch.tensor([3]), torch.ones(2, 1)) == 2
    assert cache.data_ptr() == address and cache[:, 3].tolist() == [1, 1] and cache.sum() == 2


def test_left_functional_when_the_old_contents_are_read_or_the_input_must_not_change():
    def read_after(cache, position, new):
        out = aten.index_copy.default(cache, 1, position, new)
        return out.sum() + cache.sum()  # reads the old cache after the write

    def no_write_back(cache, position, new):
        return aten.index_copy.default(cache, 1, position, new).sum()

    def into_a_view(cache, position, new):
        view = aten.slice.Tensor(cache, 0, 0, 1)
        return aten.index_copy.default(view, 1, position, new[:1]).sum()

    args = (torch.zeros(2, 8), torch.tensor([3]), torch.ones(2, 1))
    for fn in (read_after, no_write_back, into_a_view):
        gm = make_fx(fn)(*args)
        assert reinplace_writes(gm) == 0, fn.__name__
        cache = torch.zeros(2, 8)
        gm(cache, *args[1:])
        assert not cache.any(), fn.__name__


def test_a_fresh_buffer_is_written_in_place():
    def prefill(position, new):
        cache = aten.zeros.default([2, 8])
        return aten.index_copy.default(cache, 1, position, new)

    gm = make_fx(prefill)(torch.tensor([3]), torch.ones(2, 1))
    assert reinplace_writes(gm) == 1
    torch.testing.assert_close(gm(torch.tensor([5]), torch.ones(2, 1)), torch.zeros(2, 8).index_fill(1, torch.tensor([5]), 1.0))
