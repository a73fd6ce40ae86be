"""Argument checks shared by the regularizer constructors: errors name the option at fault."""

from __future__ import annotations

import math
from typing import Any


def positive_float(owner: str, option: str, value: Any, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}: option `{option}` must be a finite number {bound}, got {value!r}")
    return float(value)


def positive_int(owner: str, option: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: option `{option}` must be a positive integer, got {value!r}")
    return value


def choice(owner: str, option: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{owner}: option `{option}` must be one of {allowed}, got {value!r}")
    return str(value)


def flag(owner: str, option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: option `{option}` must be true or false, got {value!r}")
    return value
