"""Recognizing linear layers in an ATen graph.

AOTAutograd (with Inductor's decompositions) writes `nn.Linear` as a transpose of the weight
feeding a matmul, with the activations flattened to 2-D around it:

    t  = aten.permute(w, [1, 0])            # or aten.t(w)
    y  = aten.mm(x2d, t)                    # or aten.addmm(bias, x2d, t)

Passes that act on weights (quantize, prune, factorize) and the fusion in codegen find linears
through these helpers, so they agree on what a linear is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

aten = torch.ops.aten
MATMULS = (aten.mm.default, aten.addmm.default)


def is_transpose(node: fx.Node) -> bool:
    """aten.t, or aten.permute(w, [1, 0]) as Inductor's decomposition table writes it."""
    if node.op != "call_function":
        return False
    return node.target == aten.t.default or (node.target == aten.permute.default and list(node.args[1]) == [1, 0])


def plain_matmul_of(mm: fx.Node, t: fx.Node) -> bool:
    """mm is `x @ t` or `bias + x @ t` (beta = alpha = 1, 1-D bias) with t as the weight side."""
    if mm.op != "call_function":
        return False
    if mm.target == aten.mm.default:
        return mm.args[1] is t and mm.args[0] is not t
    if mm.target == aten.addmm.default:
        plain = mm.kwargs.get("beta", 1) == 1 and mm.kwargs.get("alpha", 1) == 1
        bias = mm.args[0].meta.get("val") if isinstance(mm.args[0], fx.Node) else None
        return plain and mm.args[2] is t and mm.args[1] is not t and isinstance(bias, torch.Tensor) and bias.dim() == 1
    return False


@dataclass(frozen=True)
class LinearUse:
    """One matmul that multiplies by a weight: y = x @ weightᵀ (+ bias)."""

    weight: fx.Node
    transpose: fx.Node
    matmul: fx.Node

    @property
    def x(self) -> fx.Node:
        return self.matmul.args[0] if self.matmul.target == aten.mm.default else self.matmul.args[1]

    @property
    def bias(self) -> fx.Node | None:
        return self.matmul.args[0] if self.matmul.target == aten.addmm.default else None


def linear_uses(weight: fx.Node) -> list[LinearUse] | None:
    """Every use of `weight` as a linear layer's weight, or None if it has any other use
    (an embedding, a tied weight read elsewhere, a matmul with beta/alpha): a pass that
    replaces the weight must then leave it alone."""
    uses = []
    for t in weight.users:
        if not is_transpose(t) or not t.users:
            return None
        for mm in t.users:
            if not plain_matmul_of(mm, t):
                return None
            uses.append(LinearUse(weight, t, mm))
    return uses or None
