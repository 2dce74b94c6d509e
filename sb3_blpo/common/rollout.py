"""One reader of SB3's rollout buffer, used by BLPO's update and by the callbacks.

SB3 stores a rollout as ``(n_steps, n_envs, ...)`` arrays and ``RolloutBuffer.get()`` flattens them in place,
env-major. :class:`RolloutReader` hides that difference and always hands out the env-major view: entry
``n * n_steps + t`` is step ``t`` of environment ``n``, so each environment's trajectory is contiguous (what GAE over
the rollout needs). Reading never calls ``get()``, so the buffer's state is left as the algorithm expects it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.type_aliases import PyTorchObs


@dataclass(frozen=True)
class RecurrentStates:
    """What sb3-contrib's recurrent policies (RecurrentPPO) need besides the observations, per transition: the LSTM
    states recorded when the action was taken (before the step) and whether the step started an episode (the policy
    then resets the states).

    :param actor: the actor LSTM's ``(hidden, cell)`` states, each ``(num_layers, B, hidden_size)``.
    :param critic: the critic LSTM's ``(hidden, cell)`` states (the actor's when the LSTM is shared).
    :param episode_starts: ``(B,)`` floats, 1 where a new episode started at that step.
    """

    actor: tuple[th.Tensor, th.Tensor]
    critic: tuple[th.Tensor, th.Tensor]
    episode_starts: th.Tensor


@dataclass(frozen=True)
class RolloutBatch:
    """Transitions of the rollout buffer as tensors on the policy's device.

    :param observations: observations (a tensor, or a dict of tensors for dict observation spaces).
    :param actions: actions as the policy's ``log_prob`` expects them (``long`` indices for ``Discrete``).
    :param old_log_prob: log-probabilities recorded during collection.
    :param advantages: GAE advantages (not normalised).
    :param returns: value targets (advantages + values).
    :param action_masks: the valid-action masks of sb3-contrib's ``MaskableRolloutBuffer`` (``None`` for other buffers).
    :param recurrent: the LSTM states and episode starts of sb3-contrib's recurrent buffers (``None`` for other buffers).
    """

    observations: PyTorchObs
    actions: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    action_masks: th.Tensor | None = None
    recurrent: RecurrentStates | None = None

    @property
    def size(self) -> int:
        """Number of transitions."""
        return int(self.returns.shape[0])


class RolloutReader:
    """A full SB3 rollout buffer, read in place as torch tensors in env-major order (see the module docstring).

    :param buffer: a full ``RolloutBuffer`` or ``DictRolloutBuffer`` (or a subclass).
    :param action_space: the algorithm's action space (``Discrete`` actions become ``long`` indices).
    :param device: where the tensors go.
    :raises RuntimeError: if the buffer is not full (it is read between collection and ``train()``).
    """

    def __init__(self, buffer: RolloutBuffer | DictRolloutBuffer, action_space: spaces.Space, device: th.device) -> None:
        if not isinstance(buffer, RolloutBuffer | DictRolloutBuffer) or not buffer.full:
            raise RuntimeError("the rollout buffer is not full; it is read after collection and before train()")
        self.buffer = buffer
        self.discrete_actions = isinstance(action_space, spaces.Discrete)
        self.device = device
        self.n_steps, self.n_envs = int(buffer.buffer_size), int(buffer.n_envs)

    @property
    def size(self) -> int:
        """Transitions in the rollout, ``n_steps · n_envs``."""
        return self.n_steps * self.n_envs

    def env_major(self, array: np.ndarray) -> np.ndarray:
        """A buffer field as ``(n_envs · n_steps, ...)``, whether or not ``buffer.get()`` has flattened it already.

        Decided per field from its shape: ``get()`` flattens (env-major, ``swap_and_flatten``) observations, actions,
        values, log-probabilities, advantages and returns, but not rewards or episode starts. With one env both
        layouts hold the same order.
        """
        if array.shape[:2] == (self.n_steps, self.n_envs):
            return array.swapaxes(0, 1).reshape(self.size, *array.shape[2:])
        return array

    def tensor(self, array: np.ndarray, index: np.ndarray | None = None) -> th.Tensor:
        """A buffer field (env-major), all entries or the flat entries ``index``, as a tensor on the device."""
        flat = self.env_major(array)
        return th.as_tensor(flat if index is None else flat[index], device=self.device)

    def observations(self, index: np.ndarray | None = None) -> PyTorchObs:
        """The observations (a dict of tensors for dict observation spaces)."""
        if isinstance(self.buffer.observations, dict):
            return {key: self.tensor(value, index) for key, value in self.buffer.observations.items()}
        return self.tensor(self.buffer.observations, index)

    def actions(self, index: np.ndarray | None = None) -> th.Tensor:
        """The actions as the policy's ``log_prob`` expects them: ``float32`` (SB3 stores the action space's dtype and
        casts when sampling), ``long`` indices for ``Discrete``."""
        actions = self.tensor(self.buffer.actions.astype(np.float32, copy=False), index)
        return actions.long().flatten() if self.discrete_actions else actions

    def flat(self, array: np.ndarray, index: np.ndarray | None = None) -> th.Tensor:
        """A per-transition scalar field (log-probabilities, returns, …) as a flat ``float32`` tensor."""
        return self.tensor(array, index).float().flatten()

    def per_env(self, array: np.ndarray) -> th.Tensor:
        """A per-transition scalar field as ``(n_envs, n_steps)``, one row per environment's trajectory."""
        return self.flat(array).view(self.n_envs, self.n_steps)

    def lstm_states(self, array: np.ndarray, index: np.ndarray | None = None) -> th.Tensor:
        """A recurrent buffer's LSTM state field as ``(num_layers, B, hidden_size)`` (the layout the LSTM takes).

        sb3-contrib stores these as ``(n_steps, num_layers, n_envs, hidden_size)``; its ``get()`` swaps them to
        ``(n_steps, n_envs, …)`` and flattens them env-major, like every other field.
        """
        if not self.buffer.generator_ready:
            array = self.env_major(array.swapaxes(1, 2))
        # Not self.tensor(): a flat (N, 1, H) field of one env and one layer would pass env_major's shape test again.
        selected = array if index is None else array[index]
        return th.as_tensor(selected, device=self.device).transpose(0, 1).contiguous()

    def recurrent(self, index: np.ndarray | None = None) -> RecurrentStates | None:
        """The LSTM states and episode starts of the transitions ``index`` (``None`` unless the buffer is recurrent)."""
        buffer: Any = self.buffer  # sb3-contrib's RecurrentRolloutBuffer (or its dict variant)
        if not hasattr(buffer, "hidden_states_pi"):
            return None
        return RecurrentStates(
            actor=(self.lstm_states(buffer.hidden_states_pi, index), self.lstm_states(buffer.cell_states_pi, index)),
            critic=(self.lstm_states(buffer.hidden_states_vf, index), self.lstm_states(buffer.cell_states_vf, index)),
            episode_starts=self.flat(buffer.episode_starts, index),
        )

    def batch(self, index: np.ndarray | None = None) -> RolloutBatch:
        """The transitions ``index`` (flat env-major indices; all if ``None``) as a :class:`RolloutBatch`."""
        buffer = self.buffer
        return RolloutBatch(
            observations=self.observations(index),
            actions=self.actions(index),
            old_log_prob=self.flat(buffer.log_probs, index),
            advantages=self.flat(buffer.advantages, index),
            returns=self.flat(buffer.returns, index),
            action_masks=self.tensor(masks, index) if (masks := getattr(buffer, "action_masks", None)) is not None else None,
            recurrent=self.recurrent(index),
        )

    def sample(self, n_samples: int | None, generator: th.Generator, first_step: int = 0) -> RolloutBatch:
        """A uniform subsample (without replacement) of the transitions stored at rollout steps ``≥ first_step``.

        The draw is over the time-major order of those transitions (so a given generator state picks the same
        transitions whatever the buffer's layout); the batch lists them in that order.

        :param n_samples: number of transitions; ``None`` or more than available takes all of them.
        :param generator: source of the subsample indices.
        :param first_step: first rollout step (time index) to draw from, e.g. where a new task started.
        """
        first_step = min(max(int(first_step), 0), self.n_steps - 1)
        available = (self.n_steps - first_step) * self.n_envs
        count = available if n_samples is None else min(int(n_samples), available)
        flat = th.randperm(available, generator=generator)[:count].sort().values.numpy()
        steps, envs = first_step + flat // self.n_envs, flat % self.n_envs
        return self.batch(envs * self.n_steps + steps)
