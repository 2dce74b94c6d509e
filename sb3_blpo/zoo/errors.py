"""Errors of the rl-zoo3 launcher: the command line prints their message (no traceback) and exits with status 2."""

from __future__ import annotations

INSTALL_HINT = 'pip install "sb3_blpo[zoo]"'


class ZooError(Exception):
    """Base class of the errors that ``sb3-blpo-zoo`` reports as one line (``sb3-blpo-zoo: error: ...``)."""


class ZooInputError(ZooError, ValueError):
    """Bad user input: an unknown env key, an unknown hyperparameter, a malformed storage URL, a missing model..."""


class ZooDependencyError(ZooError, ImportError):
    """rl-zoo3, optuna or another optional dependency of the launcher is not installed."""
