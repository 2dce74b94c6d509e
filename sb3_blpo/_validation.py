"""Argument checks shared by every layer (numpy only): they fail at construction, naming the parameter and
the accepted values."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import numpy as np


class InvalidParameterError(ValueError, TypeError):
    """A hyperparameter with the wrong type or value; catchable as ``ValueError`` or ``TypeError`` (as in scikit-learn)."""


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """Require an integer (bools refused) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidParameterError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InvalidParameterError(f"{name} must be an integer >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidParameterError(f"{name} must be an integer <= {maximum}, got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    allow_minimum: bool = True,
    allow_inf: bool = False,
) -> float:
    """Require a real number (bools refused, NaN refused) in the given range; ``allow_minimum=False`` makes it open."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidParameterError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise InvalidParameterError(f"{name} must be a finite number, got {value}")
    if minimum is not None and (value < minimum or (value == minimum and not allow_minimum)):
        bound = ">=" if allow_minimum else ">"
        raise InvalidParameterError(f"{name} must be {bound} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidParameterError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_one_of(name: str, value: Any, accepted: Collection[Any]) -> Any:
    """Require ``value`` to be one of ``accepted``."""
    if value not in accepted:
        raise InvalidParameterError(f"{name} must be one of {sorted(map(str, accepted))}, got {value!r}")
    return value
