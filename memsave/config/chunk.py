"""chunk: sequence chunking of losses, attention and MLPs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from memsave.config.base import FamilyConfig, OptionError, _choices


CHUNK_TARGETS = ("loss", "attention", "mlp")
CHUNK_LOGITS = ("keep", "drop")  # logits also returned beside the loss: kept in full, or an empty tensor returned
CHUNK_DEFAULT_BUDGET = 32 * 2**20  # bytes of one loss chunk's logits when no budget is given


def _parse_chunk_name(name: str) -> dict[str, Any] | None:
    """`tokens-<n>` (chunks of n tokens), `budget-<MiB>` (chunk workspace budget) → ChunkConfig fields."""
    m = re.fullmatch(r"(tokens|budget)-(\d+)", name)
    if m is None:
        return None
    value = int(m.group(2))
    return {"chunk_size": value} if m.group(1) == "tokens" else {"budget": value * 2**20}


@dataclass(frozen=True)
class ChunkConfig(FamilyConfig):
    """Sequence chunking: the LM-head loss over token chunks, eager attention routed to SDPA, MLPs by tokens.

    targets: which patterns to rewrite. "loss": linear → cross_entropy becomes one op that
    computes the loss (and its gradient) over chunks of tokens, never holding the full
    (tokens × vocab) logits; "attention": matmul → softmax → matmul attention becomes
    scaled_dot_product_attention where that is exactly the same computation; "mlp": inference
    MLP blocks are computed over chunks of tokens, only when a budget or chunk size is given.
    chunk_size: tokens per chunk (an int >= 1), or None to derive it from the budget.
    budget: bytes one chunk's temporaries may take (an int >= 1024), or None: 32 MiB of
    logits per loss chunk, and no MLP chunking.
    logits: "keep" (default) or "drop". A model that returns its logits beside the loss (HF's
    causal LMs do) needs them in full, so its loss is left unfused. "drop": in training graphs
    the compiled model returns an empty tensor in their place, and the loss runs over chunks
    (what Liger-Kernel's skip_logits does); graphs without gradients keep them.
    """

    family: ClassVar[str] = "chunk"
    name_pattern: ClassVar[str] = "'tokens-<n>', 'budget-<MiB>'"
    name_parser: ClassVar = staticmethod(_parse_chunk_name)
    name_example: ClassVar[str] = "budget-64"
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {
        "auto": {},
        "loss": {"targets": ("loss",)},
        "attention": {"targets": ("attention",)},
    }

    targets: tuple[str, ...] = CHUNK_TARGETS
    chunk_size: int | None = None
    budget: int | None = None
    # Set by options['budget'] when options['chunk'] is left out (Config.from_options): a
    # training step's budget gets the exact rewrites (the loss over chunks, attention as SDPA)
    # before its recompute plan is chosen; inference graphs are left to the planner's forms.
    training_only: bool = False
    logits: str = "keep"

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets:
            raise OptionError(f"options['chunk']['targets']: empty; valid choices: {_choices(CHUNK_TARGETS)} (or 'none' to switch chunking off)")
        for target in targets:
            self._check_choice("targets", target, CHUNK_TARGETS)
        self._check_choice("logits", self.logits, CHUNK_LOGITS)
        object.__setattr__(self, "targets", tuple(t for t in CHUNK_TARGETS if t in targets))
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise OptionError(f"options['chunk']['chunk_size']: {self.chunk_size!r} is not a positive int (tokens per chunk) or None (from the budget)")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1024):
            raise OptionError(f"options['chunk']['budget']: {self.budget!r} is not a number of bytes (an int >= 1024) or None (32 MiB per loss chunk)")
        if self.chunk_size is not None and self.budget is not None:
            raise OptionError("options['chunk']: give 'chunk_size' or 'budget', not both (the size comes from the budget)")

    @property
    def explicit(self) -> bool:
        """Whether the user asked for a size (what MLP chunking waits for)."""
        return self.chunk_size is not None or self.budget is not None

    def rows_for(self, row_bytes: int) -> int:
        """Tokens per chunk when one token's temporaries take `row_bytes`."""
        if self.chunk_size is not None:
            return self.chunk_size
        budget = CHUNK_DEFAULT_BUDGET if self.budget is None else self.budget
        return max(1, budget // max(row_bytes, 1))

    def describe(self) -> str:
        size = f"{self.chunk_size} tokens" if self.chunk_size else f"budget {(self.budget or CHUNK_DEFAULT_BUDGET) / 2**20:g} MiB"
        chosen = " (chosen by the training budget)" if self.training_only else ""
        dropped = ", logits returned beside the loss dropped in training" if self.logits == "drop" else ""
        return f"{'+'.join(self.targets)}, {size}{chosen}{dropped}"
