"""A quantized embedding table is read row by row: the lookup gathers the codes of the ids it
reads and dequantizes those rows only (codegen/fuse.py), bit for bit what the whole table gives."""

import pytest
import torch
from torch import nn

import memsave
from memsave.budget.candidates import FORMS_BY_NAME, reconstructed


class Table(nn.Module):
    def __init__(self, rows=20000, dim=128):
        super().__init__()
        self.e = nn.Embedding(rows, dim)

    def forward(self, ids):
        return self.e(ids) * 2


@pytest.mark.parametrize("codegen", ["fx", "inductor"])
@pytest.mark.parametrize("form", ["int8", "int4-g64"])
def test_lookup_dequantizes_only_the_rows_it_reads(codegen, form):
    torch.manual_seed(0)
    model = Table().eval()
    ids = torch.randint(0, 20000, (3, 17), generator=torch.Generator().manual_seed(1))
    f = FORMS_BY_NAME[form]
    # What the stored codes mean, as the whole table (GPTQ without calibration falls back to the
    # MSE grid in the pass and here alike): the reference lookup reads this.
    expected = nn.functional.embedding(ids, reconstructed(model.e.weight, f)) * 2
    options = {"quantize": {**f.for_weight(model.e.weight, embedding=True)["quantize"], "embeddings": True}, "codegen": codegen}
    with memsave.collect() as reports:
        compiled = torch.compile(model, backend="memsave", options=options)
        with torch.no_grad():
            compiled(ids)
            with memsave.MemoryTracker("cpu") as tracker:
                out = compiled(ids)
    notes = [n for r in reports for rec in r.records if rec.name == "fuse_dequant_matmul" for n in rec.notes]
    assert any("1 embedding lookups dequantize only the rows they read" in n for n in notes), notes
    assert torch.equal(out, expected)
    # The whole fp32 table is 9.8 MiB; a call needs its 51 rows and the output.
    assert tracker.stats.peak_bytes < 0.5 * 2**20, tracker.stats.peak_bytes
    torch._dynamo.reset()


class ExpandedIds(nn.Module):
    """BERT's way with token types: a buffer of ids expanded (stride 0) to the batch."""

    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(64, 32)
        self.register_buffer("types", torch.arange(64).view(1, 64) % 2, persistent=False)

    def forward(self, x):
        ids = self.types[:, : x.shape[1]].expand(x.shape[0], x.shape[1])
        return x + self.e(ids)


@pytest.mark.parametrize("codegen", ["fx", "inductor"])
def test_lookup_of_expanded_ids(codegen):
    torch.manual_seed(0)
    model = ExpandedIds().eval()
    x = torch.randn(3, 10, 32)
    f = FORMS_BY_NAME["int8"]
    ids = model.types[:, :10].expand(3, 10)
    expected = x + nn.functional.embedding(ids, reconstructed(model.e.weight, f))
    options = {"quantize": {**f.for_weight(model.e.weight, embedding=True)["quantize"], "embeddings": True}, "codegen": codegen}
    with torch.no_grad():
        out = torch.compile(model, backend="memsave", options=options)(x)
    assert torch.equal(out, expected)
    torch._dynamo.reset()
