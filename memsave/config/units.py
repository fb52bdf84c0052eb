"""Byte budgets as people write them: "24MiB", "1.5GB", "800 KB", or a number of bytes."""

from __future__ import annotations

import re

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value) -> int:
    """`value` in bytes; a clear error names the forms accepted."""
    if isinstance(value, bool):
        raise ValueError(f"budget {value!r}: expected a number of bytes or a string such as '24MiB' or '1.5GB'")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"budget {value!r}: must be positive")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m is not None and m.group(2).lower() in UNITS:
            number = float(m.group(1)) * UNITS[m.group(2).lower()]
            if number > 0:
                return int(number)
    raise ValueError(f"budget {value!r}: expected a positive number of bytes or a string such as '24MiB', "
                     f"'1.5GB' (units: {', '.join(u for u in UNITS if u)})")
