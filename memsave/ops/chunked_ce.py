"""memsave::linear_cross_entropy — an LM head and its cross-entropy loss, computed over token chunks.

    loss = cross_entropy(hidden @ weight.T + bias, labels, ignore_index, reduction)

without ever holding the full (tokens × vocab) logits: the forward computes the logits of
`chunk_size` tokens at a time, keeps only each token's log-sum-exp (N floats), and the
backward op recomputes one chunk's logits at a time to form grad_hidden and grad_weight
(the idea of Liger-Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy). Extra
memory is one chunk's logits (chunk × V) whatever the sequence length.

Note [Recompute in backward]: Liger computes the gradients inside the forward to avoid a second
pass over the logits; here the backward recomputes each chunk's logits instead (one extra
N×H×V matmul per step, 4 instead of 3), so the forward stays a plain loss (usable at
inference) and only the log-sum-exp (N fp32) is saved. On CUDA, codegen retargets both ops to
the fused Triton kernels of codegen/triton/chunked_ce.py (same schemas, tested against these).

chunk_size 0 means "all tokens in one chunk": the same maths unchunked (what the chunk pass
starts from before it picks a size). Logits are computed in the inputs' dtype and reduced in
fp32; in fp32 the results match F.linear + F.cross_entropy to fp32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memsave.memory.estimate import WORKSPACE

REDUCTIONS = ("mean", "sum", "none")


def _spans(n: int, chunk_size: int):
    step = chunk_size if chunk_size > 0 else max(n, 1)
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _acc_dtype(hidden: torch.Tensor) -> torch.dtype:
    """Softmax statistics in fp32 at least (fp64 stays fp64)."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _out_dtype(hidden: torch.Tensor, upcast: bool) -> torch.dtype:
    return _acc_dtype(hidden) if upcast else hidden.dtype


@torch.library.custom_op("memsave::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    chunk_size: int,
    upcast: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) → (loss, lse (N,) fp32).

    loss is a scalar for "mean"/"sum", (N,) for "none". upcast: the captured graph cast the
    logits to fp32 before the loss (HF does), so the loss comes out in fp32.
    """
    n = hidden.shape[0]
    acc = _acc_dtype(hidden)
    lse = torch.empty(n, dtype=acc, device=hidden.device)  # (N,)
    rows = torch.empty(n, dtype=acc, device=hidden.device)  # (N,) per-token loss
    for s, e in _spans(n, chunk_size):
        logits = F.linear(hidden[s:e], weight, bias).to(acc)  # (c, V): the only chunk-sized buffer
        target = labels[s:e]  # (c,)
        valid = target != ignore_index  # (c,)
        picked = logits.gather(1, torch.where(valid, target, 0)[:, None])[:, 0]  # (c,)
        # log-sum-exp in place (torch.logsumexp would allocate a second (c, V) buffer).
        peak = logits.amax(dim=-1, keepdim=True)  # (c, 1)
        lse[s:e] = (peak + logits.sub_(peak).exp_().sum(dim=-1, keepdim=True).log_())[:, 0]
        rows[s:e] = torch.where(valid, lse[s:e] - picked, 0.0)
        del logits  # before the next chunk's logits exist: one chunk alive at a time, not two
    return _reduce(rows, labels != ignore_index, reduction).to(_out_dtype(hidden, upcast)), lse


def _reduce(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    # "mean" divides by the tokens not ignored, as F.cross_entropy does (0/0 = nan when none).
    return total / valid.sum() if reduction == "mean" else total


@linear_cross_entropy.register_fake
def _(hidden, weight, bias, labels, ignore_index, reduction, chunk_size, upcast):
    n = hidden.shape[0]
    loss_shape = (n,) if reduction == "none" else ()
    return hidden.new_empty(loss_shape, dtype=_out_dtype(hidden, upcast)), hidden.new_empty((n,), dtype=_acc_dtype(hidden))


@torch.library.custom_op("memsave::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    reduction: str,
    chunk_size: int,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ grad_hidden (N, H), grad_weight (V, H), grad_bias (V,); an empty tensor where `needs`
    (hidden, weight, bias) says the gradient is not wanted.

    d loss / d logits[i] = scale[i] · (softmax(logits[i]) − onehot(labels[i])), with scale[i] =
    grad (sum), grad / #valid (mean) or grad[i] (none), and 0 on ignored tokens.
    """
    need_h, need_w, need_b = needs
    valid_all = labels != ignore_index  # (N,)
    scale_all = _row_scale(grad_loss, valid_all, reduction)  # (N,) fp32
    grad_h = torch.empty_like(hidden) if need_h else hidden.new_empty(0)  # (N, H)
    # fp32 accumulators over chunks: a bf16 running sum would round at every chunk.
    acc = _acc_dtype(hidden)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None  # (V, H)
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None  # (V,)
    for s, e in _spans(hidden.shape[0], chunk_size):
        h = hidden[s:e]  # (c, H)
        dlogits = F.linear(h, weight, bias).to(acc)  # (c, V)
        dlogits.sub_(lse[s:e, None]).exp_()  # softmax, in place: still one chunk-sized buffer
        target = labels[s:e]
        valid = valid_all[s:e]
        rows = torch.arange(e - s, device=hidden.device)[valid]
        dlogits[rows, target[valid]] -= 1.0
        dlogits.mul_(scale_all[s:e, None])  # ignored rows get scale 0
        d = dlogits.to(hidden.dtype)  # (c, V)
        if need_h:
            grad_h[s:e] = d @ weight  # (c, H)
        if need_w:
            grad_w.addmm_(d.t().to(acc), h.to(acc))  # no copies when the inputs are fp32 already
        if need_b:
            grad_b += dlogits.sum(0)
        del dlogits, d  # one chunk alive at a time
    return (  # distinct empty tensors: a custom op's outputs may not alias each other
        grad_h,
        grad_w.to(weight.dtype) if need_w else hidden.new_empty(0),
        grad_b.to(bias.dtype) if need_b else hidden.new_empty(0),
    )


def _row_scale(grad_loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-token factor of d loss / d logits: (N,) fp32, zero on ignored tokens."""
    grad = grad_loss.to(torch.promote_types(grad_loss.dtype, torch.float32))
    if reduction == "none":
        return torch.where(valid, grad, 0.0)
    if reduction == "mean":
        grad = grad / valid.sum()
    return torch.where(valid, grad.expand(valid.shape), 0.0)


@linear_cross_entropy_backward.register_fake
def _(grad_loss, hidden, weight, bias, labels, lse, ignore_index, reduction, chunk_size, needs):
    need_h, need_w, need_b = needs
    return (
        torch.empty_like(hidden) if need_h else hidden.new_empty(0),
        torch.empty_like(weight) if need_w else hidden.new_empty(0),
        hidden.new_empty(weight.shape[0]) if need_b else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, reduction, chunk_size, upcast = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.options = (ignore_index, reduction, chunk_size)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_loss, grad_lse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    ignore_index, reduction, chunk_size = ctx.options
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    gh, gw, gb = torch.ops.memsave.linear_cross_entropy_backward(
        grad_loss, hidden, weight, bias, labels, lse, ignore_index, reduction, chunk_size, [need_h, need_w, need_b]
    )
    return gh if need_h else None, gw if need_w else None, gb if need_b else None, None, None, None, None, None


linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def reference(hidden, weight, bias, labels, ignore_index=-100, reduction="mean"):
    """The unfused computation the op replaces (what the tests compare against)."""
    return F.cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index=ignore_index, reduction=reduction)


def chunk_rows(node) -> int:
    """Tokens per chunk that a linear_cross_entropy(_backward) node computes at once."""
    from memsave.graph.meta import hint_int

    hidden = node.args[0 if node.target is torch.ops.memsave.linear_cross_entropy.default else 1].meta["val"]
    n = hint_int(hidden.shape[0])
    chunk = node.args[6 if node.target is torch.ops.memsave.linear_cross_entropy.default else 8]
    return min(chunk, n) if chunk > 0 else n


def _workspace(node) -> int:
    # One chunk's logits in fp32 (plus their copy in the inputs' dtype when narrower); the
    # backward also holds fp32 gradient accumulators for a narrow weight.
    forward = node.target is torch.ops.memsave.linear_cross_entropy.default
    hidden = node.args[0 if forward else 1].meta["val"]
    weight = node.args[1 if forward else 2].meta["val"]
    vocab = int(weight.shape[0])
    narrow = hidden.element_size() < 4
    per_row = vocab * (4 + (hidden.element_size() if narrow else 0))
    extra = 0 if forward or not narrow else int(weight.numel()) * 4
    return chunk_rows(node) * per_row + extra


WORKSPACE[torch.ops.memsave.linear_cross_entropy.default] = _workspace
WORKSPACE[torch.ops.memsave.linear_cross_entropy_backward.default] = _workspace
