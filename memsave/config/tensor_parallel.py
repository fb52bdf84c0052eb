"""tensor_parallel: linears and attention heads split across ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from memsave.config.base import FamilyConfig, OptionError


@dataclass(frozen=True)
class TensorParallelConfig(FamilyConfig):
    """Tensor parallelism: linears and attention heads split across ranks (Megatron pairing).

    Column-parallel linears (QKV, MLP gate/up) keep their block of output features, the
    row-parallel linears after them (attention output, MLP down) their block of input
    features, with an all-reduce after each pair; attention heads are divided among ranks.
    Found from the graph: linears whose outputs cannot be split (the LM head, anything an
    unknown op reads) stay replicated. Run under `torchrun --nproc-per-node N`.
    group: the torch.distributed process group to split across (None: the default group; give
    the tensor-parallel group when combining with other parallelism). include/exclude: glob
    patterns over the weight names of linears that may be split. free_weights: release each
    split weight's full tensor, so a rank holds only its shards (memsave.sharded_parameters(model)
    gives an optimizer the shards). vocab_parallel: also split embeddings by vocabulary rows
    (masked lookup + all-reduce) and the linears otherwise kept whole (the LM head) by output
    rows, all-gathering their outputs.
    """

    family: ClassVar[str] = "tensor_parallel"
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {"auto": {}}

    group: Any = None
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    free_weights: bool = True
    vocab_parallel: bool = False

    def __post_init__(self):
        self._check_choice("free_weights", self.free_weights, (True, False))
        self._check_choice("vocab_parallel", self.vocab_parallel, (True, False))
        if self.group is not None and not hasattr(self.group, "group_name"):
            raise OptionError(
                f"options['tensor_parallel']['group']: expected a torch.distributed ProcessGroup or None "
                f"(the default group), got {type(self.group).__name__}"
            )
        for name in ("include", "exclude"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else tuple(value)
            if not all(isinstance(p, str) for p in value):
                raise OptionError(f"options['tensor_parallel'][{name!r}]: expected glob patterns (strings), got {value!r}")
            object.__setattr__(self, name, value)

    def describe(self) -> str:
        return "tensor parallel" + (", vocab-parallel" if self.vocab_parallel else "") + (" (own group)" if self.group is not None else "")
