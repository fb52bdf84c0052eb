"""Read a safetensors checkpoint one tensor at a time, each into its own memory, and build a
model whose parameters take no memory until they are loaded.

    with memsave.empty_parameters():          # parameters on the meta device, buffers real
        model = Model(config)
    ckpt = Checkpoint("model.safetensors")
    w = ckpt.read("layers.0.mlp.up.weight")    # this tensor only, in an anonymous mapping

Why not `safetensors.safe_open`: it memory-maps the whole file, and every page a read touches
stays in the process's RSS (file-backed, but resident) until the file is closed, so reading a
checkpoint tensor by tensor would still show the whole file in RSS by the end. Here each tensor
is `readinto` an anonymous mapping of its own (memory.process.mapped_zeros): dropping the
tensor unmaps it, and the process gives the bytes back at once (no C-heap hole). The file's
pages live in the OS page cache, which RSS does not count.

Why buffers stay real in `empty_parameters`: a plain checkpoint holds the persistent state
only; a model's non-persistent buffers (e.g. rotary embeddings' inverse frequencies) are
computed by its constructor, and a model built wholly on the meta device could not run.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass

import torch
from torch import nn

from memsave.memory.process import mapped_zeros

# safetensors' dtype names (https://github.com/huggingface/safetensors, format docs)
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
HEADER_LIMIT = 100 << 20  # the format's own bound on the header's size


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class Checkpoint:
    """The tensors of one safetensors file, by name, read on demand (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if not 0 < size <= HEADER_LIMIT:
                    raise ValueError(f"header size {size}")
                header = json.loads(f.read(size))
        except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"memsave: {self.path!r} is not a readable safetensors file ({e})") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        start = 8 + size
        self.entries: dict[str, Entry] = {}
        for name, info in header.items():
            if info["dtype"] not in DTYPES:
                raise ValueError(f"memsave: {self.path!r}: {name!r} has dtype {info['dtype']!r}, which memsave does "
                                 f"not read (it reads {sorted(DTYPES)})")
            begin, end = info["data_offsets"]
            self.entries[name] = Entry(DTYPES[info["dtype"]], tuple(info["shape"]), start + begin, start + end)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        """Every tensor's name, in the order of their bytes in the file (sequential reads)."""
        return sorted(self.entries, key=lambda n: self.entries[n].begin)

    def read(self, name: str, dtype: torch.dtype | None = None, *, own_mapping: bool = True) -> torch.Tensor:
        """The tensor `name`, read from the file, cast to `dtype` if given. own_mapping: into an
        anonymous mapping of its own, unmapped when the tensor dies (for a tensor read to be
        dropped soon; its storage cannot be resized); else into an ordinary tensor. A cast's
        result is always an ordinary tensor."""
        entry = self.entries[name]
        flat = mapped_zeros((entry.nbytes,), torch.uint8) if own_mapping else torch.empty(entry.nbytes, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(entry.begin)
            view = memoryview(flat.numpy()).cast("B")
            got = 0
            while got < entry.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"memsave: {self.path!r} ends inside {name!r}")
                got += n
        tensor = flat.view(entry.dtype).view(entry.shape) if entry.nbytes else torch.empty(entry.shape, dtype=entry.dtype)
        return tensor if dtype is None or dtype == entry.dtype else tensor.to(dtype)


@contextlib.contextmanager
def empty_parameters():
    """Modules built inside create their parameters on the meta device (no memory); buffers are
    created as usual (see the module docstring). Load the weights with memsave.load."""
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(param)
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original
