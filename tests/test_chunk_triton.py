"""The fused linear cross-entropy Triton kernels (memsave/codegen/triton/chunked_ce.py) against the
torch reference op, forward and gradients, under TRITON_INTERPRET=1 at small awkward shapes
(no size a multiple of the 16-wide blocks). GPU tests (marked gpu) run the compiled kernels."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")  # imported before TRITON_INTERPRET is set

import torch  # noqa: E402

import memsave.ops  # noqa: E402, F401
from memsave.codegen.triton import chunked_ce  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_env")
ATOL = 1e-5


def _problem(n=37, h=24, v=53, *, bias=True, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) * 0.3).to(device, dtype)
    b = torch.randn(v, generator=g).to(device, dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    return hidden, weight, b, labels.to(device)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_backward_match_the_reference(reduction, bias):
    hidden, weight, b, labels = _problem(bias=bias)
    args = (hidden, weight, b, labels, -100, reduction, 0, False)
    loss, lse = chunked_ce.forward(*args)
    ref_loss, ref_lse = torch.ops.memsave.linear_cross_entropy(*args)
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=1e-6)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=1e-6)
    grad = torch.randn_like(ref_loss)
    needs = [True, True, bias]
    bw_args = (grad, hidden, weight, b, labels, ref_lse, -100, reduction, 0, needs)
    got = chunked_ce.backward(*bw_args)
    want = torch.ops.memsave.linear_cross_entropy_backward(*bw_args)
    for g, w, name in zip(got, want, ("hidden", "weight", "bias")):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=1e-5, msg=name)


def test_only_wanted_gradients_and_custom_ignore_index():
    hidden, weight, _, labels = _problem(n=19, bias=False)
    labels[labels == -100] = 3  # ignore class 3 instead
    lse = torch.ops.memsave.linear_cross_entropy(hidden, weight, None, labels, 3, "mean", 0, False)[1]
    args = (torch.ones(()), hidden, weight, None, labels, lse, 3, "mean", 0, [True, False, False])
    gh, gw, gb = chunked_ce.backward(*args)
    assert gw.numel() == 0 and gb.numel() == 0
    torch.testing.assert_close(gh, torch.ops.memsave.linear_cross_entropy_backward(*args)[0], atol=ATOL, rtol=1e-5)
    assert gh[labels == 3].abs().max() == 0


def test_custom_ops_have_the_reference_schema_and_fake():
    ref = torch.ops.memsave.linear_cross_entropy.default._schema.arguments
    tri = torch.ops.memsave.linear_cross_entropy_triton.default._schema.arguments
    assert [(a.name, str(a.type)) for a in ref] == [(a.name, str(a.type)) for a in tri]
    hidden, weight, b, labels = _problem(n=5)
    torch.library.opcheck(torch.ops.memsave.linear_cross_entropy_triton.default, (hidden, weight, b, labels, -100, "sum", 0, False))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_training_step_uses_the_kernels_and_matches(dtype):
    import copy

    import memsave
    from memsave.models.decoder import build_decoder, decoder_inputs

    model = build_decoder("tiny").cuda().to(dtype).train()
    twin = copy.deepcopy(model)
    ids, labels = decoder_inputs(model, 2, 37, labels=True)
    model(ids, labels).backward()
    with memsave.collect() as reports:
        torch.compile(twin, backend="memsave", options={"chunk": "loss"})(ids, labels).backward()
    kernels = [n for r in reports for rec in r.records if rec.name == "select_kernels" for n in rec.notes]
    assert any(chunked_ce.KERNEL_NAME in n for n in kernels)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad.float(), p.grad.float(), atol=tol, rtol=tol)
