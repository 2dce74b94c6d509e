"""A clear error for the commonest callback mistake: ``model.learn(..., callback=PlasticityMonitor)``, the class.

SB3 wraps anything callable that is not a ``BaseCallback`` as a function ``callback(locals, globals)`` and calls it at
every step, so the class would be instantiated with two dicts as hyperparameters and fail deep inside. The mixin
recognises that call at the first step and says what to do instead.
"""

from __future__ import annotations

from typing import Any


class InstanceOnlyCallback:
    """Mixin (first base) of the package's callbacks: refuses being called as SB3's ``callback(locals, globals)``."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 2 and not kwargs and isinstance(args[0], dict) and isinstance(args[1], dict):
            raise TypeError(
                f"callback={cls.__name__} passes the class to learn(); pass an instance: callback={cls.__name__}() "
                "(with its keyword arguments)"
            )
        return super().__new__(cls)
