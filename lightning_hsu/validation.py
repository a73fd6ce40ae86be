"""Argument checks shared by every constructor and option: errors name the owner and the option at
fault, and booleans are never taken for numbers."""

from __future__ import annotations

import math
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_float(owner: str, option: str, value: Any, *, allow_zero: bool = False) -> float:
    """A finite number > 0 (>= 0 with ``allow_zero``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}: option `{option}` must be a finite number {bound}, got {value!r}")
    return float(value)


def number_in(owner: str, option: str, value: Any, low: float, high: float) -> float:
    """A number in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{owner}: option `{option}` must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def positive_int(owner: str, option: str, value: Any) -> int:
    """An integer >= 1."""
    return int_at_least(owner, option, value, 1)


def optional_positive_int(owner: str, option: str, value: Any) -> int | None:
    """An integer >= 1, or ``None``."""
    return None if value is None else int_at_least(owner, option, value, 1)


def int_at_least(owner: str, option: str, value: Any, minimum: int) -> int:
    """An integer >= ``minimum``."""
    if not _is_int(value) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{owner}: option `{option}` must be {what}, got {value!r}")
    return int(value)


def integer(owner: str, option: str, value: Any) -> int:
    """Any integer (a seed)."""
    if not _is_int(value):
        raise ValueError(f"{owner}: option `{option}` must be an integer, got {value!r}")
    return int(value)


def choice(owner: str, option: str, value: Any, allowed: tuple[str, ...]) -> str:
    """One of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{owner}: option `{option}` must be one of {allowed}, got {value!r}")
    return str(value)


def flag(owner: str, option: str, value: Any) -> bool:
    """``True`` or ``False`` (not a truthy value)."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: option `{option}` must be true or false, got {value!r}")
    return value
