"""NF4 (QLoRA's 4-bit NormalFloat, double-quantized absmax): the ops against a plain-torch
reference written here, against torchao's NF4, compiled, saved and loaded."""

from __future__ import annotations

import copy

import pytest
import torch

import memsave
from memsave.config import OptionError
from memsave.ops.nf4 import (
    NF4_LEVELS, SCALE_BLOCK, dequantize_nf4, nf4_bits_per_weight, quantize_weight_nf4,
)


def _reference(w: torch.Tensor, group: int) -> torch.Tensor:
    """NF4 as QLoRA describes it, spelled out: block absmax, its mean-centred int8 double
    quantization in blocks of 256, each weight the nearest level of w / stored absmax."""
    n, k = w.shape
    pad = (-k) % group
    g = torch.nn.functional.pad(w, (0, pad)).reshape(n, -1, group)
    absmax = g.abs().amax(-1)
    mean = absmax.mean()
    flat = (absmax - mean).flatten()
    stored = torch.empty_like(flat)
    for start in range(0, flat.numel(), SCALE_BLOCK):
        block = flat[start:start + SCALE_BLOCK]
        scale = block.abs().max() / 127
        stored[start:start + SCALE_BLOCK] = (torch.round(block / scale).clamp(-127, 127) * scale if scale > 0 else block * 0)
    stored = (stored + mean).reshape(absmax.shape)
    x = (g / stored.unsqueeze(-1)).clamp(-1, 1)
    levels = torch.tensor(NF4_LEVELS)
    nearest = (x.unsqueeze(-1) - levels).abs().argmin(-1)
    return (levels[nearest] * stored.unsqueeze(-1)).reshape(n, -1)[:, :k]


@pytest.mark.parametrize("shape, group", [((96, 200), 64), ((64, 256), 32), ((33, 512), 128)])
def test_dequantize_equals_the_written_out_reference(shape, group):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[0], 1)  # rows of different scales
    packed, *params = quantize_weight_nf4(w, group)
    ours = dequantize_nf4(packed, *params, group, shape[1], torch.float32)
    torch.testing.assert_close(ours, _reference(w, group), rtol=0, atol=1e-6)
    assert packed.dtype == torch.uint8 and params[0].dtype == torch.int8
    stored = packed.numel() + params[0].numel() + params[1].numel() * 4 + 4
    assert stored * 8 / w.numel() == pytest.approx(nf4_bits_per_weight(*shape, group))


def test_error_is_no_worse_than_torchaos_nf4():
    from memsave.models.minilm import load_minilm

    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        from torchao.dtypes.nf4tensor import to_nf4
    model, _ = load_minilm()
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)][:6]
    for w in weights:
        ours = dequantize_nf4(*quantize_weight_nf4(w, 64), 64, w.shape[1], torch.float32)
        theirs = to_nf4(w, 64, 256).get_original_weight()
        err, their_err = (ours - w).pow(2).sum(), (theirs - w).pow(2).sum()
        assert err <= 1.01 * their_err, (err, their_err)


def test_bad_options_name_the_valid_choices():
    with pytest.raises(OptionError, match="scheme 'nf4' is 4 bits"):
        memsave.Config.from_options({"quantize": {"scheme": "nf4", "bits": 3, "group_size": 64}})
    with pytest.raises(OptionError, match="scheme 'nf4' is 4 bits, nearest level"):
        memsave.Config.from_options({"quantize": {"scheme": "nf4", "bits": 4, "group_size": 64, "method": "mse"}})
    assert memsave.Config.from_options({"quantize": "nf4-g128"}).quantize.group_size == 128


@pytest.mark.parametrize("codegen", ["fx", "inductor"])
def test_compiles_saves_and_loads(codegen, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(200, 96), torch.nn.GELU(), torch.nn.Linear(96, 32)).eval()
    x = torch.randn(4, 200)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for m in reference:
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(_reference(m.weight, 64))
        expected = reference(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="memsave", options={"quantize": "nf4", "codegen": codegen})
        out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert all(m.weight.untyped_storage().nbytes() == 0 for m in model if isinstance(m, torch.nn.Linear))
    (quantize,) = [r for rep in memsave.recent_reports() for r in rep.records if r.name == "quantize"][-1:]
    assert all("nf4 g64" in q for q in quantize.details["quantized"])
    memsave.save(compiled, tmp_path / "nf4.safetensors")
    fresh = torch.nn.Sequential(torch.nn.Linear(200, 96), torch.nn.GELU(), torch.nn.Linear(96, 32)).eval()
    torch._dynamo.reset()
    loaded = memsave.load(fresh, tmp_path / "nf4.safetensors")
    with torch.no_grad():
        again = torch.compile(loaded, backend="memsave", options={"codegen": codegen, **loaded._memsave_options})(x)
    assert torch.equal(again, out)
