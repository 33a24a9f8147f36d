"""Numbers that arrive from someone else: a reply, a node or run config, a header, a file.

Python counts ``True`` as the integer 1 and JSON gives floats for whole numbers; none of
our fields takes a bool where a number is asked. These predicates say what each field
accepts, once, for every reader.
"""

from __future__ import annotations

import math
import re


def is_int(value: object) -> bool:
    """An integer, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def real(value: object) -> float | None:
    """``value`` as a float if it is an int or a float (not a bool), else None.

    Raises
    ------
    OverflowError
        For an integer past float's range.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def is_count(value: object) -> bool:
    """A whole number: an integer (not a bool), or a finite float with no fraction."""
    return is_int(value) or (
        isinstance(value, float) and math.isfinite(value) and value.is_integer()
    )


def positive(value: object) -> float | None:
    """``value`` as a finite float > 0, else None (an integer past float's range too)."""
    try:
        number = real(value)
    except OverflowError:
        return None
    return number if number is not None and math.isfinite(number) and number > 0 else None


DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def plain_number(raw: object) -> float:
    """A node-config number: an int or float, or a plain ASCII decimal string; else NaN.

    An empty string, a bool, ``1_0``, hex or non-ASCII digits are not numbers here: a
    floor set by mistake must not be silently off, nor mean something else.
    """
    if (number := real(raw)) is not None:
        return number
    if isinstance(raw, str) and DECIMAL.fullmatch(raw.strip()) and raw.strip().isascii():
        return float(raw)
    return math.nan
