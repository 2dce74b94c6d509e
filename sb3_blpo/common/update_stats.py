"""Statistics of one training update: collected per minibatch as returned values, logged once; and phase timing.

Compute steps return their statistics as a dict; the update adds them here and :meth:`UpdateStats.record` writes each
key once, as the mean over minibatches (losses, norms, fractions), the sum (counters and seconds), or the last value.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from collections.abc import Collection
from typing import Any


class UpdateStats:
    """Per-minibatch values of one update, by key."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)

    def add(self, **values: float) -> None:
        """Append one value per key."""
        for key, value in values.items():
            self.values[key].append(float(value))

    def record(self, logger: Any, summed: Collection[str] = (), last: Collection[str] = (), prefix: str = "train/") -> None:
        """Write every key to an SB3 logger: keys in ``summed`` as sums, keys in ``last`` as the last value (NaN if
        none was added), every other key as the mean."""
        for key, values in self.values.items():
            if key in summed:
                logger.record(prefix + key, math.fsum(values))
            elif key not in last:
                logger.record(prefix + key, math.fsum(values) / len(values))
        for key in last:
            logger.record(prefix + key, self.values[key][-1] if self.values.get(key) else math.nan)


class PhaseTimer:
    """Host wall time between phase markers: pass :meth:`lap` as a phase callback (``on_phase``) to a computation."""

    def __init__(self) -> None:
        self.started = self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        """Mark the end of ``phase``: its duration is the time since the previous marker."""
        now = time.perf_counter()
        self.laps[phase] = self.laps.get(phase, 0.0) + now - self._last
        self._last = now

    def total(self) -> float:
        """Seconds since the timer was created."""
        return time.perf_counter() - self.started


class NonFiniteGuard:
    """Counts steps skipped because a gradient was NaN/Inf (so that none reaches the parameters) and warns once.

    :param who: the algorithm's name, for the warning.
    """

    def __init__(self, who: str) -> None:
        self.who = who
        self.skips = 0
        self._warned = False

    def finite(self, vector: Any, what: str) -> bool:
        """Whether every entry of ``vector`` is finite; if not, the skip is counted."""
        if bool(vector.isfinite().all()):
            return True
        self.note(what)
        return False

    def note(self, what: str) -> None:
        """Count one skipped (or fallen-back) step caused by a non-finite ``what``; warn the first time."""
        self.skips += 1
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.who}: non-finite {what}; the affected step was skipped or fell back to the plain actor gradient "
                "(parameters are unchanged by it). Counts are logged as train/ihvp_fallbacks and train/nonfinite_skips.",
                RuntimeWarning,
            )
