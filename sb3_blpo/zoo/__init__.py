"""rl-zoo3 integration: the ``sb3-blpo-zoo`` launcher, BLPO's Optuna search space, and the packaged zoo configs.

Importing this package does not import rl-zoo3 or optuna (the ``zoo`` extra); :func:`main` and :func:`register` do,
and report a missing extra as ``pip install "sb3_blpo[zoo]"``. See ``docs/zoo.md``.
"""

from sb3_blpo.zoo.cli import ALGO_NAME, main, register
from sb3_blpo.zoo.configs import PACKAGED_CONFIGS, config_path
from sb3_blpo.zoo.errors import ZooDependencyError, ZooError, ZooInputError

__all__ = [
    "ALGO_NAME",
    "PACKAGED_CONFIGS",
    "ZooDependencyError",
    "ZooError",
    "ZooInputError",
    "config_path",
    "main",
    "register",
]
