"""Numbers a recipe may hold: finite, and inside the range where they mean something (one NaN or Inf in a
learning rate or a loss knob turns every trained weight NaN at the first step)."""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError


def finite_number(value: Any) -> bool:
    """A finite int or float (a bool is not a number here)."""
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


def check_number(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False, what: str = "") -> None:
    """Refuse ``value`` unless it is a finite number in [low, high] (ends open as flagged); the message
    says the range, e.g. ``weight_decay must be a finite number >= 0, got inf``."""
    ok = finite_number(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if ok:
        return
    if high == math.inf:
        span = f"{'>' if low_open else '>='} {low:g}"
    else:
        span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ConfigError(f"{name} must be a finite number {span}{' ' + what if what else ''}, got {value!r}")
