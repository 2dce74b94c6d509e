"""Continual-RL task wrappers: the task changes on a schedule (every ``steps_per_task`` env steps) or on request.

Every wrapper derives from :class:`ContinualTaskWrapper`, which owns the schedule and the task-switch signal of
:mod:`sb3_blpo.common.task_switch`; subclasses only say what a task is (:meth:`ContinualTaskWrapper._apply_task`).

**Counting.** Each wrapper copy counts the ``step()`` calls it executes, across episodes (``reset()`` is not a step and
does not reset the count). After its ``steps_per_task``-th, ``2·steps_per_task``-th, … step it moves to the next task,
so the first step of task ``k`` is step ``k·steps_per_task + 1``. SB3's ``VecEnv``s (``DummyVecEnv``,
``SubprocVecEnv``) step every sub-environment exactly once per vector step, so all copies hold the same count and switch
at the same vector step ``k·steps_per_task`` — one switch every ``steps_per_task · n_envs`` model timesteps. (A copy
that is stepped on its own, e.g. for evaluation, falls out of lockstep: give evaluation its own environment.)

**Tasks.** Task ``k``'s parameters depend only on ``(schedule_seed, k)`` (a ``numpy`` generator seeded with both), not
on the environment's seed nor on the history: all copies built with the same ``schedule_seed`` see the same sequence,
and :meth:`ContinualTaskWrapper.set_task` can jump to any task. Task 0 is applied at construction.

**Signal.** The ``info`` of the first step executed under a new task carries ``info[TASK_SWITCH_INFO_KEY] = True``; every
``info`` carries the current task index under :data:`TASK_ID_INFO_KEY`. The new task's dynamics, rewards, actions and
observations apply from that step on; only the observation the agent acts on at that step (the last one returned under
the previous task) is still the old task's, a one-transition boundary the monitors' protocol allows for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from sb3_blpo._validation import InvalidParameterError, check_int
from sb3_blpo.common.task_switch import TASK_SWITCH_INFO_KEY

TASK_ID_INFO_KEY = "task_id"
"""The ``info`` key under which every step reports the index of the task it ran under."""


def _check_range(name: str, value: Any, minimum: float, allow_minimum: bool) -> tuple[float, float]:
    """Require a pair ``(low, high)`` of finite numbers with ``minimum ≤ low ≤ high`` (``<`` if not ``allow_minimum``)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise InvalidParameterError(f"{name} must be a pair (low, high), got {value!r}")
    low, high = value
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, (int, float, np.integer, np.floating)) or not math.isfinite(bound):
            raise InvalidParameterError(f"{name} must hold two finite numbers, got {value!r}")
    low, high = float(low), float(high)
    if low < minimum or (low == minimum and not allow_minimum):
        raise InvalidParameterError(f"{name} must have low {'>=' if allow_minimum else '>'} {minimum}, got {value!r}")
    if high < low:
        raise InvalidParameterError(f"{name} must have low <= high, got {value!r}")
    return low, high


def _log_uniform(rng: np.random.Generator, value_range: tuple[float, float], size: int | tuple[int, ...] | None = None) -> Any:
    low, high = value_range
    return np.exp(rng.uniform(math.log(low), math.log(high), size=size))


class ContinualTaskWrapper(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Base of the continual wrappers: a task schedule, explicit switches, and the task-switch signal.

    :param env: the environment to wrap.
    :param steps_per_task: switch to the next task after every ``steps_per_task`` steps of this copy (``None``: only
        explicit switches through :meth:`set_task`).
    :param schedule_seed: seed of the task parameters (task ``k`` is drawn from ``(schedule_seed, k)``).
    """

    def __init__(self, env: gym.Env, steps_per_task: int | None = None, schedule_seed: int = 0) -> None:
        # Recorded so that env.spec can recreate the wrapper (subclasses record their own arguments first).
        gym.utils.RecordConstructorArgs.__init__(self, steps_per_task=steps_per_task, schedule_seed=schedule_seed)
        gym.Wrapper.__init__(self, env)
        self.steps_per_task = None if steps_per_task is None else check_int("steps_per_task", steps_per_task, minimum=1)
        self.schedule_seed = check_int("schedule_seed", schedule_seed, minimum=0)
        self.task = 0
        self.env_steps = 0
        self.n_switches = 0
        self._signal_pending = False
        self._apply_task(0)

    def task_rng(self, task: int) -> np.random.Generator:
        """The generator of task ``task``'s parameters (depends only on ``schedule_seed`` and ``task``).

        :param task: task index.
        """
        return np.random.default_rng([self.schedule_seed, task])

    def _apply_task(self, task: int) -> None:
        """Make ``task`` the current task (draw its parameters from :meth:`task_rng` and install them)."""
        raise NotImplementedError  # abstract: each wrapper installs its own kind of task

    def set_task(self, task: int) -> None:
        """Switch to task ``task`` now; the next ``step()`` is its first and carries the switch signal.

        Usable on vector environments as ``vec_env.env_method("set_task", task)``. It always counts as a new task
        start (even if ``task`` is the current task) and does not move the schedule: the next scheduled switch still
        comes after the next multiple of ``steps_per_task`` steps and goes to ``task + 1``.

        :param task: index of the task (``>= 0``).
        """
        task = check_int("task", task, minimum=0)
        self.task = task
        self.n_switches += 1
        self._signal_pending = True
        self._apply_task(task)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(self._transform_action(action))
        info = dict(info)
        if self._signal_pending:
            info[TASK_SWITCH_INFO_KEY] = True
            self._signal_pending = False
        info[TASK_ID_INFO_KEY] = self.task
        obs, reward = self._transform_observation(obs), self._transform_reward(reward)
        self.env_steps += 1
        if self.steps_per_task is not None and self.env_steps % self.steps_per_task == 0:
            self.set_task(self.task + 1)
        return obs, reward, terminated, truncated, info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        info = dict(info)
        info[TASK_ID_INFO_KEY] = self.task
        return self._transform_observation(obs), info

    # Identity transforms, overridden by the wrappers that change them.
    def _transform_action(self, action: Any) -> Any:
        return action

    def _transform_observation(self, obs: Any) -> Any:
        return obs

    def _transform_reward(self, reward: SupportsFloat) -> SupportsFloat:
        return reward


class SlipperyFriction(ContinualTaskWrapper):
    """MuJoCo locomotion (Ant, HalfCheetah, Hopper, …) whose floor friction changes with the task (Slippery Ant).

    Task ``k``'s sliding friction is drawn log-uniformly in ``friction_range`` and written to the sliding component
    (column 0) of ``env.unwrapped.model.geom_friction`` for the floor geom; the torsional and rolling components are
    kept. The floor is the geom named ``"floor"`` if there is one, else the first geom of the world body.

    MuJoCo combines the frictions of two touching geoms of equal priority by their element-wise maximum, so with the
    robot's own geoms at friction 0.4–1.0 (Gymnasium's v5 models) a lower floor friction would change nothing. With
    ``floor_priority=True`` (default) the floor gets a ``geom_priority`` above every other geom, which makes MuJoCo use
    the floor's friction for each floor contact: the drawn value is the contact friction.

    :param env: a MuJoCo environment (``env.unwrapped.model`` is an ``mujoco.MjModel``).
    :param steps_per_task: env steps per task (``None``: switch only through :meth:`set_task`).
    :param schedule_seed: seed of the friction sequence.
    :param friction_range: ``(low, high)`` of the log-uniform friction, ``0 < low <= high``.
    :param floor_geom: name or index of the floor geom (``None``: ``"floor"``, else the first world-body geom).
    :param floor_priority: give the floor precedence in contacts (see above).

    Attributes: ``model`` (the ``MjModel``), ``floor_geom_id``, ``friction`` (the current task's sliding friction).
    """

    def __init__(
        self,
        env: gym.Env,
        steps_per_task: int | None = 2_000_000,
        schedule_seed: int = 0,
        friction_range: tuple[float, float] = (0.02, 2.0),
        floor_geom: str | int | None = None,
        floor_priority: bool = True,
    ) -> None:
        gym.utils.RecordConstructorArgs.__init__(
            self,
            steps_per_task=steps_per_task,
            schedule_seed=schedule_seed,
            friction_range=friction_range,
            floor_geom=floor_geom,
            floor_priority=floor_priority,
        )
        self.friction_range = _check_range("friction_range", friction_range, 0.0, allow_minimum=False)
        model = getattr(env.unwrapped, "model", None)
        if model is None or not hasattr(model, "geom_friction"):
            raise InvalidParameterError(f"env must be a MuJoCo environment (env.unwrapped.model), got {env.unwrapped!r}")
        self.model = model
        self.floor_geom_id = self._find_floor(model, floor_geom)
        if floor_priority:
            model.geom_priority[self.floor_geom_id] = int(np.max(model.geom_priority)) + 1
        self.friction = float("nan")
        super().__init__(env, steps_per_task, schedule_seed)

    @staticmethod
    def _find_floor(model: Any, floor_geom: str | int | None) -> int:
        import mujoco  # deferred: importing sb3_blpo.envs must not import mujoco

        if isinstance(floor_geom, str) or floor_geom is None:
            geom_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, floor_geom or "floor")
            if geom_id >= 0:
                return int(geom_id)
            if floor_geom is not None:
                raise InvalidParameterError(f"floor_geom: no geom named {floor_geom!r} in the model")
            world_geoms = np.flatnonzero(np.asarray(model.geom_bodyid) == 0)
            if world_geoms.size == 0:
                raise InvalidParameterError("floor_geom: the model has no geom named 'floor' and no world-body geom")
            return int(world_geoms[0])
        return check_int("floor_geom", floor_geom, minimum=0, maximum=int(model.ngeom) - 1)

    def task_friction(self, task: int) -> float:
        """The floor's sliding friction of task ``task``.

        :param task: task index.
        """
        return float(_log_uniform(self.task_rng(task), self.friction_range))

    def _apply_task(self, task: int) -> None:
        self.friction = self.task_friction(task)
        self.model.geom_friction[self.floor_geom_id, 0] = self.friction


class PermutedObservations(ContinualTaskWrapper):
    """Each task shows the (flattened) observation through a fixed random permutation, optionally with sign flips.

    The observation space becomes a ``Box`` of the original shape whose bounds are the union of all components'
    bounds (the same for every task), so that the space does not change with the task.

    :param env: an environment with a ``Box`` observation space.
    :param steps_per_task: env steps per task (``None``: switch only through :meth:`set_task`).
    :param schedule_seed: seed of the permutations.
    :param sign_flip: also multiply each component by a random sign drawn per task.
    """

    def __init__(
        self, env: gym.Env, steps_per_task: int | None = None, schedule_seed: int = 0, sign_flip: bool = False
    ) -> None:
        gym.utils.RecordConstructorArgs.__init__(
            self, steps_per_task=steps_per_task, schedule_seed=schedule_seed, sign_flip=sign_flip
        )
        space = env.observation_space
        if not isinstance(space, spaces.Box):
            raise InvalidParameterError(f"env must have a Box observation space, got {space!r}")
        self.sign_flip = bool(sign_flip)
        self._size = int(np.prod(space.shape))
        low, high = np.asarray(space.low, dtype=np.float64), np.asarray(space.high, dtype=np.float64)
        if self.sign_flip:
            bound = max(float(np.max(np.abs(low))), float(np.max(np.abs(high))))
            low_all, high_all = -bound, bound
        else:
            low_all, high_all = float(np.min(low)), float(np.max(high))
        self.permutation = np.arange(self._size)
        self.signs = np.ones(self._size, dtype=space.dtype)
        super().__init__(env, steps_per_task, schedule_seed)
        self.observation_space = spaces.Box(low_all, high_all, shape=space.shape, dtype=space.dtype)

    def _apply_task(self, task: int) -> None:
        rng = self.task_rng(task)
        self.permutation = rng.permutation(self._size)
        signs = rng.choice([-1.0, 1.0], size=self._size) if self.sign_flip else np.ones(self._size)
        self.signs = signs.astype(self.env.observation_space.dtype)

    def _transform_observation(self, obs: Any) -> Any:
        obs = np.asarray(obs)
        return (obs.reshape(-1)[self.permutation] * self.signs).reshape(obs.shape)


class _ScaledTaskWrapper(ContinualTaskWrapper):
    """A task wrapper whose tasks also draw a log-uniform scale from ``scale_range``; subclasses set up their state in
    :meth:`_prepare` (before the base class applies task 0).

    :param scale_range: ``(low, high)`` of the log-uniform scale, ``0 < low <= high``.
    """

    def __init__(
        self,
        env: gym.Env,
        steps_per_task: int | None = None,
        schedule_seed: int = 0,
        scale_range: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        gym.utils.RecordConstructorArgs.__init__(
            self, steps_per_task=steps_per_task, schedule_seed=schedule_seed, scale_range=scale_range
        )
        self.scale_range = _check_range("scale_range", scale_range, 0.0, allow_minimum=False)
        self._prepare(env)
        super().__init__(env, steps_per_task, schedule_seed)

    def _prepare(self, env: gym.Env) -> None:
        """Set up what :meth:`_apply_task` needs, from the wrapped ``env``."""


class FlippedRewards(_ScaledTaskWrapper):
    """Each task multiplies the reward by ``(-1)^k · scale_k``: the sign alternates, the scale is drawn per task.

    :param env: any environment with scalar rewards.
    :param steps_per_task: env steps per task (``None``: switch only through :meth:`set_task`).
    :param schedule_seed: seed of the scales.
    :param scale_range: ``(low, high)`` of the log-uniform scale, ``0 < low <= high`` (default ``(1, 1)``: pure sign flips).
    """

    def _prepare(self, env: gym.Env) -> None:
        self.reward_factor = 1.0

    def _apply_task(self, task: int) -> None:
        scale = float(_log_uniform(self.task_rng(task), self.scale_range))
        self.reward_factor = (-1.0) ** task * scale

    def _transform_reward(self, reward: SupportsFloat) -> SupportsFloat:
        return float(reward) * self.reward_factor


class FlippedActions(_ScaledTaskWrapper):
    """Each task changes the meaning of the actions.

    ``Discrete`` action spaces: a random permutation of the actions per task. ``Box`` action spaces: each dimension is
    mirrored about the centre of its bounds with probability 1/2 (about 0 where a bound is infinite) and its deviation
    from the centre multiplied by a log-uniform scale, ``a' = c + s·scale·(a − c)``, clipped to the bounds.

    :param env: an environment with a ``Discrete`` or ``Box`` action space.
    :param steps_per_task: env steps per task (``None``: switch only through :meth:`set_task`).
    :param schedule_seed: seed of the permutations, signs and scales.
    :param scale_range: ``(low, high)`` of the log-uniform scale of ``Box`` actions, ``0 < low <= high``.
    """

    def _prepare(self, env: gym.Env) -> None:
        space = env.action_space
        if isinstance(space, spaces.Discrete):
            self.action_permutation = np.arange(int(space.n))
        elif isinstance(space, spaces.Box):
            low, high = np.asarray(space.low, dtype=np.float64), np.asarray(space.high, dtype=np.float64)
            finite = np.isfinite(low) & np.isfinite(high)
            self._center = np.where(finite, (low + high) / 2.0, 0.0)
            self._low, self._high = low, high
            self.action_factor = np.ones(space.shape)
        else:
            raise InvalidParameterError(f"env must have a Discrete or Box action space, got {space!r}")

    def _apply_task(self, task: int) -> None:
        rng = self.task_rng(task)
        space = self.env.action_space
        if isinstance(space, spaces.Discrete):
            self.action_permutation = rng.permutation(int(space.n))
        else:
            signs = rng.choice([-1.0, 1.0], size=space.shape)
            self.action_factor = signs * _log_uniform(rng, self.scale_range, size=space.shape)

    def _transform_action(self, action: Any) -> Any:
        space = self.env.action_space
        if isinstance(space, spaces.Discrete):
            return space.start + self.action_permutation[int(action) - space.start]
        action = self._center + self.action_factor * (np.asarray(action, dtype=np.float64) - self._center)
        return np.clip(action, self._low, self._high).astype(space.dtype)


# -- factories for the registered ids ---------------------------------------------------------------------------------
def make_slippery(
    env_id: str,
    steps_per_task: int | None = 2_000_000,
    schedule_seed: int = 0,
    friction_range: tuple[float, float] = (0.02, 2.0),
    floor_priority: bool = True,
    **env_kwargs: Any,
) -> SlipperyFriction:
    """``gymnasium.make(env_id, **env_kwargs)`` wrapped in :class:`SlipperyFriction` (entry point of the Slippery ids).

    :param env_id: a MuJoCo locomotion id, e.g. ``"Ant-v5"``.
    :param steps_per_task: env steps per friction phase.
    :param schedule_seed: seed of the friction sequence.
    :param friction_range: ``(low, high)`` of the log-uniform friction.
    :param floor_priority: give the floor precedence in contacts.
    :param env_kwargs: passed to ``gymnasium.make`` (``render_mode``, ``max_episode_steps``, model options, …).
    """
    return SlipperyFriction(
        gym.make(env_id, **env_kwargs),
        steps_per_task=steps_per_task,
        schedule_seed=schedule_seed,
        friction_range=friction_range,
        floor_priority=floor_priority,
    )


def make_permuted(
    env_id: str,
    steps_per_task: int | None = 20_000,
    schedule_seed: int = 0,
    sign_flip: bool = True,
    **env_kwargs: Any,
) -> PermutedObservations:
    """``gymnasium.make(env_id, **env_kwargs)`` wrapped in :class:`PermutedObservations` (entry point of the Permuted ids).

    :param env_id: any id with a ``Box`` observation space, e.g. ``"CartPole-v1"``.
    :param steps_per_task: env steps per task.
    :param schedule_seed: seed of the permutations.
    :param sign_flip: also flip the components' signs per task.
    :param env_kwargs: passed to ``gymnasium.make``.
    """
    return PermutedObservations(
        gym.make(env_id, **env_kwargs), steps_per_task=steps_per_task, schedule_seed=schedule_seed, sign_flip=sign_flip
    )
