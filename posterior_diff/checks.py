"""Argument checks shared by the public entry points: each raises early, naming the argument."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np


def positive_int(value, name: str) -> int:
    """`value` as an int if it is an integer >= 1 (and not a bool); else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def choice(value, options: Iterable[str], name: str) -> str:
    """`value` if it is one of `options`; else a ValueError naming `name` and the options."""
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def number_in(value, name: str, low: float, high: float = math.inf, *, open_low: bool = False) -> float:
    """`value` as a float in [low, high] ((low, high] when `open_low`); else a TypeError for
    a non-number or a ValueError naming `name` and the range."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    below = number <= low if open_low else number < low
    if math.isnan(number) or below or number > high:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}")
    return number


def check_sigma_range(value, name: str) -> tuple[float, float]:
    """A noise range (low, high) with 0 <= low < high (high may be inf) as a tuple of floats; a
    TypeError or ValueError naming `name` otherwise."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise TypeError(f"{name} must be a pair (low, high) of noise levels, got {value!r}")
    low = number_in(value[0], f"{name}[0]", 0.0)
    high = number_in(value[1], f"{name}[1]", 0.0, open_low=True)
    if not low < high:
        raise ValueError(f"{name} must have low < high, got {value!r}")
    return low, high
