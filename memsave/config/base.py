"""What every family's config shares: the option error, parsing from a short name or a dict,
choices in error messages, and per-layer selection (include / exclude / overrides)."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import fields
from typing import Any, Callable, ClassVar


try:  # Dynamo wraps backend exceptions in BackendCompilerFailed, except these.
    from torch._dynamo.exc import ShortenTraceback as _Unwrapped
except ImportError:  # pragma: no cover - older torch: the error arrives wrapped
    _Unwrapped = Exception


class OptionError(ValueError, _Unwrapped):
    """A bad memsave option: a ValueError naming the key and the valid choices.

    Also a Dynamo ShortenTraceback, which Dynamo re-raises as it is instead of wrapping it
    in BackendCompilerFailed, so `torch.compile(..., options=bad)(x)` raises this ValueError.
    """

    def __init__(self, message: str):
        if _Unwrapped is Exception:
            ValueError.__init__(self, message)
        else:
            _Unwrapped.__init__(self, message, first_useful_frame=None)


class BudgetError(OptionError):
    """No plan fits a memory budget: carries the smallest plan's size. An OptionError (a
    ValueError), so that torch.compile raises it as it is, not wrapped in BackendCompilerFailed.
    Raised by memsave.plan (budget/) and by a training step's recompute plan (passes/joint/)."""

    def __init__(self, message: str, smallest_bytes: int):
        super().__init__(message)
        self.smallest_bytes = smallest_bytes


PASS_FAMILIES = (
    "quantize",
    "prune",
    "factorize",
    "recompute",
    "pipeline",
    "tensor_parallel",
    "chunk",
    "precision",
    "plan_memory",
)
CODEGEN_CHOICES = ("inductor", "fx")
# options["kv_cache"]: the layouts HF's own static cache can be held in (passes/dynamo/quantize_static_cache.py)
KV_CACHE_CHOICES = ("int8", "int4", "kivi2")
OFF_VALUES = (None, False, "none", "off")


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


class FamilyConfig:
    """Base of the per-family configs: parsing from a short string or a dict, with clear errors."""

    family: ClassVar[str]
    # short string -> dict of field values; subclasses fill this in.
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {}
    # Names with parameters (e.g. "int4-g128-asym"): a parser from name to field values (None
    # when the name does not fit), the pattern and an example for the error message.
    name_parser: ClassVar[Callable[[str], dict[str, Any] | None] | None] = None
    name_pattern: ClassVar[str] = ""
    name_example: ClassVar[str] = ""

    @classmethod
    def parse(cls, value: Any) -> FamilyConfig | None:
        if isinstance(value, str):
            value = value.strip().lower()
        if value in OFF_VALUES:
            return None
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            if value in cls.shorthands:
                return cls(**cls.shorthands[value])
            fields_ = cls.name_parser(value) if cls.name_parser is not None else None
            if fields_ is None:
                names = f", names of the form {cls.name_pattern} (e.g. {cls.name_example!r})," if cls.name_pattern else ""
                raise OptionError(
                    f"options[{cls.family!r}]: unknown value {value!r}; valid choices: "
                    f"{_choices(('none', *cls.shorthands))}{names} or a dict with keys "
                    f"{_choices(f.name for f in fields(cls))}"
                )
            return cls(**fields_)
        if isinstance(value, dict):
            valid = {f.name for f in fields(cls)}
            for key in value:
                if key not in valid:
                    raise OptionError(
                        f"options[{cls.family!r}]: unknown key {key!r}; valid keys: "
                        f"{_choices(sorted(valid))}"
                    )
            return cls(**value)
        raise OptionError(
            f"options[{cls.family!r}]: expected a string, a dict or {cls.__name__}, "
            f"got {type(value).__name__}"
        )

    def _check_choice(self, name: str, value: Any, valid: tuple) -> None:
        if value not in valid:
            raise OptionError(
                f"options[{self.family!r}][{name!r}]: invalid value {value!r}; "
                f"valid choices: {_choices(valid)}"
            )


def name_matches(name: str, pattern: str) -> bool:
    """Whether a glob pattern of the include / exclude / overrides options names weight `name`:
    the weight's own name ("layers.0.mlp.down.weight") or its module's ("layers.0.mlp.down", the
    name without its last part), since users name modules as often as parameters (before, a
    pattern "lm_head" matched nothing and left the layer silently in)."""
    return fnmatch.fnmatchcase(name, pattern) or ("." in name and fnmatch.fnmatchcase(name.rsplit(".", 1)[0], pattern))


class LayerSelection:
    """include/exclude glob patterns over weight (or module) names and per-pattern overrides, shared by
    the families that act per weight (quantize, prune, factorize). A subclass lists the
    fields an override may change in `override_keys`."""

    override_keys: ClassVar[tuple[str, ...]] = ()

    def _normalize_selection(self) -> None:
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not all(isinstance(p, str) for p in value):
                raise OptionError(f"options[{self.family!r}][{name!r}]: expected glob patterns (strings), got {value!r}")
            object.__setattr__(self, name, tuple(value))
        items = self.overrides.items() if isinstance(self.overrides, dict) else self.overrides
        normalized = []
        for pattern, changes in items:
            changes = dict(changes)
            for key in changes:
                if key not in self.override_keys:
                    raise OptionError(
                        f"options[{self.family!r}]['overrides'][{pattern!r}]: unknown key {key!r}; "
                        f"valid keys: {_choices(self.override_keys)}"
                    )
            dataclasses.replace(self, overrides=(), **changes)  # validates the values
            normalized.append((pattern, tuple(sorted(changes.items()))))
        object.__setattr__(self, "overrides", tuple(normalized))

    def for_weight(self, name: str):
        """The config for one weight, or None when the filters leave it alone."""
        if not any(name_matches(name, p) for p in self.include):
            return None
        if any(name_matches(name, p) for p in self.exclude):
            return None
        config = self
        for pattern, changes in self.overrides:
            if name_matches(name, pattern):
                config = dataclasses.replace(config, **dict(changes))
        return config
