"""BLPO's view of one rollout: env-major tensors, the differentiable GAE map, and minibatches with their windows.

Built once per update from SB3's rollout buffer through :class:`~sb3_blpo.common.rollout.RolloutReader` (the reader the
callbacks use too), plus what BLPO keeps beyond the buffer: the observation after the last step and the terminal
observations of truncated steps, whose values make the advantages a differentiable function of the critic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs
from stable_baselines3.common.utils import obs_as_tensor

from sb3_blpo.blpo.advantages import DifferentiableGAE, KernelWindow
from sb3_blpo.common.rollout import RolloutReader


def select_observations(observations: PyTorchObs, index: th.Tensor | slice) -> PyTorchObs:
    if isinstance(observations, dict):
        return {key: value[index] for key, value in observations.items()}
    return observations[index]


def _on_rows(mask: th.Tensor | None, evaluate: Callable[[Any], th.Tensor], fill: float) -> th.Tensor:
    """``evaluate(rows)`` (a flat tensor, one entry per row) on the rows of the bool ``mask`` only, ``fill`` (a
    constant) elsewhere; on every row (``evaluate(slice(None))``) when ``mask`` is ``None`` or all true."""
    if mask is None or bool(mask.all()):
        return evaluate(slice(None))
    index = mask.nonzero().squeeze(1)
    selected = evaluate(index)
    return th.full((len(mask),), fill, dtype=selected.dtype, device=selected.device).index_put((index,), selected)


def concatenate_observations(parts: list[PyTorchObs], obs_shape: Any) -> PyTorchObs:
    """Stack observation batches, each reshaped to the buffer's observation shape (Discrete observations come as
    ``(n,)`` from the env but ``(n, 1)`` from the buffer)."""
    if isinstance(parts[0], dict):
        return {
            key: th.cat([part[key].reshape(-1, *obs_shape[key]) for part in parts])  # type: ignore[index]
            for key in parts[0]
        }
    return th.cat([part.reshape(-1, *obs_shape) for part in parts])  # type: ignore[union-attr]


@dataclass
class Minibatch:
    """Rollout entries ``index`` (env-major flat), with their env/step coordinates and episode window."""

    index: th.Tensor
    observations: PyTorchObs
    actions: th.Tensor
    old_log_prob: th.Tensor
    targets: th.Tensor
    rollout_advantages: th.Tensor
    window: KernelWindow
    n_steps: int

    @property
    def env_index(self) -> th.Tensor:
        return self.index // self.n_steps

    @property
    def time_index(self) -> th.Tensor:
        return self.index % self.n_steps

    def __len__(self) -> int:
        return len(self.index)


@dataclass
class BilevelRollout:
    """One rollout, flattened env-major (index ``n * n_steps + t``), as torch tensors on the policy's device.

    ``value_inputs`` stacks every observation the advantages need a value for (the rollout's, the one after its
    last step per env, and the terminal observations of truncated steps) so that one critic pass serves them all.
    """

    observations: PyTorchObs
    actions: th.Tensor
    old_log_prob: th.Tensor
    targets: th.Tensor
    advantages: th.Tensor  # (n_envs, n_steps), fixed GAE of the rollout critic
    value_inputs: PyTorchObs
    old_terminal_values: th.Tensor | None
    gae: DifferentiableGAE
    n_envs: int
    n_steps: int

    @property
    def size(self) -> int:
        return self.n_envs * self.n_steps

    def minibatch(self, index: th.Tensor) -> Minibatch:
        return Minibatch(
            index=index,
            observations=select_observations(self.observations, index),
            actions=self.actions[index],
            old_log_prob=self.old_log_prob[index],
            targets=self.targets[index],
            rollout_advantages=self.advantages.flatten()[index],
            window=self.gae.kernel.window(index // self.n_steps, index % self.n_steps),
            n_steps=self.n_steps,
        )

    def minibatches(self, batch_size: int) -> Iterator[Minibatch]:
        # numpy's global RNG, as SB3's RolloutBuffer.get(), so seeding behaves the same as for PPO.
        order = th.as_tensor(np.random.permutation(self.size), device=self.actions.device)
        for start in range(0, self.size, batch_size):
            yield self.minibatch(order[start : start + batch_size])

    @property
    def n_value_rows(self) -> int:
        """Rows of ``value_inputs``: the rollout's steps, one last observation per env, the terminal observations."""
        n_terminal = 0 if self.old_terminal_values is None else len(self.old_terminal_values)
        return self.size + self.n_envs + n_terminal

    def value_rows(self, reach: th.Tensor) -> th.Tensor:
        """The rows of ``value_inputs`` whose values the TD errors at the steps of ``reach`` ``(n_envs, n_steps)`` read:
        those steps, the last observation of an env whose last step is in ``reach``, and the terminal observations of
        truncated steps in ``reach`` (a step's next value in the same episode is in ``reach`` with it)."""
        rows = [reach.flatten(), reach[:, -1]]
        if self.old_terminal_values is not None:
            truncation = self.gae.truncation_index
            rows.append(reach[truncation[:, 0], truncation[:, 1]])
        return th.cat(rows)

    def critic_values(self, predict_values: Callable[[PyTorchObs], th.Tensor], reach: th.Tensor | None) -> th.Tensor:
        """The critic's values of ``value_inputs`` ``(n_value_rows,)``. With ``reach``, only the rows the TD errors at
        those steps need are evaluated (:meth:`value_rows`); the others are zeros, constants that no minibatch sum
        whose steps lie in ``reach`` reads."""
        return _on_rows(
            None if reach is None else self.value_rows(reach),
            lambda rows: predict_values(select_observations(self.value_inputs, rows)).flatten(),
            fill=0.0,
        )

    def ratios(self, log_prob: Callable[[PyTorchObs, th.Tensor], th.Tensor], reach: th.Tensor | None) -> th.Tensor:
        """``π_θ / π_old`` ``(n_envs, n_steps)`` from ``log_prob(observations, actions)`` (graph to θ). With ``reach``,
        only at those steps; elsewhere 1, a constant (no change from the rollout policy)."""
        ratios = _on_rows(
            None if reach is None else reach.flatten(),
            lambda rows: th.exp(
                log_prob(select_observations(self.observations, rows), self.actions[rows]) - self.old_log_prob[rows]
            ),
            fill=1.0,
        )
        return ratios.view(self.n_envs, self.n_steps)

    def split_values(self, values: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """Critic outputs on ``value_inputs`` → rollout values ``(n_envs, n_steps)``, last values, terminal values."""
        values = values.flatten()
        rollout_values = values[: self.size].view(self.n_envs, self.n_steps)
        last_values = values[self.size : self.size + self.n_envs]
        terminal_values = values[self.size + self.n_envs :] if self.old_terminal_values is not None else None
        return rollout_values, last_values, terminal_values


#: A truncated step: ``(env index, rollout step, terminal observation)``.
TruncatedStep = tuple[int, int, Any]


def _stack_observations(policy: ActorCriticPolicy, observations: Sequence[Any]) -> PyTorchObs:
    if isinstance(observations[0], dict):
        stacked: Any = {key: np.stack([obs[key] for obs in observations]) for key in observations[0]}
    else:
        stacked = np.stack(observations)
    return policy.obs_to_tensor(stacked)[0]


def bilevel_rollout(
    reader: RolloutReader,
    policy: ActorCriticPolicy,
    last_obs: Any,
    last_episode_starts: np.ndarray | None,
    truncated_steps: Sequence[TruncatedStep],
    gamma: float,
    gae_lambda: float,
) -> BilevelRollout:
    """The finished rollout, env-major, with the GAE map and the truncated steps' terminal observations.

    :param reader: the full rollout buffer.
    :param policy: the policy (values of the terminal observations at the rollout critic).
    :param last_obs: the observation after the last step, per env (the algorithm's ``_last_obs``).
    :param last_episode_starts: whether that observation starts a new episode, per env.
    :param truncated_steps: the steps that ended by a time limit, with their terminal observations.
    :param gamma: discount factor.
    :param gae_lambda: GAE λ.
    """
    buffer, device = reader.buffer, reader.device
    observations = reader.observations()
    terminal_observations, old_terminal_values, truncation_index = None, None, None
    if truncated_steps:
        truncation_index = th.as_tensor([(env, step) for env, step, _ in truncated_steps], device=device)
        terminal_observations = _stack_observations(policy, [obs for _, _, obs in truncated_steps])
        with th.no_grad():
            old_terminal_values = policy.predict_values(terminal_observations).flatten()
    last_dones = th.as_tensor(np.asarray(last_episode_starts, dtype=np.float32), device=device)
    gae = DifferentiableGAE(
        reader.per_env(buffer.rewards), reader.per_env(buffer.episode_starts), last_dones, gamma, gae_lambda, truncation_index
    )
    value_inputs = [observations, obs_as_tensor(last_obs, device)]
    if terminal_observations is not None:
        value_inputs.append(terminal_observations)
    return BilevelRollout(
        observations=observations,
        actions=reader.actions(),
        old_log_prob=reader.flat(buffer.log_probs),
        targets=reader.flat(buffer.returns),
        advantages=reader.per_env(buffer.advantages),
        value_inputs=concatenate_observations(value_inputs, buffer.obs_shape),
        old_terminal_values=old_terminal_values,
        gae=gae,
        n_envs=reader.n_envs,
        n_steps=reader.n_steps,
    )


class TruncatedStepRecorder:
    """Mixin for an ``OnPolicyAlgorithm``: records the steps of each rollout that end by a time limit, with their
    terminal observations (``self._truncated_steps``), so that their timeout bootstrap can be made differentiable."""

    _truncated_steps: list[TruncatedStep]
    rollout_buffer: Any

    def collect_rollouts(self, env: Any, callback: Any, rollout_buffer: Any, n_rollout_steps: int) -> bool:
        self._truncated_steps = []
        return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)  # type: ignore[misc]

    def _update_info_buffer(self, infos: list[dict[str, Any]], dones: np.ndarray | None = None) -> None:
        # Called by collect_rollouts right before a step is added to the buffer: remember truncated steps so that
        # their timeout bootstrap (added to the reward by SB3) can be made differentiable in the critic.
        super()._update_info_buffer(infos, dones)  # type: ignore[misc]
        if dones is None:
            return
        for env_index, done in enumerate(dones):
            info = infos[env_index]
            if done and info.get("terminal_observation") is not None and info.get("TimeLimit.truncated", False):
                self._truncated_steps.append((env_index, self.rollout_buffer.pos, info["terminal_observation"]))
