"""Statistics the benchmark reports share."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def r_squared(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, int]:
    """R² of the least-squares line of ``y`` on ``x`` (the squared Pearson correlation), the correlation's sign, and
    the number of finite pairs."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    if xs.size < 3 or xs.std() == 0 or ys.std() == 0:
        return math.nan, math.nan, int(xs.size)
    correlation = float(np.corrcoef(xs, ys)[0, 1])
    return correlation**2, math.copysign(1.0, correlation), int(xs.size)
