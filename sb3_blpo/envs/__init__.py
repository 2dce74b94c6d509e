"""Continual-RL environments: task-switching wrappers and the ``sb3_blpo/...`` ids they register.

Importing this package registers the ids below with Gymnasium (it does not import MuJoCo: the Slippery ids import it
when they are made). With rl-zoo3, ``--gym-packages sb3_blpo.envs`` makes them available. Every registered id takes
``steps_per_task`` and ``schedule_seed`` (plus its wrapper's options and the base env's own kwargs) through
``gymnasium.make(id, **kwargs)``; see ``docs/continual.md``.

=====================================  ==============================  ===============================================
id                                     base env                        default schedule
=====================================  ==============================  ===============================================
``sb3_blpo/SlipperyAnt-v0``            ``Ant-v5``                      friction log-U[0.02, 2], new every 2,000,000 steps
``sb3_blpo/SlipperyHalfCheetah-v0``    ``HalfCheetah-v5``              same
``sb3_blpo/SlipperyHopper-v0``         ``Hopper-v5``                   same
``sb3_blpo/PermutedCartPole-v0``       ``CartPole-v1``                 permutation + sign flips, new every 20,000 steps
``sb3_blpo/PermutedPendulum-v0``       ``Pendulum-v1``                 permutation + sign flips, new every 50,000 steps
=====================================  ==============================  ===============================================
"""

from __future__ import annotations

import gymnasium as gym

from sb3_blpo.envs.continual import (
    TASK_ID_INFO_KEY,
    ContinualTaskWrapper,
    FlippedActions,
    FlippedRewards,
    PermutedObservations,
    SlipperyFriction,
    make_permuted,
    make_slippery,
)

__all__ = [
    "REGISTERED_IDS",
    "TASK_ID_INFO_KEY",
    "ContinualTaskWrapper",
    "FlippedActions",
    "FlippedRewards",
    "PermutedObservations",
    "SlipperyFriction",
    "make_permuted",
    "make_slippery",
    "register_envs",
]

_ENTRY = "sb3_blpo.envs.continual"

#: The registered ids and their default kwargs.
REGISTERED_IDS: dict[str, tuple[str, dict]] = {
    "sb3_blpo/SlipperyAnt-v0": (f"{_ENTRY}:make_slippery", dict(env_id="Ant-v5", steps_per_task=2_000_000)),
    "sb3_blpo/SlipperyHalfCheetah-v0": (f"{_ENTRY}:make_slippery", dict(env_id="HalfCheetah-v5", steps_per_task=2_000_000)),
    "sb3_blpo/SlipperyHopper-v0": (f"{_ENTRY}:make_slippery", dict(env_id="Hopper-v5", steps_per_task=2_000_000)),
    "sb3_blpo/PermutedCartPole-v0": (f"{_ENTRY}:make_permuted", dict(env_id="CartPole-v1", steps_per_task=20_000)),
    "sb3_blpo/PermutedPendulum-v0": (f"{_ENTRY}:make_permuted", dict(env_id="Pendulum-v1", steps_per_task=50_000)),
}


def register_envs() -> None:
    """Register :data:`REGISTERED_IDS` with Gymnasium (idempotent; done on ``import sb3_blpo.envs``).

    The episode limit comes from the base env (its own ``TimeLimit``, inside the task wrapper), so none is set here.
    """
    for env_id, (entry_point, kwargs) in REGISTERED_IDS.items():
        if env_id not in gym.envs.registry:
            gym.register(id=env_id, entry_point=entry_point, kwargs=dict(kwargs))


register_envs()
