"""Argument checks shared by the options of the optimizer and of every method: a bad value is a
ValueError/TypeError naming the option, raised before anything changes."""

from __future__ import annotations

from typing import Any


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_optional_positive_int(name: str, value: Any) -> None:
    if value is not None and (not is_int(value) or value <= 0):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def check_number(name: str, value: Any, ok: bool, hint: str) -> float:
    """``float(value)``; ValueError naming ``name`` unless it is a real number and ``ok``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
        raise ValueError(f"{name} must be {hint}, got {value!r}")
    return float(value)
