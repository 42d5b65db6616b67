"""Table cells of the evaluation report: numbers and percentages, "—" where undefined, and never
a negative zero (a saving of ``-1e-17`` prints ``0.00%``, not ``-0.00%``)."""

from __future__ import annotations

import math


def missing(x) -> bool:
    """No value: None, NaN or infinite."""
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def num(x, fmt: str = ".4f") -> str:
    """``format(x, fmt)``; "—" when missing; a value that rounds to zero prints unsigned."""
    if missing(x):
        return "—"
    text = format(x, fmt)
    zero = text.startswith("-") and not any(c in "123456789" for c in text.split("e")[0])
    return format(0.0, fmt) if zero else text


def pct(x) -> str:
    """``x`` as a percentage with two decimals (``0.5`` -> ``50.00%``); "—" when missing."""
    return "—" if missing(x) else f"{num(100 * x, '.2f')}%"
